"""DPG on several processes: `accelerate launch` with 2 processes (its torchrun launcher; gloo on CPU) trains on
the rollouts of one process and writes the same metrics (rewards, Phi, readouts, validation), once; and the
per-row sampling streams that make this possible sample exactly from transformers' warped distribution."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from datasteer.dpg.sampling import KeyedSampler
from tests.conftest import cli_env, two_processes
from tests.test_dpg_trainer import recipe

ROOT = Path(__file__).resolve().parents[1]


def _numbers_close(a, b, path="row"):
    """Equal structure and text; floats equal to float32 rounding of differently ordered sums."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            if key != "seconds":
                _numbers_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_equal_one_process(tmp_path):
    data = recipe(tmp_path, baselines=["naive"])
    data["grpo"]["max_steps"] = 3
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    env = cli_env(OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "datasteer", "dpg", str(path), "--out", str(tmp_path / "one"),
                          "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(two_processes("accelerate", "datasteer", "dpg", str(path), "--out", str(tmp_path / "two"),
                                       "--quiet"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    for arm in ("dpg", "naive"):
        rows = {n: [json.loads(line) for line in (tmp_path / n / arm / "metrics.jsonl").read_text().splitlines()]
                for n in ("one", "two")}
        assert [r["step"] for r in rows["two"]] == [0, 1, 2, 3]  # written once, by the main process
        assert [r["examples_seen"] for r in rows["two"]] == [0, 8, 16, 24]  # the global batch, not a share
        for a, b in zip(rows["two"], rows["one"]):
            _numbers_close(a, b)  # the same rollouts ("sample"), rewards, Phi, readout and validation
        weights = {n: load_file(str(tmp_path / n / arm / "model" / "model.safetensors")) for n in ("one", "two")}
        for name, w in weights["one"].items():
            # Adam turns float32 rounding of differently ordered sums into ~3e-6 here (updates are ~1e-2 a step)
            assert float((weights["two"][name] - w).abs().max()) <= 1e-4, name
        manifest = json.loads((tmp_path / "two" / arm / "manifest.json").read_text())
        assert manifest["status"] == "complete"
    assert json.loads((tmp_path / "two" / "results.json").read_text())["arms"].keys() == {"dpg", "naive"}


def _warped_probs(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The reference: temperature, then nucleus filtering, written out by hand."""
    probs = torch.softmax(scores.double() / temperature, -1)
    order = probs.argsort(descending=True)
    cumulative = probs[order].cumsum(0)
    keep = order[: int((cumulative < top_p).sum()) + 1]
    out = torch.zeros_like(probs)
    out[keep] = probs[keep] / probs[keep].sum()
    return out


def test_keyed_sampling_draws_from_the_warped_distribution():
    from transformers import GenerationConfig

    scores = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=0)
    rows = 20000
    sampler = KeyedSampler(seed=5, step=0, first=0, config=config)
    out = sampler(torch.zeros((rows, 1), dtype=torch.long), scores.expand(rows, -1).clone())
    assert bool(((out == 0).sum(-1) == 1).all()) and bool(torch.isinf(out).sum(-1).eq(5).all())
    counts = (out == 0).double().sum(0)
    expected = _warped_probs(scores, 0.7, 0.9) * rows
    assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
    sigma = (expected * (1 - expected / rows)).sqrt()
    assert bool(((counts - expected).abs() <= 4 * sigma + 1e-9).all()), (counts, expected)


def test_a_rows_tokens_do_not_depend_on_the_rest_of_its_batch():
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0)
    torch.manual_seed(0)
    scores = torch.randn(4, 50)
    whole = KeyedSampler(seed=1, step=3, first=0, config=config)(torch.zeros((4, 2), dtype=torch.long), scores)
    halves = [KeyedSampler(seed=1, step=3, first=f, config=config)(torch.zeros((2, 2), dtype=torch.long),
                                                                   scores[f:f + 2]) for f in (0, 2)]
    assert torch.equal(whole, torch.cat(halves))
    other_step = KeyedSampler(seed=1, step=4, first=0, config=config)(torch.zeros((4, 2), dtype=torch.long), scores)
    assert not torch.equal(whole, other_step)


@pytest.mark.slow
def test_two_processes_killed_resume_to_the_metrics_of_one(tmp_path):
    """SIGKILL a 2-process launch after a checkpoint, start it again: it resumes (every rank from the same
    checkpoint, the main process truncating the metrics) and ends with an uninterrupted one-process run's rows."""
    import time

    from datasteer.dpg.trainer import read_jsonl
    from tests.test_scaling_finetune import _kill_launch

    data = recipe(tmp_path)
    data["grpo"]["max_steps"] = 6
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    env = cli_env(OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "datasteer", "dpg", str(path), "--out", str(tmp_path / "one"),
                             "-q"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]

    def launch() -> list[str]:
        return two_processes("accelerate", "datasteer", "dpg", str(path), "--out", str(tmp_path / "two"), "-q")

    proc = subprocess.Popen(launch(), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = tmp_path / "two" / "dpg" / "metrics.jsonl"
    killed_at, deadline = None, time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        rows = read_jsonl(metrics)
        if (tmp_path / "two" / "dpg" / "checkpoints" / "checkpoint-2").is_dir() and rows and rows[-1]["step"] >= 3:
            _kill_launch(proc)
            killed_at = rows[-1]["step"]
            break
        time.sleep(0.01)
    assert killed_at is not None and killed_at < 6, "the launch finished before it could be killed"
    time.sleep(1)  # the killed workers' lock goes with them
    again = subprocess.run(launch(), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = {n: read_jsonl(tmp_path / n / "dpg" / "metrics.jsonl") for n in ("one", "two")}
    assert [r["step"] for r in rows["two"]] == list(range(7))
    for a, b in zip(rows["two"], rows["one"]):
        _numbers_close(a, b)
