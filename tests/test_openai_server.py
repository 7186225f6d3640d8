"""A loopback stand-in for the OpenAI API, and tests that it speaks the protocol the official `openai` SDK speaks.

`StubOpenAI` serves, on 127.0.0.1 with the standard library only (HTTP/1.1 with keep-alive on an asyncio event
loop in a thread, so that 128 requests waiting out their delay cost no threads):

- POST /v1/chat/completions: a deterministic answer (a function of the messages and the request's seed) after
  `delay` seconds, with `usage`; `hook(body)` may answer instead (a 429 with Retry-After, a 500, ...);
- POST /v1/files (multipart, purpose=batch), GET /v1/files/{id}/content;
- POST /v1/batches, GET /v1/batches (list), GET /v1/batches/{id}, POST /v1/batches/{id}/cancel: a batch moves
  validating -> in_progress -> completed as it is polled (`batch_polls` polls), answering each request line as
  the chat endpoint would (errors, from `hook`, go to the error file).

It records what the tests measure: requests in flight (`peak`, and the in-flight count at each arrival), arrival
times, chat requests by (prompt, seed), uploads and batch creations. The benchmark (`benchmarks/openai_backend.py`)
runs it in a subprocess: `python -m tests.test_openai_server --delay 0.2` prints its port.
"""

from __future__ import annotations

import argparse
import asyncio
import email.parser
import email.policy
import json
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from typing import Any, Callable

import pytest


def answer_text(body: dict[str, Any]) -> str:
    """What the stub 'model' writes: a function of the last user message and the request's seed."""
    user = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"]
    return f"answer to {user[-1] if user else ''!r} with seed {body.get('seed')}"


def usage_of(body: dict[str, Any], text: str) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", ""))) for m in body.get("messages", [])) // 4 + 3
    completion = min(int(body.get("max_tokens") or 16), len(text.split()))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(body: dict[str, Any], usage: bool = True) -> dict[str, Any]:
    text = answer_text(body)
    out: dict[str, Any] = {
        "id": f"chatcmpl-{body.get('seed')}", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model", "m"),
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
    }
    if usage:
        out["usage"] = usage_of(body, text)
    return out


Reply = tuple[int, dict[str, str], Any]  # status, headers, JSON body


class StubOpenAI:
    def __init__(self, delay: float = 0.0, hook: Callable[[dict[str, Any]], Reply | None] | None = None,
                 batch_polls: int = 2, usage: bool = True, port: int = 0):
        self.delay = delay
        self.hook = hook
        self.batch_polls = batch_polls
        self.usage = usage
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.arrivals: list[tuple[float, int]] = []  # (time, requests in flight including this one)
        self.spans: list[tuple[float, float]] = []  # (arrival, answer) of every chat request
        self.chat: list[tuple[str, int]] = []  # (last user message, seed) of every chat request answered
        self.files: dict[str, bytes] = {}
        self.uploads = 0
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_creations = 0
        self.polls = 0
        self.keys: list[str | None] = []  # Authorization headers seen
        self.loop = asyncio.new_event_loop()
        self._connections: set[Any] = set()
        self._server = self.loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", port, backlog=1024))  # 128 clients at once
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    # -- HTTP/1.1 on asyncio streams: keep-alive, Content-Length bodies, one write per response
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            while True:
                line = await reader.readline()
                if not line.strip():
                    break
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    header = await reader.readline()
                    if header in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                self.keys.append(headers.get("authorization"))
                status, extra, payload, raw = await self._route(method, target.split("?")[0], headers, body)
                data = raw if raw is not None else json.dumps(payload).encode()
                head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
                        f"Content-Type: {'application/json' if raw is None else 'application/octet-stream'}",
                        f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in extra.items())]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _route(self, method: str, path: str, headers: dict[str, str], body: bytes
                     ) -> tuple[int, dict[str, str], Any, bytes | None]:
        def reply(r: Reply) -> tuple[int, dict[str, str], Any, None]:
            return r[0], r[1], r[2], None

        if method == "POST" and path.endswith("/chat/completions"):
            return reply(await self._chat(json.loads(body)))
        if method == "POST" and path.endswith("/files"):
            return 200, {}, self._upload(headers.get("content-type", ""), body), None
        if method == "POST" and path.endswith("/batches"):
            return reply(self._create_batch(json.loads(body)))
        if method == "POST" and re.search(r"/batches/[^/]+/cancel$", path):
            return reply(self._cancel(path.split("/")[-2]))
        if method == "GET" and path.endswith("/batches"):
            with self.lock:
                data = [dict(b["public"]) for b in self.batches.values()][::-1]
            return 200, {}, {"object": "list", "data": data, "has_more": False}, None
        if method == "GET" and re.search(r"/batches/[^/]+$", path):
            return reply(self._poll(path.rsplit("/", 1)[1]))
        if method == "GET" and re.search(r"/files/[^/]+/content$", path):
            file_id = path.split("/")[-2]
            if file_id in self.files:
                return 200, {}, None, self.files[file_id]
            return 404, {}, {"error": {"message": f"no file {file_id}"}}, None
        return 404, {}, {"error": {"message": f"no route {method} {path}"}}, None

    # -- chat completions
    async def _chat(self, body: dict[str, Any]) -> Reply:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            arrived = time.monotonic()
            self.arrivals.append((arrived, self.in_flight))
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            reply = self.hook(body) if self.hook else None
            if reply is not None:
                return reply
            with self.lock:
                self.chat.append((answer_text(body), int(body.get("seed") or 0)))
            return 200, {}, completion_body(body, self.usage)
        finally:
            with self.lock:
                self.in_flight -= 1
                self.spans.append((arrived, time.monotonic()))

    # -- files
    def _upload(self, content_type: str, data: bytes) -> dict[str, Any]:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + data)
        fields: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True))
        assert fields["purpose"][1] == b"batch", fields.get("purpose")
        filename, content = fields["file"]
        with self.lock:
            self.uploads += 1
            file_id = f"file-{len(self.files) + 1}"
            self.files[file_id] = content
        return {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": filename, "purpose": "batch"}

    # -- batches
    def _create_batch(self, body: dict[str, Any]) -> Reply:
        if body.get("input_file_id") not in self.files:
            return 400, {}, {"error": {"message": "unknown input_file_id"}}
        with self.lock:
            self.batch_creations += 1
            batch_id = f"batch_{len(self.batches) + 1}"
            public = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"],
                      "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                      "status": "validating", "created_at": int(time.time()), "output_file_id": None,
                      "error_file_id": None, "metadata": body.get("metadata"),
                      "request_counts": {"total": 0, "completed": 0, "failed": 0}}
            self.batches[batch_id] = {"public": public, "polls": 0}
        return 200, {}, dict(public)

    def _cancel(self, batch_id: str) -> Reply:
        with self.lock:
            batch = self.batches.get(batch_id)
            if batch is None:
                return 404, {}, {"error": {"message": f"no batch {batch_id}"}}
            batch["public"]["status"] = "cancelled"
            return 200, {}, dict(batch["public"])

    def _poll(self, batch_id: str) -> Reply:
        with self.lock:
            self.polls += 1
            batch = self.batches.get(batch_id)
            if batch is None:
                return 404, {}, {"error": {"message": f"no batch {batch_id}"}}
            public = batch["public"]
            batch["polls"] += 1
            if public["status"] in ("validating", "in_progress"):
                public["status"] = "in_progress" if batch["polls"] < self.batch_polls else "finalizing"
            elif public["status"] == "finalizing":
                self._finish(public)
            return 200, {}, dict(public)

    def _finish(self, public: dict[str, Any]) -> None:
        lines = [json.loads(x) for x in self.files[public["input_file_id"]].splitlines() if x.strip()]
        out, errors = [], []
        for n, line in enumerate(lines):
            assert line["method"] == "POST" and line["url"] == public["endpoint"], line
            body = line["body"]
            reply = self.hook(body) if self.hook else None
            record = {"id": f"batch_req_{n}", "custom_id": line["custom_id"]}
            if reply is None:
                self.chat.append((answer_text(body), int(body.get("seed") or 0)))
                out.append({**record, "response": {"status_code": 200, "request_id": f"req_{n}",
                                                   "body": completion_body(body, self.usage)}, "error": None})
            else:
                status, _, error_body = reply
                errors.append({**record, "response": {"status_code": status, "request_id": f"req_{n}",
                                                      "body": error_body}, "error": None})
        for kind, records in (("output_file_id", out), ("error_file_id", errors)):
            if records:
                file_id = f"file-{len(self.files) + 1}"
                self.files[file_id] = b"".join(json.dumps(r).encode() + b"\n" for r in records)
                public[kind] = file_id
        public["status"] = "completed"
        public["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(errors)}

    def mean_in_flight(self) -> float:
        """Chat requests in flight on average, from the first arrival to the last answer."""
        with self.lock:
            spans = list(self.spans)
        return sum(b - a for a, b in spans) / (max(b for _, b in spans) - min(a for a, _ in spans))

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def __enter__(self) -> StubOpenAI:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------- the stub speaks what the official SDK speaks

def test_the_official_sdk_reads_the_stub():
    openai = pytest.importorskip("openai")
    with StubOpenAI(batch_polls=1) as stub:
        client = openai.OpenAI(base_url=stub.url, api_key="sk-stub", max_retries=0)
        chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], seed=3,
                                              max_tokens=5)
        assert chat.choices[0].message.content == answer_text({"messages": [{"role": "user", "content": "hi"}],
                                                               "seed": 3})
        assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens == 5
        line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 3}}
        uploaded = client.files.create(file=("requests.jsonl", json.dumps(line).encode()), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            batch = client.batches.retrieve(batch.id)
        assert batch.request_counts.completed == 1 and [b.id for b in client.batches.list()] == [batch.id]
        [result] = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
        assert result["custom_id"] == "a" and result["response"]["body"]["choices"][0]["message"]["content"]
        assert stub.keys and all(k == "Bearer sk-stub" for k in stub.keys)


def main() -> None:
    parser = argparse.ArgumentParser(description="serve the OpenAI stand-in on loopback until killed")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds before each chat completion answers")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    stub = StubOpenAI(delay=args.delay, port=args.port)
    print(stub.port, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stub.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
