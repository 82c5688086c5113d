"""MLflow logging that never stops training: a client wrapper that counts, warns and backs off on failure.

A tracking server that goes away mid-run must cost the run its metrics for a while, not the run itself.
``ResilientClient`` wraps an ``mlflow.MlflowClient``; its logging calls (``LOGGING_CALLS``) never raise:

* a call that fails is counted in ``failed_calls`` and returns None; the first failure is logged as a
  warning with the error and the tracking URI, later ones at most every ``warn_every_s`` with the counts;
* a failure that looks like the server being unreachable (anything but a request the server answered and
  rejected, i.e. an MLflow 4xx) opens a circuit breaker: for ``cooldown_s`` further logging calls are
  dropped without a network attempt and counted in ``dropped_calls``, so a dead server costs one attempt
  per cool-down, not one per step; the first call after the cool-down tries again;
* every other attribute (run and experiment creation, reads) passes through unchanged and still raises:
  before training starts, failing fast is right.

MLflow's own HTTP retry policy would still stall the attempts themselves: ``mlflow.utils.rest_utils.
http_request`` reads ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (default 7, exponential back-off with factor 2,
about 4 minutes against a dead server), ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (120 s) and
``MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER`` from the environment on every request; the ``requests`` session
is cached per retry setting (``request_utils._cached_get_request_session``), so a changed value takes effect
on the next request. Logging calls therefore run under ``TRAINING_HTTP_DEFAULTS`` for the variables the
user has not set; variables set in the environment are left alone.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from .secrets import scrub_text, scrub_url

log = logging.getLogger(__name__)

LOGGING_CALLS = frozenset({
    "log_metric", "log_param", "log_batch", "log_inputs", "log_outputs", "set_tag", "delete_tag",
    "update_run", "set_terminated", "log_artifact", "log_artifacts", "log_text", "log_dict", "log_stream",
    "log_figure", "log_image", "log_table",
})
"""MlflowClient methods that record run data during training; only these are guarded."""

TRAINING_HTTP_DEFAULTS: Mapping[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",  # one immediate retry (urllib3 sleeps only before the 2nd)
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",  # seconds per connect / read, not for a whole upload
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",  # a 503 with Retry-After: 600 must not stall a step
}
"""MLflow HTTP settings for logging calls during training, applied only where the environment has none."""

_ENV_LOCK = threading.RLock()


@contextmanager
def http_defaults(defaults: Mapping[str, str]) -> Iterator[None]:
    """Set the ``defaults`` the environment lacks for the duration of the block, then remove them again.

    The environment is process-wide: the lock serialises the guarded calls, and other threads that make
    MLflow requests meanwhile see the same short policy."""
    with _ENV_LOCK:
        added = [name for name in defaults if name not in os.environ]
        for name in added:
            os.environ[name] = defaults[name]
        try:
            yield
        finally:
            for name in added:
                os.environ.pop(name, None)


def _server_rejected(err: Exception) -> bool:
    """True when the server answered and refused this one request (an MLflow 4xx): it is alive."""
    status = getattr(err, "get_http_status_code", None)
    try:
        return status is not None and 400 <= int(status()) < 500
    except Exception:  # noqa: BLE001 - an odd exception type is treated as "unreachable"
        return False


class ResilientClient:
    """An ``MlflowClient`` whose logging calls count, warn and back off instead of raising."""

    def __init__(self, client: Any, cooldown_s: float = 30.0, warn_every_s: float = 60.0,
                 http: Mapping[str, str] = TRAINING_HTTP_DEFAULTS, clock: Callable[[], float] = time.monotonic):
        self._client = client
        self.cooldown_s = cooldown_s
        """After an unreachable-looking failure, drop logging calls for this long without trying."""
        self.warn_every_s = warn_every_s
        """Repeat the warning (with the counts) at most this often while failures go on."""
        self._http = dict(http)
        self._clock = clock
        self._lock = threading.Lock()
        self.failed_calls = 0
        """Logging calls that were attempted and raised."""
        self.dropped_calls = 0
        """Logging calls skipped during a cool-down, without a network attempt."""
        self.last_error: Exception | None = None
        self._retry_at: float | None = None  # breaker open until then; None: closed
        self._last_warning: float | None = None
        self._succeeded_since_failure = True
        self._lost_at_last_report = 0

    @property
    def wrapped(self) -> Any:
        return self._client

    @property
    def failures(self) -> int:
        """Logging calls whose data did not reach the tracking store (failed + dropped)."""
        return self.failed_calls + self.dropped_calls

    def summary(self) -> str:
        uri = self._uri()
        if not self.failures:
            return f"tracking: all logging calls to {uri} succeeded"
        return (f"tracking: {self.failures} logging calls failed ({self.failed_calls} raised, "
                f"{self.dropped_calls} dropped during cool-downs) at {uri}; last error: {_short(self.last_error)}")

    def __getattr__(self, name: str) -> Any:
        client = self.__dict__.get("_client")
        if client is None:  # during unpickling, before __setstate__
            raise AttributeError(name)
        attr = getattr(client, name)
        if name not in LOGGING_CALLS:
            return attr

        @functools.wraps(attr)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            return self._call(name, attr, args, kwargs)

        return guarded

    def _call(self, name: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        with self._lock:
            if self._retry_at is not None and self._clock() < self._retry_at:
                self.dropped_calls += 1
                self._warn_again()
                return None
        try:
            with http_defaults(self._http):
                result = fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - no logging failure may end a training run
            self._failed(name, err)
            return None
        with self._lock:
            self._succeeded_since_failure = True
            if self._retry_at is not None:
                self._retry_at = None
                log.warning("MLflow logging to %s works again; %d logging calls lost so far", self._uri(),
                            self.failures)
        return result

    def _failed(self, name: str, err: Exception) -> None:
        with self._lock:
            now = self._clock()
            new_episode = self._succeeded_since_failure
            self.failed_calls += 1
            self.last_error = err
            self._succeeded_since_failure = False
            rejected = _server_rejected(err)
            self._retry_at = None if rejected else now + self.cooldown_s  # a rejection means "reachable"
            if self._last_warning is None or (new_episode and now - self._last_warning >= self.warn_every_s):
                self._last_warning, self._lost_at_last_report = now, self.failures
                then = ("the server rejected it" if rejected else
                        f"logging calls in the next {self.cooldown_s:g} s are dropped, then retried")
                log.warning("MLflow %s to %s failed (%s); %s. Training goes on; failed logging calls are "
                            "counted and reported at the end.", name, self._uri(), _short(err), then)
            else:
                self._warn_again()

    def _warn_again(self) -> None:
        """The rate-limited repeat warning; call with the lock held."""
        now = self._clock()
        if self._last_warning is not None and now - self._last_warning < self.warn_every_s:
            return
        if self.failures == self._lost_at_last_report:
            return
        self._last_warning, self._lost_at_last_report = now, self.failures
        log.warning("MLflow logging to %s still failing: %d logging calls lost (%d raised, %d dropped); "
                    "last error: %s", self._uri(), self.failures, self.failed_calls, self.dropped_calls,
                    _short(self.last_error))

    def _uri(self) -> str:
        return scrub_url(str(getattr(self._client, "tracking_uri", "?")))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ResilientClient({self._client!r}, failed={self.failed_calls}, dropped={self.dropped_calls})"


def _short(err: BaseException | None, limit: int = 300) -> str:
    """One line, no password of a URL inside (MLflow's messages quote the request URL), at most ``limit``."""
    text = "none" if err is None else f"{type(err).__name__}: {err}"
    text = scrub_text(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."
