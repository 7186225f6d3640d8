"""Values that are not numbers are missing values everywhere, and options that would do nothing are refused
(issue 14, rows 10 and 18)."""

import json
import math
import subprocess
import sys

import pytest

from datasteer.errors import ConfigError
from datasteer.inheritance.config import FinetuneConfig, SelectConfig, parse_constraint
from datasteer.inheritance.select import select
from datasteer.metrics import build_scorers
from datasteer.metrics.config import ScoreConfig
from datasteer.metrics.runner import score
from datasteer.stats import column_stats


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes inf as Infinity, as Python reads it
    return path


def test_inf_is_missing_in_selection_and_summaries(tmp_path):
    rows = _rows(tmp_path / "scored.jsonl", [
        {"prompt_id": "a", "completion": "x", "s": math.inf, "t": 1.0},
        {"prompt_id": "a", "completion": "y", "s": 2.0, "t": 3.0},
        {"prompt_id": "b", "completion": "z", "s": -math.inf, "t": 2.0},
        {"prompt_id": "b", "completion": "w", "s": math.nan, "t": 5.0},
    ])
    one = select(SelectConfig(input=str(rows), objectives=["s:max"]), tmp_path / "one")
    chosen = [json.loads(line) for line in one.selected_path.read_text().splitlines()]
    assert [r["completion"] for r in chosen] == ["y"]  # inf does not win; prompt b has no finite value
    assert one.summary["dropped_reasons"] == {"s missing": 1}
    both = select(SelectConfig(input=str(rows), objectives=["s:max", "t:min"]), tmp_path / "two")
    chosen = [json.loads(line) for line in both.selected_path.read_text().splitlines()]
    assert [r["completion"] for r in chosen] == ["y"]  # not "x" (inf ignored for the prompt), b dropped
    for run in ("one", "two"):  # valid JSON: no NaN or Infinity tokens
        text = (tmp_path / run / "summary.json").read_text()
        json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    stats = column_stats([1.0, math.inf, None, math.nan, 3.0])
    assert stats["count"] == 2 and stats["missing"] == 3 and stats["non_finite"] == 1 and stats["mean"] == 2.0


def test_weighted_selection_of_values_near_the_float_limit(tmp_path):
    rows = _rows(tmp_path / "scored.jsonl", [
        {"prompt_id": "a", "completion": "x", "s": 1e308, "t": 1.0},
        {"prompt_id": "a", "completion": "y", "s": -1e308, "t": 1.0},
        {"prompt_id": "a", "completion": "z", "s": 0.0, "t": 0.0}])
    result = select(SelectConfig(input=str(rows), objectives=["s:max", "t:max"]), tmp_path / "o")
    assert [json.loads(line)["completion"] for line in result.selected_path.read_text().splitlines()] == ["x"]


def test_a_scorer_returning_inf_writes_missing_values(tmp_path, monkeypatch):
    (tmp_path / "inf_metric.py").write_text("def big(texts):\n    return [float('inf') for _ in texts]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = _rows(tmp_path / "rows.jsonl", [{"prompt_id": "1", "completion": "a"}])
    result = score(ScoreConfig(input=str(rows), metrics=["inf_metric:big"]), tmp_path / "s", progress=False)
    row = json.loads(result.scored_path.read_text())
    assert row["big"] is None and result.summary["metrics"]["big"]["missing"] == 1


def test_no_numpy_warnings_on_stderr(tmp_path):
    rows = _rows(tmp_path / "scored.jsonl", [{"prompt_id": "a", "completion": "x", "s": math.inf},
                                             {"prompt_id": "a", "completion": "y", "s": 1.0}])
    code = (f"from datasteer.inheritance.select import select; from datasteer.inheritance.config import "
            f"SelectConfig; select(SelectConfig(input={str(rows)!r}, objectives=['s:max']), {str(tmp_path / 'o')!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Warning" not in done.stderr, done.stderr


def test_options_that_would_do_nothing_are_refused():
    with pytest.raises(ConfigError, match="nothing compares to nan"):
        parse_constraint("length_words>=nan")
    with pytest.raises(ValueError, match="weights .* apply to combine=weighted only"):
        SelectConfig(input="x", objectives=["mtld:max:2", "length_words:max"], combine="lexicographic")
    SelectConfig(input="x", objectives=["mtld:max", "length_words:max"], combine="lexicographic")
    with pytest.raises(ValueError, match="lora settings apply to method lora"):
        FinetuneConfig(input="x", method="full", lora={"r": 4})
    FinetuneConfig(input="x", method="lora", lora={"r": 4})


def test_readability_of_text_that_is_not_latin_script_is_missing():
    scorers = build_scorers(["readability"])
    english = "The cat sat on the mat. It was happy there."
    japanese = "これは日本語の文章です。猫がマットの上に座っていました。"
    arabic = "هذا نص باللغة العربية. جلست القطة على الحصيرة."
    for scorer in scorers:
        values = scorer.score([english, japanese, arabic])
        assert math.isfinite(values[0]) and math.isnan(values[1]) and math.isnan(values[2]), scorer.name


def test_attribute_numbers_rows_from_one(tmp_path, capsys):
    from datasteer.cli import main

    rows = _rows(tmp_path / "rows.jsonl", [{"text": "a longer text here"}, {"text": "a"}])
    (tmp_path / "held.txt").write_text("held out text\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["attribute", str(rows), "--model", "tiny:gpt2", "--eval-texts", str(tmp_path / "held.txt"),
              "--out", str(tmp_path / "out.jsonl"), "-q"])
    assert exit_info.value.code == 2
    assert "row 2's 'text' is a single token" in capsys.readouterr().err
