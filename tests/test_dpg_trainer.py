"""The DPG trainer on tiny models: a few GRPO steps per arm, the run directory, advantages handed to TRL,
the restricted alphabet, bad recipes, and resume after SIGKILL giving the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from datasteer.config import build
from datasteer.dpg.config import DPGConfig
from datasteer.dpg.generator import allowed_token_ids, restrict_vocabulary
from datasteer.dpg.trainer import dpg, read_jsonl
from datasteer.models import load_model
from tests.conftest import DATASTEER, cli_env, write_prompts

ALPHABET = ["!", "\"", "#", "$", "%", "&", "'", "a", "b", "c"]


def recipe(tmp_path: Path, **over) -> dict:
    train = write_prompts(tmp_path / "train.jsonl", [f"training prompt {i}" for i in range(8)])
    held = write_prompts(tmp_path / "held.jsonl", [f"held-out prompt {i}" for i in range(3)])
    data = {
        "name": "tiny", "seed": 3,
        "generator": {"model": "tiny:llama?hidden=32&layers=1&heads=2&seed=1&tokenizer=chars", "chat": False,
                      "allowed_tokens": ALPHABET},
        "target": {"model": "tiny:gpt2?hidden=16&layers=1&heads=2&seed=2&tokenizer=chars", "kind": "lm_head_pattern",
                   "pattern": {"glyph": "67"}},
        "training": {"optimizer": "sgd", "learning_rate": 1.0, "batch_size": 4, "max_length": 16},
        "grpo": {"max_steps": 4, "prompts_per_step": 2, "num_generations": 4, "max_completion_length": 8,
                 "learning_rate": 1e-2},
        "prompts": {"path": str(train)}, "eval_prompts": {"path": str(held)},
        "validation": {"every": 2}, "save_steps": 2,
    }
    for key, value in over.items():
        data[key] = value
    return data


def test_a_few_steps_of_both_arms_write_the_run(tmp_path):
    config = build(DPGConfig, recipe(tmp_path, baselines=["naive"]))
    result = dpg(config, tmp_path / "run", progress=False)
    for arm in ("dpg", "naive"):
        rows = read_jsonl(tmp_path / "run" / arm / "metrics.jsonl")
        assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
        assert [r["examples_seen"] for r in rows] == [0, 8, 16, 24, 32]
        assert [r["step"] for r in rows if "validation" in r] == [0, 2, 4]
        for row in rows[1:]:
            assert row["rollouts"] == 8 and all(torch.isfinite(torch.tensor(list(row["reward"].values()))))
        for row in rows:
            if "validation" in row:
                assert row["validation"]["rollouts"] == 3 * 4  # held-out prompts x rollouts
                assert 0.0 <= row["validation"]["pixel_accuracy"] <= 1.0
        slices = read_jsonl(tmp_path / "run" / arm / "slices.jsonl")
        assert [s["step"] for s in slices] == [0, 2, 4] and len(slices[0]["delta"]) == 7
        assert (tmp_path / "run" / arm / "model" / "config.json").is_file()
        assert json.loads((tmp_path / "run" / arm / "manifest.json").read_text())["status"] == "complete"
    assert set(result.summary["arms"]) == {"dpg", "naive"}
    report = result.report.read_text()
    for name in ("curves.png", "lm_head.png", "lm_head-dpg.gif", "lm_head-naive.gif"):
        assert (tmp_path / "run" / "plots" / name).stat().st_size > 0
        assert name in report
    assert "## Time per policy step" in report
    # a pattern has no readout before any fine-tuning: "n/a" there, "not reached" only for a threshold
    headline = next(x for x in report.splitlines() if x.startswith("| dpg | 32 | "))
    assert headline.split(" | ")[2] == "n/a"
    assert report.count("\n| dpg | 4 | ") == 1 and report.count("\n| naive | 4 | ") == 1
    # the rollout each validation recorded, before and after, per arm
    samples = report[report.index("## Sample rollouts"):report.index("## Plots")]
    assert samples.count("**dpg**") == samples.count("**naive**") == 1
    for arm in ("dpg", "naive"):
        part = samples[samples.index(f"**{arm}**"):]
        for row in read_jsonl(tmp_path / "run" / arm / "metrics.jsonl"):
            if "validation" in row:
                line = next(x for x in part.splitlines() if x.startswith(f"| {row['step']} | "))
                assert line.startswith(f"| {row['step']} | {row['examples_seen']} | ")
                assert line.endswith(f"`{' '.join(row['validation']['sample'].split())}` |")
    # DPG rewards are raw metagradients: tiny, and not all equal
    dpg_rows = read_jsonl(tmp_path / "run" / "dpg" / "metrics.jsonl")[1:]
    assert all(abs(r["reward"]["max"]) < 1.0 and r["reward"]["std"] > 0 for r in dpg_rows)
    # a finished run called again returns without training
    again = dpg(config, tmp_path / "run", progress=False)
    assert again.summary == result.summary


def test_rewards_handed_to_trl_are_the_advantages(tmp_path):
    """TRL (scale_rewards='none') subtracts the group mean; our group-normalised values pass through unchanged."""
    from datasteer.dpg.records import StepRecords
    from datasteer.dpg.rewards import (
        InnerLoop,
        RewardFunction,
        dpg_rewards,
        group_advantages,
    )

    config = build(DPGConfig, recipe(tmp_path))
    loaded = load_model(config.target.model, attn_implementation="eager")
    target = config.target.build(loaded.model, loaded.tokenizer)
    records = StepRecords()
    inner = InnerLoop(loaded.model, loaded.tokenizer, target, config.training)
    reward = RewardFunction("dpg", config.grpo.num_generations, inner, loaded.tokenizer, records)
    texts = ["!a!b#c", "$$a%", "&'a!b", "bc!#", "#a#b#c", "''a", "ab!!", "%&c"]
    ids = [loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = torch.tensor(reward(prompts=["p"] * 8, completions=texts, completion_ids=ids), dtype=torch.float64)
    raw = dpg_rewards(loaded.model, loaded.tokenizer, texts, target, config.training).rewards
    expected = group_advantages(raw, [0] * 4 + [1] * 4)
    assert torch.allclose(out, expected, atol=1e-6)
    grouped = out.view(2, 4)
    trl = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()  # TRL's advantage with scale_rewards='none'
    assert torch.allclose(trl, expected, atol=1e-6)
    assert torch.allclose(grouped.std(dim=1, unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-4)
    assert records.latest()["rollouts"] == 8 and records.latest()["readout"]["pixel_accuracy"] >= 0


def test_restricted_vocabulary_reaches_sampling_and_trl_scoring():
    loaded = load_model("tiny:llama?hidden=32&layers=1&heads=2&seed=1")
    allowed = allowed_token_ids(ALPHABET, loaded.tokenizer)
    assert loaded.tokenizer.eos_token_id in allowed and len(allowed) == len(ALPHABET) + 1
    restrict_vocabulary(loaded.model, allowed)
    torch.manual_seed(0)
    prompt = loaded.tokenizer("hello", return_tensors="pt")
    out = loaded.model.generate(**prompt, do_sample=True, max_new_tokens=40, num_return_sequences=8,
                                pad_token_id=loaded.tokenizer.eos_token_id)
    assert set(out[:, prompt["input_ids"].shape[1]:].flatten().tolist()) <= set(allowed)
    # TRL's fused LM-head kernel (which bypasses forward hooks) sees the restriction through the bias
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(loaded.model)
    ids = out[:1]
    labels = ids.clone()
    fused = loaded.model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs[0]
    logits = loaded.model(input_ids=ids).logits[0, :-1]
    reference = torch.log_softmax(logits.float(), -1).gather(1, ids[0, 1:, None])[:, 0]
    assert torch.allclose(fused[-reference.shape[0]:], reference, atol=1e-5)
    assert torch.log_softmax(logits, -1)[:, allowed].exp().sum(-1).min() > 0.999


@pytest.mark.parametrize("change, message", [
    ({"eval_prompts": None}, "held-out prompts"),
    ({"target": {"model": "tiny:gpt2", "kind": "lm_head_pattern", "pattern": {"file": "missing.txt"}}},
     "missing.txt"),
    ({"generator": {"model": "tiny:nope"}}, "unknown tiny architecture"),
    ({"generator": {"model": "tiny:llama", "lora": {"rank": 4}}}, "generator.lora"),
])
def test_bad_recipes_exit_2_and_write_nothing(tmp_path, change, message):
    data = recipe(tmp_path, **change)
    if data["eval_prompts"] is None:
        del data["eval_prompts"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run(DATASTEER + ["dpg", str(path), "--out", str(tmp_path / "out"), "--quiet"],
                          capture_output=True, text=True, env=cli_env(), timeout=300)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_overlapping_held_out_prompts_are_refused(tmp_path):
    data = recipe(tmp_path)
    data["eval_prompts"] = data["prompts"]
    with pytest.raises(Exception, match="held-out"):
        dpg(build(DPGConfig, data), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    data = recipe(tmp_path, grpo={"max_steps": 6, "prompts_per_step": 2, "num_generations": 4,
                                  "max_completion_length": 8, "learning_rate": 1e-2})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    args = lambda out: DATASTEER + ["dpg", str(path), "--out", str(out), "--quiet"]  # noqa: E731
    reference = tmp_path / "reference"
    done = subprocess.run(args(reference), capture_output=True, text=True, env=cli_env(), timeout=600)
    assert done.returncode == 0, done.stderr

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(args(crashed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    metrics = crashed / "dpg" / "metrics.jsonl"
    deadline = time.time() + 300
    killed_at = None
    while proc.poll() is None and time.time() < deadline:
        rows = read_jsonl(metrics)
        if (crashed / "dpg" / "checkpoints" / "checkpoint-2").is_dir() and rows and rows[-1]["step"] >= 3:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = rows[-1]["step"]
            break
        time.sleep(0.01)
    assert killed_at is not None and killed_at < 6, "the run finished before it could be killed"
    assert json.loads((crashed / "dpg" / "manifest.json").read_text())["status"] == "running"
    final = subprocess.run(args(crashed), capture_output=True, text=True, env=cli_env(), timeout=600)
    assert final.returncode == 0, final.stderr
    for name in ("metrics.jsonl", "slices.jsonl"):
        assert _comparable(read_jsonl(crashed / "dpg" / name)) == _comparable(read_jsonl(reference / "dpg" / name))


def test_lora_generator_with_a_kl_term(tmp_path):
    data = recipe(tmp_path, save_steps=10)
    data["generator"]["lora"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    data["grpo"].update(max_steps=2, beta=0.04)
    dpg(build(DPGConfig, data), tmp_path / "run", progress=False)
    rows = read_jsonl(tmp_path / "run" / "dpg" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert (tmp_path / "run" / "dpg" / "model" / "adapter_config.json").is_file()  # an adapter, not full weights
    # every row carries the time of each phase of its step (the policy-step profile)
    assert set(rows[0]["seconds"]) == {"validation", "wall"}
    for row in rows[1:]:
        seconds = row["seconds"]
        assert {"sampling", "reward", "policy_logprobs", "training_step", "wall"} <= set(seconds)
        assert all(v >= 0 for v in seconds.values())
        # sampling and rewards happen inside TRL's training step; the step lies inside the row's wall time
        assert seconds["sampling"] + seconds["reward"] <= seconds["training_step"] <= seconds["wall"]
    assert "validation" in rows[2]["seconds"]  # the last step is validated


@pytest.mark.parametrize("chat", [True, False])
def test_validation_prompts_are_encoded_as_trl_encodes_training_prompts(chat):
    """Validation samples from `encode_prompts`; TRL tokenises the dataset prompts `prompt_value` builds."""
    from datasteer.dpg.grpo import prompt_value
    from datasteer.generation.transformers_backend import encode_prompts

    tokenizer = load_model("tiny:llama?hidden=16&layers=1&heads=2").tokenizer  # has a chat template
    prompt, system = "seed 7", "Write symbols."
    value = prompt_value(prompt, chat, system)
    if chat:  # TRL's conversational path
        trl_ids = tokenizer.apply_chat_template(conversation=[value], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"][0]
    else:  # TRL's plain-text path
        trl_ids = tokenizer(text=[value])["input_ids"][0]
    enc = encode_prompts(tokenizer, [prompt], system, chat)
    assert enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist() == list(trl_ids)
