"""Selection rules on hand-built rows: max/min, weighted z-scores, lexicographic, constraints, sources,
missing values, ties, the random baseline, and the CLI's errors."""

import json
import math

import pytest

from datasteer.inheritance.config import SelectConfig
from datasteer.errors import ConfigError, InputError
from datasteer.inheritance.select import parse_constraint, parse_objective, select, select_rows
from tests.test_cli import _assert_user_error, run_cli


def row(pid, i, source="a", **cols):
    return {"prompt_id": pid, "completion": f"{pid}-{source}-{i}", "source": source, "sample_index": i, **cols}


def cfg(**kw):
    kw.setdefault("input", "rows.jsonl")
    return SelectConfig(**kw)


def picked(selection):
    return {r["prompt_id"]: r["completion"] for r in selection.selected}


def test_max_and_min_with_score_and_margin():
    rows = [row("p", 0, mtld=10.0), row("p", 1, mtld=30.0), row("p", 2, mtld=25.0),
            row("q", 0, mtld=5.0), row("q", 1, mtld=1.0)]
    best = select_rows(rows, cfg(objectives=["mtld:max"]))
    assert picked(best) == {"p": "p-a-1", "q": "q-a-0"}
    info = best.selected[0]["selection"]
    assert info == {"objective": "mtld:max", "score": 30.0, "margin": 5.0, "eligible": 3, "candidates": 3}
    worst = select_rows(rows, cfg(objectives=["mtld:min"]))
    assert picked(worst) == {"p": "p-a-0", "q": "q-a-1"}
    assert worst.selected[0]["selection"]["score"] == 10.0
    assert worst.selected[0]["selection"]["margin"] == 15.0  # 25 - 10, oriented so that positive = better
    # the selected row keeps every input column
    assert {k for k in best.selected[0] if k != "selection"} == set(rows[1])


def test_single_candidate_has_no_margin():
    sel = select_rows([row("p", 0, mtld=3.0)], cfg(objectives=["mtld:max"]))
    assert sel.selected[0]["selection"]["margin"] is None


def test_ties_go_to_the_first_candidate_in_the_input():
    rows = [row("p", 0, mtld=7.0), row("p", 1, mtld=9.0), row("p", 2, mtld=9.0)]
    assert picked(select_rows(rows, cfg(objectives=["mtld:max"]))) == {"p": "p-a-1"}
    assert select_rows(rows, cfg(objectives=["mtld:max"])).selected[0]["selection"]["margin"] == 0.0
    rows.reverse()
    assert picked(select_rows(rows, cfg(objectives=["mtld:max"]))) == {"p": "p-a-2"}


def test_weighted_sum_of_per_prompt_z_scores():
    # x: 0, 1, 2 (z = -1.2247, 0, 1.2247); y: 10, 0, 5 (z = 1.2247, -1.2247, 0)
    rows = [row("p", 0, x=0.0, y=10.0), row("p", 1, x=1.0, y=0.0), row("p", 2, x=2.0, y=5.0)]
    equal = select_rows(rows, cfg(objectives=["x:max", "y:max"]))
    assert picked(equal) == {"p": "p-a-2"}  # z sums: 0, -1.22, 1.22
    z = math.sqrt(1.5)
    assert equal.selected[0]["selection"]["score"] == pytest.approx(z)
    assert equal.selected[0]["selection"]["margin"] == pytest.approx(z)
    assert equal.selected[0]["selection"]["values"] == {"x": 2.0, "y": 5.0}
    heavy_y = select_rows(rows, cfg(objectives=["x:max", "y:max:3"]))
    assert picked(heavy_y) == {"p": "p-a-0"}  # z sums: -1.22 + 3 * 1.22, ...
    mixed = select_rows(rows, cfg(objectives=["x:min", "y:min"]))
    assert picked(mixed) == {"p": "p-a-1"}  # -z sums: 0, 1.22, -1.22
    # a column on which all candidates agree contributes z = 0, not NaN
    flat = [row("p", 0, x=1.0, y=3.0), row("p", 1, x=1.0, y=4.0)]
    assert picked(select_rows(flat, cfg(objectives=["x:max", "y:max"]))) == {"p": "p-a-1"}


def test_z_scores_are_per_prompt_not_global():
    # prompt q has huge x values; per-prompt standardisation makes its scale irrelevant to p's choice
    rows = [row("p", 0, x=1.0, y=0.0), row("p", 1, x=2.0, y=0.0),
            row("q", 0, x=1000.0, y=1.0), row("q", 1, x=2000.0, y=0.0)]
    sel = select_rows(rows, cfg(objectives=["x:max", "y:max"]))
    assert picked(sel) == {"p": "p-a-1", "q": "q-a-0"}  # q: z(x) and z(y) cancel -> tie -> first


def test_lexicographic():
    rows = [row("p", 0, x=2.0, y=1.0), row("p", 1, x=2.0, y=5.0), row("p", 2, x=1.0, y=9.0)]
    sel = select_rows(rows, cfg(objectives=["x:max", "y:max"], combine="lexicographic"))
    assert picked(sel) == {"p": "p-a-1"}
    info = sel.selected[0]["selection"]
    assert info["score"] == 2.0 and info["margin"] == 4.0  # decided on y, by 5 - 1
    assert info["objective"] == "lexicographic(x:max, y:max)"
    sel = select_rows(rows, cfg(objectives=["x:min", "y:max"], combine="lexicographic"))
    assert picked(sel) == {"p": "p-a-2"} and sel.selected[0]["selection"]["margin"] == 1.0


def test_constraints_filter_and_drop_prompts_with_no_survivor():
    rows = [row("p", 0, mtld=90.0, length=10), row("p", 1, mtld=50.0, length=60),
            row("q", 0, mtld=99.0, length=5), row("q", 1, mtld=80.0, length=49)]
    sel = select_rows(rows, cfg(objectives=["mtld:max"], constraints=["length>=50"]))
    assert picked(sel) == {"p": "p-a-1"}
    assert sel.dropped == [{"prompt_id": "q", "reason": "all candidates fail length>=50", "candidates": 2}]
    assert sel.ineligible == {"constraint length>=50": 3}
    # constraints apply to the random baseline too, so it stays comparable
    rnd = select_rows(rows, cfg(objectives=["random"], constraints=["length>=50"]))
    assert picked(rnd) == {"p": "p-a-1"} and len(rnd.dropped) == 1


@pytest.mark.parametrize("spec, value, holds", [
    ("x>=2", 2.0, True), ("x>2", 2.0, False), ("x<=2", 2.0, True), ("x<2", 1.5, True), ("x==2", 2.0, True),
    ("x!=2", 2.0, False), ("x>=2", None, False), ("x<0.5", float("nan"), False), ("x>-1e3", -5.0, True),
])
def test_constraint_operators(spec, value, holds):
    assert parse_constraint(spec).holds(value) is holds


def test_missing_scores_are_not_eligible_and_all_missing_drops_the_prompt():
    rows = [row("p", 0, mtld=None), row("p", 1, mtld=5.0), row("p", 2, mtld=float("nan")),
            row("q", 0, mtld=None), row("q", 1)]
    sel = select_rows(rows, cfg(objectives=["mtld:max"]))
    assert picked(sel) == {"p": "p-a-1"}
    assert sel.selected[0]["selection"]["eligible"] == 1 and sel.selected[0]["selection"]["candidates"] == 3
    assert sel.dropped == [{"prompt_id": "q", "reason": "mtld missing", "candidates": 2}]
    assert sel.ineligible == {"missing mtld": 4}


def test_single_and_multi_source():
    rows = [row("p", 0, "small", mtld=10.0), row("p", 0, "big", mtld=20.0),
            row("q", 0, "small", mtld=30.0), row("q", 0, "big", mtld=1.0)]
    pool = select_rows(rows, cfg(objectives=["mtld:max"]))
    assert picked(pool) == {"p": "p-big-0", "q": "q-small-0"}
    small = select_rows(rows, cfg(objectives=["mtld:max"], sources=["small"]))
    assert picked(small) == {"p": "p-small-0", "q": "q-small-0"} and small.candidates == 2
    with pytest.raises(InputError, match="no candidates from source"):
        select_rows(rows, cfg(objectives=["mtld:max"], sources=["nobody"]))


def test_random_baseline_is_seeded_per_prompt_and_covers_candidates():
    rows = [row(f"p{j}", i, mtld=float(i)) for j in range(200) for i in range(4)]
    a = select_rows(rows, cfg(objectives=["random"], seed=1))
    prompts_reversed = [r for j in reversed(range(200)) for r in rows[4 * j:4 * j + 4]]
    b = select_rows(prompts_reversed, cfg(objectives=["random"], seed=1))
    assert picked(a) == picked(b)  # the draw depends on (seed, prompt), not on the order of prompts
    c = select_rows(rows, cfg(objectives=["random"], seed=2))
    assert picked(a) != picked(c)
    counts = [sum(r["sample_index"] == i for r in a.selected) for i in range(4)]
    assert min(counts) > 30, counts  # uniform over the 4 candidates (expected 50 each)
    assert a.selected[0]["selection"]["objective"] == "random" and a.selected[0]["selection"]["score"] is None


def test_parsing_errors():
    assert str(parse_objective("mtld:max:2")) == "mtld:max:2"
    for bad in ("mtld", "mtld:up", "mtld:max:-1", ":max"):
        with pytest.raises(ConfigError):
            parse_objective(bad)
    for bad in ("length=>5", "length>=five", ">=3"):
        with pytest.raises(ConfigError):
            parse_constraint(bad)
    with pytest.raises(Exception, match="cannot be combined"):
        cfg(objectives=["random", "mtld:max"])
    assert cfg(objectives="mtld:max, length:min").objectives == ["mtld:max", "length:min"]


def test_unknown_column_and_non_numeric_column():
    rows = [row("p", 0, mtld=3.0)]
    with pytest.raises(InputError, match="no column 'mtdl'.*did you mean 'mtld'"):
        select_rows(rows, cfg(objectives=["mtdl:max"]))
    with pytest.raises(InputError, match="'completion' is str, not a number"):
        select_rows(rows, cfg(objectives=["completion:max"]))
    with pytest.raises(InputError, match="no 'prompt_id' column"):
        select_rows([{"completion": "x", "mtld": 1.0}], cfg(objectives=["mtld:max"]))


def test_select_writes_run_and_empty_selection_writes_nothing(tmp_path):
    rows = [row("p", 0, mtld=1.0, length=3), row("p", 1, mtld=2.0, length=4), row("q", 0, mtld=3.0, length=99)]
    src = tmp_path / "scored.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = select(cfg(input=str(src), objectives=["mtld:max"], constraints=["length<50"]), tmp_path / "sel")
    got = [json.loads(line) for line in (tmp_path / "sel" / "selected.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in got] == ["p-a-1"]
    assert json.loads((tmp_path / "sel" / "dropped.jsonl").read_text())["prompt_id"] == "q"
    summary = json.loads((tmp_path / "sel" / "summary.json").read_text())
    shift = summary["columns"]["mtld"]
    assert shift["candidates"]["mean"] == 2.0 and shift["selected"]["mean"] == 2.0
    assert result.dropped == 1 and summary["dropped_reasons"] == {"all candidates fail length<50": 1}
    with pytest.raises(InputError, match="selection is empty"):
        select(cfg(input=str(src), objectives=["mtld:max"], constraints=["length>1000"]), tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize("rows, args, words", [
    ([{"prompt_id": "p", "mtld": 1.0}], ["--objective", "mtld:max"], "has no 'completion' column"),
    ([{"prompt_id": "p", "completion": "x", "mtld": 1.0}], ["--objective", "mtdl:max"], "no column 'mtdl'"),
    ([{"prompt_id": "p", "completion": "x", "mtld": 1.0}], ["--objective", "mtld:best"], "is not COLUMN:max"),
    ([{"prompt_id": "p", "completion": "x", "mtld": None}], ["--objective", "mtld:max"], "selection is empty"),
    ([{"prompt_id": "p", "completion": "x", "length": 3}], ["-O", "length:max", "-C", "length>9"],
     "selection is empty"),
    (None, ["--objective", "mtld:max"], "file not found"),
])
def test_cli_errors(tmp_path, rows, args, words):
    src = tmp_path / "scored.jsonl"
    if rows is not None:
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    _assert_user_error(run_cli("select", str(src), *args, "--out", str(out)), words, out)


def test_cli_select(tmp_path):
    rows = [row("p", 0, mtld=1.0), row("p", 1, mtld=2.0)]
    src = tmp_path / "scored.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("select", str(src), "-O", "mtld:max", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert "selected 1 of 1 prompts" in proc.stdout and "mtld: candidates mean 1.5 -> selected mean 2" in proc.stdout
