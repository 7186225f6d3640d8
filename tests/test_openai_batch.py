"""The openai-batch backend against a loopback server that speaks /v1/files, /v1/batches, /v1/batches/{id} and
/v1/files/{id}/content (`tests/test_openai_server.py`, checked against the official SDK): submit, kill, resume and
collect with exactly one submission; an unrecorded batch adopted; unanswered requests resubmitted alone."""

import json
import signal
import subprocess
import time

import httpx
import pytest
import yaml

from datasteer.errors import TeacherRequestError
from datasteer.generation import generate
from datasteer.generation.config import GenerateConfig
from tests.conftest import DATASTEER, cli_env, write_prompts
from tests.test_openai_server import StubOpenAI

SECRET = "sk-batch-do-not-leak-0123456789"


def _config(prompts, url, backend="openai-batch", **teacher):
    fields = {"name": "b", "model": "m", "backend": backend, "base_url": url, "k": 2, "batch_size": 3,
              "api_key_env": "BATCH_KEY", "prices": {"input": 0.5, "output": 1.5}}
    if backend == "openai-batch":
        fields["poll_interval_s"] = 0.01
    fields.update(teacher)
    return GenerateConfig.model_validate({"prompts": str(prompts), "teachers": [fields], "seed": 3})


def _rows(result, drop=("backend",)):
    rows = [json.loads(x) for x in result.candidates_path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


@pytest.fixture
def prompts(tmp_path):
    return write_prompts(tmp_path / "prompts.jsonl", [f"Question {i}: what is {i} + {i}?" for i in range(7)])


def test_batch_rows_equal_the_live_backend_and_report_usage(tmp_path, prompts, monkeypatch):
    monkeypatch.setenv("BATCH_KEY", SECRET)
    with StubOpenAI(batch_polls=3) as stub:
        batch = generate(_config(prompts, stub.url), tmp_path / "batch", progress=False)
        assert (stub.uploads, stub.batch_creations) == (1, 1) and stub.polls >= 3
        live = generate(_config(prompts, stub.url, backend="openai"), tmp_path / "live", progress=False)
    assert batch.rows == 14 and _rows(batch) == _rows(live), "same seeds and bodies: the same rows"
    assert {r["backend"] for r in _rows(batch, drop=())} == {"openai-batch"}
    usage = batch.usage["b"]
    rows = _rows(batch)
    assert usage["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows) > 0
    assert usage["completion_tokens"] == sum(r["completion_tokens"] for r in rows) > 0
    expected = usage["prompt_tokens"] * 0.5e-6 + usage["completion_tokens"] * 1.5e-6
    assert usage["cost"]["total"] == pytest.approx(expected) and batch.cost == pytest.approx(expected)
    records = json.loads((tmp_path / "batch" / "teachers" / "b" / "batches.json").read_text())["batches"]
    assert [(r["batch_id"], r["status"], r["collected"]) for r in records] == [("batch_1", "completed", True)]
    assert all(k == f"Bearer {SECRET}" for k in stub.keys)
    for path in (tmp_path / "batch").rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(), path


class Interrupted(BaseException):
    """Stands for the process dying: raised by the first poll's sleep, after the batch id was saved."""


def test_an_interrupted_run_collects_its_batch_without_submitting_again(tmp_path, prompts, monkeypatch):
    from datasteer.generation.openai_batch import OpenAIBatchTeacher

    monkeypatch.setenv("BATCH_KEY", SECRET)
    with StubOpenAI(batch_polls=3) as stub:
        config = _config(prompts, stub.url)

        def die(seconds):
            raise Interrupted

        teacher = OpenAIBatchTeacher(config.teachers[0], sleep=die)
        with pytest.raises(Interrupted):
            generate(config, tmp_path / "run", progress=False, teachers={"b": teacher})
        saved = json.loads((tmp_path / "run" / "teachers" / "b" / "batches.json").read_text())["batches"]
        assert saved[0]["batch_id"] == "batch_1" and not saved[0].get("collected")
        assert not list((tmp_path / "run").glob("shards/b/*.jsonl"))
        result = generate(config, tmp_path / "run", progress=False)
        assert (stub.uploads, stub.batch_creations) == (1, 1), "collected, not submitted again"
        assert result.rows == 14
        again = generate(config, tmp_path / "run", progress=False)  # complete: nothing asked of the server
        assert again.rows == 14 and stub.batch_creations == 1


class CrashAfterCreate(httpx.BaseTransport):
    """Forwards to the server, then loses the answer to POST /batches: the batch exists but was never recorded."""

    def __init__(self):
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request):
        response = self.inner.handle_request(request)
        if request.method == "POST" and request.url.path.endswith("/batches"):
            response.read()
            raise Interrupted
        return response


def test_a_batch_created_but_not_recorded_is_found_and_adopted(tmp_path, prompts, monkeypatch):
    from datasteer.generation.openai_batch import OpenAIBatchTeacher

    monkeypatch.setenv("BATCH_KEY", SECRET)
    with StubOpenAI(batch_polls=2) as stub:
        config = _config(prompts, stub.url)
        teacher = OpenAIBatchTeacher(config.teachers[0], transport=CrashAfterCreate())
        with pytest.raises(Interrupted):
            generate(config, tmp_path / "run", progress=False, teachers={"b": teacher})
        saved = json.loads((tmp_path / "run" / "teachers" / "b" / "batches.json").read_text())["batches"]
        assert saved[0]["input_file_id"] and saved[0]["batch_id"] is None, "the intent was saved before creating"
        assert stub.batch_creations == 1
        result = generate(config, tmp_path / "run", progress=False)
        assert (stub.uploads, stub.batch_creations) == (1, 1) and result.rows == 14
        saved = json.loads((tmp_path / "run" / "teachers" / "b" / "batches.json").read_text())["batches"]
        assert [r["batch_id"] for r in saved] == ["batch_1"]


def test_sigkill_after_submission_then_rerun_submits_exactly_once(tmp_path, prompts):
    """The real thing: `datasteer generate` killed with SIGKILL while it polls, then the same command again."""
    with StubOpenAI(batch_polls=10**9) as stub:  # never finishes while the first process lives
        recipe = tmp_path / "batch.yaml"
        recipe.write_text(yaml.safe_dump({"prompts": str(prompts), "seed": 3, "teachers": [
            {"name": "b", "model": "m", "backend": "openai-batch", "base_url": stub.url, "k": 2, "batch_size": 3,
             "api_key_env": "BATCH_KEY", "poll_interval_s": 0.02}]}))
        out = tmp_path / "run"
        args = DATASTEER + ["generate", "--config", str(recipe), "--out", str(out), "--quiet"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=cli_env(BATCH_KEY=SECRET))
        try:
            deadline = time.time() + 120
            while stub.polls < 3 and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, proc.stderr.read()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert stub.batch_creations == 1
        stub.batch_polls = 2  # the provider finishes the batch now
        with stub.lock:
            for batch in stub.batches.values():
                batch["polls"] = 0
        done = subprocess.run(args, capture_output=True, text=True, env=cli_env(BATCH_KEY=SECRET), timeout=300)
        assert done.returncode == 0, done.stderr
        assert (stub.uploads, stub.batch_creations) == (1, 1), "exactly one submission seen by the server"
        assert SECRET not in done.stdout + done.stderr
    rows = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 14 and len({(r["prompt_id"], r["sample_index"]) for r in rows}) == 14
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["usage"]["b"]["rows"] == 14
    assert SECRET not in (out / "manifest.json").read_text()


def test_unanswered_requests_go_into_a_follow_up_batch_alone(tmp_path, prompts, monkeypatch):
    monkeypatch.setenv("BATCH_KEY", SECRET)
    failed_once: set[int] = set()

    def flaky(body):  # every third request fails the first time with a retryable error
        seed = body["seed"]
        if seed % 3 == 0 and seed not in failed_once:
            failed_once.add(seed)
            return 500, {}, {"error": {"message": "overloaded"}}
        return None

    with StubOpenAI(batch_polls=1, hook=flaky) as stub:
        result = generate(_config(prompts, stub.url, max_retries=1), tmp_path / "run", progress=False)
        assert result.rows == 14 and stub.batch_creations == 2
        sizes = [len(stub.files[b["public"]["input_file_id"]].splitlines()) for b in stub.batches.values()]
    assert sizes == [14, len(failed_once)] and failed_once, "only the unanswered requests are submitted again"
    chat_seeds = [seed for _, seed in stub.chat]
    assert len(chat_seeds) == len(set(chat_seeds)) == 14, "no request answered twice"


def test_errors_that_retrying_cannot_fix_stop_with_one_line(tmp_path, prompts, monkeypatch):
    monkeypatch.setenv("BATCH_KEY", SECRET)
    with StubOpenAI(batch_polls=1, hook=lambda body: (400, {}, {"error": {"message": f"bad model {SECRET}"}})) as stub:
        with pytest.raises(TeacherRequestError, match=r"HTTP 400: bad model \*\*\*") as err:
            generate(_config(prompts, stub.url), tmp_path / "run", progress=False)
        assert stub.batch_creations == 1
    assert SECRET not in str(err.value)
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(), path


def test_a_cancelled_batch_stops_and_a_rerun_submits_only_the_rest(tmp_path, prompts, monkeypatch):
    monkeypatch.setenv("BATCH_KEY", SECRET)
    with StubOpenAI(batch_polls=10**9) as stub:
        config = _config(prompts, stub.url)

        def cancel_on_poll(seconds):  # someone cancels the batch on the provider's dashboard
            stub._cancel("batch_1")

        from datasteer.generation.openai_batch import OpenAIBatchTeacher

        teacher = OpenAIBatchTeacher(config.teachers[0], sleep=cancel_on_poll)
        with pytest.raises(TeacherRequestError, match="batch_1 was cancelled with 14 requests unanswered"):
            generate(config, tmp_path / "run", progress=False, teachers={"b": teacher})
        stub.batch_polls = 1
        result = generate(config, tmp_path / "run", progress=False)
        assert result.rows == 14 and stub.batch_creations == 2
