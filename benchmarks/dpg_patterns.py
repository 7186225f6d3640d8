"""DPG across patterns against an oracle: does the CPU "67" recipe write any 7 x 6 pattern, not just the one it was
tuned on?

For each pattern (glyph pairs of the 3 x 7 digit font and random 7 x 6 bitmaps, +-1 with probability 1/2 each):

1. the oracle (`datasteer.dpg.oracle.search`): the best pixel accuracy a coordinate search over datasets of the
   validation's size (128 strings of 16 characters from the recipe's alphabet) reaches, scored by the same
   fine-tuning and readout as DPG's validation;
2. DPG with the recipe (`demo-dpg-67` unless --recipe), the pattern swapped in; the naive baseline beside it for
   the patterns in --naive.

Reported per pattern and arm: validation pixel accuracy at step 0, best, mean of the last five validations, final,
examples to 90% and 95%, and the ratio of DPG's best to the oracle's. Everything lands in OUT (each run resumes),
with results.json, table.md and patterns.png (pattern, oracle's slice, DPG's final slice).

    python benchmarks/dpg_patterns.py OUT [--patterns 67 42 09 31 random:0 ...] [--naive 67 random:0]
        [--steps 300] [--recipe demo-dpg-67] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from datasteer.dpg.config import DPGConfig  # noqa: E402
from datasteer.dpg.oracle import search  # noqa: E402
from datasteer.dpg.trainer import dpg, load_target  # noqa: E402
from datasteer.recipes import recipe_config  # noqa: E402

DEFAULT_PATTERNS = ["67", "42", "09", "31", "random:0", "random:1", "random:2", "random:3"]


def random_bitmap(seed: int, rows: int = 7, cols: int = 6) -> list[str]:
    bits = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < 0.5
    return ["".join("#" if b else "." for b in row) for row in bits.tolist()]


def pattern_override(name: str) -> str:
    if name.startswith("random:"):
        rows = random_bitmap(int(name.split(":", 1)[1]))
        return "target.pattern={bitmap: [" + ", ".join(f"'{r}'" for r in rows) + "]}"
    return f"target.pattern={{glyph: '{name}'}}"


def slug(name: str) -> str:
    return name.replace(":", "-")


def oracle(config: DPGConfig, path: Path, sweeps: int) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    inner = load_target(config)
    found = search(config, inner, sweeps=sweeps, say=lambda line: print("  " + line, flush=True))
    result = {"pixel_accuracy": found.pixel_accuracy, "phi": found.phi, "start_accuracy": found.start_accuracy,
              "sweeps": found.sweeps, "seconds": round(found.seconds, 1), "history": found.history,
              "strings": found.strings, "delta": found.delta}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result


def arm_entry(result, arm: str) -> dict:
    entry = dict(result.summary["arms"][arm])
    rows = next(a for a in result.arms if a.arm == arm)
    entry["slice"] = rows.slices[-1]["delta"] if rows.slices else None
    return entry


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(len(names), 3, figsize=(4.2, 1.5 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        entry = results[name]
        images = [("pattern", entry["pattern"]), (f"oracle {entry['oracle']['pixel_accuracy']:.0%}",
                                                  entry["oracle_sign"]),
                  (f"DPG final {entry['dpg']['final']:.0%}", entry["dpg_sign"])]
        for col, (title, image) in enumerate(images):
            ax = axes[row][col]
            ax.imshow(image, cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title if col else f"{name}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reached(entry: dict, level: str) -> str:
    examples = entry["examples_to"][level]
    return "not reached" if examples is None else f"{examples:,}"


def sign_image(spec, delta) -> list[list[float]]:
    return torch.sign(spec.image(torch.as_tensor(delta))).tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--patterns", nargs="+", default=DEFAULT_PATTERNS)
    parser.add_argument("--naive", nargs="*", default=["67", "random:0"])
    parser.add_argument("--recipe", default="demo-dpg-67")
    parser.add_argument("--steps", type=int, default=None, help="grpo.max_steps (default: the recipe's)")
    parser.add_argument("--sweeps", type=int, default=8, help="oracle sweeps at most")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.patterns:
        sets = [pattern_override(name), *args.sets]
        if args.steps:
            sets.append(f"grpo.max_steps={args.steps}")
        if name in args.naive:
            sets.append("baselines=[naive]")
        else:
            sets.append("baselines=[]")
        config = recipe_config(DPGConfig, args.recipe, sets)
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        found = oracle(config, out / f"oracle-{slug(name)}.json", args.sweeps)
        print(f"  oracle {found['pixel_accuracy']:.3f} (from {found['start_accuracy']:.3f}, {found['sweeps']} "
              f"sweeps, {found['seconds']} s)", flush=True)
        t1 = time.perf_counter()
        run = dpg(config, out / slug(name), progress=False)
        seconds = round(time.perf_counter() - t1, 1)
        entry = {"pattern": config.target.pattern.render().tolist(), "oracle": {k: v for k, v in found.items()
                                                                               if k not in ("strings", "delta")},
                 "oracle_sign": sign_image(config.target, found["delta"]), "run_seconds": seconds}
        for arm in config.arms:
            entry[arm] = arm_entry(run, arm)
        entry["dpg_sign"] = sign_image(config.target, entry["dpg"]["slice"])
        entry["ratio_best"] = entry["dpg"]["best"] / found["pixel_accuracy"]
        entry["ratio_last"] = entry["dpg"]["last_mean"] / found["pixel_accuracy"]
        results[name] = entry
        for arm in config.arms:
            e = entry[arm]
            print(f"  {arm}: best {e['best']:.3f}, last five {e['last_mean']:.3f}, final {e['final']:.3f}, "
                  f"to 90/95%: {e['examples_to']['90%']}/{e['examples_to']['95%']} ({seconds} s with the oracle "
                  f"{round(t1 - t0, 1)} s)", flush=True)
    header = ("| pattern | oracle | DPG best | DPG mean of last 5 | DPG final | DPG / oracle (best) | examples to 90% "
              "| examples to 95% | naive best | naive mean of last 5 |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, e in results.items():
        d, n = e["dpg"], e.get("naive")
        cells = [f"`{name}`", f"{e['oracle']['pixel_accuracy']:.2f}", f"{d['best']:.2f}", f"{d['last_mean']:.2f}",
                 f"{d['final']:.2f}", f"{e['ratio_best']:.2f}", reached(d, "90%"), reached(d, "95%"),
                 f"{n['best']:.2f}" if n else "", f"{n['last_mean']:.2f}" if n else ""]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    table = "\n".join(lines)
    print(table)
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "torch": torch.__version__, "recipe": args.recipe, "sets": args.sets}
    (out / "results.json").write_text(json.dumps({"meta": meta, "patterns": results}, indent=1))
    (out / "table.md").write_text(table + "\n")
    plot(results, out / "patterns.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
