"""Credentials are scrubbed at one choke point, `datasteer.secrets`: URLs, free text, JSON objects, command lines."""

import json

import httpx
import pytest

from datasteer import secrets
from datasteer.errors import DatasteerError
from datasteer.runs import Run, redact_url

KEY = "sk-live-0123456789abcdef"


def test_urls_lose_userinfo_and_credential_parameters():
    assert redact_url(f"http://user:{KEY}@host:8000/v1") == "http://host:8000/v1"
    for name in ("key", "api_key", "token", "access_token", "secret", "password", "sig"):
        cleaned = redact_url(f"https://host/v1?{name}={KEY}&model=m")
        assert KEY not in cleaned and f"{name}=***" in cleaned and "model=m" in cleaned
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert redact_url(None) is None


def test_known_key_values_are_masked_everywhere(monkeypatch):
    monkeypatch.setenv("MY_TEACHER_KEY", KEY)
    assert KEY in secrets.redact_text(f"server said: bad key {KEY}")  # not known yet
    secrets.register_config({"teachers": [{"api_key_env": "MY_TEACHER_KEY"}]})
    assert KEY not in secrets.redact_text(f"server said: bad key {KEY}")
    assert secrets.redact({"a": [f"x {KEY} y"], "n": 3}) == {"a": ["x *** y"], "n": 3}
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "perspective-key-42")
    assert "perspective-key-42" not in secrets.redact_text("HTTP 403: key perspective-key-42 is not valid")


def test_free_text_and_command_lines():
    text = secrets.redact_text(f"failed at http://u:{KEY}@h/v1?key={KEY} api_key={KEY} Bearer {KEY}; max_new_tokens=5")
    assert KEY not in text and "max_new_tokens=5" in text
    argv = secrets.redact_argv(["datasteer", "generate", "--base-url", f"http://h/v1?token={KEY}", "--api-key", KEY])
    assert KEY not in " ".join(argv) and argv[:3] == ["datasteer", "generate", "--base-url"]


def test_manifest_holds_no_credential(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["datasteer", "generate", "--base-url", f"http://u:{KEY}@h/v1?key={KEY}"])
    run = Run.prepare(tmp_path / "run", stage="generate", seed=0, inputs={"prompts": {"path": "p.jsonl"}},
                      config={"teachers": [{"base_url": f"http://u:{KEY}@h/v1?key={KEY}"}]})
    run.write_shard("t", "000000", [{"base_url": redact_url(f"http://h/v1?key={KEY}")}])
    run.finish({"rows": 1})
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(), path
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["teachers"][0]["base_url"] == "http://h/v1?key=***"
    # the same run given again resumes (the comparison sees the scrubbed config on both sides)
    again = Run.prepare(tmp_path / "run", stage="generate", seed=0, inputs={"prompts": {"path": "p.jsonl"}},
                        config={"teachers": [{"base_url": f"http://u:{KEY}@h/v1?key={KEY}"}]})
    assert again.complete


def test_server_error_text_never_carries_the_key(monkeypatch):
    from datasteer.generation.config import teacher_config
    from datasteer.generation.openai_backend import OpenAITeacher
    from datasteer.io import Prompt

    monkeypatch.setenv("LEAKY_KEY", KEY)
    config = teacher_config(name="r", model="m", backend="openai", base_url="http://127.0.0.1:9/v1",
                            api_key_env="LEAKY_KEY", max_retries=0)
    transport = httpx.MockTransport(lambda r: httpx.Response(401, json={"error": {"message": f"bad key {KEY}"}}))
    teacher = OpenAITeacher(config, transport=transport)
    with pytest.raises(DatasteerError) as err:
        teacher.generate([Prompt("a", "hi")], seed=0)
    assert "HTTP 401" in str(err.value) and KEY not in str(err.value)


def test_perspective_errors_never_carry_the_key(monkeypatch):
    from datasteer.metrics.toxicity import PerspectiveScorer

    monkeypatch.setenv("PERSPECTIVE_API_KEY", KEY)

    def answer(request):
        return httpx.Response(403, json={"error": {"message": f"API key {KEY} not valid ({request.url})"}})

    scorer = PerspectiveScorer(transport=httpx.MockTransport(answer), sleep=lambda s: None)
    with pytest.raises(DatasteerError) as err:
        scorer.score(["some text"])
    assert "HTTP 403" in str(err.value) and KEY not in str(err.value)
