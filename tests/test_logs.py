"""Logs off a terminal: with stderr a pipe (SLURM, Ray, CI, nohup) progress is plain periodic lines, never a redrawn
bar; `--log-json` makes stderr one JSON object per line and event (stage start/end, progress, warnings, errors, the
closing summary) on every stage command; `--quiet` prints no progress."""

from __future__ import annotations

import json
import logging
import subprocess

import pytest
import yaml

from datasteer import progress
from tests.conftest import DATASTEER, TINY, cli_env
from tests.test_dpg_trainer import recipe as dpg_recipe
from tests.test_inheritance import ROWS, write_rows


def run(*args, **env):
    """The CLI with stdout and stderr both pipes, as under SLURM or CI."""
    return subprocess.run(DATASTEER + [str(a) for a in args], capture_output=True, text=True,
                          env=cli_env(**env), timeout=300)


def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(e, dict) and "event" in e and "time" in e for e in events)
    return events


def generate_args(prompts_file, out):
    return ["generate", prompts_file, "--model", TINY, "--k", "2", "--max-new-tokens", "4", "--batch-size", "1",
            "--out", out]


def test_piped_progress_is_plain_periodic_lines(prompts_file, tmp_path):
    done = run(*generate_args(prompts_file, tmp_path / "run"), DATASTEER_PROGRESS_INTERVAL="0")
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stderr and "\r" not in done.stderr  # no colours, no cursor moves, no redraws
    lines = [line for line in done.stderr.splitlines() if line.startswith("generate")]
    # interval 0: a line per finished batch of 2 rows (none before the first: a stage that fails to start leaves
    # its error as the only line)
    counts = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert counts == [2, 4, 6, 8, 10], done.stderr
    assert lines[0].startswith("generate [llama]: 2/10 rows (20%)")
    assert "10/10 rows (100%)" in lines[-1] and "tok/s" in lines[-1] and "ETA 0:00" in lines[-1]
    # a long interval: the first line and the closing one only
    quiet = run(*generate_args(prompts_file, tmp_path / "run2"), DATASTEER_PROGRESS_INTERVAL="3600")
    lines = [line for line in quiet.stderr.splitlines() if line.startswith("generate")]
    assert len(lines) == 2 and "10/10 rows" in lines[-1], quiet.stderr
    # --quiet: nothing at all on stderr, the result still on stdout
    silent = run(*generate_args(prompts_file, tmp_path / "run3"), "--quiet")
    assert silent.returncode == 0 and silent.stderr == "" and "10 candidates" in silent.stdout


def test_log_json_events_of_a_stage(prompts_file, tmp_path):
    done = run(*generate_args(prompts_file, tmp_path / "run"), "--log-json", DATASTEER_PROGRESS_INTERVAL="0")
    assert done.returncode == 0, done.stderr
    events = json_lines(done.stderr)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-2:] == ["end", "summary"] and set(kinds) == {"start", "progress", "end",
                                                                                       "summary"}
    start, end, summary = events[0], events[-2], events[-1]
    assert start == {**start, "stage": "generate", "total": 10, "done": 0, "unit": "rows"}
    assert end["status"] == "done" and end["done"] == end["total"] == 10 and end["eta_s"] == 0
    progress_events = [e for e in events if e["event"] == "progress"]
    assert [e["done"] for e in progress_events] == sorted(e["done"] for e in progress_events)
    assert all({"rate", "eta_s", "elapsed_s", "tokens_per_s"} <= set(e) for e in progress_events)
    assert summary["command"] == "generate" and summary["rows"] == 10 and summary["cost"] is None
    assert summary["output"].endswith("candidates.jsonl")
    assert "10 candidates" in done.stdout  # stdout keeps the human result
    # a resumed run: start counts the rows done before
    again = json_lines(run(*generate_args(prompts_file, tmp_path / "run"), "--log-json").stderr)
    assert again[-1]["resumed"] == 10


def test_log_json_error_is_one_json_line(tmp_path):
    bad = run("generate", tmp_path / "absent.jsonl", "--model", TINY, "--out", tmp_path / "o", "--log-json")
    assert bad.returncode == 2
    (event,) = json_lines(bad.stderr)
    assert event["event"] == "error" and event["exit_code"] == 2 and "file not found" in event["message"]
    assert not (tmp_path / "o").exists()


def test_log_json_finetune_and_select(tmp_path):
    data = write_rows(tmp_path / "sel.jsonl", ROWS * 2)
    done = run("finetune", data, "--model", TINY, "--epochs", "1", "--batch-size", "4", "--out", tmp_path / "ft",
               "--log-json", DATASTEER_PROGRESS_INTERVAL="0")
    assert done.returncode == 0, done.stderr
    events = json_lines(done.stderr)
    assert [e["event"] for e in events][0] == "start" and events[0]["unit"] == "steps"
    end = next(e for e in events if e["event"] == "end")
    assert end["done"] == end["total"] == 2 and end["status"] == "done"
    assert events[-1]["event"] == "summary" and events[-1]["steps"] == 2 and events[-1]["model"].endswith("model")
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps({**r, "length_words": len(r["completion"].split())}) + "\n" for r in ROWS))
    chosen = run("select", scored, "--objective", "length_words:max", "--out", tmp_path / "sel", "--log-json")
    assert chosen.returncode == 0, chosen.stderr
    (summary,) = json_lines(chosen.stderr)
    assert summary["event"] == "summary" and summary["selected"] == 4 and summary["objectives"] == ["length_words:max"]


@pytest.mark.slow
def test_log_json_dpg_steps_and_stages(tmp_path):
    data = dpg_recipe(tmp_path)
    data["grpo"]["max_steps"] = 2
    data["validation"]["every"] = 1
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    done = run("dpg", tmp_path / "r.yaml", "--out", tmp_path / "run", "--log-json")
    assert done.returncode == 0, done.stderr
    events = json_lines(done.stderr)
    assert any(e["event"] == "stage" and e["title"].startswith("dpg: dpg (2 steps") for e in events)
    steps = [e for e in events if e["event"] == "progress" and e["stage"] == "dpg-dpg"]
    assert [e["done"] for e in steps] == [1, 2] and all(e["total"] == 2 for e in steps)
    assert "phi" in steps[0]["metrics"] and "validation/pixel_accuracy" in steps[0]["metrics"]
    assert events[-1]["event"] == "summary" and events[-1]["command"] == "dpg"
    # without --log-json, the same steps are plain lines, one per step, never wrapped
    plain = run("dpg", tmp_path / "r.yaml", "--out", tmp_path / "run2")
    lines = [line for line in plain.stderr.splitlines() if line.startswith("dpg step ")]
    assert len(lines) == 2 and all("| ETA" in line for line in lines), plain.stderr


def test_warnings_are_json_events_with_secrets_masked(capsys, monkeypatch):
    from datasteer.cli import _StderrWarnings

    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue123")
    handler = _StderrWarnings(logging.WARNING)
    record = logging.LogRecord("datasteer", logging.WARNING, __file__, 1, "retrying with hf_secretvalue123", (), None)
    progress.configure("json")
    try:
        handler.emit(record)
    finally:
        progress.configure("auto")
    (event,) = json_lines(capsys.readouterr().err)
    assert event["event"] == "warning" and "hf_secretvalue123" not in event["message"] and "***" in event["message"]
    handler.emit(record)  # not json: the usual line
    assert capsys.readouterr().err.startswith("datasteer: warning: retrying with ***")


def test_tracker_numbers_and_modes(monkeypatch, capsys):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    assert progress.mode() == "lines"
    progress.configure("json", interval_s=3600)
    try:
        with progress.track("work", 4, done=1, unit="items", tokens=False) as tracker:
            tracker.advance(1)
            tracker.advance(2)
    finally:
        progress.configure("auto")
    events = json_lines(capsys.readouterr().err)
    assert [e["event"] for e in events] == ["start", "progress", "end"]
    assert events[0]["done"] == 1 and events[-1]["done"] == 4 and events[-1]["eta_s"] == 0
    with pytest.raises(RuntimeError):
        progress.configure("json")
        try:
            with progress.track("broken", 2) as tracker:
                raise RuntimeError("stop")
        finally:
            progress.configure("auto")
    assert json_lines(capsys.readouterr().err)[-1]["status"] == "failed"
    assert progress.clock(3725) == "1:02:05" and progress.clock(None) == "-:--"


def test_generate_rate_and_price_flags_set_the_teachers(tmp_path, monkeypatch):
    import datasteer.generation
    from datasteer.cli import main

    seen = []

    def capture(config, out, **kwargs):
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(datasteer.generation, "generate", capture)
    with pytest.raises(SystemExit):
        main(["generate", "p.jsonl", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
              "--rpm", "60", "--tpm", "9000", "--input-price", "0.5", "--output-price", "1.5", "--out", str(tmp_path)])
    (teacher,) = seen[0].teachers
    assert (teacher.rpm, teacher.tpm, teacher.prices.input, teacher.prices.output) == (60, 9000, 0.5, 1.5)


def test_generate_rate_and_price_flags_and_the_cost(tmp_path):
    """--rpm/--tpm/--input-price/--output-price set the teacher's fields; the closing line and summary give the cost."""
    from tests.conftest import write_prompts
    from tests.test_openai_server import StubOpenAI

    prompts = write_prompts(tmp_path / "p.jsonl", [f"question {i}" for i in range(4)])
    with StubOpenAI() as stub:
        done = run("generate", prompts, "--backend", "openai", "--base-url", stub.url, "--model", "m",
                   "--rpm", "6000", "--tpm", "1000000", "--input-price", "2.5", "--output-price", "10",
                   "--out", tmp_path / "run", "--log-json")
    assert done.returncode == 0, done.stderr
    summary = json_lines(done.stderr)[-1]
    usage = summary["usage"]["m"]
    expected = round(usage["prompt_tokens"] * 2.5e-6 + usage["completion_tokens"] * 1e-5, 6)
    assert summary["cost"] == pytest.approx(expected) and expected > 0
    assert f"estimated cost {expected:.6g}" in done.stdout
