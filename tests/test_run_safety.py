"""Issue 14's run-safety rows: locked run directories, --overwrite that never deletes an input or another kind of
run, location-free resume, one error channel for OS errors, secrets kept out of every file and stderr, a
visible retry loop, and up-front refusals (offline detoxify, bad regexes, attribute outputs)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from datasteer.errors import ConfigError, RunMismatchError
from datasteer.runs import LOCK, OutputError, Run, RunInUseError, atomic_write_text, file_input
from tests.conftest import DATASTEER, cli_env, write_prompts

KEY = "sk-audit-do-not-leak-0123456789"
URL_KEY = "urlkey-do-not-leak-9876543210"


def _prepare(path, stage="generate", config=None, inputs=None, overwrite=False):
    return Run.prepare(path, stage=stage, config=config or {"a": 1}, inputs=inputs or {"x": "h"}, seed=0,
                       overwrite=overwrite)


def _cli(*args, timeout=300, cwd=None, **env):
    return subprocess.run(DATASTEER + list(args), capture_output=True, text=True, env=cli_env(**env), timeout=timeout,
                          cwd=cwd)


def _one_line_error(proc, words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("datasteer: error: ") and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def _main_error(argv, capsys, words):
    from datasteer.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in err, err


def _no_temporaries(root):
    return not [p for p in root.rglob("*") if ".tmp-" in p.name]


# ---------------------------------------------------------------- row 12: one command per directory

HOLD = """
import sys, time
from datasteer.runs import Run
run = Run.prepare(sys.argv[1], stage="score", config={"a": 1}, inputs={"x": "h"}, seed=0)
run.write_shard("g", "000000", [{"i": 1}])
print("ready", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A process that holds `tmp_path/run` (a score run) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                            env=cli_env())
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_directory_in_use_is_refused_then_taken_over_once_its_holder_dies(tmp_path, holder):
    run_dir = tmp_path / "run"
    with pytest.raises(RunInUseError, match=f"is in use by pid {holder.pid}"):
        Run.prepare(run_dir, stage="score", config={"a": 1}, inputs={"x": "h"}, seed=0)
    with pytest.raises(RunInUseError):  # --overwrite does not break a lock either
        Run.prepare(run_dir, stage="score", config={"a": 2}, inputs={"x": "h"}, seed=0, overwrite=True)
    assert (run_dir / "shards" / "g" / "000000.jsonl").exists()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (run_dir / LOCK).exists()  # a stale lock: its pid is dead
    run = Run.prepare(run_dir, stage="score", config={"a": 1}, inputs={"x": "h"}, seed=0)
    assert run.has_shard("g", "000000")
    run.finish({"rows": 1})
    assert not (run_dir / LOCK).exists(), "finish releases the lock"


def test_cli_on_a_directory_in_use_is_one_line(tmp_path, holder):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"completion": "hello there"}\n')
    _one_line_error(_cli("score", str(rows), "--metrics", "length_chars", "--out", str(tmp_path / "run"),
                         "--overwrite", "--quiet"), f"is in use by pid {holder.pid}")


def test_the_same_process_may_take_over_its_own_abandoned_run(tmp_path):
    first = _prepare(tmp_path / "run")
    first.write_shard("t", "000000", [{"i": 1}])  # then "crashes": never finishes, never released
    second = _prepare(tmp_path / "run")
    second.finish({"rows": 1})
    del first
    assert not (tmp_path / "run" / LOCK).exists()


# ---------------------------------------------------------------- rows 11 and 2: --overwrite

def test_overwrite_never_discards_another_kind_of_run(tmp_path):
    _prepare(tmp_path / "gen", stage="generate").finish({"output": "x"})
    with pytest.raises(RunMismatchError, match="holds a `generate` run, not a `score` run"):
        _prepare(tmp_path / "gen", stage="score", overwrite=True)
    assert (tmp_path / "gen" / "manifest.json").exists()


def test_score_over_its_own_generate_run_is_refused(tmp_path):
    """Row 11: `score X/candidates.jsonl --out X --overwrite` deleted the generate run, its own input included."""
    gen = tmp_path / "gen"
    _prepare(gen, stage="generate").finish({"output": "candidates.jsonl"})
    (gen / "candidates.jsonl").write_text('{"completion": "a fine answer"}\n')
    proc = _cli("score", str(gen / "candidates.jsonl"), "--metrics", "length_chars", "--out", str(gen), "--overwrite",
                "--quiet")
    _one_line_error(proc, "holds a `generate` run")
    assert (gen / "candidates.jsonl").exists() and (gen / "manifest.json").exists()


def test_overwrite_never_deletes_an_input_of_the_new_run(tmp_path):
    run_dir = tmp_path / "run"
    _prepare(run_dir, stage="score").write_shard("g", "000000", [{"i": 1}])
    rows = run_dir / "mine.jsonl"
    rows.write_text('{"completion": "x"}\n')
    with pytest.raises(RunMismatchError, match="would delete .*mine.jsonl, an input of this run"):
        _prepare(run_dir, stage="score", config={"a": 2}, inputs={"rows": file_input(rows, 1)}, overwrite=True)
    assert rows.exists()


def test_overwrite_never_discards_a_directory_that_holds_no_run(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(RunMismatchError, match="holds no datasteer run"):
        _prepare(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.tex").exists()


def test_dpg_arms_never_write_into_another_kind_of_run(tmp_path):
    """Row 2: `dpg ... --out <an inherit run>` overwrote the inherit run's report: its arms are refused there."""
    _prepare(tmp_path / "inh", stage="inherit").finish({"report": "report.md"})
    with pytest.raises(RunMismatchError, match="inside a `inherit` run"):
        _prepare(tmp_path / "inh" / "naive", stage="dpg-naive")
    _prepare(tmp_path / "inh" / "generate", stage="generate")  # its own stages are fine
    _prepare(tmp_path / "d", stage="dpg").write_shard("x", "0", [])
    _prepare(tmp_path / "d" / "naive", stage="dpg-naive")


def test_cli_dpg_into_an_inherit_run_is_refused(tmp_path, capsys):
    inh = tmp_path / "inh"
    _prepare(inh, stage="inherit").finish({"report": "report.md"})
    (inh / "report.md").write_text("the inherit report")
    _main_error(["dpg", "demo-dpg-67", "--out", str(inh), "--quiet"], capsys, "holds a `inherit` run, not a `dpg` run")
    assert (inh / "report.md").read_text() == "the inherit report" and not (inh / "results.json").exists()


# ---------------------------------------------------------------- row 6 and 18: location-free identity

def test_the_same_run_given_another_way_resumes(tmp_path, monkeypatch):
    from datasteer.metrics import score
    from datasteer.metrics.config import ScoreConfig

    data = tmp_path / "data"
    data.mkdir()
    (data / "rows.jsonl").write_text('{"completion": "one two"}\n{"completion": "three"}\n')
    monkeypatch.chdir(data)
    first = score(ScoreConfig(input="rows.jsonl", metrics=["length_chars"]), "../run", progress=False)
    assert first.scored_units == 1
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    absolute = ScoreConfig(input=str(data / "rows.jsonl"), metrics=["length_chars"])
    assert score(absolute, tmp_path / "run", progress=False).scored_units == 0  # absolute --out and input
    (tmp_path / "run").rename(tmp_path / "moved")
    assert score(absolute, tmp_path / "moved", progress=False).scored_units == 0  # a moved run directory
    manifest = json.loads((tmp_path / "moved" / "manifest.json").read_text())
    assert manifest["config"]["input"] == "rows.jsonl" and manifest["inputs"]["rows"]["path"].endswith("rows.jsonl")
    (data / "rows.jsonl").write_text('{"completion": "changed"}\n')
    with pytest.raises(RunMismatchError, match="inputs.rows.sha256"):  # content still decides
        score(absolute, tmp_path / "moved", progress=False)


def test_descriptive_fields_never_block_a_resume(tmp_path):
    _prepare(tmp_path / "run", config={"name": "a", "description": "first", "k": 1}).finish({"rows": 1})
    assert _prepare(tmp_path / "run", config={"name": "b", "description": "renamed", "k": 1}).complete
    with pytest.raises(RunMismatchError, match="config.k"):
        _prepare(tmp_path / "run", config={"name": "b", "k": 2})


# ---------------------------------------------------------------- rows 8 and 13: one error channel

def test_a_directory_with_only_temporaries_and_a_lock_is_empty(tmp_path):
    """Row 13: SIGKILL while the first manifest.json was written left manifest.json.tmp-PID only."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json.tmp-4242").write_text('{"datas')
    (run_dir / LOCK).write_text("4242\n")
    run = _prepare(run_dir)
    run.write_shard("t", "000000", [{"i": 1}])
    run.finish({"rows": 1})
    assert _no_temporaries(run_dir) and json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"


def test_a_failed_atomic_write_leaves_no_temporary_and_names_the_path(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match=r"cannot write .*f\.txt: No space left on device; free some disk space"):
        atomic_write_text(tmp_path / "f.txt", "data")
    assert list(tmp_path.iterdir()) == []


def test_outputs_that_cannot_be_written_are_one_line(tmp_path, capsys, monkeypatch):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"completion": "hello"}\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _main_error(["score", str(rows), "--metrics", "length_chars", "--out", str(a_file / "run"), "-q"], capsys,
                "is a file, not a directory")
    _main_error(["dpg", "demo-dpg-67", "--out", str(a_file), "--quiet"], capsys, "not a directory")
    assert a_file.read_text() == "x"

    # a read-only output parent (root ignores permissions, so the refusal of mkdir is simulated)
    from pathlib import Path

    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if "readonly" in str(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    _main_error(["score", str(rows), "--metrics", "length_chars", "--out", str(tmp_path / "readonly" / "run"), "-q"],
                capsys, "Permission denied; make its folder writable")
    assert _no_temporaries(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_read_only_parent_is_one_line(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"completion": "hello"}\n')
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _main_error(["score", str(rows), "--metrics", "length_chars", "--out", str(locked / "run"), "-q"], capsys,
                    "not writable")
    finally:
        locked.chmod(0o755)


def test_compare_markdown_into_a_directory_is_one_line(tmp_path, capsys):
    from datasteer.cli import main

    profile_dir = tmp_path / "p"
    main(["profile", "tiny:llama", "--out", str(profile_dir), "--prompts", str(
        write_prompts(tmp_path / "q.jsonl", ["Say hi.", "Say bye."])), "--metrics", "length", "--max-new-tokens", "4",
        "-q"])
    capsys.readouterr()
    (tmp_path / "md").mkdir()
    _main_error(["compare", str(profile_dir), str(profile_dir), "--markdown", str(tmp_path / "md")], capsys,
                "is a directory")
    assert list((tmp_path / "md").iterdir()) == [] and _no_temporaries(tmp_path)


# ---------------------------------------------------------------- row 3: attribute never writes over its input

@pytest.mark.parametrize("case, words", [
    ("same", "is the input file"),
    ("column", "already has a column 'text'"),
    ("exists", "already exists; choose another --out, or pass --overwrite"),
    ("directory", "is a directory"),
])
def test_attribute_refuses_unsafe_outputs(tmp_path, capsys, case, words):
    rows = tmp_path / "rows.jsonl"
    original = '{"text": "a row to score"}\n'
    rows.write_text(original)
    (tmp_path / "held.txt").write_text("held out\n")
    out = {"same": rows, "column": tmp_path / "o.jsonl", "exists": tmp_path / "old.jsonl",
           "directory": tmp_path}[case]
    (tmp_path / "old.jsonl").write_text("keep me\n")
    extra = ["--column", "text"] if case == "column" else []
    _main_error(["attribute", str(rows), "--eval-texts", str(tmp_path / "held.txt"), "--model", "tiny:gpt2",
                 "--out", str(out), "-q", *extra], capsys, words)
    assert rows.read_text() == original and (tmp_path / "old.jsonl").read_text() == "keep me\n"
    assert not (tmp_path / "o.jsonl").exists() and _no_temporaries(tmp_path)


def test_an_invalid_trainable_regex_is_a_config_error():
    from datasteer.config import build
    from datasteer.metagrad.attribute import AttributeConfig

    with pytest.raises(ConfigError, match=r"training.trainable.*'\(' is not a valid regular expression"):
        build(AttributeConfig, {"input": "x.jsonl", "training": {"trainable": ["("]}})


# ---------------------------------------------------------------- row 15: offline detoxify

def test_detoxify_offline_without_a_checkpoint_is_refused_up_front(monkeypatch):
    import types

    from datasteer.metrics import toxicity

    def no_download(**kwargs):
        raise AssertionError("must not try to download")

    monkeypatch.setattr(toxicity, "optional_import", lambda *a: types.SimpleNamespace(Detoxify=no_download))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="checkpoint="):
        toxicity.DetoxifyScorer()


# ---------------------------------------------------------------- rows 4, 5, 14: a loopback server

class _Server:
    """A loopback chat-completions server: `mode` ok (content null for the prompt 'nothing'), fail (500 whose text
    quotes the key), or silent (never answers in time)."""

    def __init__(self, mode):
        self.mode, self.paths = mode, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.paths.append(self.path)
                if outer.mode == "silent":
                    time.sleep(2)
                    return
                if outer.mode == "fail":
                    status, answer = 500, {"error": {"message": f"internal error for key {KEY} at {self.path}"}}
                else:
                    said = body["messages"][-1]["content"]
                    status, answer = 200, {"choices": [{"index": 0, "finish_reason": "stop", "message": {
                        "role": "assistant", "content": None if said == "nothing" else f"echo {said}"}}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self):
        return f"http://user:{URL_KEY}@127.0.0.1:{self.port}/v1?key={URL_KEY}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request):
    s = _Server(request.param)
    yield s
    s.close()


def _generate(tmp_path, server, *extra):
    prompts = write_prompts(tmp_path / "prompts.jsonl", ["hello", "nothing"])
    return _cli("generate", str(prompts), "--backend", "openai", "--base-url", server.url(), "--model", "m",
                "--api-key-env", "AUDIT_KEY", "--out", str(tmp_path / "run"), "--quiet", *extra, AUDIT_KEY=KEY)


def _assert_no_secret(tmp_path, proc):
    for text in (proc.stdout, proc.stderr):
        assert KEY not in text and URL_KEY not in text, text
    for path in (tmp_path / "run").rglob("*") if (tmp_path / "run").exists() else []:
        if path.is_file():
            content = path.read_bytes()
            assert KEY.encode() not in content and URL_KEY.encode() not in content, path


@pytest.mark.parametrize("server", ["ok"], indirect=True)
def test_credentials_reach_no_file_and_null_content_is_counted(tmp_path, server):
    proc = _generate(tmp_path, server)
    assert proc.returncode == 0, proc.stderr
    _assert_no_secret(tmp_path, proc)
    assert server.paths and all(p.startswith("/v1/chat/completions?key=") for p in server.paths)
    rows = [json.loads(x) for x in (tmp_path / "run" / "candidates.jsonl").read_text().splitlines()]
    assert [r["finish_reason"] for r in rows] == ["stop", "empty"] and rows[1]["completion"] == ""
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["summary"]["finish_reasons"] == {"stop": 1, "empty": 1}
    assert manifest["config"]["teachers"][0]["base_url"].endswith("/v1?key=***")


@pytest.mark.parametrize("server", ["fail"], indirect=True)
def test_a_server_quoting_the_key_never_puts_it_on_stderr(tmp_path, server):
    proc = _generate(tmp_path, server, "--max-retries", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    *warnings, error = proc.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("datasteer: warning: ") and "retry 1 of 1" in w for w in warnings)
    assert error.startswith("datasteer: error: ") and "HTTP 500: internal error for key ***" in error, proc.stderr
    _assert_no_secret(tmp_path, proc)


@pytest.mark.parametrize("server", ["silent"], indirect=True)
def test_a_silent_server_shows_each_retry_and_gives_up_in_time(tmp_path, server):
    start = time.time()
    proc = _generate(tmp_path, server, "--timeout-s", "0.3", "--max-retries", "2")
    assert time.time() - start < 60
    assert proc.returncode == 2, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("datasteer: warning: ")]
    assert len(warnings) == 4  # two prompts, two retries each
    assert all("ReadTimeout after 0.3s" in w for w in warnings)
    assert "kept failing after 2 retries" in proc.stderr.strip().splitlines()[-1]
    _assert_no_secret(tmp_path, proc)
    assert not (tmp_path / "run").exists()


def test_timeout_and_retries_are_cli_flags_with_model_defaults():
    from datasteer.generation.openai_backend import OpenAITeacherConfig

    assert OpenAITeacherConfig.model_fields["timeout_s"].default == 120.0
    assert OpenAITeacherConfig.model_fields["max_retries"].default == 6
    from typer.testing import CliRunner

    from datasteer.cli import app

    result = CliRunner().invoke(app, ["generate", "--help"])
    assert "--timeout-s" in result.output and "--max-retries" in result.output


def test_select_help_names_a_column():
    from typer.testing import CliRunner

    from datasteer.cli import app

    result = CliRunner().invoke(app, ["select", "--help"], terminal_width=200)
    assert "length_words>=50" in " ".join(result.output.split()) and "length>=50" not in result.output


def test_a_run_that_wrote_only_its_manifest_leaves_nothing_when_released(tmp_path):
    run = _prepare(tmp_path / "run")
    run.ensure_created()  # e.g. inherit, before its first stage fails
    run.release()
    assert not (tmp_path / "run").exists()
    kept = _prepare(tmp_path / "kept")
    kept.write_shard("t", "000000", [{"i": 1}])
    kept.release()
    assert (tmp_path / "kept" / "shards").exists() and not (tmp_path / "kept" / LOCK).exists()
