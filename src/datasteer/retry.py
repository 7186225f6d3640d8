"""What the HTTP clients (OpenAI-compatible teachers, the Perspective API) share about failed requests.

Each client keeps its own set of retryable status codes; how long to wait is the same for all: the server's
Retry-After when it sends one, else exponential backoff with jitter. `server_message` is a failed response's
error text, short and with credentials masked.
"""

from __future__ import annotations

import random
from typing import Any

from datasteer.secrets import redact_text

BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0


def retry_after(response: Any) -> float | None:
    """The server's Retry-After in seconds (clamped to [0, BACKOFF_MAX_S]), or None."""
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return min(BACKOFF_MAX_S, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def retry_delay(attempt: int, response: Any = None) -> float:
    """Seconds to wait before retry number `attempt + 1`: Retry-After if given, else jittered backoff."""
    server = retry_after(response)
    if server is not None:
        return server
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** attempt) * (0.5 + random.random() / 2)


def server_message(response: Any, limit: int = 200) -> str:
    """The server's error message (`error.message` of a JSON body, else the body), on one line, at most `limit`
    characters, credentials masked (a key may travel in the URL or be echoed by the server)."""
    try:
        body = response.json()
        message = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(message, dict):
            message = message.get("message", message)
        text = str(message)
    except ValueError:
        text = response.text or ""
    return redact_text(" ".join(redact_text(text).split())[:limit])
