"""Data-parallel metagradients over torch.distributed (gloo, 2 real processes under torchrun) equal the
one-process ones in float64: value, every score, the trained parameters and the losses, for SGD with momentum
and AdamW, micro-batched, with uneven steps and a replayed schedule."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed_metagrad import CASES, run_cases

ROOT = Path(__file__).resolve().parents[1]
REL = 1e-10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of the one-process tensor."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           "-m", "tests.distributed_metagrad", str(out)],
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
