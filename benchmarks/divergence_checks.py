"""What the divergence guard costs the metagradient engine, side by side in one run.

Every forward step of `train`/`metagradients` checks that the step's loss and the updated weights are finite
(`datasteer.training.check_loss`, `check_parameters`). This times `train` and `metagradients` with the checks
on and switched off, alternately for --rounds rounds on the same model and data, and reports the medians and
their ratio (target: under 1.05, i.e. the guard costs less than 5%).

    python benchmarks/divergence_checks.py [--preset cpu|gpt2-small] [--steps 16] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

from metagrad import build, sft_config  # benchmarks/metagrad.py beside this script: its GPT-2-shaped target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import datasteer.metagrad.engine as engine
    from datasteer.metagrad import metagradients, train

    model, examples, metric, p = build(args.preset, args.device, args.steps)
    config = sft_config(p, args.device)
    checks = engine.check_loss, engine.check_parameters
    off = (lambda *a, **k: None, lambda *a, **k: None)
    times: dict[str, list[float]] = {k: [] for k in ("train on", "train off", "metagrad on", "metagrad off")}
    for round_ in range(args.rounds):
        order = (("on", checks), ("off", off)) if round_ % 2 == 0 else (("off", off), ("on", checks))  # no drift bias
        for label, fns in order:
            engine.check_loss, engine.check_parameters = fns
            start = time.perf_counter()
            train(model, examples, config)
            times[f"train {label}"].append(time.perf_counter() - start)
            start = time.perf_counter()
            metagradients(model, examples, metric, config)
            times[f"metagrad {label}"].append(time.perf_counter() - start)
    engine.check_loss, engine.check_parameters = checks
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "date": datetime.date.today().isoformat(), "machine": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "preset": args.preset, "steps": args.steps, "rounds": args.rounds,
        "median_seconds": {k: round(v, 4) for k, v in medians.items()},
        "ratio_train": round(medians["train on"] / medians["train off"], 3),
        "ratio_metagradients": round(medians["metagrad on"] / medians["metagrad off"], 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
