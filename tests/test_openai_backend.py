"""The OpenAI-compatible backend: failure injection through httpx.MockTransport, then a real
`transformers serve` process on loopback."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from datasteer.errors import ConfigError, TeacherRequestError
from datasteer.generation import generate
from datasteer.generation.config import GenerateConfig
from datasteer.generation.config import teacher_config as TeacherConfig
from datasteer.generation.openai_backend import OpenAITeacher
from datasteer.io import Prompt
from tests.conftest import DATASTEER, cli_env

SECRET = "sk-test-do-not-leak-0123456789"


def _config(**kw):
    base = dict(name="remote", model="m", backend="openai", base_url="http://127.0.0.1:9/v1", k=2,
                sampling={"max_new_tokens": 7, "temperature": 0.5}, max_retries=3)
    base.update(kw)
    return TeacherConfig(**base)


def _ok(request, text="hi", finish="stop"):
    body = json.loads(request.content)
    return httpx.Response(200, json={
        "choices": [{"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 11, "completion_tokens": body["max_tokens"]},
    })


class Recorder:
    """A fake clock: sleeping records the wait and moves the clock on, so retries and pacing take no time."""

    def __init__(self):
        self.sleeps = []
        self.now = 0.0

    async def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self):
        return self.now


def test_payload_headers_and_parsing(monkeypatch):
    monkeypatch.setenv("REMOTE_KEY", SECRET)
    seen = []

    def handler(request):
        seen.append((request.headers.get("authorization"), json.loads(request.content)))
        return _ok(request, text=f"answer {len(seen)}", finish="length")

    teacher = OpenAITeacher(_config(api_key_env="REMOTE_KEY", system_prompt="Be brief.", concurrency=1),
                            transport=httpx.MockTransport(handler))
    out = teacher.generate([Prompt("a", "Q1"), Prompt("b", "Q2")], seed=5)
    assert [[c.text for c in row] for row in out] == [["answer 1", "answer 2"], ["answer 3", "answer 4"]]
    assert all(c.finish_reason == "length" and c.completion_tokens == 7 and c.prompt_tokens == 11
               for row in out for c in row)
    auth, payload = seen[0]
    assert auth == f"Bearer {SECRET}"
    assert payload["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}]
    assert payload["model"] == "m" and payload["temperature"] == 0.5 and payload["max_tokens"] == 7
    seeds = [p["seed"] for _, p in seen]
    assert len(set(seeds)) == 4, "every sample has its own seed"
    again = []
    teacher2 = OpenAITeacher(_config(api_key_env="REMOTE_KEY", concurrency=1),
                             transport=httpx.MockTransport(lambda r: again.append(json.loads(r.content)) or _ok(r)))
    teacher2.generate([Prompt("a", "Q1"), Prompt("b", "Q2")], seed=5)
    assert [p["seed"] for p in again] == seeds, "seeds depend only on (unit seed, prompt id, sample index)"


def test_retries_429_and_5xx_with_backoff_and_retry_after():
    calls = {"n": 0}

    def handler(request):
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(429, headers={"retry-after": "2"}, json={"error": {"message": "slow down"}})
        if calls["n"] == 2:
            return httpx.Response(503, text="overloaded")
        if calls["n"] == 3:
            raise httpx.ReadTimeout("timed out", request=request)
        return _ok(request)

    rec = Recorder()
    teacher = OpenAITeacher(_config(k=1), transport=httpx.MockTransport(handler), sleep=rec.sleep,
                            clock=rec.clock)
    [[c]] = teacher.generate([Prompt("a", "Q")], seed=0)
    assert c.text == "hi" and calls["n"] == 4
    assert rec.sleeps[0] == 2.0, "Retry-After is honoured"
    assert 0.25 <= rec.sleeps[1] <= 1.0 and 0.5 <= rec.sleeps[2] <= 2.0, "exponential backoff with jitter"


def test_gives_up_after_max_retries_without_leaking_the_key(monkeypatch):
    monkeypatch.setenv("REMOTE_KEY", SECRET)
    rec = Recorder()
    teacher = OpenAITeacher(_config(k=1, api_key_env="REMOTE_KEY", base_url="https://user:pw@api.example/v1"),
                            transport=httpx.MockTransport(lambda r: httpx.Response(500, text="boom")), sleep=rec.sleep,
                            clock=rec.clock)
    with pytest.raises(TeacherRequestError, match="kept failing after 3 retries") as err:
        teacher.generate([Prompt("a", "Q")], seed=0)
    assert len(rec.sleeps) == 3
    assert SECRET not in str(err.value) and "pw" not in str(err.value)


def test_client_errors_are_not_retried():
    calls = []
    teacher = OpenAITeacher(_config(k=1), transport=httpx.MockTransport(
        lambda r: calls.append(1) or httpx.Response(404, json={"error": {"message": "model 'm' not found"}})))
    with pytest.raises(TeacherRequestError, match=r"refused the request \(HTTP 404: model 'm' not found\)"):
        teacher.generate([Prompt("a", "Q")], seed=0)
    assert len(calls) == 1


def test_concurrency_is_bounded():
    import asyncio

    state = {"now": 0, "peak": 0}

    async def handler(request):
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.01)
        state["now"] -= 1
        return _ok(request)

    teacher = OpenAITeacher(_config(k=4, concurrency=3), transport=httpx.MockTransport(handler))
    out = teacher.generate([Prompt(str(i), f"Q{i}") for i in range(5)], seed=0)
    assert sum(len(r) for r in out) == 20
    assert state["peak"] == 3


def test_missing_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    with pytest.raises(ConfigError, match="environment variable NOT_SET_KEY is not set"):
        OpenAITeacher(_config(api_key_env="NOT_SET_KEY")).load()


def test_openai_backend_requires_base_url():
    with pytest.raises(ValueError, match="needs base_url"):
        TeacherConfig(name="x", model="m", backend="openai")


# ---------------------------------------------------------------- a real server on loopback

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_model(smollm2_dir, tmp_path_factory):
    """`transformers serve` with the embedded model, on a loopback port."""
    port = _free_port()
    exe = Path(sys.executable).with_name("transformers")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(exe), "serve", smollm2_dir, "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--dtype", "float32"], stdout=fh, stderr=subprocess.STDOUT,
                                env=cli_env())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("transformers serve did not start:\n" + log.read_text()[-2000:])
            time.sleep(0.5)
        yield base + "/v1", smollm2_dir
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_real_server_generation_is_reproducible(served_model, prompts_file, tmp_path, monkeypatch):
    base_url, model_name = served_model
    monkeypatch.setenv("SERVE_KEY", SECRET)
    config = GenerateConfig.model_validate({
        "prompts": {"path": str(prompts_file), "limit": 3},
        "teachers": [{"name": "served", "model": model_name, "backend": "openai", "base_url": base_url, "k": 2,
                      "api_key_env": "SERVE_KEY", "concurrency": 2, "batch_size": 2,
                      "sampling": {"temperature": 1.0, "max_new_tokens": 12}}],
    })
    first = generate(config, tmp_path / "a", progress=False)
    rows = [json.loads(x) for x in first.candidates_path.read_text().splitlines()]
    assert len(rows) == 6
    assert all(r["completion"] and r["completion_tokens"] > 0 and r["prompt_tokens"] > 0 for r in rows)
    assert all(r["finish_reason"] in ("stop", "length") and r["base_url"] == base_url for r in rows)
    second = generate(config, tmp_path / "b", progress=False)
    assert second.candidates_path.read_bytes() == first.candidates_path.read_bytes(), \
        "the server honours per-request seeds"
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text()


def test_real_server_through_the_cli(served_model, prompts_file, tmp_path):
    base_url, model_name = served_model
    out = tmp_path / "run"
    proc = subprocess.run(DATASTEER + ["generate", str(prompts_file), "--backend", "openai", "--base-url", base_url,
                                       "--model", model_name, "--k", "1", "--max-new-tokens", "8", "--limit", "2",
                                       "--api-key-env", "SERVE_KEY", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, env=cli_env(SERVE_KEY=SECRET), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 candidates" in proc.stdout
    manifest = (out / "manifest.json").read_text()
    assert "SERVE_KEY" in manifest and SECRET not in manifest and SECRET not in proc.stdout + proc.stderr


# ---------------------------------------------------------------- across units, on the loopback stub

def _stub_config(prompts, url, **teacher):
    fields = {"name": "remote", "model": "m", "backend": "openai", "base_url": url, "k": 1, "batch_size": 2,
              "concurrency": 8, **teacher}
    return GenerateConfig.model_validate({"prompts": str(prompts), "teachers": [fields], "seed": 1})


def test_concurrency_stays_up_across_units(tmp_path):
    """Batches of 2 prompts, 8 requests in flight: the old backend never had more than 2 (one unit at a time)."""
    from tests.conftest import write_prompts
    from tests.test_openai_server import StubOpenAI

    prompts = write_prompts(tmp_path / "p.jsonl", [f"question {i}" for i in range(64)])
    with StubOpenAI(delay=0.05) as stub:
        result = generate(_stub_config(prompts, stub.url), tmp_path / "run", progress=False)
        mean = stub.mean_in_flight()
    assert result.rows == 64 and stub.peak == 8
    assert mean >= 6, f"{mean:.1f} requests in flight on average (unit by unit: 2 at most)"
    assert result.generation_seconds < 1.2, "ideal 0.4 s; unit by unit (32 units of 50 ms) 1.6 s"
    rows = [json.loads(x) for x in result.candidates_path.read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [f"p{i:03d}" for i in range(64)], "plan order, whatever the finish order"


def test_usage_and_cost_totals_per_teacher(tmp_path):
    from tests.conftest import write_prompts
    from tests.test_openai_server import StubOpenAI

    prompts = write_prompts(tmp_path / "p.jsonl", [f"question {i}" for i in range(5)])
    with StubOpenAI() as stub, StubOpenAI(usage=False) as silent:
        teachers = [
            {"name": "priced", "model": "m", "backend": "openai", "base_url": stub.url, "k": 2,
             "prices": {"input": 2.5, "output": 10.0}},
            {"name": "free", "model": "m", "backend": "openai", "base_url": stub.url},
            {"name": "silent", "model": "m", "backend": "openai", "base_url": silent.url,
             "prices": {"input": 1.0, "output": 1.0}},
        ]
        config = GenerateConfig.model_validate({"prompts": str(prompts), "teachers": teachers})
        result = generate(config, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in result.candidates_path.read_text().splitlines()]
    summary = json.loads((tmp_path / "run" / "manifest.json").read_text())["summary"]
    assert summary["usage"] == result.usage
    for name in ("priced", "free"):
        mine = [r for r in rows if r["source"] == name]
        usage = result.usage[name]
        assert usage["rows"] == len(mine) and "rows_without_usage" not in usage
        assert usage["prompt_tokens"] == sum(r["prompt_tokens"] for r in mine) > 0
        assert usage["completion_tokens"] == sum(r["completion_tokens"] for r in mine) > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    priced = result.usage["priced"]
    assert priced["cost"] == {"input": round(priced["prompt_tokens"] * 2.5 / 1e6, 6),
                              "output": round(priced["completion_tokens"] * 10.0 / 1e6, 6),
                              "total": round(priced["prompt_tokens"] * 2.5e-6 + priced["completion_tokens"] * 1e-5, 6)}
    assert "cost" not in result.usage["free"]
    assert result.usage["silent"]["rows_without_usage"] == 5 and result.usage["silent"]["cost"]["total"] == 0
    assert summary["cost"] == result.cost == pytest.approx(priced["cost"]["total"])


def test_resume_after_sigkill_does_not_ask_for_finished_units_again(tmp_path):
    """`datasteer generate` killed with SIGKILL mid-run, then the same command: the rows of an uninterrupted run, and
    no request of a unit whose shard was written before the kill is sent again."""
    import signal

    from tests.conftest import write_prompts
    from tests.test_openai_server import StubOpenAI

    prompts = write_prompts(tmp_path / "p.jsonl", [f"question {i}" for i in range(60)])

    def args(url, out):
        return DATASTEER + ["generate", str(prompts), "--backend", "openai", "--base-url", url, "--model", "m",
                            "--batch-size", "3", "--concurrency", "4", "--seed", "5", "--out", str(out), "--quiet"]

    with StubOpenAI(delay=0.03) as stub:
        reference = subprocess.run(args(stub.url, tmp_path / "ref"), capture_output=True, text=True, env=cli_env(),
                                   timeout=300)
        assert reference.returncode == 0, reference.stderr
        stub.chat.clear()
        out = tmp_path / "run"
        proc = subprocess.Popen(args(stub.url, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=cli_env())
        deadline = time.time() + 120
        while len(list(out.glob("shards/*/*.jsonl"))) < 6 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        finished = {json.loads(line)["seed"] for shard in out.glob("shards/*/*.jsonl")
                    for line in shard.read_text().splitlines()}
        first = list(stub.chat)
        assert 6 * 3 <= len(finished) < 60, "killed mid-run"
        stub.chat.clear()
        again = subprocess.run(args(stub.url, out), capture_output=True, text=True, env=cli_env(), timeout=300)
        assert again.returncode == 0, again.stderr
        second = list(stub.chat)
    assert not {seed for _, seed in second} & finished, "finished units are not asked for again"
    repeated = {seed for _, seed in second} & {seed for _, seed in first}
    assert len(repeated) <= 4 + 3, "at most the requests in flight and the unfinished unit's answers are redone"
    assert (out / "candidates.jsonl").read_bytes() == (tmp_path / "ref" / "candidates.jsonl").read_bytes()
