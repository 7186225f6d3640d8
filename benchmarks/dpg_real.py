"""DPG with a real generator on a CPU: the recipe's arms, then the target metric of the unsteered generator and of
each arm's final generator, each validated several times (fresh rollouts for the held-out prompts each time), so
that the difference is read against validation noise; sample answers before and after.

    python benchmarks/dpg_real.py OUT [--recipe demo-dpg-smollm2] [--draws 5] [--set key=value ...]

OUT holds the DPG run (resumable) and `noise.json` / `noise.md`: per generator the mean, standard deviation and
every draw of the validation readout, the per-phase median seconds of a policy step, and three answers per
generator to the same held-out prompts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from datasteer.dpg.config import DPGConfig  # noqa: E402
from datasteer.dpg.generator import use_chat  # noqa: E402
from datasteer.dpg.report import phase_medians  # noqa: E402
from datasteer.dpg.trainer import _prompts, dpg, load_target  # noqa: E402
from datasteer.dpg.validation import sample_rollouts, validate  # noqa: E402
from datasteer.models import load_model  # noqa: E402
from datasteer.recipes import recipe_config  # noqa: E402


def generators(config: DPGConfig, out: Path) -> dict[str, torch.nn.Module]:
    """The unsteered generator, and each arm's trained one (its LoRA adapter on the base, or its full weights)."""
    from peft import PeftModel

    loaded = {}
    base = load_model(config.generator.model, dtype=config.generator.dtype, device="cpu")
    loaded["unsteered"] = (base.model, base.tokenizer)
    for arm in config.arms:
        folder = out / arm / "model"
        if (folder / "adapter_config.json").is_file():
            fresh = load_model(config.generator.model, dtype=config.generator.dtype, device="cpu").model
            model = PeftModel.from_pretrained(fresh, str(folder)).eval()
        else:
            model = load_model(str(folder), dtype=config.generator.dtype, device="cpu").model
        loaded[arm] = (model, base.tokenizer)
    return loaded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--recipe", default="demo-dpg-smollm2")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    config = recipe_config(DPGConfig, args.recipe, args.sets)
    started = time.perf_counter()
    result = dpg(config, out / "run")
    run_seconds = time.perf_counter() - started
    _, held_out = _prompts(config)
    prompts = [p.prompt for p in held_out]
    inner = load_target(config)
    key = config.target.readout.key or "phi"
    table, samples = {}, {}
    for name, (model, tokenizer) in generators(config, out / "run").items():
        chat = use_chat(config.generator, tokenizer)
        draws = []
        for draw in range(args.draws):
            record, _ = validate(model, tokenizer, prompts, chat, config, inner, step=10_000 + draw)
            draws.append(record[key])
        table[name] = {"mean": statistics.fmean(draws), "std": statistics.stdev(draws) if len(draws) > 1 else 0.0,
                       "draws": draws}
        samples[name] = sample_rollouts(model, tokenizer, prompts[:3], 1, config.grpo, config.generator.system_prompt,
                                        chat, seed=7)
        print(f"{name}: {key} {table[name]['mean']:.4f} +- {table[name]['std']:.4f} over {args.draws} draws",
              flush=True)
    phases = {arm.arm: phase_medians(arm.rows) for arm in result.arms}
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "recipe": args.recipe, "sets": args.sets,
            "run_seconds": round(run_seconds, 1)}
    lines = [f"| generator | {key} (mean of {args.draws} validations) | std | draws |", "|---|---|---|---|"]
    for name, entry in table.items():
        lines.append(f"| {name} | {entry['mean']:.4f} | {entry['std']:.4f} | "
                     + ", ".join(f"{d:.4f}" for d in entry["draws"]) + " |")
    lines += ["", "| arm | " + " | ".join(next(iter(phases.values()))) + " |",
              "|---|" + "---|" * len(next(iter(phases.values())))]
    lines += [f"| {arm} | " + " | ".join(f"{v:.2f}" for v in values.values()) + " |" for arm, values in phases.items()]
    lines += [""]
    for name, texts in samples.items():
        lines += [f"**{name}**", ""] + [f"- {prompts[i]!r} -> {t[:300]!r}" for i, t in enumerate(texts)] + [""]
    (out / "noise.json").write_text(json.dumps({"meta": meta, "readout": key, "generators": table,
                                                "phases": phases, "samples": samples, "summary": result.summary},
                                               indent=1))
    (out / "noise.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
