"""Pacing requests under a provider's limits: requests per minute (`rpm`), tokens per minute (`tpm`), and the
pause a server asks for with Retry-After.

Each limit is a token bucket that refills at limit/60 per second and holds at most one second's worth (so the
pace is even: a provider that enforces its per-minute limit per second never sees a burst of a whole minute). A
request takes 1 from the request bucket and its estimated tokens from the token bucket, waiting while a bucket
is empty; a request larger than the bucket waits for a full bucket and leaves it in debt, so that the average
stays at the limit. The estimate (prompt characters / 4 + max_tokens, what a request may cost at most) is
settled against the response's `usage` once it arrives: unused tokens go back, so over a run the tokens the
server reports per minute approach `tpm` without exceeding it. A failed request gives its tokens back (it
produced none) but keeps its place in the request count, as providers count it.

Retry-After (on a 429 or 503) pauses every request of the teacher, not only the one that was refused: the
server asked the client, not the request, to wait.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Awaitable, Callable

Clock = Callable[[], float]
RECHECK_S = 0.05  # a waiting request looks again this often: answers settle their tokens while it waits
Sleep = Callable[[float], Awaitable[Any]]


class TokenBucket:
    """`per_minute` units a minute, at most `burst_s` seconds' worth at once (never less than one unit)."""

    def __init__(self, per_minute: float, clock: Clock, burst_s: float = 1.0):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self._clock = clock
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait_for(self, cost: float) -> float:
        """Seconds until `cost` may be taken (0: now)."""
        self._refill()
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, cost: float) -> None:
        self._refill()
        self.level -= cost

    def give_back(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class Pacer:
    """The limits of one teacher, shared by all its requests (on one event loop). Requests are admitted in the
    order they ask, so a large request is not overtaken forever by small ones."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None, *, clock: Clock = time.monotonic,
                 sleep: Sleep = asyncio.sleep):
        self.requests = TokenBucket(rpm, clock) if rpm else None
        self.tokens = TokenBucket(tpm, clock) if tpm else None
        self._clock = clock
        self._sleep = sleep
        self._paused_until = -math.inf
        self._lock: asyncio.Lock | None = None
        self.waited_s = 0.0  # time requests spent waiting for the limits (all of them, summed)

    async def acquire(self, tokens: float) -> None:
        """Wait until a request of about `tokens` tokens may go, then count it."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            while True:
                wait = self._paused_until - self._clock()
                for bucket, cost in ((self.requests, 1.0), (self.tokens, tokens)):
                    if bucket is not None:
                        wait = max(wait, bucket.wait_for(cost))
                if wait <= 0:
                    break
                wait = min(wait, RECHECK_S)  # tokens settled meanwhile may let the request go sooner
                self.waited_s += wait
                await self._sleep(wait)
            if self.requests is not None:
                self.requests.take(1.0)
            if self.tokens is not None:
                self.tokens.take(tokens)

    def settle(self, estimated: float, used: float | None) -> None:
        """A request estimated at `estimated` tokens used `used` (None: unknown, the estimate stands)."""
        if self.tokens is not None and used is not None and used < estimated:
            self.tokens.give_back(estimated - used)
        elif self.tokens is not None and used is not None and used > estimated:
            self.tokens.take(used - estimated)

    def pause(self, seconds: float) -> None:
        """Retry-After: no request of this teacher goes out for `seconds`."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)


def estimate_tokens(payload: dict[str, Any]) -> float:
    """What a chat request may cost at most: its messages' characters / 4 (the usual rule of thumb for English
    with BPE tokenizers) plus the max_tokens it allows."""
    chars = sum(len(str(m.get("content") or "")) for m in payload.get("messages", []))
    return math.ceil(chars / 4) + int(payload.get("max_tokens") or 0)
