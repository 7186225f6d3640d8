"""Data-parallel metagradients over torch.distributed (gloo, 2 real processes under torchrun) equal the
one-process ones in float64: value, every score, the trained parameters and the losses, for SGD with momentum
and AdamW, micro-batched, with uneven steps and a replayed schedule."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import two_processes
from tests.distributed_metagrad import CASES, run_cases

ROOT = Path(__file__).resolve().parents[1]
REL = 1e-10


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of the one-process tensor."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(two_processes("torchrun", "tests.distributed_metagrad", str(out)),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_process():
    return run_cases()


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_two_gloo_ranks_equal_one_process(case, two_ranks, one_process):
    single = one_process[case]
    assert single["world"] == 1
    for rank in two_ranks:
        got = rank[case]
        assert got["world"] == 2
        assert abs(got["value"] - single["value"]) <= REL * abs(single["value"])
        assert close(got["scores"], single["scores"]) <= REL
        assert single["scores"].abs().min() > 0  # every example has a score to compare
        assert got["losses"] == pytest.approx(single["losses"], rel=REL)
        for name, p in single["params"].items():
            assert close(got["params"][name], p) <= REL, name
            assert close(got["trained"][name], single["trained"][name]) <= REL, name
    # the ranks agree bit for bit: they train the same parameters from the same reduced sums
    first, second = two_ranks
    assert torch.equal(first[case]["scores"], second[case]["scores"])
    assert all(torch.equal(first[case]["params"][n], second[case]["params"][n]) for n in first[case]["params"])


def test_attribute_under_torchrun_writes_once_the_scores_of_one_process(tmp_path):
    """`datasteer attribute` joins the launcher's process group itself; 2 ranks score like one process."""
    import json

    held = "the quick brown fox jumps over the lazy dog"
    rows = [{"text": held}, {"text": "zebra quantum yellow seventeen marmalade"},
            {"prompt": "Name an animal.", "completion": "A fox, quick and brown."},
            {"text": "dogs and foxes are lazy and quick"}, {"text": "a fox"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "held.txt").write_text(held + "\n")
    args = ["attribute", str(data), "--eval-texts", str(tmp_path / "held.txt"), "--model", "tiny:gpt2", "-q",
            "--set", "training.optimizer=adamw", "--set", "training.learning_rate=0.01",
            "--set", "training.batch_size=3", "--set", "training.epochs=2", "--set", "training.dtype=float64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    one = subprocess.run([sys.executable, "-m", "datasteer", *args, "--out", str(tmp_path / "one.jsonl")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(two_processes("torchrun", "datasteer", *args, "--out", str(tmp_path / "two.jsonl")),
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    scores = {n: torch.tensor([json.loads(line)["metagrad"]
                               for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()])
              for n in ("one", "two")}
    assert close(scores["two"], scores["one"]) <= REL
    meta = json.loads((tmp_path / "two.jsonl.meta.json").read_text())
    assert meta["stats"]["world_size"] == 2 and meta["rows"] == len(rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held.txt", "one.jsonl", "one.jsonl.meta.json", "rows.jsonl",
                                                         "two.jsonl", "two.jsonl.meta.json"]  # no stray files
