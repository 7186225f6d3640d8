"""The same `datasteer generate` work in one process, on Ray with 1 worker and on Ray with 2 workers, in one run.

Each configuration is the real command (`datasteer generate ... --engine ray --workers N`) in a fresh process, so
each pays what a user pays: Python and torch start-up, for Ray a local cluster and one actor per worker, each
loading its own copy of the model. Two numbers per configuration:

- end to end: wall seconds of the whole command;
- steady state: rows per second after the first wave of units (one per worker: those include model loading) up
  to the last shard written (shards land as units finish), which leaves out start-up and loading and shows how
  the work itself scales.

Parallel efficiency = speed-up / workers (1.0: two workers do the work in half the time). Every configuration
must write the same bytes (checked). On a 2-core machine a local run already uses both cores (torch threads), while
each Ray worker has one: Ray's gain there is the model's poor scaling over threads, not more cores.

    python benchmarks/ray_scaling.py [--model embedded:smollm2] [--prompts 24] [--k 2] [--batch-size 2]
                                     [--max-new-tokens 32] [--repeats 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [("local", [], 1), ("ray, 1 worker", ["--engine", "ray", "--workers", "1"], 1),
           ("ray, 2 workers", ["--engine", "ray", "--workers", "2"], 2)]


def run_once(args: argparse.Namespace, extra: list[str], out: Path, workers: int) -> tuple[float, float, bytes]:
    command = [sys.executable, "-m", "datasteer", "generate", "builtin:instructions-train", "--limit",
               str(args.prompts), "--model", args.model, "--k", str(args.k), "--batch-size", str(args.batch_size),
               "--max-new-tokens", str(args.max_new_tokens), "--temperature", "1", "--seed", "0", "--out", str(out),
               "--quiet", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    shards = sorted((out / "shards").rglob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    first_wave = shards[workers - 1].stat().st_mtime
    rows = sum(len(p.read_bytes().splitlines()) for p in shards[workers:])
    window = shards[-1].stat().st_mtime - first_wave
    return seconds, rows / window if window > 0 else float("nan"), (out / "candidates.jsonl").read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per unit (units are what workers share)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    wall: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
    steady: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
    outputs: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, extra, workers in CONFIGS:  # alternating: machine noise hits every configuration alike
                seconds, rate, data = run_once(args, extra, Path(tmp) / f"{repeat}-{workers}-{len(extra)}", workers)
                wall[name].append(seconds)
                steady[name].append(rate)
                outputs.setdefault(name, data)
                print(f"repeat {repeat}: {name:<15} {seconds:6.1f} s end to end, {rate:6.2f} rows/s steady",
                      flush=True)
    same = len(set(outputs.values())) == 1
    t = {name: statistics.median(v) for name, v in wall.items()}
    r = {name: statistics.median(v) for name, v in steady.items()}
    local, one, two = (name for name, _, _ in CONFIGS)
    units = -(-args.prompts // args.batch_size)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, cpu",
        "model": args.model, "prompts": args.prompts, "k": args.k, "units": units,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "same_bytes": same,
        "seconds": {name: round(v, 1) for name, v in t.items()},
        "steady_rows_per_s": {name: round(v, 2) for name, v in r.items()},
        "end_to_end_speedup_vs_local": {name: round(t[local] / t[name], 2) for name in t},
        "steady_speedup_vs_local": {name: round(r[name] / r[local], 2) for name in r},
        "parallel_efficiency_2_workers": {"end_to_end": round(t[one] / t[two] / 2, 2),
                                          "steady": round(r[two] / r[one] / 2, 2)},
    }
    print(json.dumps(result))
    print("| configuration | end to end s | x local | steady rows/s | x local |")
    print("|---|---|---|---|---|")
    for name in t:
        print(f"| {name} | {t[name]:.1f} | {t[local] / t[name]:.2f} | {r[name]:.2f} | {r[name] / r[local]:.2f} |")
    print(f"parallel efficiency, 2 workers vs 1: end to end {result['parallel_efficiency_2_workers']['end_to_end']}, "
          f"steady {result['parallel_efficiency_2_workers']['steady']}; same bytes in all: {same}")
    if not same:
        raise SystemExit("the configurations wrote different rows")


if __name__ == "__main__":
    main()
