"""One recipe mechanism for every command: recipes + typed --set, discriminated unions, CLI polish."""

import subprocess

import pytest

from datasteer.config import build
from datasteer.errors import ConfigError
from datasteer.generation.config import GenerateConfig
from datasteer.generation.openai_backend import OpenAITeacherConfig
from datasteer.generation.transformers_backend import TransformersTeacherConfig
from datasteer.inheritance.config import FinetuneConfig, InheritConfig, SelectConfig
from datasteer.metrics.base import build_scorers, metric_columns
from datasteer.recipes import apply_override, builtin_recipes, describe, parse_value, recipe_config
from tests.conftest import DATASTEER, cli_env


def test_set_values_are_read_by_the_type_of_their_field():
    cfg = recipe_config(InheritConfig, "demo-inherit", [
        "teachers.0.system_prompt=# be brief",          # YAML would read a comment: None
        "teachers.0.k=2",                                # an int field: a number
        "selection.objectives=[mtld:max, length_words:min]",  # a list field: a YAML list
        "finetune.num_train_epochs=1",
        "profile.sampling.max_new_tokens=12",
        "name=42",                                       # a text field keeps digits as text
    ])
    assert cfg.teachers[0].system_prompt == "# be brief"
    assert cfg.teachers[0].k == 2
    assert cfg.selection.objectives == ["mtld:max", "length_words:min"]
    assert cfg.finetune.num_train_epochs == 1.0
    assert cfg.profile.sampling.max_new_tokens == 12
    assert cfg.name == "42"
    colon = recipe_config(InheritConfig, "demo-inherit", ["teachers.0.system_prompt=Answer: briefly"])
    assert colon.teachers[0].system_prompt == "Answer: briefly"
    cleared = recipe_config(InheritConfig, "demo-inherit", ["teachers.0.system_prompt=null"])
    assert cleared.teachers[0].system_prompt is None


def test_parse_value_by_annotation():
    assert parse_value("42", str) == "42"
    assert parse_value("42", int) == 42
    assert parse_value("42", str | None) == "42"
    assert parse_value("~", str | None) is None
    assert parse_value("[a, b]", list[str] | str) == ["a", "b"]
    assert parse_value("all-linear", list[str] | str) == "all-linear"
    assert parse_value("true", bool) is True
    assert parse_value("1e-3", float) == 1e-3


def test_set_reaches_into_discriminated_unions_and_bad_keys_fail():
    data = {"prompts": "p.jsonl", "teachers": [{"name": "a", "model": "m", "backend": "openai",
                                                 "base_url": "http://127.0.0.1:9/v1"}]}
    apply_override(GenerateConfig, data, "teachers.0.api_key_env=123")
    cfg = build(GenerateConfig, data)
    assert isinstance(cfg.teachers[0], OpenAITeacherConfig) and cfg.teachers[0].api_key_env == "123"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override(GenerateConfig, data, "nonsense")
    with pytest.raises(ConfigError, match="not an index"):
        apply_override(GenerateConfig, data, "teachers.3.k=1")


def test_teacher_backends_are_a_discriminated_union_with_clear_errors():
    cfg = build(GenerateConfig, {"prompts": "p.jsonl", "teachers": [{"name": "a", "model": "m"}]})
    assert isinstance(cfg.teachers[0], TransformersTeacherConfig) and cfg.teachers[0].k == 1
    # the error names the key the user wrote, not pydantic's union tag
    with pytest.raises(ConfigError, match=r"teachers\.0\.k: "):
        build(GenerateConfig, {"prompts": "p.jsonl", "teachers": [{"name": "a", "model": "m", "k": 0}]})
    with pytest.raises(ConfigError, match=r"teachers\.0\.concurrency: Extra inputs"):  # an openai-only field
        build(GenerateConfig, {"prompts": "p.jsonl", "teachers": [{"name": "a", "model": "m", "concurrency": 2}]})
    with pytest.raises(ConfigError, match="needs base_url"):
        build(GenerateConfig, {"prompts": "p.jsonl", "teachers": [{"name": "a", "model": "m", "backend": "openai"}]})
    with pytest.raises(ConfigError, match="backend must be one of transformers, openai, vllm"):
        build(GenerateConfig, {"prompts": "p.jsonl", "teachers": [{"name": "a", "model": "m", "backend": "tgi"}]})


def test_typed_sections_and_trl_names():
    cfg = recipe_config(InheritConfig, "demo-inherit", ["finetune.trl={gradient_checkpointing: true}"])
    ft = cfg.finetune_config("rows.jsonl")
    assert isinstance(ft, FinetuneConfig) and ft.trl == {"gradient_checkpointing": True}
    assert ft.seed == cfg.seed and ft.per_device_train_batch_size == 8 and ft.train_layers == 8
    with pytest.raises(ConfigError, match=r"finetune\.epochs: Extra inputs"):  # the old name is not accepted
        recipe_config(InheritConfig, "demo-inherit", ["finetune.epochs=1"])
    rule = cfg.select_config("scored.jsonl", "random", ["mtld"])
    assert isinstance(rule, SelectConfig) and rule.objectives == ["random"] and rule.seed == cfg.seed


def test_declared_metric_columns_match_the_built_scorers():
    specs = ["length", "lexical", "readability", "toxicity", "mtld[column=m2]", "length_words"]
    assert metric_columns(specs[:4]) == [s.name for s in build_scorers(specs[:4])]
    assert metric_columns(["mtld[column=m2]"]) == ["m2"]
    assert metric_columns(["toxicity[backend=detoxify]"]) == ["toxicity_detoxify"]  # no model is loaded
    with pytest.raises(ConfigError, match="unknown metric"):
        metric_columns(["mtdl"])


def test_every_builtin_recipe_names_its_command_and_describes_itself():
    recipes = builtin_recipes()
    assert {"demo-inherit", "demo-dpg-67", "demo-generate"} <= set(recipes)
    for name, path in recipes.items():
        command, text = describe(path)
        assert command in ("inherit", "passive", "profile", "dpg", "generate") and text, name
    assert describe(recipes["demo-passive"])[0] == "passive" and describe(recipes["profile-toxicity"])[0] == "profile"


def _cli(*args):
    return subprocess.run(DATASTEER + list(args), capture_output=True, text=True, env=cli_env(COLUMNS="200"),
                          timeout=120)


def test_cli_version_recipes_and_help_show_choices():
    from datasteer import __version__

    assert _cli("--version").stdout.strip() == __version__
    listing = _cli("recipes").stdout
    assert "demo-inherit" in listing and "datasteer inherit" in listing and "datasteer dpg" in listing
    for command in ("generate", "score", "select", "finetune", "profile", "inherit", "dpg", "attribute"):
        text = _cli(command, "--help").stdout
        assert "list[" not in text and "--set" in text, command
    assert "transformers|openai|vllm" in _cli("generate", "--help").stdout
    assert "weighted|lexicographic" in _cli("select", "--help").stdout


def test_every_command_takes_a_recipe_and_set(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt_id": "1", "prompt": "p", "completion": "a b c"}\n')
    recipe = tmp_path / "score.yaml"
    recipe.write_text(f"input: {rows}\nmetrics: [length_words]\n")
    proc = _cli("score", "--config", str(recipe), "--set", "text_field=prompt", "--out", str(tmp_path / "s"), "-q")
    assert proc.returncode == 0, proc.stderr
    select = tmp_path / "select.yaml"
    select.write_text(f"input: {tmp_path / 's' / 'scored.jsonl'}\nobjectives: [length_words:max]\n")
    proc = _cli("select", "--config", str(select), "--set", "seed=3", "--out", str(tmp_path / "sel"))
    assert proc.returncode == 0, proc.stderr
    assert "selected 1 of 1 prompts" in proc.stdout


def test_api_keywords_merge_into_recipe_sections():
    from datasteer.config import coerce
    from datasteer.dpg.config import DPGConfig
    from datasteer.recipes import load_recipe

    recipe = load_recipe("demo-dpg-67")
    cfg = coerce(DPGConfig, recipe, {"grpo": {"max_steps": 5}, "seed": 3})
    assert cfg.grpo.max_steps == 5 and cfg.seed == 3
    assert cfg.grpo.learning_rate == recipe["grpo"]["learning_rate"] == 3e-3  # the rest of the section is kept
    assert cfg.grpo.prompts_per_step == 32 and cfg.training.optimizer == "sgd"
    # a config object with keyword arguments keeps what was not set (here: the default baselines)
    again = coerce(DPGConfig, cfg, {"validation": {"every": 2}})
    assert again.validation.every == 2 and again.validation.limit == 32 and again.baselines == cfg.baselines


def test_profile_sampling_flags_keep_the_profile_defaults():
    from datasteer.inheritance.config import ProfileConfig

    greedy = ProfileConfig(model="m", sampling={"max_new_tokens": 3})
    assert greedy.sampling.temperature == 0.0 and greedy.sampling.max_new_tokens == 3 and greedy.k == 1
    tox = ProfileConfig(model="m", toxicity=True, sampling={"max_new_tokens": 64})
    assert (tox.sampling.temperature, tox.sampling.top_p, tox.k) == (1.0, 0.9, 25)
    limited = ProfileConfig(model="m", prompts={"limit": 2})  # --limit without --prompts: the default set
    assert limited.prompts.path == "builtin:instructions-heldout" and limited.prompts.limit == 2
    with pytest.raises(ConfigError, match=r"profile: k=3 samples with greedy decoding"):
        recipe_config(InheritConfig, "demo-inherit", ["profile.k=3"])


def test_finetune_pass_through_is_checked_before_any_work():
    from datasteer.inheritance.config import FinetuneSettings
    from datasteer.inheritance.finetune import SFT_OWNED, check_finetune

    check_finetune(FinetuneSettings(trl={"gradient_checkpointing": True}))
    with pytest.raises(ConfigError, match="no_such_arg not argument"):
        check_finetune(FinetuneSettings(trl={"no_such_arg": 1}))
    for key in SFT_OWNED:
        with pytest.raises(ConfigError, match=f"finetune.trl.{key} is set by datasteer"):
            check_finetune(FinetuneSettings(trl={key: 1}), "finetune.")
    with pytest.raises(ConfigError, match="finetune.lora: .*bogus"):
        check_finetune(FinetuneSettings(method="lora", lora={"bogus": 1}), "finetune.")


def test_set_list_of_text_items_and_prompts_shorthand():
    from datasteer.dpg.config import DPGConfig

    cfg = recipe_config(DPGConfig, "demo-dpg-67", ["generator.allowed_tokens=[6, 7, a, no]"])
    assert cfg.generator.allowed_tokens == ["6", "7", "a", "no"]
    data = {"prompts": "p.jsonl", "teachers": [{"name": "a", "model": "m"}]}
    apply_override(GenerateConfig, data, "prompts.limit=1")
    assert build(GenerateConfig, data).prompts.limit == 1 and data["prompts"]["path"] == "p.jsonl"
    with pytest.raises(ConfigError, match=r"generator\.allowed_tokens: Input should be"):  # no union label
        recipe_config(DPGConfig, "demo-dpg-67", ["generator.allowed_tokens=5"])


def test_wrong_command_and_renamed_keys_say_what_to_do():
    from datasteer.dpg.config import DPGConfig

    with pytest.raises(ConfigError, match="recipe for `datasteer dpg`, not `datasteer inherit`"):
        recipe_config(InheritConfig, "demo-dpg-67", [])
    with pytest.raises(ConfigError, match=r"finetune\.epochs: .*renamed: use num_train_epochs"):
        recipe_config(InheritConfig, "demo-inherit", ["finetune.epochs=1"])
    with pytest.raises(ConfigError, match=r"grpo\.steps: .*renamed: use max_steps"):
        recipe_config(DPGConfig, "demo-dpg-67", ["grpo.steps=1"])
    with pytest.raises(ConfigError, match=r"inner: .*renamed: use training"):
        recipe_config(DPGConfig, "demo-dpg-67", ["inner.learning_rate=1"])


def test_cli_backend_choices_are_the_registry():
    from datasteer.cli import Backend
    from datasteer.generation.config import BACKENDS

    assert [b.value for b in Backend] == list(BACKENDS)


def test_stages_refuse_other_ranks_and_a_deleted_output_is_rebuilt(tmp_path, monkeypatch):
    from datasteer.metrics.config import ScoreConfig
    from datasteer.metrics.runner import score

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt_id": "1", "completion": "a b c"}\n{"prompt_id": "2", "completion": "d e"}\n')
    config = ScoreConfig(input=str(rows), metrics=["length_words"])
    first = score(config, tmp_path / "s", progress=False)
    expected = first.scored_path.read_bytes()
    first.scored_path.unlink()  # a finished run whose output is gone is not "complete"
    again = score(config, tmp_path / "s", progress=False)
    assert again.scored_path.read_bytes() == expected and again.scored_units == 0  # merged again from its shards
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="`score` runs in one process"):
        score(config, tmp_path / "s2", progress=False)
    assert not (tmp_path / "s2").exists()


def test_generate_recipe_with_malformed_teachers_is_one_line(tmp_path):
    recipe = tmp_path / "g.yaml"
    recipe.write_text("prompts: p.jsonl\nteachers: [tiny:llama]\n")
    proc = _cli("generate", "--config", str(recipe), "--k", "2", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and proc.stderr.startswith("datasteer: error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "teachers.0" in proc.stderr


def test_every_option_of_every_command_has_help():
    import typer

    from datasteer.cli import app

    def walk(command, path):
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert (param.help or "").strip(), f"{' '.join(path)} {param.opts[0]} has no help text"
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    root = typer.main.get_command(app)
    walk(root, ["datasteer"])
    assert {"generate", "score", "select", "finetune", "profile", "compare", "inherit", "dpg", "attribute", "demo",
            "metrics", "models", "recipes", "version"} <= set(root.commands)
