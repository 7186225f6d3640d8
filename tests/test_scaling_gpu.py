"""The multi-GPU paths that cannot run on a CPU machine; skipped without the GPUs they need.

- data-parallel metagradients over NCCL (2 GPUs) equal the one-process CPU results in float64;
- DPG with TRL's vLLM generation in colocate mode (1 GPU, vllm installed) runs a few steps and writes its run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import cli_env, two_processes
from tests.distributed_metagrad import CASES, run_cases
from tests.test_scaling_metagrad import REL, close

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.gpu


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_metagradients_equal_one_cpu_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(two_processes("torchrun", "tests.distributed_metagrad", str(tmp_path), "nccl"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = run_cases("cpu")
    for rank in range(2):
        got = torch.load(tmp_path / f"rank-{rank}.pt", weights_only=False)
        for case, *_ in CASES:
            assert got[case]["world"] == 2
            assert close(got[case]["scores"], single[case]["scores"]) <= REL * 100  # GPU float64 sums, other order
            assert abs(got[case]["value"] - single[case]["value"]) <= REL * 100 * abs(single[case]["value"])


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None,
                    reason="needs a CUDA GPU and vllm")
def test_dpg_with_vllm_colocate_generation(tmp_path):
    from tests.test_dpg_trainer import recipe

    # vLLM loads the generator from disk: the embedded SmolLM2 (a converted copy in the user cache), with LoRA
    data = recipe(tmp_path)
    data["generator"] = {"model": "embedded:smollm2", "device": "cuda", "lora": {"r": 8}}
    data["target"] = {"model": "tiny:gpt2?hidden=32&layers=1&heads=2&seed=2", "kind": "l2_norm"}
    data["training"].update(device="cuda", max_length=32)
    data["grpo"].update(max_steps=2, use_vllm=True, max_completion_length=16,
                        trl={"vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "datasteer", "dpg", str(path), "--out", str(tmp_path / "run"), "-q"],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (tmp_path / "run" / "dpg" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3
