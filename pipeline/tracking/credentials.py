"""MLflow credentials come from the environment; a tracking URI is only ever written down without its password.

MLflow sends ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (else ``~/.mlflow/credentials``) as
basic auth on every request. A password inside ``http(s)://user:password@host`` would work too, but the URI is
copied into checkpoints' config.yaml, job files, params and printed lines. So:

* ``take_credentials`` (when a tracking config is built) moves such a password into those two variables of
  this process, only where MLflow has no value yet: credentials MLflow already has win, as they do inside MLflow
  (its explicit basic auth overrides a URL's userinfo). It returns the URI as it is written everywhere,
  ``http://user:***@host``, and warns once.
* ``client_uri`` is what MLflow is given: the URI without userinfo. A URI read back (``user:***@``) needs the
  password in the environment; without it, the error names the variables.

Only http(s) URIs are handled: a database store URI (``postgresql://user:pw@host/db``) needs its password in the
URI itself, and MLflow's variables do not apply to it.
"""
from __future__ import annotations

import logging
import os
from urllib.parse import SplitResult, unquote

from ..config import ConfigError
from .secrets import REDACTED, scrub_url, split_userinfo, without_userinfo

log = logging.getLogger(__name__)

USERNAME, PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
_warned: set[str] = set()


def _http_userinfo(uri: str) -> SplitResult | None:
    """The split ``uri`` when it is an http(s) URI with a user or password in it, else None."""
    parts = split_userinfo(uri)
    return parts if parts is not None and parts.scheme.lower() in ("http", "https") else None


def _mlflow_credentials() -> tuple[str | None, str | None]:
    """(username, password) MLflow would send now: its variables, else ~/.mlflow/credentials."""
    try:
        from mlflow.utils.credentials import read_mlflow_creds
    except ImportError:  # an MLflow without the credentials file reader
        return os.environ.get(USERNAME) or None, os.environ.get(PASSWORD) or None
    creds = read_mlflow_creds()
    return creds.username or None, creds.password or None


def _set_missing(username: str | None, password: str | None) -> bool:
    """Put the URI's user and password into MLflow's variables where MLflow has none; True when MLflow already
    has other credentials, which it then sends instead of the URI's."""
    have_user, have_password = _mlflow_credentials()
    if username and not have_user:
        os.environ[USERNAME] = username
    if password and not have_password:
        os.environ[PASSWORD] = password
    other_user = bool(username and have_user and have_user != username)
    other_password = bool(password and have_password and have_password != password)
    return other_user or other_password


def take_credentials(uri: str | None, where: str = "tracking.uri") -> str | None:
    """``uri`` as vitpipe writes it down (``http://user:***@host``); a password in it goes to MLflow's variables
    in this process first (see the module's notes on which value wins)."""
    parts = None if uri is None else _http_userinfo(uri)
    if parts is None or parts.password is None or parts.password == REDACTED:
        return uri
    ignored = _set_missing(_decoded(parts.username), unquote(parts.password))
    written = scrub_url(uri)
    _warn_once(written, where, ignored)
    return written


def client_uri(uri: str, where: str = "tracking.uri") -> str:
    """The URI MLflow is given: without userinfo, its user and password taken into the environment. A ``***``
    password (a URI read back from a checkpoint or a job file) needs the real one in the environment."""
    parts = _http_userinfo(uri)
    if parts is None:
        return uri
    user = _decoded(parts.username)
    if parts.password not in (None, REDACTED):
        take_credentials(uri, where)
        return without_userinfo(uri)
    _set_missing(user, None)
    if parts.password == REDACTED and _mlflow_credentials()[1] is None:
        other_user = f"{USERNAME}, if not {user!r}" if user else USERNAME
        raise ConfigError(f"{where} {uri} needs a password, which vitpipe never writes down: set {PASSWORD} (and "
                          f"{other_user}) in the environment, or store them in ~/.mlflow/credentials")
    return without_userinfo(uri)


def _process_rank() -> int:
    """This process's global rank as the launchers set it (torchrun, srun), 0 when launched alone; read from
    the environment, as Lightning's rank_zero_only does, without importing Lightning."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _decoded(text: str | None) -> str | None:
    return None if text is None else unquote(text)


def _warn_once(written: str, where: str, ignored: bool) -> None:
    if written in _warned:
        return
    _warned.add(written)
    if _process_rank() != 0:  # every process of a run reads the same URI; one warning is enough
        return
    used = (f"The credentials MLflow already has ({USERNAME} / {PASSWORD} or ~/.mlflow/credentials) are used "
            "instead, as MLflow itself does" if ignored else f"This process uses it as {USERNAME} / {PASSWORD}")
    log.warning("%s %s contains a password. %s. vitpipe writes the URI only as shown (checkpoints, MLflow, job "
                "files, logs), so every later command or job needs the password in its environment: pass "
                "credentials as %s and %s (on Kubernetes: keys of the cluster profile's Secret) and leave them out "
                "of the URI.", where, written, used, USERNAME, PASSWORD)
