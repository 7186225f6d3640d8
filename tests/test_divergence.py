"""Training that diverges is an error, not a result (issue 14, row 1).

A learning rate far too high (inf, or a finite 1e8) turns the loss, the gradient or the weights into NaN; every
trainer (finetune's SFT, the metagradient engine's inner loop, DPG's rewards and its policy step) must stop at
that step with a one-line error naming it and the learning rate, publish no model and mark nothing complete, and
nothing downstream (profile, generate) may consume a NaN model.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from datasteer.errors import DatasteerError, InputError
from datasteer.inheritance.config import FinetuneConfig, InheritConfig
from datasteer.inheritance.finetune import finetune
from datasteer.metagrad import TrainingConfig, metagradients, train
from datasteer.models import load_model
from datasteer.training import TrainingDivergedError, check_loss, check_parameters, divergence_callback
from tests.conftest import TINY, write_prompts
from tests.test_cli import _assert_user_error, run_cli
from tests.test_inheritance import ROWS, tiny_recipe, write_rows
from tests.test_metagrad import heldout_metric, make_examples, tiny_gpt2


def test_divergence_error_is_a_user_error_naming_step_and_learning_rate():
    assert issubclass(TrainingDivergedError, DatasteerError)
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(TrainingDivergedError, match=r"^x diverged at step 7: the loss is .*learning rate"):
            check_loss(value, "x", 7, "--lr")
    with pytest.raises(TrainingDivergedError, match="exploded"):
        check_loss(5e3, "x", 1, "--lr", limit=1e3)
    check_loss(12.0, "x", 1, "--lr", limit=1e3)  # a finite loss passes untouched
    check_loss(None, "x", 1, "--lr")
    weights = [("a", torch.ones(3)), ("b", torch.tensor([1.0, float("nan")])), ("c", torch.ones(1))]
    with pytest.raises(TrainingDivergedError, match="step 2: parameter b holds NaN"):
        check_parameters(weights, "x", 2, "--lr")
    check_parameters([("a", torch.ones(3)), ("i", torch.arange(3))], "x", 2, "--lr")


# ---------------------------------------------------------------- finetune (TRL SFT)

@pytest.mark.parametrize("lr", [1e8, math.inf])
def test_finetune_that_diverges_stops_and_leaves_nothing(tmp_path, lr):
    data = write_rows(tmp_path / "sel.jsonl", ROWS)
    try:
        cfg = FinetuneConfig(input=str(data), model=TINY, learning_rate=lr, per_device_train_batch_size=1,
                             num_train_epochs=2)
    except ValueError:  # refusing a non-finite learning rate at config time is fine too
        assert not math.isfinite(lr)
        return
    out = tmp_path / "ft"
    with pytest.raises(TrainingDivergedError, match=r"finetune diverged at step \d+: .*learning rate.*--lr"):
        finetune(cfg, out, progress=False)
    assert not out.exists()  # no model/, no training.json, no run marked complete


def test_finetune_divergence_callback_runs_before_checkpoints():
    """The parameter check runs at the step end of a step that saves (before the checkpoint is written)."""
    callback = divergence_callback("finetune", "--lr")
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    state = SimpleNamespace(global_step=3, max_steps=10)
    quiet = SimpleNamespace(should_save=False, should_training_stop=False)
    callback.on_step_end(None, state, quiet, model=model)  # no save at this step: nothing read
    saving = SimpleNamespace(should_save=True, should_training_stop=False)
    with pytest.raises(TrainingDivergedError, match="step 3: parameter weight"):
        callback.on_step_end(None, state, saving, model=model)
    with pytest.raises(TrainingDivergedError, match="step 3: the gradient norm is nan"):
        callback.on_log(None, state, quiet, logs={"loss": 1.0, "grad_norm": float("nan")})


def test_cli_finetune_lr_that_diverges_exits_2(tmp_path):
    data = write_rows(tmp_path / "sel.jsonl", ROWS)
    out = tmp_path / "out"
    proc = run_cli("finetune", str(data), "--out", str(out), "--model", TINY, "--lr", "1e8", "--batch-size", "1",
                   "--epochs", "2", "-q")
    _assert_user_error(proc, "diverged at step", out)
    assert "final loss" not in proc.stdout


def test_inherit_stops_at_a_diverged_finetune(tmp_path):
    from datasteer.inheritance.pipeline import inherit

    recipe = tiny_recipe(tmp_path)
    recipe["finetune"] = {**recipe["finetune"], "learning_rate": 1e8, "per_device_train_batch_size": 1}
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match="finetune diverged"):
        inherit(InheritConfig(**recipe), out, progress=False)
    assert not (out / "finetune-active").exists()
    assert not any(p.name.startswith("profile") for p in out.iterdir())
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"


def test_profile_refuses_a_model_with_nan_weights(tmp_path):
    from datasteer.inheritance.config import ProfileConfig
    from datasteer.inheritance.profile import profile

    loaded = load_model(TINY)
    with torch.no_grad():
        next(loaded.model.parameters()).fill_(float("nan"))
    model_dir = tmp_path / "nan-model"
    loaded.model.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    prompts = write_prompts(tmp_path / "p.jsonl", ["Hi?"])
    out = tmp_path / "profile"
    cfg = ProfileConfig(model=str(model_dir), prompts={"path": str(prompts)}, metrics=["length"],
                        sampling={"max_new_tokens": 4})
    with pytest.raises(InputError, match="NaN or infinite weights.*learning rate"):
        profile(cfg, out, progress=False)
    assert not out.exists()


# ---------------------------------------------------------------- the metagradient engine

@pytest.mark.parametrize("lr", [1e8, math.inf])
def test_engine_train_and_metagradients_stop_at_the_diverged_step(lr):
    model, examples = tiny_gpt2(), make_examples()
    config = TrainingConfig(dtype="float64", batch_size=3, epochs=2, optimizer="sgd", learning_rate=lr)
    with pytest.raises(TrainingDivergedError,
                       match=r"inner fine-tuning diverged at step \d+: .*training.learning_rate"):
        train(model, examples, config)
    with pytest.raises(TrainingDivergedError, match=r"diverged at step \d+"):
        metagradients(model, examples, heldout_metric, config)


def test_engine_happy_path_is_unchanged_by_the_checks():
    """The checks only read values: the same run with them and with them switched off agrees bit for bit."""
    import datasteer.metagrad.engine as engine

    model, examples = tiny_gpt2(), make_examples()
    config = TrainingConfig(dtype="float64", batch_size=3, epochs=2, optimizer="adamw", learning_rate=0.01)
    checked = metagradients(model, examples, heldout_metric, config)
    saved = engine.check_loss, engine.check_parameters
    engine.check_loss = engine.check_parameters = lambda *a, **k: None
    try:
        plain = metagradients(model, examples, heldout_metric, config)
    finally:
        engine.check_loss, engine.check_parameters = saved
    assert torch.equal(checked.scores, plain.scores) and checked.value == plain.value


# ---------------------------------------------------------------- DPG: the inner loop and the policy step

@pytest.fixture(scope="module")
def target_model():
    loaded = load_model("tiny:gpt2?hidden=32&layers=1&heads=2", attn_implementation="eager")
    return loaded.model, loaded.tokenizer


@pytest.mark.parametrize("arm", ["dpg", "naive"])
def test_dpg_rewards_stop_when_the_inner_loop_diverges(target_model, arm):
    from datasteer.dpg.glyphs import glyph
    from datasteer.dpg.records import StepRecords
    from datasteer.dpg.rewards import InnerLoop, RewardFunction
    from datasteer.dpg.targets import lm_head_pattern

    model, tokenizer = target_model
    target = lm_head_pattern(model, glyph("67"), tokenizer)
    config = TrainingConfig(optimizer="sgd", learning_rate=1e12, batch_size=2, epochs=3, max_length=8)
    records = StepRecords()
    reward = RewardFunction(arm, 2, InnerLoop(model, tokenizer, target, config), tokenizer, records)
    ids = [tokenizer("The cat sat on the mat.", add_special_tokens=False)["input_ids"],
           tokenizer("Hello there, general.", add_special_tokens=False)["input_ids"]] * 2
    with pytest.raises(TrainingDivergedError, match=rf"^{arm} arm, rewards: .*diverged at step \d+"):
        reward(prompts=[None] * 4, completions=[None] * 4, completion_ids=ids)
    assert records.records == []  # no metrics row for the diverged step


def test_dpg_policy_step_with_nan_weights_stops_before_its_metrics_row():
    from datasteer.dpg.grpo import step_callback

    seen = []
    hooks = SimpleNamespace(on_train_begin=lambda model: None, on_step_end=lambda step, model: seen.append(step))
    callback = step_callback(hooks)
    model = torch.nn.Linear(2, 2)
    state = SimpleNamespace(global_step=1)
    callback.on_step_end(None, state, None, model=model)
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    state.global_step = 2
    with pytest.raises(TrainingDivergedError, match="policy update diverged at step 2: parameter bias.*grpo"):
        callback.on_step_end(None, state, None, model=model)
    assert seen == [1]
    with pytest.raises(TrainingDivergedError, match="the loss is inf"):
        callback.on_log(None, state, None, logs={"loss": float("inf")})
