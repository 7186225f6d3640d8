"""DPG rewards equal the engine's scores; naive rewards equal Phi of each split; advantage normalisation."""

from __future__ import annotations

import pytest
import torch

from datasteer.dpg.glyphs import glyph
from datasteer.dpg.rewards import batch_advantages, dpg_rewards, group_advantages, naive_rewards, target_examples
from datasteer.dpg.targets import lm_head_pattern
from datasteer.errors import InputError
from datasteer.metagrad import TrainingConfig, metagradients, train
from datasteer.models import load_model

TEXTS = ["The cat sat on the mat.", "", "A quick brown fox!", "Numbers: 6 7 6 7", "x", "Hello there, general."]
SAMPLE = [0, 1, 0, 1, 0, 1]  # 3 prompts x 2 rollouts


@pytest.fixture(scope="module")
def target_model():
    loaded = load_model("tiny:gpt2?hidden=32&layers=1&heads=2", attn_implementation="eager")
    return loaded.model, loaded.tokenizer


def test_target_examples_retokenise_and_skip_untrainable(target_model):
    _, tokenizer = target_model
    examples, kept = target_examples(TEXTS, tokenizer, max_length=4)
    assert kept == [0, 2, 3, 5]  # "" and "x" have fewer than two tokens
    assert all(len(e["input_ids"]) <= 4 for e in examples)
    assert examples[0]["input_ids"] == tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"][:4]


def test_dpg_rewards_are_the_engines_scores(target_model):
    model, tokenizer = target_model
    target = lm_head_pattern(model, glyph("67"), tokenizer)
    config = TrainingConfig(optimizer="adamw", learning_rate=1e-2, batch_size=4, max_length=16)
    result = dpg_rewards(model, tokenizer, TEXTS, target, config)
    examples, kept = target_examples(TEXTS, tokenizer, 16)
    engine = metagradients(model, examples, target, config)
    assert torch.equal(result.rewards[kept], engine.scores)
    assert result.rewards[1] == 0 and result.rewards[4] == 0
    assert result.trained == [True, False, True, True, False, True]
    assert result.phi == engine.value and 0.0 <= result.readout["pixel_accuracy"] <= 1.0
    assert (result.rewards[kept] != 0).all()


def test_naive_rewards_are_phi_of_each_split(target_model):
    model, tokenizer = target_model
    target = lm_head_pattern(model, glyph("67"), tokenizer)
    config = TrainingConfig(optimizer="adamw", learning_rate=1e-2, batch_size=4, max_length=16)
    result = naive_rewards(model, tokenizer, TEXTS, SAMPLE, target, config)
    for split in (0, 1):
        texts = [t for t, s in zip(TEXTS, SAMPLE) if s == split]
        examples, _ = target_examples(texts, tokenizer, 16)
        phi = float(target(model, train(model, examples, config)))
        for i, s in enumerate(SAMPLE):
            if s == split:
                assert result.rewards[i].item() == pytest.approx(phi, rel=1e-12, abs=1e-15)
    assert result.rewards[0] != result.rewards[1]
    with pytest.raises(InputError, match="one entry per rollout"):
        naive_rewards(model, tokenizer, TEXTS, [0, 1], target, config)


def test_advantages():
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0, 4.0])
    adv = group_advantages(rewards, [0, 0, 1, 1, 2, 2], eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, float("nan"), float("nan"), -1.0, 1.0],
                                                 dtype=torch.float64), equal_nan=True)
    adv = group_advantages(rewards, [0, 0, 1, 1, 2, 2])
    assert adv[2] == 0 and adv[3] == 0  # equal rewards: no signal
    assert adv[1] == pytest.approx(1.0 / (1.0 + 1e-6))
    tiny = rewards * 1e-9  # raw metagradients are ~1e-9: normalisation makes them usable
    assert group_advantages(tiny, [0, 0, 1, 1, 2, 2], eps=1e-12)[1] == pytest.approx(1.0, rel=1e-3)
    whole = batch_advantages(rewards, eps=0.0)
    assert whole.mean().abs() < 1e-12 and whole.std(unbiased=False) == pytest.approx(1.0)


def test_a_batch_with_nothing_to_train_gives_no_signal(target_model):
    model, tokenizer = target_model
    target = lm_head_pattern(model, glyph("67"), tokenizer)
    config = TrainingConfig(optimizer="sgd", learning_rate=1e-2, batch_size=2, max_length=8)
    texts = ["", "x", "", "y"]  # every rollout under two tokens
    for result in (dpg_rewards(model, tokenizer, texts, target, config),
                   naive_rewards(model, tokenizer, texts, [0, 1, 0, 1], target, config)):
        assert result.phi is None and result.trained == [False] * 4
        assert torch.equal(result.rewards, torch.zeros(4, dtype=torch.float64))
        assert torch.equal(group_advantages(result.rewards, [0, 0, 1, 1]), torch.zeros(4, dtype=torch.float64))
