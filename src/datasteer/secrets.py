"""The one place where credentials are scrubbed: URLs, free text (logs, errors, command lines) and whole JSON
objects (manifests, rows).

What counts as a credential:
- the user-info part of a URL (`http://user:KEY@host`),
- the value of a query parameter or `name=value` pair whose name says it is one (key, api_key, token,
  access_token, secret, password, sig, ...),
- the value of every environment variable known to hold a key: the ones datasteer reads itself
  (`PERSPECTIVE_API_KEY`, `OPENAI_API_KEY`, `HF_TOKEN`, ...) and every variable a config names in an
  `api_key_env` field (`register_key_env`, called when a run is prepared and when a client loads its key).

Ground floor: imports nothing of datasteer (it may use `errors` only, and needs nothing from it today).
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

MASK = "***"
# names (of query parameters, flags, key=value pairs) whose values are credentials
SECRET_NAMES = frozenset({"key", "api_key", "apikey", "api-key", "token", "access_token", "auth", "auth_token",
                          "secret", "client_secret", "password", "passwd", "pwd", "sig", "signature", "x-api-key",
                          "refresh_token", "id_token", "session", "credential", "credentials"})
# keys of a JSON object whose (text) value is masked whole
_SECRET_FIELDS = frozenset({"api_key", "apikey", "access_token", "auth_token", "secret", "client_secret", "password",
                            "refresh_token"})
_KEY_ENVS: set[str] = {"PERSPECTIVE_API_KEY", "OPENAI_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                       "ANTHROPIC_API_KEY"}
_MIN_KEY_LENGTH = 6  # shorter values would mask ordinary words

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
_NAMES = "|".join(sorted((re.escape(n) for n in SECRET_NAMES), key=len, reverse=True))
# name=value and "name": "value" in free text (also --api-key=VALUE)
_PAIR = re.compile(rf"(?i)(?<![A-Za-z0-9_])((?:{_NAMES})(?:=|\"\s*:\s*\"))([^\s\"'&,;)}}\]]+)")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
# an all-capitals word is a placeholder in help and error text (`--set KEY=VALUE`), not a credential
_PLACEHOLDER = re.compile(r"[A-Z][A-Z_]{0,15}")


def _mask_pair(match: re.Match[str]) -> str:
    return match.group(0) if _PLACEHOLDER.fullmatch(match.group(2)) else match.group(1) + MASK


def register_key_env(name: str | None) -> None:
    """Remember that environment variable `name` holds a key, so that its value is masked everywhere."""
    if name:
        _KEY_ENVS.add(name)


def register_config(config: Any) -> None:
    """Register every `api_key_env` named anywhere in a config (a dict as dumped by pydantic)."""
    if isinstance(config, dict):
        for key, value in config.items():
            if key == "api_key_env" and isinstance(value, str):
                register_key_env(value)
            else:
                register_config(value)
    elif isinstance(config, (list, tuple)):
        for item in config:
            register_config(item)


def known_keys() -> list[str]:
    """The values of the key-holding environment variables that are set (longest first)."""
    values = {os.environ.get(name) or "" for name in _KEY_ENVS}
    return sorted((v for v in values if len(v) >= _MIN_KEY_LENGTH), key=len, reverse=True)


def redact_url(url: str | None) -> str | None:
    """`url` without user-info and with credential query parameters masked; None stays None."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return _mask_keys(_PAIR.sub(_mask_pair, url))
    netloc = parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(name.lower() in SECRET_NAMES for name, _ in pairs):
            query = "&".join(f"{quote(name, safe='')}=" + (MASK if name.lower() in SECRET_NAMES
                                                          else quote(value, safe="/:,"))
                             for name, value in pairs)
    fragment = _PAIR.sub(_mask_pair, parts.fragment) if parts.fragment else parts.fragment
    return _mask_keys(urlunsplit((parts.scheme, netloc, parts.path, query, fragment)))


def _mask_keys(text: str) -> str:
    for value in known_keys():
        text = text.replace(value, MASK)
    return text


def _redact_url_match(match: re.Match[str]) -> str:
    url = match.group(0)
    core = url.rstrip(".,:;)]}!?")  # sentence punctuation after a URL is not part of it
    return (redact_url(core) or "") + url[len(core):]


def redact_text(text: str) -> str:
    """Free text (a log line, an error message, a command-line argument) with every credential masked."""
    if not text:
        return text
    text = _URL.sub(_redact_url_match, text)
    text = _PAIR.sub(_mask_pair, text)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    return _mask_keys(text)


def redact(obj: Any) -> Any:
    """A JSON-like object (manifest, row) with every string passed through `redact_text`; a value under a
    credential-named key is masked whole. Returns a new object; the input is left as it is."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: (MASK if isinstance(k, str) and k.lower() in _SECRET_FIELDS and isinstance(v, str) and v
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v) for v in obj)
    return obj


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with credentials masked, including the value after a credential-named flag."""
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next and not arg.startswith("-"):
            out.append(MASK)
            mask_next = False
            continue
        mask_next = False
        if arg.startswith("--") and "=" not in arg and arg[2:].lower().replace("-", "_") in SECRET_NAMES:
            mask_next = True
        out.append(redact_text(arg))
    return out
