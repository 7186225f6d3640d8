"""Any OpenAI-compatible chat-completions endpoint: a remote provider, a vLLM or llama.cpp server,
`transformers serve`.

`concurrency` requests stay in flight for the whole run, not batch by batch: `generate_units` takes all of a
teacher's pending units at once and `concurrency` workers take requests from them in plan order, so the
endpoint never idles while a batch waits for its slowest answer; each unit is handed back (and written as its
shard by `generate`) the moment its last answer arrives. One event loop on a background thread holds one HTTP
client for the teacher's life, so connections are reused from request to request (and shard writes on the main
thread never stall the requests). The connection pool is a free list: httpx's own pool scans every connection for
every request waiting, which at 128 in flight spent most of the client's CPU (see docs/openai.md).

Requests retry with exponential backoff on 429, 5xx, timeouts and dropped connections; a server's Retry-After
pauses every request of the teacher (`datasteer.generation.pacing`), and `rpm`/`tpm` pace requests under a
provider's limits instead of running into them. Each request carries a seed derived from the unit seed, the
prompt id and the sample index, so servers that honour `seed` give reproducible samples, and its `usage` (prompt
and completion tokens) lands in the row. The API key comes from the environment variable named by `api_key_env`
and lives only in the request header (`datasteer.generation.remote`).

Each retry is one warning line (logger `datasteer.generation.openai`; the CLI prints it on stderr) with the
attempt count and the reason, so a server that never answers is visible. An answer whose `content` is null
becomes an empty completion with finish_reason "empty", counted in the generate summary's `finish_reasons`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from pydantic import Field

from datasteer.errors import TeacherRequestError, optional_import
from datasteer.generation.base import Completion
from datasteer.generation.pacing import Pacer, estimate_tokens
from datasteer.generation.remote import (
    EMPTY,
    RETRY_STATUS,
    RemoteTeacherBase,
    auth_headers,
    chat_payload,
    describe,
    endpoint,
    parse_completion,
    request_seed,
)
from datasteer.io import Prompt
from datasteer.retry import retry_after, retry_delay, server_message
from datasteer.secrets import redact_text

log = logging.getLogger("datasteer.generation.openai")
HTTPX_INSTALL = "pip install 'datasteer[openai]'"
KEEPALIVE_S = 5.0  # an idle connection older than this is closed rather than reused (servers drop them too)

__all__ = ["EMPTY", "OpenAITeacher", "OpenAITeacherConfig"]


class OpenAITeacherConfig(RemoteTeacherBase):
    """Any OpenAI-compatible chat-completions endpoint (a provider, a vLLM or llama.cpp server, `transformers
    serve`). Requests in flight, limits, timeouts, retries and prices are operational: they may change when a run
    resumes."""

    backend: Literal["openai"]
    concurrency: int = Field(8, ge=1, description="requests in flight, kept up across batches for the whole run")
    rpm: float | None = Field(None, gt=0, description="requests per minute at most (paced, not refused); None: no "
                              "limit")
    tpm: float | None = Field(None, gt=0, description="tokens per minute at most (prompt + completion, paced; "
                              "estimated before a request, settled with its usage); None: no limit")

    def build(self) -> OpenAITeacher:
        return OpenAITeacher(self)


# ---------------------------------------------------------------- transport: a connection pool that scales

class _Released:
    """A response body that gives its connection back to the free list once read (or closed)."""

    def __init__(self, stream: Any, pool: _FreeListPool, key: Any, connection: Any):
        self._stream, self._pool, self._key, self._connection = stream, pool, key, connection

    async def __aiter__(self) -> Any:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            if hasattr(self._stream, "aclose"):
                await self._stream.aclose()
        finally:
            self._pool.release(self._key, self._connection)


class _FreeListPool:
    """What httpx's transport calls to send a request (`handle_async_request`, `aclose`), over idle connections
    kept in a list per origin: taking one and giving it back is O(1). httpcore's pool re-assigns every waiting
    request to every connection on each event, quadratic in the requests in flight. The number of connections is
    bounded by the teacher's workers (one request each at a time)."""

    def __init__(self, httpcore: Any, ssl_context: Any):
        self._httpcore = httpcore
        self._ssl_context = ssl_context
        self._idle: dict[Any, list[Any]] = {}
        self._closing: list[Any] = []

    async def handle_async_request(self, request: Any) -> Any:
        origin = request.url.origin
        key = (origin.scheme, origin.host, origin.port)
        idle = self._idle.setdefault(key, [])
        connection = None
        while idle:
            candidate = idle.pop()
            if candidate.is_idle() and not candidate.has_expired():
                connection = candidate
                break
            await candidate.aclose()
        if connection is None:
            connection = self._httpcore.AsyncHTTPConnection(origin=origin, ssl_context=self._ssl_context,
                                                            keepalive_expiry=KEEPALIVE_S)
        try:
            response = await connection.handle_async_request(request)
        except BaseException:
            await connection.aclose()
            raise
        return self._httpcore.Response(status=response.status, headers=response.headers,
                                       content=_Released(response.stream, self, key, connection),
                                       extensions=response.extensions)

    def release(self, key: Any, connection: Any) -> None:
        if connection.is_idle() and not connection.is_closed():
            self._idle.setdefault(key, []).append(connection)
        else:
            self._closing.append(connection)

    async def aclose(self) -> None:
        for connection in [c for idle in self._idle.values() for c in idle] + self._closing:
            await connection.aclose()
        self._idle, self._closing = {}, []


def _transport(httpx: Any) -> Any:
    """httpx's own transport (TLS settings, proxies from the environment, exceptions mapped to httpx's) sending
    through the free-list pool; httpx's pool where its internals are not the ones this was written against."""
    transport = httpx.AsyncHTTPTransport()
    pool = getattr(transport, "_pool", None)
    ssl_context = getattr(pool, "_ssl_context", None)
    if pool is None or ssl_context is None or not hasattr(pool, "handle_async_request"):
        return transport
    import httpcore

    transport._pool = _FreeListPool(httpcore, ssl_context)
    return transport


# ---------------------------------------------------------------- one event loop for the teacher's life

class _LoopThread:
    """An asyncio event loop on a daemon thread: the teacher's client, connections and pacer live there."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Any) -> Any:
        """Run `coro` on the loop and wait for it; an interruption here (Ctrl-C) cancels it there."""
        task = asyncio.run_coroutine_threadsafe(_spawn(coro), self.loop).result()
        try:
            return asyncio.run_coroutine_threadsafe(_wait(task), self.loop).result()
        except BaseException:
            self.cancel(task)
            raise

    def start(self, coro: Any) -> asyncio.Task[Any]:
        return asyncio.run_coroutine_threadsafe(_spawn(coro), self.loop).result()

    def cancel(self, task: asyncio.Task[Any]) -> None:
        """Cancel a task on the loop and wait until it has unwound (its requests closed)."""
        if not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(_cancel(task), self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _spawn(coro: Any) -> asyncio.Task[Any]:
    return asyncio.ensure_future(coro)


async def _wait(task: asyncio.Task[Any]) -> Any:
    return await asyncio.shield(task)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - its result no longer matters
        pass


# ---------------------------------------------------------------- the teacher

class OpenAITeacher:
    """`generate_units` keeps `concurrency` requests in flight over many units; `generate` is one unit."""

    def __init__(self, config: OpenAITeacherConfig, *, transport: Any = None, sleep: Any = asyncio.sleep,
                 clock: Any = time.monotonic):
        self.config = config
        optional_import("httpx", "the openai backend", HTTPX_INSTALL)  # a missing extra fails when built
        self._transport = transport  # tests inject httpx.MockTransport for failure injection
        self._sleep = sleep
        self._clock = clock
        self._headers: dict[str, str] | None = None
        self._loop: _LoopThread | None = None
        self._client: Any = None
        self._pacer: Pacer | None = None
        self.where = describe(config)
        self.url = endpoint(config.base_url, "chat/completions")

    def load(self) -> None:
        if self._loop is not None:
            return
        self._headers = {"Content-Type": "application/json", **auth_headers(self.config)}
        self._pacer = Pacer(self.config.rpm, self.config.tpm, clock=self._clock, sleep=self._sleep)
        self._loop = _LoopThread(f"datasteer-{self.config.name}")
        self._client = self._loop.run(self._open_client())

    async def _open_client(self) -> Any:
        import httpx

        return httpx.AsyncClient(timeout=httpx.Timeout(self.config.timeout_s), headers=self._headers,
                                 transport=self._transport or _transport(httpx))

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            try:
                loop.run(self._client.aclose())
            finally:
                loop.close()
        self._client = self._headers = self._pacer = None

    def __getstate__(self) -> dict[str, Any]:  # a built teacher travels (Ray, the judge metric); a loop does not
        return {**self.__dict__, "_loop": None, "_client": None, "_pacer": None, "_headers": None}

    def _payload(self, prompt: Prompt, seed: int) -> dict[str, Any]:
        return chat_payload(self.config, prompt, seed)

    def generate(self, prompts: list[Prompt], *, seed: int) -> list[list[Completion]]:
        for _, completions in self.generate_units([(prompts, seed)]):
            return completions
        return []

    def generate_units(self, tasks: Sequence[tuple[list[Prompt], int]], state: Any = None
                       ) -> Iterator[tuple[int, list[list[Completion]]]]:
        """(position, completions) for every task (a unit's prompts and seed), as each unit's last answer arrives
        (not in plan order). Requests go out in plan order, `concurrency` at a time across units. A request that
        keeps failing stops the rest (units finished before it are handed back first) and raises."""
        self.load()
        assert self._loop is not None
        results: queue.Queue[Any] = queue.Queue()
        task = self._loop.start(self._pump(tasks, results.put))
        try:
            for _ in range(len(tasks)):
                item = results.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._loop.cancel(task)  # a consumer that stops early (an error writing a shard, Ctrl-C) stops the rest

    async def _pump(self, tasks: Sequence[tuple[list[Prompt], int]], emit: Any) -> None:
        k = self.config.k
        answers: list[Any] = [[[None] * k for _ in prompts] for prompts, _ in tasks]
        left = [len(prompts) * k for prompts, _ in tasks]
        for position, count in enumerate(left):
            if count == 0:
                emit((position, []))
        requests = ((t, i, j) for t, (prompts, _) in enumerate(tasks) for i in range(len(prompts)) for j in range(k))

        async def worker() -> None:
            for t, i, j in requests:  # one generator shared by every worker: each takes the next request in order
                prompts, unit_seed = tasks[t]
                seed = request_seed(unit_seed, prompts[i], j)
                answers[t][i][j] = await self._request(self._payload(prompts[i], seed), seed)
                left[t] -= 1
                if left[t] == 0:
                    emit((t, answers[t]))
                    answers[t] = None

        total = sum(left)
        workers = [asyncio.ensure_future(worker()) for _ in range(min(self.config.concurrency, total))]
        try:
            if workers:
                done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
                for w in done:
                    if not w.cancelled() and w.exception() is not None:
                        raise w.exception()  # type: ignore[misc]
                await asyncio.gather(*workers)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            emit(err)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _request(self, payload: dict[str, Any], seed: int) -> Completion:
        import httpx

        assert self._pacer is not None and self._client is not None
        pacer = self._pacer
        estimate = estimate_tokens(payload)
        last = ""
        for attempt in range(self.config.max_retries + 1):
            response = None
            await pacer.acquire(estimate)
            try:
                response = await self._client.post(self.url, json=payload)
            except httpx.TimeoutException as err:
                last = f"{type(err).__name__} after {self.config.timeout_s:g}s"
            except httpx.TransportError as err:
                last = f"{type(err).__name__}"
            else:
                if response.status_code == 200:
                    completion = parse_completion(_json(response), self.where, seed)
                    used = completion.prompt_tokens + completion.completion_tokens
                    pacer.settle(estimate, used if used else None)
                    return completion
                last = f"HTTP {response.status_code}: {server_message(response)}"
                if response.status_code not in RETRY_STATUS:
                    raise TeacherRequestError(f"{self.where} refused the request ({last}); check the model name, "
                                              "key and parameters")
            pacer.settle(estimate, 0)  # a failed request produced no tokens
            if attempt < self.config.max_retries:
                delay = retry_delay(attempt, response)
                if retry_after(response) is not None:
                    pacer.pause(delay)  # the server asked this client, not just this request, to wait
                log.warning(redact_text(f"{self.where}: {last}; retry {attempt + 1} of {self.config.max_retries} "
                                        f"in {delay:.1f}s"))
                await self._sleep(delay)
        raise TeacherRequestError(f"{self.where} kept failing after {self.config.max_retries} retries ({last}); "
                                  "finished units are saved: rerun the same command to resume")


def _json(response: Any) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
