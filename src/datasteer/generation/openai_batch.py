"""Provider batch APIs (OpenAI's Batch API and the providers that copy it): every pending request of a teacher in
one JSONL file, uploaded (`POST /files`, purpose batch), submitted (`POST /batches`), polled (`GET
/batches/{id}`) and collected (`GET /files/{id}/content`), usually at half the price of live requests and within
the provider's `completion_window` (24 hours).

A batch may outlive the process that submitted it, so its bookkeeping lives in the run directory
(`<run>/teachers/<name>/batches.json`, `datasteer.generation.state`), written atomically at each step:

1. the input file is uploaded and its id recorded (the *intent*) before the batch is created;
2. the batch's id is recorded as soon as the server returns it, before the first poll;
3. its results are downloaded and saved (`results-<batch id>.jsonl`: parsed answers and errors, nothing else)
   before any shard is written from them.

Rerunning the same command therefore never submits a request twice: a recorded batch is polled and collected; an
intent without a batch id (the process died between creating the batch and recording it) is looked up in the
provider's batch list by its input file and adopted, and created only when the provider has no such batch. Each
unit is written as its shard once all its answers are in, so resume stays the shards' resume.

Requests a batch did not answer (an error line, an expired or cancelled batch) go into a new batch with only
them, up to `max_retries` times each; an error that retrying cannot fix (HTTP 400, 401, 404 ...) or a batch the
provider failed stops with one line naming it. Every request has the seed and body the `openai` backend sends,
so a server that honours seeds gives the same rows through either backend.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from pydantic import Field

from datasteer.errors import ConfigError, TeacherRequestError, optional_import
from datasteer.generation.base import Completion
from datasteer.generation.remote import (
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
from datasteer.retry import retry_delay, server_message
from datasteer.secrets import redact_text

log = logging.getLogger("datasteer.generation.openai_batch")
BATCHES = "batches.json"
CHAT_ENDPOINT = "/v1/chat/completions"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
LIST_PAGES = 20  # batches pages (100 each) searched for a batch whose id was not recorded


class OpenAIBatchTeacherConfig(RemoteTeacherBase):
    """A provider's batch API: all pending requests submitted as one batch (or several of at most
    `max_requests_per_batch`), polled and collected; the run directory remembers the batch, so a rerun collects it
    instead of submitting again. Polling, timeouts, retries and prices are operational."""

    backend: Literal["openai-batch"]
    completion_window: str = Field("24h", description="the provider's completion window for the batch")
    poll_interval_s: float = Field(30.0, gt=0, description="seconds between two polls of a batch's status")
    max_requests_per_batch: int = Field(50_000, ge=1, description="requests per batch at most (OpenAI: 50,000 "
                                        "and 200 MB)")

    def build(self) -> OpenAIBatchTeacher:
        return OpenAIBatchTeacher(self)


def custom_id(unit_seed: int, prompt: Prompt, sample_index: int) -> str:
    """A request's name in the batch, the same on every rerun: 80 bits of sha256 over what defines the request
    (the request seeds themselves are 31-bit, too few to stay distinct over a batch of 50,000)."""
    key = f"{unit_seed}\x00{prompt.prompt_id}\x00{sample_index}".encode("utf-8")
    return "ds-" + hashlib.sha256(key).hexdigest()[:20]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class OpenAIBatchTeacher:
    """`generate_units(tasks, state)`: submit, poll, collect (see the module's docstring)."""

    def __init__(self, config: OpenAIBatchTeacherConfig, *, transport: Any = None, sleep: Any = time.sleep):
        self.config = config
        optional_import("httpx", "the openai-batch backend", "pip install 'datasteer[openai]'")
        self._transport = transport
        self._sleep = sleep
        self._client: Any = None
        self.where = describe(config)

    def load(self) -> None:
        if self._client is None:
            import httpx

            self._client = httpx.Client(timeout=httpx.Timeout(self.config.timeout_s),
                                        headers=auth_headers(self.config), transport=self._transport)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def generate(self, prompts: list[Prompt], *, seed: int) -> list[list[Completion]]:
        raise ConfigError(f"teacher '{self.config.name}': the openai-batch backend runs inside `datasteer generate`, "
                          "whose run directory remembers its batch; use backend openai for requests one by one")

    # -- HTTP with retries
    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> Any:
        import httpx

        self.load()
        url = endpoint(self.config.base_url, path)
        last = ""
        for attempt in range(self.config.max_retries + 1):
            response = None
            try:
                response = self._client.request(method, url, **kwargs)
            except httpx.TimeoutException as err:
                last = f"{type(err).__name__} after {self.config.timeout_s:g}s"
            except httpx.TransportError as err:
                last = type(err).__name__
            else:
                if response.status_code == 200:
                    return response
                last = f"HTTP {response.status_code}: {server_message(response)}"
                if response.status_code not in RETRY_STATUS:
                    raise TeacherRequestError(f"{self.where} refused to {what} ({last})")
            if attempt < self.config.max_retries:
                delay = retry_delay(attempt, response)  # the server's Retry-After when it sends one
                log.warning(redact_text(f"{self.where}: {what}: {last}; retry {attempt + 1} of "
                                        f"{self.config.max_retries} in {delay:.1f}s"))
                self._sleep(delay)
        raise TeacherRequestError(f"{self.where} kept failing to {what} after {self.config.max_retries} retries "
                                  f"({last}); rerun the same command to resume (a submitted batch is not submitted "
                                  "again)")

    def _json(self, method: str, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        response = self._call(method, path, what, **kwargs)
        try:
            body = response.json()
            if not isinstance(body, dict):
                raise ValueError
            return body
        except ValueError:
            raise TeacherRequestError(f"{self.where} answered {what} with something that is not JSON") from None

    # -- the batch's life
    def generate_units(self, tasks: Sequence[tuple[list[Prompt], int]], state: Any
                       ) -> Iterator[tuple[int, list[list[Completion]]]]:
        if state is None:
            raise ConfigError(f"teacher '{self.config.name}': the openai-batch backend needs a run directory")
        k = self.config.k
        requests: dict[str, tuple[int, int, int, dict[str, Any], int]] = {}
        ids_of: list[list[str]] = []
        for t, (prompts, unit_seed) in enumerate(tasks):
            ids_of.append([])
            for i, prompt in enumerate(prompts):
                for j in range(k):
                    cid = custom_id(unit_seed, prompt, j)
                    if cid in requests:
                        raise ConfigError(f"teacher '{self.config.name}': prompt id '{prompt.prompt_id}' appears "
                                          "twice; give every prompt its own id")
                    seed = request_seed(unit_seed, prompt, j)
                    requests[cid] = (t, i, j, chat_payload(self.config, prompt, seed), seed)
                    ids_of[t].append(cid)
        records: list[dict[str, Any]] = (state.read_json(BATCHES) or {}).get("batches", [])
        answers: dict[str, Completion] = {}
        errors: dict[str, dict[str, Any]] = {}
        for record in records:
            if record.get("collected"):
                self._read_results(state, record, requests, answers, errors)
        emitted: set[int] = set()
        while True:
            for t, (prompts, _) in enumerate(tasks):
                if t in emitted:
                    continue
                ids = ids_of[t]
                if all(cid in answers for cid in ids):
                    emitted.add(t)
                    yield t, [[answers[ids[i * k + j]] for j in range(k)] for i in range(len(prompts))]
            if len(emitted) == len(tasks):
                return
            active = [r for r in records if not r.get("collected")]
            if active:
                for record in active:
                    self._follow(state, records, record)
                    self._read_results(state, record, requests, answers, errors)
                    self._stop_if_needed(record, requests, answers)
                continue
            missing = [cid for cid in requests if cid not in answers]
            self._check_attempts(missing, records, errors)
            size = self.config.max_requests_per_batch
            for start in range(0, len(missing), size):
                self._submit(state, records, missing[start:start + size], requests)

    def _save(self, state: Any, records: list[dict[str, Any]]) -> None:
        state.write_json(BATCHES, {"teacher": self.config.name, "batches": records})

    def _submit(self, state: Any, records: list[dict[str, Any]], ids: list[str],
                requests: dict[str, tuple[int, int, int, dict[str, Any], int]]) -> None:
        lines = b"".join(json.dumps({"custom_id": cid, "method": "POST", "url": CHAT_ENDPOINT,
                                     "body": requests[cid][3]}, ensure_ascii=False).encode("utf-8") + b"\n"
                         for cid in ids)
        state.note(f"uploading {len(ids)} requests")
        uploaded = self._json("POST", "files", "upload the batch's requests", data={"purpose": "batch"},
                              files={"file": (f"datasteer-{self.config.name}.jsonl", lines, "application/jsonl")})
        record: dict[str, Any] = {"input_file_id": uploaded.get("id"), "batch_id": None, "requests": ids,
                                  "uploaded_at": _now()}
        if not record["input_file_id"]:
            raise TeacherRequestError(f"{self.where} answered the upload without a file id")
        records.append(record)
        self._save(state, records)  # the intent: a rerun looks for a batch made from this file before making one
        self._create(state, records, record)

    def _create(self, state: Any, records: list[dict[str, Any]], record: dict[str, Any]) -> None:
        batch = self._json("POST", "batches", "create the batch", json={
            "input_file_id": record["input_file_id"], "endpoint": CHAT_ENDPOINT,
            "completion_window": self.config.completion_window,
            "metadata": {"datasteer_teacher": self.config.name}})
        if not batch.get("id"):
            raise TeacherRequestError(f"{self.where} answered the batch's creation without an id")
        record.update(batch_id=batch["id"], status=batch.get("status"), submitted_at=_now())
        self._save(state, records)  # remembered before the first poll: a rerun collects it, never submits again
        log.info(f"{self.where}: batch {batch['id']} submitted ({len(record['requests'])} requests)")

    def _adopt(self, state: Any, records: list[dict[str, Any]], record: dict[str, Any]) -> None:
        """An intent without a batch id: the batch made from its file, if the provider has one; else create it."""
        after: str | None = None
        for _ in range(LIST_PAGES):
            page = self._json("GET", "batches", "list batches", params={"limit": 100, **({"after": after}
                                                                                         if after else {})})
            data = page.get("data") or []
            for batch in data:
                if batch.get("input_file_id") == record["input_file_id"]:
                    record.update(batch_id=batch["id"], status=batch.get("status"), submitted_at=_now())
                    self._save(state, records)
                    log.info(f"{self.where}: found batch {batch['id']} submitted by an earlier run")
                    return
            if not page.get("has_more") or not data:
                break
            after = data[-1].get("id")
        self._create(state, records, record)

    def _follow(self, state: Any, records: list[dict[str, Any]], record: dict[str, Any]) -> None:
        """Poll a batch until it ends, then download and save what it answered."""
        if not record.get("batch_id"):
            self._adopt(state, records, record)
        batch_id = record["batch_id"]
        while True:
            batch = self._json("GET", f"batches/{batch_id}", f"poll batch {batch_id}")
            status = str(batch.get("status"))
            counts = batch.get("request_counts") or {}
            state.note(f"batch {batch_id}: {status}"
                       + (f" {counts.get('completed', 0)}/{counts.get('total')}" if counts.get("total") else ""))
            if status in TERMINAL:
                break
            self._sleep(self.config.poll_interval_s)
        results: list[dict[str, Any]] = []
        for key in ("output_file_id", "error_file_id"):
            file_id = batch.get(key)
            if file_id:
                content = self._call("GET", f"files/{file_id}/content", f"download batch {batch_id}'s results")
                results += [self._result(line) for line in content.content.splitlines() if line.strip()]
        if status == "failed":
            reasons = [e.get("message", "") for e in ((batch.get("errors") or {}).get("data") or [])]
            record["failure"] = redact_text("; ".join(r for r in reasons if r)[:500] or "no reason given")
        state.write_bytes(f"results-{batch_id}.jsonl",
                          b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in results))
        record.update(status=status, collected=True, collected_at=_now())
        self._save(state, records)

    def _result(self, line: bytes) -> dict[str, Any]:
        """One line of an output or error file, reduced to what the rows need (or the error, credentials masked)."""
        try:
            item = json.loads(line)
            cid = str(item["custom_id"])
        except (ValueError, KeyError, TypeError):
            raise TeacherRequestError(f"{self.where} returned a batch result that is not JSON with a custom_id") \
                from None
        response = item.get("response") or {}
        status = response.get("status_code")
        body = response.get("body")
        if status == 200 and isinstance(body, dict):
            c = parse_completion(body, self.where, 0)
            return {"custom_id": cid, "text": c.text, "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason}
        message = ""
        if isinstance(body, dict):
            error = body.get("error", body)
            message = str(error.get("message", error) if isinstance(error, dict) else error)
        elif isinstance(item.get("error"), dict):
            message = str(item["error"].get("message") or item["error"].get("code") or "")
        return {"custom_id": cid, "error": {"status": status, "message": redact_text(" ".join(message.split())[:300])}}

    def _read_results(self, state: Any, record: dict[str, Any], requests: dict[str, Any],
                      answers: dict[str, Completion], errors: dict[str, dict[str, Any]]) -> None:
        data = state.read_bytes(f"results-{record['batch_id']}.jsonl") if record.get("batch_id") else None
        for line in (data or b"").splitlines():
            item = json.loads(line)
            cid = item["custom_id"]
            if cid not in requests:
                continue  # a request of a unit finished earlier, or of another unit plan
            if "error" in item:
                errors[cid] = item["error"]
            else:
                answers[cid] = Completion(text=item["text"], prompt_tokens=item["prompt_tokens"],
                                          completion_tokens=item["completion_tokens"],
                                          finish_reason=item["finish_reason"], seed=requests[cid][4])

    def _stop_if_needed(self, record: dict[str, Any], requests: dict[str, Any],
                        answers: dict[str, Completion]) -> None:
        """A batch the provider failed, or one cancelled (by someone: a person, a budget), ends the call."""
        unanswered = sum(1 for cid in record["requests"] if cid in requests and cid not in answers)
        if record.get("status") == "failed":
            raise TeacherRequestError(f"{self.where}: batch {record['batch_id']} failed ({record.get('failure')}); "
                                      "fix the cause and rerun the same command to submit its requests again")
        if record.get("status") == "cancelled" and unanswered:
            raise TeacherRequestError(f"{self.where}: batch {record['batch_id']} was cancelled with {unanswered} "
                                      "requests unanswered; finished units are saved, rerun the same command to "
                                      "submit the rest")

    def _check_attempts(self, missing: list[str], records: list[dict[str, Any]],
                        errors: dict[str, dict[str, Any]]) -> None:
        """Refuse to resubmit a request whose error retrying cannot fix, or that used up its retries."""
        for cid in missing:
            error = errors.get(cid)
            if error and error.get("status") is not None and error["status"] not in RETRY_STATUS:
                raise TeacherRequestError(f"{self.where} refused a request of the batch (HTTP {error['status']}: "
                                          f"{error.get('message')}); check the model name, key and parameters")
        attempts: dict[str, int] = {}
        for record in records:
            if record.get("collected") and record.get("status") != "failed":
                for cid in record["requests"]:
                    attempts[cid] = attempts.get(cid, 0) + 1
        tired = [cid for cid in missing if attempts.get(cid, 0) > self.config.max_retries]
        if tired:
            error = errors.get(tired[0]) or {}
            raise TeacherRequestError(
                f"{self.where}: {len(tired)} requests went unanswered in {self.config.max_retries + 1} batches "
                f"(last: {error.get('message') or 'no answer before the batch ended'}); finished units are saved")
