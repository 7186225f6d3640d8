"""The CLI's contract: one-line errors with exit status 2 and no output left behind; progress; summary."""

import importlib.util
import json
import subprocess

import pytest

from tests.conftest import DATASTEER, TINY, cli_env


def run_cli(*args, timeout=300, **env):
    return subprocess.run(DATASTEER + list(args), capture_output=True, text=True, env=cli_env(**env), timeout=timeout)


def _assert_user_error(proc, words, out=None):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("datasteer: error: ") and words in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    if out is not None:
        assert not out.exists(), "a failed run must leave no output behind"


@pytest.mark.parametrize("setup, args, words", [
    (None, ["absent.jsonl"], "file not found"),
    ('{"prompt": "ok"}\n{"prompt": \n', ["p.jsonl"], "p.jsonl:2: not valid JSON"),
    ("", ["p.jsonl"], "the prompt set is empty"),
    ('{"prompt": ""}\n', ["p.jsonl"], "row 1: the prompt is empty"),
    ('{"prompt": "ok"}\n', ["p.jsonl", "--model", "tiny:nope"], "unknown tiny architecture"),
    ('{"prompt": "ok"}\n', ["p.jsonl", "--model", "no-such-org/no-such-model"], "could not load model"),
    ('{"prompt": "ok"}\n', ["p.jsonl", "--model", "./missing-dir/model"], "model directory not found"),
    ('{"prompt": "ok"}\n', ["p.jsonl", "--teacher", "nameless"], "--teacher expects NAME=MODEL"),
    ('{"prompt": "ok"}\n', ["p.jsonl", "--backend", "openai", "--model", "m"], "needs base_url"),
    ('{"prompt": "ok"}\n', ["p.jsonl", "--k", "0", "--model", TINY], "teachers.0.k"),
    ('{"prompt": "ok"}\n', ["p.jsonl", "--backend", "vllm", "--model", TINY], "pip install 'datasteer[vllm]'"),
    ('{"prompt": "ok"}\n', ["p.jsonl", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                            "--api-key-env", "UNSET_VAR_X"], "UNSET_VAR_X is not set"),
])
def test_user_errors(tmp_path, setup, args, words):
    if "vllm" in args and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    if setup is not None:
        (tmp_path / "p.jsonl").write_text(setup)
    args = [str(tmp_path / a) if a.endswith(".jsonl") else a for a in args]
    out = tmp_path / "run"
    _assert_user_error(run_cli("generate", *args, "--out", str(out)), words, out)


def test_bad_recipe_is_one_line(tmp_path):
    (tmp_path / "r.yaml").write_text("prompts: [unclosed\n")
    _assert_user_error(run_cli("generate", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")),
                       "not valid YAML at line")
    (tmp_path / "r.yaml").write_text("prompts: p.jsonl\nteachers: [{name: a, model: x, k: 2, colour: red}]\n")
    _assert_user_error(run_cli("generate", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")),
                       "teachers.0.colour: Extra inputs are not permitted")


def test_generate_with_progress_and_summary_then_mismatch(prompts_file, tmp_path):
    out = tmp_path / "run"
    args = ["generate", str(prompts_file), "--model", TINY, "--k", "2", "--max-new-tokens", "4", "--batch-size", "2",
            "--out", str(out)]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "10 candidates (tiny-llama: 10)" in proc.stdout or "10 candidates (llama: 10)" in proc.stdout, proc.stdout
    assert "10/10" in proc.stderr and "tok/s" in proc.stderr and "ETA" in proc.stderr, proc.stderr
    rows = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    again = run_cli(*args)
    assert again.returncode == 0 and "10 resumed" in again.stdout
    changed = run_cli(*[a if a != "4" else "5" for a in args])
    _assert_user_error(changed, "max_new_tokens: 4 -> 5")
    assert "--overwrite" in changed.stderr
    overwritten = run_cli(*[a if a != "4" else "5" for a in args], "--overwrite", "--quiet")
    assert overwritten.returncode == 0 and overwritten.stderr == ""
    assert json.loads((out / "candidates.jsonl").read_text().splitlines()[0])["completion_tokens"] == 5


def test_recipe_with_two_teachers(tmp_path, prompts_file):
    (tmp_path / "r.yaml").write_text(f"""
prompts: {{path: {prompts_file}, limit: 2}}
seed: 3
teachers:
  - {{name: a, model: "{TINY}", k: 1, sampling: {{max_new_tokens: 3}}}}
  - {{name: b, model: "{TINY}?seed=2", k: 2, sampling: {{max_new_tokens: 3, temperature: 0.5}}}}
""")
    proc = run_cli("generate", "--config", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o"), "-q")
    assert proc.returncode == 0, proc.stderr
    assert "6 candidates (a: 2, b: 4)" in proc.stdout
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["seed"] == 3 and [t["name"] for t in manifest["config"]["teachers"]] == ["a", "b"]


def test_models_and_version():
    proc = run_cli("models")
    assert proc.returncode == 0 and "embedded:smollm2" in proc.stdout and "tiny:llama" in proc.stdout
    assert run_cli("version").stdout.strip() == "0.1.0"
