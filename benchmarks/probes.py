"""The likelihood probes on real benchmark data: every probe, one model, throughput and results in markdown.

Runs `datasteer.probes.probe` on the shared copies of BBQ (6 categories), StereoSet (intra- and intersentence),
CrowS-Pairs, OpenBookQA and MMLU (`../shared/data`, see its README), all items or a seeded random sample of
`--limit` per benchmark, with the model loaded once. Prints items/s and wall time per probe (scoring only; the
model load is timed apart) and each probe's headline numbers. `--lm-eval N` also runs lm-eval-harness (if
installed) on the first N OpenBookQA and MMLU items with the same model and prompt (question, then " " + option;
no BOS, as lm-eval's HFLM does for this tokenizer; sum of log-likelihoods = lm-eval's `acc`) through datasteer's
`lm_eval` probe, and prints both accuracies and the largest log-likelihood difference.

    python benchmarks/probes.py [--model embedded:smollm2] [--limit N] [--batch-size 16] [--lm-eval N]
                                [--data ../shared/data] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from datasteer.models import load_model
from datasteer.probes import ProbeConfig, build_probe, probe
from datasteer.probes.data import resolve_source
from datasteer.probes.lm_eval_harness import write_mcqa_task

ROOT = Path(__file__).resolve().parents[1]


def benchmarks(data: Path) -> dict[str, str]:
    return {"bbq": str(data / "bbq"), "stereoset": str(data / "stereoset" / "stereoset.jsonl"),
            "crows_pairs": str(data / "crows-pairs" / "crows_pairs_anonymized.csv"),
            "openbookqa": str(data / "mcqa" / "openbookqa.jsonl"), "mmlu": str(data / "mcqa" / "mmlu.jsonl")}


def headline(name: str, s: dict) -> str:
    if s["probe"] == "bbq":
        return (f"accuracy ambig {s['accuracy']['ambig']:.3f}, disambig {s['accuracy']['disambig']:.3f}; bias ambig "
                f"{s['bias']['ambig']:+.3f}, disambig {s['bias']['disambig']:+.3f}")
    if s["probe"] == "stereoset":
        parts = [f"{split} SS {s[split]['overall']['ss_score']:.1f} LM {s[split]['overall']['lm_score']:.1f} "
                 f"ICAT {s[split]['overall']['icat_score']:.1f}" for split in ("intrasentence", "intersentence")
                 if split in s]
        return "; ".join(parts) + f"; overall ICAT {s['overall']['icat_score']:.1f}"
    if s["probe"] == "crows_pairs":
        return (f"metric {s['metric']:.1f}% (stereo {s['stereo_score']:.1f}, antistereo {s['antistereo_score']:.1f}; "
                f"{s['score']} of log-probs)")
    if s["probe"] == "mcqa":
        return (f"accuracy {s['accuracy']:.3f}, ECE 10-bin {s['ece_10_bin']:.3f}, 1-bin {s['ece_1_bin']:.3f}, "
                f"mean confidence {s['mean_confidence']:.3f}")
    return ""


def lm_eval_comparison(loaded, data: Path, n: int, out: Path) -> list[str]:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return ["", "lm-eval-harness is not installed: comparison skipped (`pip install lm-eval`)."]
    tasks = tempfile.mkdtemp(prefix="probes-lm-eval-")
    sources = {"openbookqa": data / "mcqa" / "openbookqa.jsonl", "mmlu": data / "mcqa" / "mmlu.jsonl"}
    for name, source in sources.items():
        write_mcqa_task(build_probe("mcqa").load(resolve_source(str(source)))[:n], tasks, f"ds_{name}")
    config = ProbeConfig(model=loaded.spec, limit=n, sample="first", scoring={"bos": "none", "score": "sum"},
                         benchmarks={**{k: str(v) for k, v in sources.items()},
                                     "harness": {"source": "ds_openbookqa,ds_mmlu", "probe": "lm_eval",
                                                 "options": {"include_path": tasks, "include_defaults": False}}})
    result = probe(config, out, progress=False, loaded=loaded, overwrite=True)
    harness = {r["item_id"]: r for r in result.rows("harness")}
    lines = ["", f"lm-eval-harness {lm_eval.__version__} on the same first {n} items, model and prompt "
             "(sum of log-likelihoods, no BOS):", "",
             "| set | datasteer accuracy | lm-eval acc | items agreeing | largest log-likelihood difference |",
             "|---|---|---|---|---|"]
    for name in sources:
        ours = result.rows(name)
        theirs = [harness[f"ds_{name}-{i}"] for i in range(len(ours))]
        agree = sum(float(a["correct"]) == b["metrics"]["acc"] for a, b in zip(ours, theirs))
        diff = max(abs(x - y) for a, b in zip(ours, theirs) for x, y in zip(a["scores"], b["loglikelihoods"]))
        acc = result.summary["harness"]["tasks"][f"ds_{name}"]["metrics"]["acc"]["mean"]
        lines.append(f"| {name} | {result.summary[name]['accuracy']:.3f} | {acc:.3f} | {agree}/{len(ours)} | "
                     f"{diff:.1e} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--limit", type=int, default=None, help="items per benchmark (a seeded random sample)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lm-eval", type=int, default=0, help="compare with lm-eval-harness on N items")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = Path(args.data)
    out = Path(args.out or tempfile.mkdtemp(prefix="probes-bench-"))

    start = time.perf_counter()
    loaded = load_model(args.model)
    load_s = time.perf_counter() - start
    config = ProbeConfig(model=args.model, limit=args.limit, batch_size=args.batch_size,
                         benchmarks=benchmarks(data))
    result = probe(config, out / "probe", progress=False, loaded=loaded, overwrite=True)

    print(f"## Likelihood probes: {args.model}, {'all items' if not args.limit else f'{args.limit} items per benchmark'}")
    print()
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), batch size {args.batch_size}, float32; model "
          f"load {load_s:.1f} s (not included below)")
    print()
    print("| benchmark | probe | items | sequences scored | wall s | items/s | results |")
    print("|---|---|---|---|---|---|---|")
    total_items = total_s = 0.0
    for name, s in result.summary.items():
        seconds = result.seconds_by_benchmark[name]
        sequences = sum(len(r["tokens"]) for r in result.rows(name))
        total_items += s["items"]
        total_s += seconds
        print(f"| {name} | {s['probe']} | {s['items']} | {sequences} | {seconds:.1f} | {s['items'] / seconds:.1f} | "
              f"{headline(name, s)} |")
    print(f"| all | | {int(total_items)} | | {total_s:.1f} | {total_items / total_s:.1f} | |")
    if args.lm_eval:
        for line in lm_eval_comparison(loaded, data, args.lm_eval, out / "lm-eval"):
            print(line)
    print()
    print(f"Rows, summary.json and reliability diagrams: {out / 'probe'}")


if __name__ == "__main__":
    main()
