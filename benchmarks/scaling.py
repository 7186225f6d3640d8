"""1 process against 2 on the same work, side by side in one run: wall time, the ratio and the parallel efficiency.

Each stage runs once in one process and once on two, on this machine's cores, alternately for --rounds rounds
(the medians are reported). Every process gets 1 / processes of the cores (OMP_NUM_THREADS), so a 2-process run
uses the same cores as the 1-process run: the speed-up measures how well the work splits, not extra hardware.

- metagrad: `metagradients` of a GPT-2-shaped target (the engine's own timing, process start left out) under
  torchrun, data parallel over gloo;
- dpg: `datasteer dpg` on a small recipe (whole command, start-up included) under `accelerate launch`;
- finetune: `datasteer finetune` of a tiny student (whole command) under `accelerate launch`;
- ray: `datasteer generate` with --engine local against Ray with 2 workers (when ray is installed).

    python benchmarks/scaling.py [--rounds 2] [--stages metagrad dpg finetune ray]

Efficiency = T1 / (2 x T2): 1.0 is a perfect split; on 2 cores start-up, the collectives and the serial parts
(loading, the report) keep it lower.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORES = os.cpu_count() or 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(processes: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(max(CORES // processes, 1)), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str], processes: int) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(processes), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


def _launch(processes: int, module_args: list[str], launcher: str = "accelerate") -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", *module_args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(_port()), "-m", *module_args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_port()), "-m", *module_args]


# ---------------------------------------------------------------- metagrad (a worker of this very file)

def metagrad_worker() -> None:
    import torch
    from torch.func import functional_call
    from transformers import GPT2Config, GPT2LMHeadModel

    from datasteer import distributed
    from datasteer.metagrad import TrainingConfig, metagradients

    distributed.init_from_launcher("cpu")
    torch.manual_seed(0)
    config = GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=4096, n_positions=128,
                        attn_implementation="eager")
    model = GPT2LMHeadModel(config).eval()
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(0, 4096, (64,), generator=g).tolist()} for _ in range(128)]
    held = torch.randint(0, 4096, (4, 64), generator=g)

    def metric(m, params):
        logits = functional_call(m, params, (held,)).logits[:, :-1]
        return -torch.nn.functional.cross_entropy(logits.reshape(-1, 4096), held[:, 1:].reshape(-1))

    # no micro-batching: a step's examples are split over the ranks, so each rank's transient (the double backward
    # through its micro-batch's logits) shrinks with the number of processes, while stored states do not
    training = TrainingConfig(optimizer="adamw", learning_rate=1e-3, batch_size=16)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = metagradients(model, examples, metric, training)
    seconds = time.perf_counter() - start
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    if distributed.is_main_process():
        print(json.dumps({"seconds": seconds, "value": result.value, "score0": float(result.scores[0]),
                          "peak_growth_mb_rank0": round(growth), "state_mb": round(result.stats["state_bytes"] / 1e6,
                                                                                      1)}))


def metagrad_stage(processes: int) -> dict:
    _, out = _run(_launch(processes, ["benchmarks.scaling", "metagrad-worker"], "torchrun"), processes)
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- whole commands

def _dpg_recipe(folder: Path) -> Path:
    import yaml

    prompts = folder / "train.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"seed {i}"}) + "\n" for i in range(64)))
    held = folder / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"held {i}"}) + "\n" for i in range(8)))
    recipe = {
        "seed": 0, "reward": "dpg",
        "generator": {"model": "tiny:llama?hidden=64&layers=2&heads=4&seed=1&tokenizer=chars", "chat": False,
                      "allowed_tokens": ["!", "\"", "#", "$", "%", "&", "'", "a", "b", "c", "d", "e", "f", "g", "h",
                                         "i"], "allow_eos": False},
        "target": {"model": "tiny:gpt2?hidden=64&layers=1&heads=2&seed=2&tokenizer=chars", "kind": "lm_head_pattern",
                   "pattern": {"glyph": "67"}},
        "training": {"optimizer": "sgd", "learning_rate": 1.0, "batch_size": 128, "max_length": 32},
        "grpo": {"max_steps": 10, "prompts_per_step": 32, "num_generations": 4, "max_completion_length": 16,
                 "learning_rate": 3e-3},
        "prompts": {"path": str(prompts)}, "eval_prompts": {"path": str(held)},
        "validation": {"every": 5}, "save_steps": 10,
    }
    path = folder / "dpg.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def dpg_stage(processes: int, folder: Path) -> dict:
    out = folder / f"dpg-{processes}-{time.monotonic_ns()}"
    seconds, _ = _run(_launch(processes, ["datasteer", "dpg", str(folder / "dpg.yaml"), "--out", str(out), "-q"]),
                      processes)
    rows = [json.loads(line) for line in (out / "dpg" / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": seconds, "final_pixel_accuracy": rows[-1]["validation"]["pixel_accuracy"]}


def _sft_rows(folder: Path) -> Path:
    path = folder / "selected.jsonl"
    words = "the quick brown fox jumps over the lazy dog while seven bright stars watch".split()
    path.write_text("".join(json.dumps({"prompt": f"Say something about {words[i % len(words)]}.",
                                        "completion": " ".join(words[(i + j) % len(words)] for j in range(24))})
                            + "\n" for i in range(256)))
    return path


def finetune_stage(processes: int, folder: Path) -> dict:
    out = folder / f"sft-{processes}-{time.monotonic_ns()}"
    per_device = 16 // processes  # the same global batch of 16 on 1 or 2 processes
    seconds, _ = _run(_launch(processes, ["datasteer", "finetune", str(folder / "selected.jsonl"), "--model",
                                          "tiny:llama?hidden=128&layers=2&heads=4", "--method", "full",
                                          "--batch-size", str(per_device), "--out", str(out), "-q"]), processes)
    info = json.loads((out / "training.json").read_text())
    return {"seconds": seconds, "final_loss": info["final_loss"]}


def ray_stage(workers: int, folder: Path) -> dict:
    out = folder / f"gen-{workers}-{time.monotonic_ns()}"
    engine = ["--engine", "local"] if workers == 1 else ["--engine", "ray", "--workers", str(workers)]
    seconds, _ = _run([sys.executable, "-m", "datasteer", "generate", str(folder / "prompts.jsonl"), "--model",
                       "tiny:llama?hidden=128&layers=2&heads=4", "--k", "2", "--max-new-tokens", "32",
                       "--out", str(out), "-q", *engine], 1)
    rows = (out / "candidates.jsonl").read_bytes()
    return {"seconds": seconds, "bytes": len(rows), "sha": __import__("hashlib").sha256(rows).hexdigest()[:12]}


# ---------------------------------------------------------------- driver

def _close(a: object, b: object) -> bool:
    """Equal, or for floats within 1e-3 relative: float32 sums in another order (a single small score moves ~1e-4)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-3 * max(abs(a), abs(b), 1e-12)
    return a == b


def main() -> None:
    if sys.argv[1:2] == ["metagrad-worker"]:
        metagrad_worker()
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stages", nargs="+", default=["metagrad", "dpg", "finetune", "ray"])
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="datasteer-scaling-"))
    _dpg_recipe(folder)
    _sft_rows(folder)
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Write about topic {i}."}) + "\n"
                                                  for i in range(64)))
    stages = {"metagrad": lambda n: metagrad_stage(n), "dpg": lambda n: dpg_stage(n, folder),
              "finetune": lambda n: finetune_stage(n, folder), "ray": lambda n: ray_stage(n, folder)}
    print(f"# {platform.node()}, {CORES} cores, {platform.processor() or platform.machine()}, "
          f"{datetime.date.today()}; {args.rounds} rounds, medians")
    print("| stage | 1 process (s) | 2 processes (s) | speed-up | efficiency | same result |")
    print("|---|---|---|---|---|---|")
    for name in args.stages:
        if name == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                print("| ray | (ray not installed) | | | | |")
                continue
        times: dict[int, list[float]] = {1: [], 2: []}
        results: dict[int, dict] = {}
        for _ in range(args.rounds):
            for n in (1, 2):
                results[n] = stages[name](n)
                times[n].append(results[n]["seconds"])
        t1, t2 = statistics.median(times[1]), statistics.median(times[2])
        same = all(_close(results[1][k], results[2][k]) for k in results[1] if k != "seconds" and "peak" not in k)
        detail = {k: v for k, v in results[2].items() if k != "seconds"}
        if name == "metagrad":
            detail["peak_growth_mb_rank0_1_process"] = results[1]["peak_growth_mb_rank0"]
        if not same:
            detail["one_process"] = {k: v for k, v in results[1].items() if k != "seconds"}
        print(f"| {name} | {t1:.1f} | {t2:.1f} | {t1 / t2:.2f}x | {t1 / (2 * t2):.0%} | "
              f"{'yes' if same else 'no'}: {json.dumps(detail)} |", flush=True)


if __name__ == "__main__":
    main()
