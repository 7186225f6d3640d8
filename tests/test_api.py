"""The public Python API: `from datasteer import generate, score, select, ...`, each stage configured by keyword
arguments, a dict, a config object or a recipe, writing its run directory and returning its result."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import yaml

import datasteer
from datasteer import GenerateConfig, ScoreConfig, SelectConfig
from datasteer.errors import ConfigError
from tests.conftest import TINY, cli_env

datasets = pytest.importorskip("datasets")

TEACHERS = [{"name": "t", "model": TINY, "k": 2, "batch_size": 5, "sampling": {"max_new_tokens": 6}}]


def _chain(tmp_path, how: str, prompts_file):
    """generate -> score -> select, configured `how`; returns the three results."""
    out = tmp_path / how
    gen_fields = {"prompts": str(prompts_file), "teachers": TEACHERS, "seed": 5}
    if how == "kwargs":
        gen = datasteer.generate(out=out / "gen", progress=False, **gen_fields)
        scored = datasteer.score(input=str(gen.candidates_path), metrics="length,mtld", out=out / "score",
                                 progress=False)
        chosen = datasteer.select(input=str(scored.scored_path), objectives="length_words:max", out=out / "sel")
    elif how == "dicts":
        gen = datasteer.generate(gen_fields, out=out / "gen", progress=False)
        scored = datasteer.score({"input": str(gen.candidates_path), "metrics": ["length", "mtld"]},
                                 out=out / "score", progress=False)
        chosen = datasteer.select({"input": str(scored.scored_path), "objectives": ["length_words:max"]},
                                  out=out / "sel")
    else:
        gen = datasteer.generate(GenerateConfig(**gen_fields), out=out / "gen", progress=False)
        scored = datasteer.score(ScoreConfig(input=str(gen.candidates_path), metrics=["length", "mtld"]),
                                 out=out / "score", progress=False)
        chosen = datasteer.select(SelectConfig(input=str(scored.scored_path), objectives=["length_words:max"]),
                                  out=out / "sel")
    return gen, scored, chosen


def test_generate_score_select_three_ways(tmp_path, prompts_file):
    cache = str(tmp_path / "hf")
    results = {how: _chain(tmp_path, how, prompts_file) for how in ("kwargs", "dicts", "configs")}
    for how, (gen, scored, chosen) in results.items():
        assert gen.rows == 10 and scored.rows == 10 and chosen.selected == 5, how
        candidates = gen.dataset(cache_dir=cache)
        assert isinstance(candidates, datasets.Dataset) and candidates.num_rows == 10
        assert candidates.features["sampling"]["max_new_tokens"] == datasets.Value("int64")
        rows = scored.dataset(cache_dir=cache)
        assert rows.num_rows == 10 and rows.features["length_words"] == datasets.Value("float64")
        selection = chosen.dataset(cache_dir=cache)
        assert selection.num_rows == 5 and sorted(selection["prompt_id"]) == [f"p{i:03d}" for i in range(5)]
        assert all(s["objective"] == "length_words:max" for s in selection["selection"])
    # one config, three spellings: the same bytes
    first = [r.read_bytes() for r in (results["kwargs"][0].candidates_path, results["kwargs"][2].selected_path)]
    for how in ("dicts", "configs"):
        assert [results[how][0].candidates_path.read_bytes(), results[how][2].selected_path.read_bytes()] == first


def test_keywords_override_a_config_and_recipes_work(tmp_path, prompts_file):
    base = GenerateConfig(prompts=str(prompts_file), teachers=TEACHERS, seed=5)
    other = datasteer.generate(base, seed=6, out=tmp_path / "six", progress=False)
    assert other.dataset(cache_dir=str(tmp_path / "hf")).num_rows == 10
    manifest = (tmp_path / "six" / "manifest.json").read_text()
    assert '"seed": 6' in manifest
    recipe = tmp_path / "gen.yaml"
    recipe.write_text(yaml.safe_dump({"prompts": str(prompts_file), "teachers": TEACHERS, "seed": 6}))
    again = datasteer.generate(str(recipe), out=tmp_path / "recipe", progress=False)
    assert again.candidates_path.read_bytes() == other.candidates_path.read_bytes()


def test_bad_arguments_are_config_errors(tmp_path, prompts_file):
    with pytest.raises(ConfigError, match="teachers"):
        datasteer.generate(prompts=str(prompts_file), out=tmp_path / "x")
    with pytest.raises(ConfigError, match="metricz"):
        datasteer.score(input="x.jsonl", metrics=["length"], metricz=1, out=tmp_path / "y")
    with pytest.raises(ConfigError, match="DPGConfig"):
        datasteer.run_dpg(out=tmp_path / "z")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_profile_through_the_api(tmp_path, prompts_file):
    result = datasteer.profile(model=TINY, prompts={"path": str(prompts_file), "limit": 2}, metrics="length",
                               sampling={"temperature": 0.0, "max_new_tokens": 5}, label="tiny",
                               out=tmp_path / "profile", progress=False)
    ds = result.dataset(cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds, datasets.Dataset) and ds.num_rows == 2 and "length_words" in ds.column_names


def test_import_is_cheap_and_names_are_public():
    code = ("import sys, datasteer; heavy = [m for m in ('torch', 'datasets', 'transformers', 'datasteer.api', "
            "'pyarrow') if m in sys.modules]; print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    for name in ("generate", "score", "select", "finetune", "profile", "inherit", "run_dpg", "metagradients",
                 "attribute", "load_rows", "GenerateConfig", "ScoreConfig", "SelectConfig", "FinetuneConfig",
                 "ProfileConfig", "InheritConfig", "DPGConfig", "TrainingConfig", "DatasteerError", "__version__"):
        assert name in datasteer.__all__ and getattr(datasteer, name) is not None, name
    from datasteer import metagradients, run_dpg
    from datasteer.metagrad import metagradients as engine

    assert metagradients is engine and callable(run_dpg)
    importlib.import_module("datasteer.dpg.config")  # the DPG package loads beside the stage function
    assert datasteer.run_dpg is run_dpg and datasteer.dpg.config.DPGConfig is datasteer.DPGConfig
    with pytest.raises(AttributeError):
        datasteer.no_such_name  # noqa: B018
