"""Kill a generation run with SIGKILL at several points, rerun the same command, and check that the
final rows are exactly those of an uninterrupted run with the same seed: nothing lost, nothing doubled."""

import json
import signal
import subprocess
import time

import pytest

from tests.conftest import DATASTEER, TINY, cli_env, write_prompts

N_PROMPTS = 30
K = 2


def _args(prompts, out):
    return DATASTEER + ["generate", str(prompts), "--model", TINY + "?hidden=128&layers=3", "--k", str(K),
                        "--max-new-tokens", "48", "--batch-size", "1", "--seed", "11", "--out", str(out), "--quiet"]


def _shards(out):
    return sorted((out / "shards").rglob("*.jsonl")) if (out / "shards").exists() else []


def _kill_after(args, out, n_shards, timeout=240):
    """Start the command, SIGKILL it once at least `n_shards` shards exist; True if it was still running."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if len(_shards(out)) >= n_shards:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [f"Question number {i}: what is {i} + {i}?"
                                                         for i in range(N_PROMPTS)])
    reference = tmp_path / "reference"
    done = subprocess.run(_args(prompts, reference), capture_output=True, text=True, env=cli_env(), timeout=600)
    assert done.returncode == 0, done.stderr

    crashed = tmp_path / "crashed"
    kills = 0
    for n in (0, 3, 11, 22):  # 0: during start-up and model load, before any shard
        if _kill_after(_args(prompts, crashed), crashed, n):
            kills += 1
            manifest = crashed / "manifest.json"
            assert not manifest.exists() or json.loads(manifest.read_text())["status"] == "running"
    assert kills >= 3, "the run finished before it could be killed; make the workload larger"
    final = subprocess.run(_args(prompts, crashed), capture_output=True, text=True, env=cli_env(), timeout=600)
    assert final.returncode == 0, final.stderr

    expected = (reference / "candidates.jsonl").read_bytes()
    got = (crashed / "candidates.jsonl").read_bytes()
    rows = [json.loads(x) for x in got.splitlines()]
    keys = [(r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == N_PROMPTS * K, "no loss, no duplicates"
    assert got == expected, "resumed rows are byte-identical to an uninterrupted run"
    assert [p.name for p in _shards(crashed)] == [p.name for p in _shards(reference)]
    assert not list(crashed.rglob("*.tmp-*")), "no temporary files left behind"
    assert json.loads((crashed / "manifest.json").read_text())["status"] == "complete"
