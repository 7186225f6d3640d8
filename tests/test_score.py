"""`score` end to end: columns added to every row, missing values kept and counted, resume, CLI errors."""

import json
import math

import pytest

from datasteer.metrics.config import ScoreConfig
from datasteer.errors import DatasteerError, RunMismatchError
from datasteer.metrics import score
from datasteer.metrics.lexical import mtld
from tests.test_cli import _assert_user_error, run_cli

ROWS = [
    {"prompt_id": "p0", "prompt": "Say something kind.", "completion": "You are wonderful and kind.", "source": "a"},
    {"prompt_id": "p0", "prompt": "Say something kind.", "completion": "fuck you, idiot", "source": "a"},
    {"prompt_id": "p1", "prompt": "Describe rain.", "completion": "", "source": "b"},
    {"prompt_id": "p1", "prompt": "Describe rain.", "completion": "Rain falls; x marks wet streets.", "source": "b"},
    {"prompt_id": "p2", "prompt": "Count.", "completion": "one two three four five seven", "source": "a"},
    {"prompt_id": "p2", "prompt": "Count.", "completion": "x " * 50, "source": "b"},
]

USER_MODULE = """
import os, math
def fragile(texts):
    with open(os.environ["CALLS_FILE"], "a") as fh:
        fh.write(f"{len(texts)}\\n")
    if os.environ.get("FAIL_ON") and any(os.environ["FAIL_ON"] in t for t in texts):
        raise RuntimeError("simulated crash")
    return [math.nan if "x" in t else float(len(t)) for t in texts]
"""


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "candidates.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "fragile_metrics.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CALLS_FILE", str(tmp_path / "calls.txt"))
    return tmp_path / "calls.txt"


def test_score_adds_columns_and_summaries(rows_file, tmp_path, user_module):
    config = ScoreConfig(input=str(rows_file), metrics=["mtld", "length_words", "toxicity", "fragile_metrics:fragile"],
                         chunk_size=4)
    result = score(config, tmp_path / "run", progress=False)
    scored = [json.loads(line) for line in result.scored_path.read_text().splitlines()]
    assert [{k: r[k] for k in ROWS[0]} for r in scored] == ROWS  # input rows kept, in order
    assert [r["mtld"] for r in scored] == [mtld(r["completion"]) for r in ROWS]
    assert [r["length_words"] for r in scored] == [5, 3, 0, 6, 6, 50]
    assert scored[1]["toxicity_profanity"] > 0.9 and scored[2]["toxicity_profanity"] == 0.0
    assert [r["fragile"] for r in scored] == [27.0, 15.0, 0.0, None, 29.0, None]  # NaN -> null, row kept
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["metrics"]["fragile"]["missing"] == 2 and summary["metrics"]["fragile"]["count"] == 4
    assert result.missing["fragile"] == 2
    tox = summary["metrics"]["toxicity_profanity"]["toxicity"]
    maxima = {}
    for r in scored:
        maxima[r["prompt_id"]] = max(maxima.get(r["prompt_id"], 0.0), r["toxicity_profanity"])
    assert tox["expected_maximum_toxicity"] == pytest.approx(sum(maxima.values()) / 3)
    assert tox["toxicity_probability"] == pytest.approx(1 / 3) and tox["samples_per_prompt"] == {"min": 2, "max": 2}
    stats = summary["metrics"]["length_words"]
    assert stats["mean"] == pytest.approx(70 / 6) and stats["p50"] == 5.5 and stats["max"] == 50.0
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stage"] == "score"


def test_a_crash_resumes_without_redoing_finished_chunks(rows_file, tmp_path, user_module, monkeypatch):
    config = ScoreConfig(input=str(rows_file), metrics=["length_chars", "fragile_metrics:fragile"], chunk_size=2)
    monkeypatch.setenv("FAIL_ON", "one two three")  # row 5, in the third chunk
    with pytest.raises(DatasteerError, match="simulated crash"):
        score(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "scored.jsonl").exists()
    assert len(list((tmp_path / "run" / "shards" / "fragile").glob("*.jsonl"))) == 2
    assert user_module.read_text().split() == ["2", "2", "2"]  # chunks 0 and 1 done, chunk 2 crashed

    monkeypatch.delenv("FAIL_ON")
    result = score(config, tmp_path / "run", progress=False)
    assert result.scored_units == 1  # only the crashed chunk was redone
    assert user_module.read_text().split() == ["2", "2", "2", "2"]
    fresh = score(config, tmp_path / "fresh", progress=False)
    assert result.scored_path.read_bytes() == fresh.scored_path.read_bytes()

    changed = ScoreConfig(input=str(rows_file), metrics=["length_chars"], chunk_size=2)
    with pytest.raises(RunMismatchError, match="config.metrics"):
        score(changed, tmp_path / "run", progress=False)
    assert score(changed, tmp_path / "run", overwrite=True, progress=False).columns == ["length_chars"]


def test_existing_column_is_not_overwritten(tmp_path):
    path = tmp_path / "scored.jsonl"
    path.write_text(json.dumps({"completion": "hi", "mtld": 3.0}) + "\n")
    with pytest.raises(DatasteerError, match=r"already has column\(s\) \['mtld'\]"):
        score(ScoreConfig(input=str(path), metrics=["mtld"]), tmp_path / "run", progress=False)
    result = score(ScoreConfig(input=str(path), metrics=["mtld[column=mtld_2]"]), tmp_path / "run", progress=False)
    assert json.loads(result.scored_path.read_text())["mtld_2"] == 1.0


@pytest.mark.parametrize("content, args, words", [
    (None, ["--metrics", "mtld"], "file not found"),
    ('{"prompt": "p"}\n', ["--metrics", "mtld"], "row 1 has no 'completion' field"),
    ('{"completion": 3}\n', ["--metrics", "mtld"], "row 1 has a non-text 'completion' field"),
    ('{"completion": "ok"}\n{"completion": \n', ["--metrics", "mtld"], "rows.jsonl:2: not valid JSON"),
    ("", ["--metrics", "mtld"], "has no rows to score"),
    ('{"completion": "ok"}\n', ["--metrics", "mtdl"], "unknown metric 'mtdl'"),
    ('{"completion": "ok"}\n', [], "give --metrics"),
    ('{"completion": "ok"}\n', ["--metrics", "judge[model=tiny:llama]"], "no 'prompt' text"),
    ('{"completion": "ok"}\n', ["--metrics", "toxicity[backend=perspective]"], "PERSPECTIVE_API_KEY is not set"),
])
def test_cli_errors_are_one_line_and_leave_nothing(tmp_path, content, args, words):
    rows = tmp_path / "rows.jsonl"
    if content is not None:
        rows.write_text(content)
    out = tmp_path / "out"
    proc = run_cli("score", str(rows), "--out", str(out), *args, timeout=120, PERSPECTIVE_API_KEY="")
    _assert_user_error(proc, words, out)


def test_cli_scores_and_reports(rows_file, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("score", str(rows_file), "--out", str(out), "--metrics", "mtld,readability,hdd", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "6 rows scored" in proc.stdout and "flesch_reading_ease" in proc.stdout
    assert "hdd has no value for 5 of 6 rows" in " ".join(proc.stdout.split())
    scored = [json.loads(line) for line in (out / "scored.jsonl").read_text().splitlines()]
    assert scored[5]["hdd"] is not None and scored[0]["hdd"] is None
    assert math.isnan(float("nan")) and scored[2]["flesch_reading_ease"] is None  # empty text: no readability
    listing = run_cli("metrics")
    assert listing.returncode == 0 and "mtld [threshold]" in listing.stdout and "readability (group)" in listing.stdout
