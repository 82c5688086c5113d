"""Keep secrets out of MLflow: recipe values under secret-looking keys, and passwords inside URLs.

Recipes should reference secrets through the environment (``${AWS_SECRET_ACCESS_KEY}``); whatever a recipe
holds, what reaches a param, tag or artifact goes through ``scrub`` first.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

REDACTED = "***"
SECRET_WORDS = {"secret", "password", "passwd", "pwd", "token", "credential", "credentials", "auth"}
SECRET_PHRASES = ("api_key", "apikey", "access_key", "private_key", "session_key")
ENV_REFERENCE = re.compile(r"^\$\{?[A-Za-z_][A-Za-z0-9_]*\}?$")


def is_secret_key(key: str) -> bool:
    """``aws_secret_access_key``, ``password``, ``auth_token``: yes; ``encoder_mask_tokens``: no (whole words)."""
    k = key.lower().replace("-", "_").replace(".", "_")
    return bool(SECRET_WORDS & set(k.split("_"))) or any(p in k for p in SECRET_PHRASES)


def scrub(value: Any, key: str = "") -> Any:
    """A copy of ``value`` (nested mappings / lists) with secret-keyed values and URL passwords redacted.
    References to environment variables are kept: they name a secret without revealing it."""
    if isinstance(value, dict):
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, key) for v in value]
    if isinstance(value, str):
        if is_secret_key(key) and not ENV_REFERENCE.match(value):
            return REDACTED
        return scrub_url(value)
    if is_secret_key(key) and value is not None and not isinstance(value, bool):
        return REDACTED
    return value


def split_userinfo(text: str) -> SplitResult | None:
    """The parts of ``text`` when it is a URL with a user or a password in it, else None."""
    if "://" not in text or "@" not in text:
        return None
    try:
        parts = urlsplit(text)
    except ValueError:
        return None
    return None if parts.username is None and parts.password is None else parts


def scrub_url(text: str) -> str:
    """``https://user:pw@host/x`` -> ``https://user:***@host/x``; anything that is not such a URL is kept."""
    parts = split_userinfo(text)
    if parts is None or parts.password is None:
        return text
    userinfo, _, host = parts.netloc.rpartition("@")  # the host as written (case, IPv6 brackets, port)
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:{REDACTED}@{host}"))


def without_userinfo(text: str) -> str:
    """``https://user:pw@host/x`` (or ``user:***@``, or ``user@``) -> ``https://host/x``; other text is kept."""
    parts = split_userinfo(text)
    return text if parts is None else urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^@\s/]+@")


def scrub_text(text: str) -> str:
    """Free text (an error message quoting a request URL, say) with every URL password redacted."""
    return URL_PASSWORD.sub(rf"\1{REDACTED}@", text)

