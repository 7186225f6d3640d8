"""The pattern oracle (`datasteer.dpg.oracle`): its per-string slice gradients add up to the real fine-tuning's
change of the slice (float64), its search only ever improves what it predicts, its answer is scored by the real
fine-tuning, and recipes it would not be exact for are refused."""

from __future__ import annotations

import pytest
import torch

from datasteer.dpg.config import DPGConfig
from datasteer.dpg.oracle import SliceGradients, alphabet_ids, check_oracle_config, search
from datasteer.dpg.rewards import target_examples
from datasteer.dpg.trainer import load_target
from datasteer.errors import ConfigError
from datasteer.metagrad import train
from datasteer.recipes import recipe_config

SMALL = ["grpo.prompts_per_step=2", "grpo.num_generations=4", "validation.limit=2", "training.batch_size=8",
         "grpo.max_completion_length=8", "training.dtype=float64",
         "target.model=tiny:gpt2?hidden=16&layers=1&heads=2&seed=2&tokenizer=chars"]


def small_config(*extra: str) -> DPGConfig:
    return recipe_config(DPGConfig, "demo-dpg-67", [*SMALL, *extra])


@pytest.mark.parametrize("untie", [False, True])
def test_slice_gradients_sum_to_the_real_sgd_step(untie):
    config = small_config(f"target.untie={str(untie).lower()}")
    inner = load_target(config)
    alphabet, n, length = check_oracle_config(config)
    assert (n, length) == (8, 8)
    letters = torch.as_tensor(alphabet_ids(alphabet, inner.tokenizer))
    ids = letters[torch.randint(len(letters), (n, length), generator=torch.Generator().manual_seed(3))]
    predicted = -config.training.learning_rate / n * SliceGradients(inner, chunk=3)(ids).sum(0)
    strings = [inner.tokenizer.decode(row.tolist()) for row in ids]
    examples, kept = target_examples(strings, inner.tokenizer, config.training.max_length)
    assert len(kept) == n and all(len(e["input_ids"]) == length for e in examples)
    actual = inner.target.delta(train(inner.model, examples, inner.training))
    assert actual.abs().max() > 1e-4  # the step moved the slice
    torch.testing.assert_close(predicted, actual, rtol=1e-10, atol=1e-13)


def test_search_improves_on_its_random_start_and_reports_the_real_readout():
    config = small_config()
    inner = load_target(config)
    found = search(config, inner, sweeps=2, seed=1)
    objectives = [h["objective"] for h in found.history]
    assert objectives == sorted(objectives) and objectives[-1] > objectives[0]
    assert found.pixel_accuracy >= found.start_accuracy and found.pixel_accuracy > 0.6
    assert found.history[-1]["accuracy"] == pytest.approx(found.pixel_accuracy)  # predicted = the real readout
    assert len(found.strings) == 8 and all(len(s) == 8 and set(s) <= set(config.generator.allowed_tokens)
                                           for s in found.strings)
    examples, _ = target_examples(found.strings, inner.tokenizer, config.training.max_length)
    readout = inner.target.readout(inner.model, train(inner.model, examples, inner.training))
    assert readout["pixel_accuracy"] == found.pixel_accuracy
    assert len(found.delta) == 7 and len(found.delta[0]) == 6


@pytest.mark.parametrize("override, words", [
    ("training.optimizer=adamw", "plain SGD"),
    ("training.batch_size=4", "plain SGD"),
    ("generator.allow_eos=true", "allow_eos"),
    ("target={model: 'tiny:gpt2?tokenizer=chars', kind: l2_norm}", "pattern"),
])
def test_recipes_the_search_would_not_be_exact_for_are_refused(override, words):
    with pytest.raises(ConfigError, match=words):
        check_oracle_config(small_config(override))
