"""The DPG authors' settings as options (docs/dpg.md): advantages with the unbiased std, several generator updates
per batch of rollouts through TRL's steps_per_generation, the generator's weight decay, the target's untied LM head,
and all of them together with the engine's options in one run whose manifest records them. The engine's options
(loss over max_length, summed micro-batches, eps_root, the untied head) are checked against finite differences in
tests/test_metagrad.py."""

from __future__ import annotations

import json

import pytest
import torch

from datasteer.config import build
from datasteer.dpg.config import AdvantageSpec, DPGConfig
from datasteer.dpg.grpo import check_grpo_section, grpo_arguments
from datasteer.dpg.records import StepRecords
from datasteer.dpg.rewards import InnerLoop, RewardFunction, batch_advantages, dpg_rewards, group_advantages
from datasteer.dpg.trainer import arm_trainer, check_config, dpg, load_models, read_jsonl
from datasteer.errors import ConfigError
from datasteer.io import read_prompts
from datasteer.models import load_model
from datasteer.recipes import recipe_config
from tests.test_dpg_trainer import recipe

AUTHORS = {  # every option at the DPG authors' value (the inner learning rate is the demo's, not theirs)
    "training": {"optimizer": "adamw", "learning_rate": 1e-2, "batch_size": 4, "micro_batch_size": 2,
                 "max_length": 16, "eps_root": 1e-9, "accumulation": "sum", "loss_normalization": "max_length"},
    "advantages": {"std": "unbiased", "eps": 1e-6},
}


def test_defaults_are_unchanged_and_every_option_is_reachable_by_set(tmp_path):
    config = build(DPGConfig, recipe(tmp_path))
    assert (config.training.accumulation, config.training.loss_normalization, config.training.eps_root) == \
        ("mean", "trained_tokens", 0.0)
    assert config.advantages == AdvantageSpec(std="population", eps=1e-6)
    assert (config.grpo.steps_per_generation, config.grpo.weight_decay, config.target.untie) == (1, 0.0, False)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe(tmp_path)))
    sets = ["training.optimizer=adamw", "training.accumulation=sum", "training.loss_normalization=max_length",
            "training.eps_root=1e-9", "advantages.std=unbiased", "advantages.eps=1e-6",
            "grpo.steps_per_generation=2", "grpo.weight_decay=0.01", "target.untie=true"]
    config = recipe_config(DPGConfig, path, sets)
    assert (config.training.accumulation, config.training.loss_normalization, config.training.eps_root) == \
        ("sum", "max_length", 1e-9)
    assert config.advantages.std == "unbiased" and config.grpo.steps_per_generation == 2
    assert config.grpo.weight_decay == 0.01 and config.target.untie is True
    with pytest.raises(ConfigError, match="accumulation"):
        recipe_config(DPGConfig, path, ["training.accumulation=median"])


def test_unbiased_advantages():
    rewards = torch.tensor([1.0, 3.0, 5.0, 9.0, 2.0, 4.0, 4.0, 8.0], dtype=torch.float64) * 1e-9
    groups = [0] * 4 + [1] * 4
    for eps in (0.0, 1e-6):
        out = group_advantages(rewards, groups, eps=eps, unbiased=True)
        for g in (0, 1):
            r = rewards[4 * g:4 * g + 4]
            expected = (r - r.mean()) / (r.std() + eps)  # torch.std: unbiased, as verl's GRPO advantage
            torch.testing.assert_close(out[4 * g:4 * g + 4], expected, rtol=1e-12, atol=0.0)
    exact = group_advantages(rewards, groups, eps=0.0, unbiased=True)
    population = group_advantages(rewards, groups, eps=0.0)
    torch.testing.assert_close(population, exact * (4 / 3) ** 0.5, rtol=1e-12, atol=0.0)  # sqrt(n / (n - 1))
    # the authors' eps 1e-6 outweighs a std of ~1e-9: advantages are the centred rewards times ~1e6
    authors = group_advantages(rewards, groups, eps=1e-6, unbiased=True)
    centred = rewards - rewards.view(2, 4).mean(1).repeat_interleave(4)
    assert torch.allclose(authors, centred * 1e6, rtol=1e-2)
    whole = batch_advantages(rewards, eps=0.0, unbiased=True)
    assert whole.std() == pytest.approx(1.0) and whole.mean().abs() < 1e-12


def test_reward_function_normalises_as_configured(tmp_path):
    config = build(DPGConfig, recipe(tmp_path, advantages={"std": "unbiased", "eps": 1e-3}))
    loaded = load_model(config.target.model, attn_implementation="eager")
    target = config.target.build(loaded.model, loaded.tokenizer)
    inner = InnerLoop(loaded.model, loaded.tokenizer, target, config.training)
    texts = ["!a!b#c", "$$a%", "&'a!b", "bc!#", "#a#b#c", "''a", "ab!!", "%&c"]
    ids = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    raw = dpg_rewards(loaded.model, loaded.tokenizer, texts, target, config.training).rewards
    for spec, unbiased in ((config.advantages, True), (None, False)):  # None: the default, population + 1e-6
        reward = RewardFunction("dpg", 4, inner, loaded.tokenizer, StepRecords(), spec)
        out = torch.tensor(reward(prompts=["p"] * 8, completions=texts, completion_ids=ids), dtype=torch.float64)
        expected = group_advantages(raw, [0] * 4 + [1] * 4, eps=1e-3 if unbiased else 1e-6, unbiased=unbiased)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=0.0)


def test_steps_per_generation_is_trls_and_weight_decay_reaches_the_optimizer(tmp_path):
    config = build(DPGConfig, recipe(tmp_path, grpo={"max_steps": 4, "prompts_per_step": 4, "num_generations": 4,
                                                     "steps_per_generation": 4, "weight_decay": 0.01}, save_steps=4))
    models = load_models(config)
    args = grpo_arguments(config.grpo, tmp_path / "ckpt", 0, 4, models.generator)
    # one batch of 16 rollouts sampled and rewarded at once, then 4 updates on mini-batches of 4 (TRL's mechanism)
    assert (args.generation_batch_size, args.per_device_train_batch_size, args.steps_per_generation) == (16, 4, 4)
    assert args.gradient_accumulation_steps == 1 and args.weight_decay == 0.01
    prompts = read_prompts(config.prompts)
    trainer = arm_trainer(config, "dpg", tmp_path / "arm", models, prompts, prompts[:1], 0, None, False)
    trainer.create_optimizer()
    decays = {group["weight_decay"] for group in trainer.optimizer.param_groups if group["params"]}
    assert decays == {0.01, 0.0}  # transformers' Trainer: biases and norm weights are not decayed
    with pytest.raises(ConfigError, match="set by datasteer"):
        check_grpo_section(config.grpo.model_copy(update={"trl": {"generation_batch_size": 16}}))


def test_steps_per_generation_refusals(tmp_path):
    with pytest.raises(ConfigError, match="save_steps"):
        build(DPGConfig, recipe(tmp_path, grpo={"steps_per_generation": 2, "prompts_per_step": 2}, save_steps=3))
    with pytest.raises(ConfigError, match="save_steps"):
        build(DPGConfig, recipe(tmp_path, grpo={"num_iterations": 2, "prompts_per_step": 2}, save_steps=5))
    config = build(DPGConfig, recipe(tmp_path, grpo={"prompts_per_step": 2, "num_generations": 3,
                                                     "steps_per_generation": 4}, save_steps=4,
                                     training={"optimizer": "sgd", "batch_size": 6}))
    with pytest.raises(ConfigError, match="equal mini-batches"):
        check_config(config, read_prompts(config.prompts))


def test_untie_gives_the_target_its_own_head_before_the_pattern_is_placed(tmp_path):
    data = recipe(tmp_path)
    data["target"]["untie"] = True
    models = load_models(build(DPGConfig, data))
    target = models.inner.model
    assert target.lm_head.weight is not target.transformer.wte.weight
    assert models.inner.target.param == "lm_head.weight"  # the pattern is written into the head alone
    tied = load_models(build(DPGConfig, recipe(tmp_path))).inner
    assert tied.target.param == "transformer.wte.weight"
    torch.testing.assert_close(models.inner.target.initial, tied.target.initial, rtol=0, atol=0)


def test_a_run_with_the_authors_settings(tmp_path):
    """Every option at the authors' value in one run: 2 updates per batch of 8 rollouts (TRL's steps_per_generation),
    so rows 1-2 and 3-4 share a batch and its rewards; the manifest records every option."""
    data = recipe(tmp_path, **AUTHORS, save_steps=2,
                  grpo={"max_steps": 4, "prompts_per_step": 2, "num_generations": 4, "max_completion_length": 8,
                        "learning_rate": 1e-2, "steps_per_generation": 2, "weight_decay": 0.01})
    data["target"]["untie"] = True
    config = build(DPGConfig, data)
    dpg(config, tmp_path / "run", progress=False)
    rows = read_jsonl(tmp_path / "run" / "dpg" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["examples_seen"] for r in rows] == [0, 8, 8, 16, 16]
    assert all(r["rollouts"] == 8 for r in rows[1:])  # the target trains on the whole batch, not a mini-batch
    own = ("step", "validation", "seconds")  # what each update has of its own; the batch's record is shared
    same = lambda a, b: {k: v for k, v in a.items() if k not in own} == \
        {k: v for k, v in b.items() if k not in own}  # noqa: E731
    assert same(rows[1], rows[2]) and same(rows[3], rows[4]) and rows[2]["sample"] != rows[3]["sample"]
    assert all(0.0 <= r["validation"]["pixel_accuracy"] <= 1.0 for r in rows if "validation" in r)
    manifest = json.loads((tmp_path / "run" / "dpg" / "manifest.json").read_text())["config"]
    for key, value in AUTHORS["training"].items():
        assert manifest["training"][key] == value, key
    assert manifest["advantages"] == AUTHORS["advantages"]
    assert manifest["grpo"]["steps_per_generation"] == 2 and manifest["grpo"]["weight_decay"] == 0.01
    assert manifest["target"]["untie"] is True
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["config"]["target"]["untie"] is True
