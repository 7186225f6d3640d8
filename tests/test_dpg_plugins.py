"""DPG's plug-in points: the target registry (one module and one line per kind, each declaring its readout),
the report reading that declaration, the `grpo:` section under TRL's names with a `trl:` pass-through, LoRA
under peft's names, and the metagradient optimizers' registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import TypeAdapter

from datasteer.config import build
from datasteer.dpg.config import DPGConfig, GRPOSpec
from datasteer.dpg.generator import check_generator
from datasteer.dpg.grpo import check_grpo_section, grpo_arguments
from datasteer.dpg.report import summarise
from datasteer.dpg.targets import TARGETS, Readout, TargetSpec, TargetSpecBase
from datasteer.dpg.trainer import ArmResult, dpg
from datasteer.errors import ConfigError, InputError
from datasteer.metagrad import TrainingConfig
from datasteer.metagrad.optim import OPTIMIZERS, SGD, make_optimizer
from datasteer.models import load_model
from tests.test_dpg_trainer import recipe

TINY_TARGET = "tiny:gpt2?hidden=16&layers=1&heads=2&seed=2&tokenizer=chars"
SECTIONS = {
    "lm_head_pattern": {"pattern": {"glyph": "67"}},
    "l2_norm": {},
    "text_loss": {"texts": ["3f2a6c1e-8b7d"]},
    "custom": {"function": "tests.test_dpg_targets:double_head"},
}


def target_spec(kind: str, **fields) -> TargetSpecBase:
    return TypeAdapter(TargetSpec).validate_python({"model": TINY_TARGET, "kind": kind, **SECTIONS[kind], **fields})


def test_every_registered_kind_declares_the_readout_its_target_reports():
    assert set(TARGETS) == set(SECTIONS)
    declared = {kind: cls.readout for kind, cls in TARGETS.items()}
    assert declared == {"lm_head_pattern": Readout("pixel_accuracy", True, (0.90, 0.95), untrained=False),
                        "l2_norm": Readout("l2", higher_is_better=False),
                        "text_loss": Readout("loss", higher_is_better=False),
                        "custom": Readout(None)}
    loaded = load_model(TINY_TARGET, attn_implementation="eager")
    params = {k: v.detach() for k, v in loaded.model.named_parameters()}
    for kind, cls in TARGETS.items():
        spec = target_spec(kind)
        assert type(spec) is cls and spec.kind == kind
        spec.check()
        target = spec.build(loaded.model, loaded.tokenizer)
        keys = set(target.readout(loaded.model, params))
        assert keys == {"phi"} | ({spec.readout.key} if spec.readout.key else set())


def test_target_sections_are_checked_before_a_model_loads(tmp_path):
    with pytest.raises(InputError, match="must not be empty"):
        target_spec("text_loss", texts=["  "]).check()
    with pytest.raises(ConfigError, match="package.module:function"):
        target_spec("custom", function="no_colon").check()
    with pytest.raises(InputError, match="not found"):
        target_spec("lm_head_pattern", pattern={"file": str(tmp_path / "missing.txt")}).check()
    base = recipe(tmp_path)
    for section, message in [({"model": TINY_TARGET, "kind": "nope"}, "target: kind must be one of lm_head_pattern"),
                             ({"model": TINY_TARGET, "kind": "l2_norm", "beta": 3}, "target.beta"),
                             ({"model": TINY_TARGET, "kind": "lm_head_pattern"}, "target.pattern"),
                             ({"model": TINY_TARGET, "kind": "text_loss"}, "needs 'texts' or 'texts_file'")]:
        with pytest.raises(ConfigError, match=message):
            build(DPGConfig, {**base, "target": section})


def _arm(name: str, values: list[dict]) -> ArmResult:
    rows = [{"step": i, "examples_seen": 8 * i, "validation": v} for i, v in enumerate(values)]
    rows[0]["untrained"] = {"phi": -3.0, "loss": 3.0}
    return ArmResult(name, Path("."), rows)


def test_the_report_reads_the_declared_readout_not_the_keys_it_finds():
    # a numeric key ahead of the readout in every record: guessing from the keys would pick it
    arm = _arm("dpg", [{"rollouts": 4, "extra": 7.0, "phi": -2.0, "loss": 2.0},
                       {"rollouts": 4, "extra": 1.0, "phi": -1.0, "loss": 1.0},
                       {"rollouts": 4, "extra": 9.0, "phi": -1.5, "loss": 1.5}])
    summary = summarise([arm], TARGETS["text_loss"].readout)
    assert summary["readout"] == "loss"
    entry = summary["arms"]["dpg"]
    assert (entry["start"], entry["final"], entry["best"], entry["untrained"]) == (2.0, 1.5, 1.0, 3.0)
    assert (entry["last_mean"], entry["last_count"]) == (1.5, 3)  # fewer than five validations: all of them
    assert "examples_to" not in entry
    seven = _arm("dpg", [{"phi": -float(v), "loss": float(v)} for v in (9, 8, 1, 2, 3, 4, 5)])
    assert summarise([seven], TARGETS["text_loss"].readout)["arms"]["dpg"]["last_mean"] == 3.0  # 1..5
    assert summarise([arm], Readout(None))["readout"] is None
    higher = summarise([arm], Readout("extra", thresholds=(0.5,)))["arms"]["dpg"]
    assert higher["best"] == 9.0 and higher["examples_to"] == {"50%": 0}


def test_grpo_section_uses_trl_names_and_passes_other_arguments_through(tmp_path):
    grpo = GRPOSpec(max_steps=7, beta=0.05, prompts_per_step=3, num_generations=4,
                    trl={"lr_scheduler_type": "linear", "logging_strategy": "steps"})
    check_grpo_section(grpo)
    args = grpo_arguments(grpo, tmp_path / "checkpoints", seed=5, save_steps=2, generator=torch.nn.Linear(2, 2))
    assert (args.max_steps, args.beta, args.per_device_train_batch_size, args.num_generations) == (7, 0.05, 12, 4)
    assert args.lr_scheduler_type == "linear" and args.logging_strategy == "steps"  # trl: changes a default
    assert args.scale_rewards == "none" and args.seed == args.data_seed == 5 and args.save_steps == 2
    assert args.loss_type == "grpo" and args.save_total_limit == 2  # datasteer's defaults otherwise
    for trl, message in [({"max_steps": 3}, "grpo.trl.max_steps is set by datasteer"),
                         ({"scale_rewards": "group"}, "grpo.trl.scale_rewards is set by datasteer"),
                         ({"no_such_argument": 1}, "no_such_argument")]:
        with pytest.raises(ConfigError, match=message):
            check_grpo_section(GRPOSpec(trl=trl))


def test_bad_trl_and_lora_sections_fail_before_anything_is_written(tmp_path):
    data = recipe(tmp_path)
    data["grpo"]["trl"] = {"no_such_argument": 1}
    with pytest.raises(ConfigError, match="grpo.trl"):
        dpg(build(DPGConfig, data), tmp_path / "out", progress=False)
    data = recipe(tmp_path)
    data["generator"]["lora"] = {"r": 4, "rank": 4}
    config = build(DPGConfig, data)
    assert config.generator.lora.r == 4 and config.generator.lora.lora_alpha == 32.0  # datasteer.training.LoraSpec
    with pytest.raises(ConfigError, match="^generator.lora: "):
        check_generator(config)
    assert not (tmp_path / "out").exists()


def test_optimizers_are_a_registry(monkeypatch):
    assert set(OPTIMIZERS) == {"sgd", "adam", "adamw"}
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        TrainingConfig(optimizer="rmsprop")
    monkeypatch.setitem(OPTIMIZERS, "plain_sgd", lambda c: SGD(weight_decay=c.resolved_weight_decay))
    optimizer = make_optimizer(TrainingConfig(optimizer="plain_sgd", weight_decay=0.5))
    assert isinstance(optimizer, SGD) and optimizer.weight_decay == 0.5 and optimizer.slot_names == ()


def test_phase_medians_take_validation_from_every_validation_and_the_rest_from_policy_steps():
    from datasteer.dpg.report import phase_medians

    rows = [{"step": 0, "seconds": {"validation": 4.0, "wall": 100.0}},
            {"step": 1, "seconds": {"sampling": 1.0, "reward": 2.0, "wall": 3.0}},
            {"step": 2, "seconds": {"sampling": 3.0, "reward": 2.0, "validation": 6.0, "wall": 5.0}},
            {"step": 3}]  # a row written before times were recorded
    assert phase_medians(rows) == {"sampling": 2.0, "reward": 2.0, "validation": 5.0, "wall": 4.0}
    assert phase_medians([{"step": 1}]) == {}

