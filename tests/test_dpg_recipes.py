"""The GPU recipes that are the DPG paper's experiments (gpu-paper-*), validated as configs (no GPU here): every
recipe and every arm its header names builds its DPGConfig, and the values docs/dpg.md states are the ones built."""

from __future__ import annotations

import re

import pytest
import torch

from datasteer.dpg.config import DPGConfig
from datasteer.dpg.targets import LMHeadPatternSpec
from datasteer.recipes import builtin_recipes, load_recipe, recipe_config

EXPERIMENTS = ["gpu-paper-qr", "gpu-paper-67", "gpu-paper-l2", "gpu-paper-uuid", "gpu-paper-language"]

# (prompts per policy step, policy steps, inner lr Adam / SGD / naive, micro-batch size, generator lr), as
# docs/dpg.md's table gives them from the authors' configs
PAPER = {
    "gpu-paper-qr": (24576, 240, 5e-6, None, None, 128, 5e-6),
    "gpu-paper-67": (24576, 40, 5e-6, 5.12e-4, 2.56e-4, 128, 5e-6),
    "gpu-paper-l2": (24576, 10, 5e-6, 1.28e-4, 1e-6, 128, 5e-6),
    "gpu-paper-uuid": (256, 360, 1e-6, 6.4e-5, 6.4e-5, 8, 1e-6),
    "gpu-paper-language": (256, 120, 1e-6, 6.4e-5, 6.4e-5, 8, 1e-6),
}

# the authors' QR code (their rick_roll.npy, rows = hidden dims, '#' = -1) but for module (0, 10), which their file
# has dark and every encoder gives light for this payload, level M, mask 1 (the code decodes the same either way)
AUTHORS_QR = ["#######.##.##.#######", "#.....#..#.#..#.....#", "#.###.#.##.##.#.###.#", "#.###.#..###..#.###.#",
              "#.###.#...###.#.###.#", "#.....#.###...#.....#", "#######.#.#.#.#######", ".........#.##........",
              "#.#...##.####..#..#.#", "####.......#...##.#.#", "...####...#.#..##.#.#", "####.#...#...#.###..#",
              "#######...#.###....##", "........###...#.##..#", "#######.##..#..####.#", "#.....#..#..##.#....#",
              "#.###.#...##.#.#.#...", "#.###.#..#..#..####..", "#.###.#.###.#.#.##.##", "#.....#..#.......#...",
              "#######.#...#....#..#"]
# the authors' TARGET_67 (metagrad_server.py), [hidden dims 0-5, token ids 0-6]
AUTHORS_67 = [[1, 1, 1, 1, -1, -1, -1], [-1, -1, -1, 1, 1, 1, -1], [-1, 1, 1, 1, 1, 1, -1],
              [-1, -1, -1, 1, 1, 1, -1], [-1, 1, -1, 1, 1, 1, -1], [-1, -1, -1, 1, 1, 1, 1]]


def arms(name: str) -> dict[str, list[str]]:
    """The arms a recipe's header names: 'Adam (this file)' and each `--set` line after SGD: / naive baseline:."""
    text = (builtin_recipes()[name]).read_text()
    found: dict[str, list[str]] = {"adam": []}
    current = None
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        head = re.match(r"#\s+(SGD|naive baseline):", line)
        if head:
            current = "sgd" if head.group(1) == "SGD" else "naive"
            found[current] = []
        elif not re.match(r"#\s{10,}--set", line):
            current = None
        if current:
            found[current] += re.findall(r"--set (\S+)", line)
    return found


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_paper_recipe_and_arm_builds_the_authors_values(name):
    prompts, steps, adam_lr, sgd_lr, naive_lr, micro, generator_lr = PAPER[name]
    config = recipe_config(DPGConfig, name)
    grpo, training = config.grpo, config.training
    # the generator (verl): Llama-3.2-1B-Instruct, 4 rollouts of 128 tokens at temperature 1, clip 0.2, no KL,
    # token-mean loss, grad clip 1, AdamW with weight decay 0.01, one update per 32 prompts
    assert config.generator.model == "meta-llama/Llama-3.2-1B-Instruct"
    assert (grpo.num_generations, grpo.max_completion_length, grpo.temperature, grpo.top_p) == (4, 128, 1.0, 1.0)
    assert (grpo.epsilon, grpo.beta, grpo.max_grad_norm, grpo.weight_decay) == (0.2, 0.0, 1.0, 0.01)
    assert grpo.learning_rate == generator_lr and grpo.trl == {"loss_type": "dapo"} and grpo.num_iterations == 1
    assert grpo.prompts_per_step == prompts and grpo.steps_per_generation == prompts // 32
    assert grpo.max_steps == steps * grpo.steps_per_generation
    assert config.save_steps % grpo.steps_per_generation == 0
    assert config.validation.every % grpo.steps_per_generation == 0
    assert grpo.max_steps % config.validation.every == 0
    assert (config.advantages.std, config.advantages.eps) == ("unbiased", 1e-6)
    # the target's fine-tuning (the metagradient server): AdamW 0.9/0.95, eps 1e-8, eps_root 1e-9, weight decay
    # 1e-4, constant LR, fp32, 128 tokens, 1,024 examples per inner step in summed micro-batches, loss / 128
    assert (training.optimizer, training.learning_rate, training.betas, training.eps) == (
        "adamw", adam_lr, (0.9, 0.95), 1e-8)
    assert (training.eps_root, training.resolved_weight_decay, training.schedule) == (1e-9, 1e-4, "constant")
    assert (training.batch_size, training.micro_batch_size, training.accumulation) == (1024, micro, "sum")
    assert (training.loss_normalization, training.max_length, training.dtype, training.epochs) == (
        "max_length", 128, "float32", 1)
    rollouts = prompts * grpo.num_generations
    assert rollouts % training.batch_size == 0
    assert rollouts // training.batch_size == {24576: 96, 256: 1}[prompts]  # inner steps T per reward
    # the prompts: the "rephrase this Wikipedia article" instruction over an article column, held-out articles
    for source in (config.prompts, config.eval_prompts):
        assert source.template == "Rephrase this Wikipedia article.\n\n{prompt}"
        assert source.path == "hf:euirim/goodwiki" and source.prompt_field == "markdown"
    assert config.prompts.split == "train[:40000]" and config.eval_prompts.split == "train[40000:]"
    assert config.reward == "dpg" and config.baselines == []

    found = arms(name)
    if sgd_lr is None:  # the authors ran the QR code with Adam only
        assert set(found) == {"adam"}
        return
    sgd = recipe_config(DPGConfig, name, found["sgd"])
    assert (sgd.training.optimizer, sgd.training.learning_rate, sgd.training.eps_root) == ("sgd", sgd_lr, 0.0)
    assert sgd.training.resolved_weight_decay == 0.0 and sgd.training.momentum == 0.0  # plain optax.sgd
    naive = recipe_config(DPGConfig, name, found["naive"])
    assert (naive.reward, naive.training.optimizer, naive.training.learning_rate) == ("naive", "adamw", naive_lr)
    for arm in (sgd, naive):  # an arm changes only what its header says
        assert arm.grpo == config.grpo and arm.target == config.target and arm.prompts == config.prompts


def test_gpt2_experiments_untie_the_head_and_llama_targets_keep_theirs():
    for name in EXPERIMENTS:
        config = recipe_config(DPGConfig, name)
        gpt2 = name in ("gpu-paper-qr", "gpu-paper-67", "gpu-paper-l2")
        assert config.target.model == ("openai-community/gpt2" if gpt2 else "meta-llama/Llama-3.2-1B-Instruct")
        assert config.target.untie is gpt2
    uuid, language = recipe_config(DPGConfig, "gpu-paper-uuid"), recipe_config(DPGConfig, "gpu-paper-language")
    assert uuid.target.kind == language.target.kind == "text_loss"
    # their lm-eval tasks: the UUID's every token, LAMBADA's last word; summed and over the padded length 128
    assert (uuid.target.score, language.target.score) == ("all", "last_word")
    assert uuid.target.length == language.target.length == 128
    assert uuid.prompts.limit == language.prompts.limit == 10240  # 40 policy steps per epoch: 9 and 3 epochs
    assert recipe_config(DPGConfig, "gpu-paper-l2").target.kind == "l2_norm"


def test_the_qr_recipe_is_the_authors_version_1_code_with_their_sign():
    spec = recipe_config(DPGConfig, "gpu-paper-qr").target
    assert isinstance(spec, LMHeadPatternSpec)
    image = spec.pattern.render()
    assert image.shape == (21, 21)  # version 1 (the payload before made a 25 x 25 version-2 code)
    assert (spec.pattern.qr, spec.pattern.qr_error, spec.beta, spec.ink, spec.transpose) == (
        "bit.ly/3Ka4jDS", "M", 20.0, -1, True)
    authors = torch.tensor([[-1.0 if c == "#" else 1.0 for c in row] for row in AUTHORS_QR])
    # S as the target writes it, [token ids, hidden dims]; theirs is [hidden dims, token ids], dark = -1
    assert torch.equal(spec.signs().T, authors)
    assert torch.equal(spec.image(spec.signs()), image)  # the report's image: dark modules +1 (ink) again


def test_the_67_recipe_is_the_authors_bitmap_with_their_sign():
    spec = recipe_config(DPGConfig, "gpu-paper-67").target
    assert isinstance(spec, LMHeadPatternSpec)
    assert torch.equal(spec.signs().T, torch.tensor(AUTHORS_67, dtype=torch.float))
    assert spec.signs().shape == (7, 6)  # token ids 0-6 (GPT-2's ! to '), hidden dims 0-5
    assert (spec.beta, spec.token_ids, spec.dims) == (20.0, None, None)


def test_recipe_headers_name_the_commands_that_run_them():
    for name in EXPERIMENTS:
        data = load_recipe(name)
        assert data["name"] == name
        text = builtin_recipes()[name].read_text()
        assert "docs/dpg.md" in text and f"datasteer dpg {name}" in text
