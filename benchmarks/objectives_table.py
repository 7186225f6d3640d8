"""The active-inheritance objectives table of docs/benchmarks.md, from the runs of `inheritance_study.sh OUT length
toxicity mtld`: per objective, the targeted metric of the base, the random-selection student and the active student
on held-out prompts, active against random and against the base (paired 95% intervals), the selection
differential in the training data, and the wall time from `OUT/seconds.txt`.

    python benchmarks/objectives_table.py OUT
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RUNS = {"length": ("objective-length", "length_words"), "MTLD": ("objective-mtld", "mtld"),
        "toxicity": ("objective-toxicity", "toxicity_profanity")}


def interval(entry: dict) -> str:
    low, high = entry["ci95"]
    verdict = "" if entry["significant"] else ", noise"
    return f"{entry['mean']:+.3g} [{low:+.3g}, {high:+.3g}]{verdict}"


def training_data(report: str, metric: str) -> str:
    """'all -> active (random)' from the report's training-data table."""
    match = re.search(rf"^\| {metric} \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", report, re.M)
    if not match:
        return ""
    mean = [cell.split("±")[0].strip() for cell in match.groups()]
    return f"{mean[0]} -> {mean[1]} (random {mean[2]})"


def main() -> int:
    out = Path(sys.argv[1])
    seconds = {}
    if (out / "seconds.txt").is_file():
        for line in (out / "seconds.txt").read_text().splitlines():
            name, _, value = line.partition(":")
            seconds[name.strip()] = int(value.split()[0])
    lines = ["| objective | metric (held-out) | base | random | active | active - random | active - base | "
             "training data: all -> active (random) | wall |", "|" + "---|" * 9]
    for name, (folder, metric) in RUNS.items():
        path = out / folder / "results.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())["comparison"]["metrics"][metric]
        means = data["means"]
        wall = seconds.get(name.lower())
        lines.append(" | ".join([
            f"| {name}", f"`{metric}`", *(f"{m:.4g}" for m in means), interval(data["active_vs_random"]),
            interval(data["paired"][2]), training_data((out / folder / "report.md").read_text(), metric),
            f"{wall // 60} min {wall % 60} s" if wall else "",
        ]) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
