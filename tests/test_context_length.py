"""Prompts longer than a model's context, and a student the recipe cannot train, fail before any work
(issue 14, rows 7, 16 and 17).

- generate/profile: a prompt whose tokens plus max_new_tokens exceed the model's positions is a one-line
  InputError naming the prompt, raised before any unit runs (no run directory); `too_long: truncate` keeps the
  prompt's end and counts it in the summary.
- inherit: the student's layers (train_layers) and context (held-out prompts), and a directory that is not a
  model, are checked before generate runs.
"""

from __future__ import annotations

import json

import pytest

from datasteer.errors import ConfigError, InputError, ModelNotFoundError
from datasteer.generation.config import GenerateConfig
from datasteer.generation.runner import generate
from datasteer.inheritance.config import FinetuneConfig, InheritConfig, ProfileConfig
from datasteer.models import load_model, model_shape, parse_spec
from tests.conftest import TINY
from tests.test_cli import _assert_user_error, run_cli
from tests.test_inheritance import ROWS, tiny_recipe, write_rows

LONG = "word " * 3000  # ~3000 tokens: past the 1024 positions of tiny:gpt2 and tiny:llama


def prompts_file(path, long_id="too-long"):
    path.write_text(json.dumps({"prompt_id": "short", "prompt": "Say hi."}) + "\n"
                    + json.dumps({"prompt_id": long_id, "prompt": LONG}) + "\n")
    return path


def config(prompts, model, **teacher):
    return GenerateConfig(prompts={"path": str(prompts)}, teachers=[
        {"name": "t", "model": model, "batch_size": 1, "sampling": {"max_new_tokens": 4}, **teacher}])


@pytest.mark.parametrize("model", ["tiny:gpt2", "tiny:llama"])
def test_generate_refuses_a_prompt_past_the_context_before_any_work(tmp_path, model):
    out = tmp_path / "gen"
    with pytest.raises(InputError, match=r"prompt 'too-long' is \d+ tokens.*1024-token context.*too_long: truncate"):
        generate(config(prompts_file(tmp_path / "p.jsonl"), model), out, progress=False)
    assert not out.exists()  # the short prompt's unit (the first) did not run either


def test_generate_truncates_when_the_teacher_says_so(tmp_path):
    out = tmp_path / "gen"
    result = generate(config(prompts_file(tmp_path / "p.jsonl"), "tiny:gpt2", too_long="truncate"), out,
                      progress=False)
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["truncated_prompts"] == {"t": 1} and summary["rows"] == 2
    rows = [json.loads(line) for line in result.candidates_path.read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == ["short", "too-long"]
    assert rows[1]["prompt"] == LONG  # rows unchanged: the prompt as given, its cut counted in prompt_tokens
    assert rows[1]["prompt_tokens"] == 1024 - 4 and rows[0]["prompt_tokens"] < 100
    # nothing cut: no key in the summary (summaries of ordinary runs are as before)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt_id": "a", "prompt": "Hi."}) + "\n")
    generate(config(plain, "tiny:gpt2"), tmp_path / "gen2", progress=False)
    assert "truncated_prompts" not in json.loads((tmp_path / "gen2" / "manifest.json").read_text())["summary"]


def test_max_new_tokens_alone_past_the_context_is_refused(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt_id": "a", "prompt": "Hi."}) + "\n")
    cfg = GenerateConfig(prompts={"path": str(plain)}, teachers=[
        {"name": "t", "model": "tiny:gpt2", "sampling": {"max_new_tokens": 2000}}])
    with pytest.raises(InputError, match="max_new_tokens=2000 leaves no room for a prompt in the 1024-token context"):
        generate(cfg, tmp_path / "gen", progress=False)
    assert not (tmp_path / "gen").exists()


def test_cli_generate_and_profile_too_long_exit_2_and_leave_nothing(tmp_path):
    prompts = prompts_file(tmp_path / "p.jsonl")
    out = tmp_path / "out"
    _assert_user_error(run_cli("generate", str(prompts), "--model", "tiny:gpt2", "--max-new-tokens", "4", "--out",
                               str(out), "-q"), "prompt 'too-long'", out)
    _assert_user_error(run_cli("profile", "tiny:gpt2", "--prompts", str(prompts), "--metrics", "length",
                               "--max-new-tokens", "4", "--out", str(out), "-q"), "prompt 'too-long'", out)


def test_profile_too_long_leaves_no_running_run(tmp_path):
    from datasteer.inheritance.profile import profile

    cfg = ProfileConfig(model="tiny:gpt2", prompts={"path": str(prompts_file(tmp_path / "p.jsonl"))},
                        metrics=["length"], sampling={"max_new_tokens": 4})
    with pytest.raises(InputError, match="prompt 'too-long'.*max_new_tokens"):
        profile(cfg, tmp_path / "prof", progress=False)
    assert not (tmp_path / "prof").exists()


# ---------------------------------------------------------------- the student, before any stage

def test_model_shape_without_weights(tmp_path):
    assert model_shape("tiny:gpt2").layers == 2 and model_shape("tiny:gpt2").context == 1024
    assert model_shape("tiny:llama?layers=4").layers == 4
    assert model_shape("embedded:smollm2").layers == 30
    loaded = load_model(TINY)
    loaded.model.config.save_pretrained(tmp_path / "m")
    assert model_shape(str(tmp_path / "m")).layers == 2


def test_a_directory_that_is_not_a_model_is_refused_by_parse_spec(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match="not a model \\(no config.json\\)"):
        parse_spec(str(tmp_path / "notes"))


def test_a_model_directory_without_tokenizer_is_one_clear_line(tmp_path):
    loaded = load_model(TINY)
    loaded.model.save_pretrained(tmp_path / "m")  # weights and config, no tokenizer
    with pytest.raises(ModelNotFoundError) as err:
        load_model(str(tmp_path / "m"))
    message = str(err.value)
    assert "\n" not in message and not message.rstrip().endswith(":") and "one of: " not in message
    assert "tokenizer files" in message


@pytest.mark.parametrize("change, error, words", [
    ({"finetune": {"train_layers": 99}}, ConfigError, "finetune.train_layers=99 but the student tiny:llama has 2"),
    ({"student": "NOTDIR"}, ModelNotFoundError, "not a model (no config.json)"),
    ({"eval_prompts": "LONG"}, InputError, "prompt 'h-long'"),
])
def test_inherit_checks_the_student_before_any_stage(tmp_path, change, error, words):
    from datasteer.inheritance.pipeline import inherit

    recipe = tiny_recipe(tmp_path)
    for key, value in change.items():
        if value == "NOTDIR":
            (tmp_path / "not-a-model").mkdir()
            value = str(tmp_path / "not-a-model")
        elif value == "LONG":
            held = tmp_path / "held-long.jsonl"
            held.write_text(json.dumps({"prompt_id": "h-long", "prompt": LONG}) + "\n")
            value = {"path": str(held)}
        elif isinstance(value, dict):
            value = {**recipe[key], **value}
        recipe[key] = value
    out = tmp_path / "run"
    with pytest.raises(error) as err:
        inherit(InheritConfig(**recipe), out, progress=False)
    assert words in str(err.value)
    assert not out.exists()


def test_cli_inherit_train_layers_99_fails_before_generate(tmp_path):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    out = tmp_path / "out"
    _assert_user_error(run_cli("inherit", str(path), "--out", str(out), "--set", "finetune.train_layers=99", "-q"),
                       "train_layers=99", out)


def test_finetune_train_layers_past_the_model_fails_before_the_run_exists(tmp_path):
    from datasteer.inheritance.finetune import finetune

    data = write_rows(tmp_path / "sel.jsonl", ROWS)
    out = tmp_path / "ft"
    with pytest.raises(ConfigError, match="train_layers=5 but the student tiny:llama has 2 layers"):
        finetune(FinetuneConfig(input=str(data), model=TINY, train_layers=5), out, progress=False)
    assert not out.exists()
