"""Every rows file a run writes loads as it is: with datasets' JSON loader, with pandas, and with its explicit
schema (the run's dataset card, `datasets.load_dataset(RUN_DIR)`, and `datasteer.load_rows`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasteer import rows as R
from datasteer.generation.config import GenerateConfig
from datasteer.generation.runner import generate
from datasteer.inheritance.config import InheritConfig, SelectConfig
from datasteer.inheritance.select import select
from datasteer.io import read_rows
from datasteer.metrics.config import ScoreConfig
from datasteer.metrics.runner import score
from datasteer.runs import Run, dump_rows
from tests.conftest import TINY
from tests.test_inheritance import tiny_recipe

datasets = pytest.importorskip("datasets")


def _json(path: Path, cache: Path):
    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(cache))


def _card(run_dir: Path, cache: Path, config: str | None = None):
    return datasets.load_dataset(str(run_dir), config, split="train", cache_dir=str(cache))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _two_teachers(prompts: Path, **over) -> GenerateConfig:
    sampling = {"temperature": 1.0, "max_new_tokens": 6}
    return GenerateConfig(prompts={"path": str(prompts)}, seed=3, teachers=[
        {"name": "plain", "model": TINY, "k": 2, "batch_size": 5, "sampling": sampling},
        {"name": "told", "model": TINY, "k": 2, "batch_size": 5, "sampling": sampling,
         "system_prompt": "You answer in one short sentence."},
    ], **over)


# ---------------------------------------------------------------- schemas and bytes

def test_schema_is_inferred_over_all_rows():
    rows = [{"a": None, "n": 1, "s": {"k": None}}] * 3 + [{"a": "text", "n": 2.5, "s": {"k": 4}, "late": True}]
    schema = R.schema_of(rows)
    assert schema.names == ["a", "n", "s", "late"]
    assert schema.field("a").type == pa.string() and schema.field("n").type == pa.float64()
    assert schema.field("s").type == pa.struct([("k", pa.int64())]) and schema.field("late").type == pa.bool_()
    assert R.schema_of([{"x": None}]).field("x").type == pa.null()
    mixed = R.schema_of([{"x": 1}, {"x": "one"}])
    assert isinstance(mixed.field("x").type, pa.JsonType)  # datasets reads it back as Json()
    assert R.table_of([{"x": 1}, {"x": "one"}]).column("x").chunk(0).storage.to_pylist() == ["1", "\"one\""]


def test_jsonl_bytes_are_dump_rows_bytes_and_json_has_no_nan():
    rows = [{"a": "é", "b": [1, 2.5], "c": {"d": None}}, {"a": "x", "b": [], "c": {"d": 1e-9}}]
    assert dump_rows(rows) == b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)
    assert dump_rows([{"v": math.nan, "w": [math.inf]}]) == b'{"v": null, "w": [null]}\n'


def test_size_categories():
    assert [R.size_category(n) for n in (0, 999, 1000, 50_000, 2_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M"]


# ---------------------------------------------------------------- a multi-teacher generate run

def test_multi_teacher_candidates_load_everywhere(tmp_path, prompts_file):
    cache = tmp_path / "hf"
    result = generate(_two_teachers(prompts_file), tmp_path / "gen", progress=False)
    path = result.candidates_path
    assert path.name == "candidates.jsonl" and result.rows == 20
    expected = _lines(path)
    assert expected[0]["system_prompt"] is None and expected[-1]["system_prompt"].startswith("You answer")

    plain = _json(path, cache)
    card = _card(result.run_dir, cache)
    mine = result.dataset(cache_dir=str(cache))
    for ds in (plain, card, mine):
        assert isinstance(ds, datasets.Dataset) and ds.num_rows == 20
        assert ds.features["system_prompt"] == datasets.Value("string")
        assert ds.features["completion_tokens"] == datasets.Value("int64")
        assert ds["system_prompt"][0] is None and ds["system_prompt"][-1] == expected[-1]["system_prompt"]
        assert ds["completion"] == [r["completion"] for r in expected]
    assert card.features == mine.features
    frame = pd.read_json(path, lines=True)
    assert len(frame) == 20 and list(frame.columns) == list(expected[0])
    assert frame["source"].tolist() == ["plain"] * 10 + ["told"] * 10

    # the card: the header datasets and the Hub read, and a readable body
    text = (result.run_dir / "README.md").read_text()
    header = R._card_header(result.run_dir)
    assert header["configs"] == [{"config_name": "candidates", "default": True,
                                  "data_files": [{"split": "train", "path": "candidates.jsonl"}]}]
    assert header["size_categories"] == ["n<1K"] and "datasteer" in header["tags"]
    assert header["dataset_info"][0]["splits"][0]["num_examples"] == 20
    assert "| stage | `generate` |" in text and "| seed | 3 |" in text and "`system_prompt`" in text
    assert [f.file for f in R.read_card(result.run_dir)] == ["candidates.jsonl"]
    from huggingface_hub import DatasetCard

    hub = DatasetCard.load(result.run_dir / "README.md")  # the Hub's own parser
    assert hub.data.configs[0]["config_name"] == "candidates" and hub.data.size_categories == ["n<1K"]


def test_large_file_needs_the_explicit_schema(tmp_path):
    """datasets infers a JSON file's types from its first 10 MB block: a column that is null for the first teacher
    and text for a later one fails to cast. The card (and load_rows) give the schema inferred over all rows."""
    cache = tmp_path / "hf"
    pad = "x" * 330
    rows = [{"prompt_id": f"p{i}", "completion": pad, "source": "first" if i < 30_000 else "second",
             "system_prompt": None if i < 30_000 else "Be brief.", "seed": i} for i in range(40_000)]
    run = Run.prepare(tmp_path / "big", stage="generate", config={"test": True}, inputs={}, seed=0)
    written = R.write_rows(run, "candidates", rows)
    R.write_card(run, [written])
    path = tmp_path / "big" / "candidates.jsonl"
    assert path.stat().st_size > 15 * 2**20
    with pytest.raises(Exception, match="generating the dataset") as failure:  # the plain inference fails
        _json(path, cache)
    assert "Couldn't cast array of type string to null" in str(failure.value.__cause__)
    for ds in (_card(tmp_path / "big", cache), R.load_rows(path, cache_dir=str(cache)),
               R.load_rows(tmp_path / "big", cache_dir=str(cache))):
        assert ds.num_rows == 40_000 and ds.features["system_prompt"] == datasets.Value("string")
        assert ds[0]["system_prompt"] is None and ds[39_999]["system_prompt"] == "Be brief."
    # without a card, load_rows infers over all rows itself
    (tmp_path / "big" / "README.md").unlink()
    assert R.load_rows(path, cache_dir=str(cache))[39_999]["system_prompt"] == "Be brief."
    assert len(pd.read_json(path, lines=True)) == 40_000


# ---------------------------------------------------------------- select, parquet

def test_selection_and_dropped_rows_load(tmp_path):
    cache = tmp_path / "hf"
    rows = [{"prompt_id": p, "completion": f"{p}-{i}", "source": "t", "mtld": None if p == "q" else float(i),
             "system_prompt": None if i == 0 else "sys"} for p in ("p", "q", "r") for i in range(3)]
    scored = tmp_path / "scored.jsonl"
    scored.write_bytes(dump_rows(rows))
    result = select(SelectConfig(input=str(scored), objectives=["mtld:max"]), tmp_path / "sel")
    assert result.selected == 2 and result.dropped == 1
    selected, dropped = tmp_path / "sel" / "selected.jsonl", tmp_path / "sel" / "dropped.jsonl"
    for path, n in ((selected, 2), (dropped, 1)):
        assert _json(path, cache).num_rows == n and len(pd.read_json(path, lines=True)) == n
    ds = result.dataset(cache_dir=str(cache))
    assert ds.num_rows == 2 and ds.features["selection"]["score"] == datasets.Value("float64")
    assert _card(tmp_path / "sel", cache).num_rows == 2
    assert _card(tmp_path / "sel", cache, "dropped")["reason"] == ["mtld missing"]

    # nothing dropped: no empty dropped.jsonl (datasets cannot load an empty file), the card lists selected only
    whole = select(SelectConfig(input=str(scored), objectives=["random"]), tmp_path / "rnd")
    assert whole.dropped == 0 and not (tmp_path / "rnd" / "dropped.jsonl").exists()
    assert [f.config for f in R.read_card(tmp_path / "rnd")] == ["selected"]


def test_parquet_output_round_trips_and_feeds_score(tmp_path, prompts_file):
    cache = tmp_path / "hf"
    as_jsonl = generate(_two_teachers(prompts_file), tmp_path / "jsonl", progress=False)
    as_parquet = generate(_two_teachers(prompts_file, output_format="parquet"), tmp_path / "parquet",
                          progress=False)
    path = as_parquet.candidates_path
    assert path.name == "candidates.parquet" and not (tmp_path / "parquet" / "candidates.jsonl").exists()
    assert pq.read_schema(path).field("system_prompt").type == pa.string()
    assert read_rows(path) == read_rows(as_jsonl.candidates_path)  # same rows, another encoding
    assert pd.read_parquet(path)["source"].tolist() == ["plain"] * 10 + ["told"] * 10
    assert as_parquet.dataset(cache_dir=str(cache)).num_rows == 20
    assert _card(tmp_path / "parquet", cache).num_rows == 20
    # a finished run read back points at the parquet file
    again = generate(_two_teachers(prompts_file, output_format="parquet"), tmp_path / "parquet", progress=False)
    assert again.generated_rows == 0 and again.candidates_path == path

    scored = score(ScoreConfig(input=str(path), metrics=["length"], output_format="parquet"), tmp_path / "score",
                   progress=False)
    assert scored.scored_path.name == "scored.parquet"
    table = pq.read_table(scored.scored_path)
    assert table.num_rows == 20 and table.schema.field("length_words").type == pa.float64()
    assert scored.dataset(cache_dir=str(cache))["length_words"] == table.column("length_words").to_pylist()
    chosen = select(SelectConfig(input=str(scored.scored_path), objectives=["length_words:max"]), tmp_path / "sel")
    assert chosen.selected == 5
    assert score(ScoreConfig(input=str(path), metrics=["length"], output_format="parquet"), tmp_path / "score",
                 progress=False).scored_path == scored.scored_path


# ---------------------------------------------------------------- a whole inherit run

def test_every_rows_file_of_an_inherit_run_loads(tmp_path):
    from datasteer.inheritance.pipeline import inherit

    cache = tmp_path / "hf"
    out = tmp_path / "run"
    inherit(InheritConfig(**tiny_recipe(tmp_path)), out, progress=False)
    files = sorted(p for p in out.rglob("*.jsonl") if "shards" not in p.parts)
    names = {p.relative_to(out).as_posix() for p in files}
    assert {"generate/candidates.jsonl", "score/scored.jsonl", "select-active/selected.jsonl",
            "select-random/selected.jsonl", "profile-base/profile.jsonl", "profile-active/profile.jsonl",
            "profile-random/profile.jsonl", "profile-base/generations/candidates.jsonl",
            "profile-base/scores/scored.jsonl"} <= names
    for path in files:
        expected = _lines(path)
        assert expected, f"{path} is empty"
        listed = {f.file: f.config for f in R.read_card(path.parent)}
        assert path.name in listed, f"{path.parent}'s card does not list {path.name}"
        for ds in (_json(path, cache), _card(path.parent, cache, listed[path.name]),
                   R.load_rows(path, cache_dir=str(cache))):
            assert ds.num_rows == len(expected), path
        assert len(pd.read_json(path, lines=True)) == len(expected)
    profile = _card(out / "profile-active", cache)
    assert profile.features["length_words"] == datasets.Value("float64")
    assert profile.features["prompt_id"] == datasets.Value("string")
    selected = _card(out / "select-active", cache)
    assert selected.features["selection"]["objective"] == datasets.Value("string")

    # one card at the top can list every sub-run's rows (pipeline: write_card(run, gather_cards(out, parts)))
    parts = ["generate", "score", "select-active", "select-random", "profile-base", "profile-random", "profile-active"]
    gathered = R.gather_cards(out, parts)
    assert [f.config for f in gathered] == parts
    top = Run(out, json.loads((out / "manifest.json").read_text()), exists=True)
    R.write_card(top, gathered, default="select-active", title="tiny inherit")
    assert _card(out, cache).num_rows == 6  # the default: select-active
    assert _card(out, cache, "profile-base").num_rows == 4
