"""Generation and scoring on Ray, for real (Ray clusters of 2 CPUs, 2 worker actors, no mocks): the rows are the
bytes one process writes, a worker killed mid-run loses and doubles nothing, a run started locally resumes on Ray,
and without ray installed `--engine ray` is one line.

The kill test lets `datasteer` start (and stop) its own local cluster; the others join one cluster started for
this module (`--ray-address`), which is the multi-node path and saves a cluster start per command."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datasteer.config import fingerprint as run_fingerprint
from datasteer.engines import ENGINES, EngineConfig
from datasteer.generation import generate
from datasteer.generation.config import GenerateConfig
from datasteer.metrics import score
from datasteer.metrics.config import ScoreConfig
from tests.conftest import DATASTEER, TINY, cli_env, write_prompts

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="needs ray (pip install 'datasteer[ray]')")

N_PROMPTS, K, SEED = 12, 2, 11
MODEL = TINY + "?hidden=128&layers=3"
METRICS = "mtld,length,readability"


def _generate_args(prompts: Path, out: Path, *extra: str) -> list[str]:
    return DATASTEER + ["generate", str(prompts), "--model", MODEL, "--k", str(K), "--max-new-tokens", "24",
                        "--batch-size", "1", "--seed", str(SEED), "--out", str(out), "--quiet", *extra]


def _score_args(rows: Path, out: Path, *extra: str) -> list[str]:
    return DATASTEER + ["score", str(rows), "--metrics", METRICS, "--chunk-size", "8", "--out", str(out), "--quiet",
                        *extra]


def _cli(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    # a cluster given by address is joined with token authentication only when asked (Ray's rule); the token is
    # the one the head wrote to ~/.ray/auth_token
    done = subprocess.run(args, capture_output=True, text=True, env=cli_env(RAY_AUTH_MODE="token"), timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done


def _shards(out: Path) -> list[Path]:
    return sorted((out / "shards").rglob("*.jsonl")) if (out / "shards").exists() else []


def _keys(path: Path) -> list[tuple[str, int]]:
    return [(r["prompt_id"], r["sample_index"]) for r in map(json.loads, path.read_bytes().splitlines())]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One local process: the prompts, its candidates and its scored rows."""
    root = tmp_path_factory.mktemp("ray-reference")
    prompts = write_prompts(root / "prompts.jsonl", [f"Question number {i}: what is {i} + {i}?"
                                                     for i in range(N_PROMPTS)])
    config = GenerateConfig.model_validate({
        "prompts": {"path": str(prompts)}, "seed": SEED,
        "teachers": [{"name": "llama", "model": MODEL, "k": K, "batch_size": 1, "sampling": {"max_new_tokens": 24}}]})
    gen = generate(config, root / "generate", progress=False)
    scored = score(ScoreConfig(input=str(gen.candidates_path), metrics=METRICS, chunk_size=8), root / "score",
                   progress=False)
    return {"prompts": prompts, "candidates": gen.candidates_path, "scored": scored.scored_path,
            "generate": root / "generate", "score": root / "score"}


class _Head:
    """A Ray cluster's head, started by a process of its own; `address` waits for it to be up."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self._address = proc, None

    @property
    def address(self) -> str:
        if self._address is None:
            self._address = self.proc.stdout.readline().strip()
            assert self._address, "the Ray head did not start"
        return self._address


@pytest.fixture(scope="module")
def cluster():
    """A running Ray cluster that commands join by address (it boots while the reference is generated)."""
    code = ("import sys, ray; info = ray.init(num_cpus=2, include_dashboard=False, logging_level='ERROR', "
            "log_to_driver=False); print(info.address_info['gcs_address'], flush=True); sys.stdin.read(); "
            "ray.shutdown()")
    head = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env=cli_env(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token"))
    try:
        yield _Head(head)
    finally:
        head.stdin.close()  # the head shuts its cluster down and exits
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


@needs_ray
def test_ray_workers_write_the_bytes_of_one_process(cluster, reference, tmp_path):
    ray = ("--engine", "ray", "--workers", "2", "--ray-address", cluster.address)
    _cli(_generate_args(reference["prompts"], tmp_path / "gen", *ray))
    got = tmp_path / "gen" / "candidates.jsonl"
    assert got.read_bytes() == reference["candidates"].read_bytes()
    assert [p.name for p in _shards(tmp_path / "gen")] == [p.name for p in _shards(reference["generate"])]

    _cli(_score_args(reference["candidates"], tmp_path / "score", *ray))
    assert (tmp_path / "score" / "scored.jsonl").read_bytes() == reference["scored"].read_bytes()
    assert (tmp_path / "score" / "summary.json").read_bytes() == (reference["score"] / "summary.json").read_bytes()
    # where the work ran is not part of a run's identity
    for stage in ("gen", "score"):
        ran = _manifest(tmp_path / stage)
        assert ran["status"] == "complete" and "engine" not in ran["config"]
    assert _manifest(tmp_path / "gen")["config"] == _manifest(reference["generate"])["config"]
    assert not list(tmp_path.rglob("*.tmp-*"))


def _descendants(root: int) -> set[int]:
    """Every live process below `root` (Ray's local cluster runs under the driver that started it)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _unit_workers(driver: int) -> list[int]:
    pids = []
    for pid in _descendants(driver):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::UnitWorker"):
            pids.append(pid)
    return sorted(pids)


@needs_ray
def test_a_killed_worker_loses_and_doubles_nothing(reference, tmp_path):
    out = tmp_path / "gen"
    proc = subprocess.Popen(_generate_args(reference["prompts"], out, "--engine", "ray", "--workers", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    killed = None
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline and killed is None:
            workers = _unit_workers(proc.pid)
            # 3 shards from 2 workers: the actors are loaded and have finished units; work is still queued
            if len(_shards(out)) >= 3 and len(workers) == 2:
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.02)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed is not None, "the run finished before a worker could be killed; make the workload larger"
    assert proc.returncode == 0, stderr
    assert "a Ray worker died running unit" in stderr and "retrying it on a new worker (1/2)" in stderr, stderr
    got = out / "candidates.jsonl"
    keys = _keys(got)
    assert len(keys) == len(set(keys)) == N_PROMPTS * K, "no loss, no duplicates"
    assert got.read_bytes() == reference["candidates"].read_bytes()
    assert [p.name for p in _shards(out)] == [p.name for p in _shards(reference["generate"])]


@needs_ray
def test_a_run_started_locally_resumes_on_ray(cluster, reference, tmp_path):
    out = tmp_path / "gen"
    proc = subprocess.Popen(_generate_args(reference["prompts"], out), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=cli_env())
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline and len(_shards(out)) < 3:
            time.sleep(0.005)
        stopped = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stopped, "the local run finished before it could be killed; make the workload larger"
    assert _manifest(out)["status"] == "running"
    before = len(_shards(out))
    assert 3 <= before < N_PROMPTS
    done = _cli(_generate_args(reference["prompts"], out, "--engine", "ray", "--workers", "2", "--ray-address",
                               cluster.address))
    assert f"{before * K} resumed from an earlier run" in done.stdout, done.stdout
    assert (out / "candidates.jsonl").read_bytes() == reference["candidates"].read_bytes()
    assert _manifest(out)["status"] == "complete"
    assert not list(out.rglob("*.tmp-*"))


@needs_ray
def test_a_unit_whose_workers_keep_dying_is_one_line(reference, tmp_path):
    """Retries are bounded: a metric that kills its worker every time ends the run with one line, and the run
    directory keeps nothing half-written."""
    (tmp_path / "deadly.py").write_text("import os, signal\n\n\ndef deadly(texts):\n"
                                        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    out = tmp_path / "score"
    args = _score_args(reference["candidates"], out, "--engine", "ray", "--workers", "1", "--set",
                       "engine.max_retries=1")
    args[args.index(METRICS)] = "deadly:deadly"
    done = subprocess.run(args, capture_output=True, text=True, timeout=300,
                          env=cli_env(PYTHONPATH=str(tmp_path)))  # the local cluster's workers inherit it
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("datasteer: warning: a Ray worker died running unit 000000 of metric deadly")
    assert len(lines) == 2 and lines[1].startswith("datasteer: error: unit 000000 of metric deadly: its Ray worker "
                                                   "died 2 times"), done.stderr
    assert "rerun the same command to resume" in lines[1]
    assert not out.exists()


def test_without_ray_the_ray_engine_is_one_line(reference, tmp_path):
    out = tmp_path / "gen"
    code = ("import sys; sys.modules['ray'] = None; from datasteer.cli import main; "
            f"main({_generate_args(reference['prompts'], out, '--engine', 'ray')[3:]!r})")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("datasteer: error: the ray engine needs"), done.stderr
    assert "pip install 'datasteer[ray]'" in lines[0]
    assert not out.exists()


def test_the_engine_is_operational():
    """Engine settings never change a run's fingerprint, and the CLI's choices are the config's."""
    from datasteer import cli

    base = {"prompts": {"path": "p.jsonl"}, "teachers": [{"name": "t", "model": TINY}]}
    local = GenerateConfig.model_validate(base)
    on_ray = GenerateConfig.model_validate({**base, "engine": {"kind": "ray", "workers": 8, "address": "auto"}})
    assert run_fingerprint(local) == run_fingerprint(on_ray) and "engine" not in run_fingerprint(on_ray)
    assert GenerateConfig.model_validate({**base, "engine": "ray"}).engine == EngineConfig(kind="ray")
    with pytest.raises(ValueError, match="workers applies to the ray engine only; add --engine ray"):
        EngineConfig(workers=2)  # refused, not ignored
    assert tuple(e.value for e in cli.Engine) == ENGINES == EngineConfig.model_fields["kind"].annotation.__args__
    # inherit hands its engine to its generate and score stages, and leaves it out of its own fingerprint too
    from datasteer.inheritance.config import InheritConfig
    from datasteer.recipes import recipe_config

    plain = recipe_config(InheritConfig, "demo-inherit", [], {})
    spread = recipe_config(InheritConfig, "demo-inherit", ["engine.workers=4"], {"engine": {"kind": "ray"}})
    assert spread.generate_config().engine == EngineConfig(kind="ray", workers=4)
    assert run_fingerprint(plain) == run_fingerprint(spread)
    assert run_fingerprint(plain.generate_config()) == run_fingerprint(spread.generate_config())


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_RAY or importlib.util.find_spec("vllm") is None or _cuda_devices() == 0,
                    reason="needs ray, vllm and a CUDA GPU")
def test_vllm_workers_on_ray_match_one_process(prompts_file, tmp_path):
    """vLLM actors, one per GPU (tensor_parallel_size 1, data parallel over the GPUs), write what one vLLM process
    writes."""
    base = {"prompts": {"path": str(prompts_file)},
            "teachers": [{"name": "v", "model": "embedded:smollm2", "backend": "vllm", "k": 3, "batch_size": 2,
                          "tensor_parallel_size": 1, "sampling": {"temperature": 1.0, "max_new_tokens": 32}}]}
    one = generate(GenerateConfig.model_validate(base), tmp_path / "one", progress=False)
    many = generate(GenerateConfig.model_validate({**base, "engine": {"kind": "ray", "workers": _cuda_devices()}}),
                    tmp_path / "ray", progress=False)
    assert many.candidates_path.read_bytes() == one.candidates_path.read_bytes()
