"""Tokens/s of `datasteer generate` against a bare `model.generate` loop, side by side in one run.

Both sides use the same loaded model, prompts, batch size, sampling parameters and per-batch
seeds, so they produce the same tokens; the ratio isolates datasteer's overhead (chat template,
run directory, atomic shards, manifest, merge, progress bar). Runs alternate (bare, datasteer,
bare, ...) so that machine noise hits both sides alike; the table reports medians.

    python benchmarks/generation.py [--model embedded:smollm2] [--prompts 16] [--k 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from datasteer.chat import encode_prompts
from datasteer.generation.config import GenerateConfig
from datasteer.generation import generate
from datasteer.generation.runner import plan_units
from datasteer.generation.transformers_backend import TransformersTeacher, eos_token_ids
from datasteer.io import read_prompts
from datasteer.models import load_model
from datasteer.runs import derive_seed

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(loaded, config: GenerateConfig) -> tuple[int, float]:
    """What a user would write by hand: template, left-pad, generate, count tokens up to EOS."""
    teacher_config = config.teachers[0]
    model, tokenizer = loaded.model, loaded.tokenizer
    gen_config = TransformersTeacher(teacher_config, loaded=loaded).generation_config()
    eos = set(eos_token_ids(tokenizer, model))
    prompts = read_prompts(config.prompts)
    tokens = 0
    start = time.perf_counter()
    for unit in plan_units(config, prompts):
        enc = encode_prompts(tokenizer, [p.prompt for p in unit.prompts], teacher_config.system_prompt)
        ids = enc["input_ids"].repeat_interleave(teacher_config.k, 0)
        mask = enc["attention_mask"].repeat_interleave(teacher_config.k, 0)
        torch.manual_seed(derive_seed(config.seed, teacher_config.name, unit.name))
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
        for row in out[:, ids.shape[1]:].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            tokens += len(row) if stop is None else stop + 1
            tokenizer.decode(row[:stop], skip_special_tokens=True)
    return tokens, time.perf_counter() - start


def datasteer_run(loaded, config: GenerateConfig, out: Path) -> tuple[int, float]:
    teacher = TransformersTeacher(config.teachers[0], loaded=loaded)
    start = time.perf_counter()
    result = generate(config, out, teachers={config.teachers[0].name: teacher}, progress=True)
    return result.generated_tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = GenerateConfig.model_validate({
        "prompts": {"path": str(ROOT / "data/prompts/demo.jsonl"), "limit": args.prompts},
        "teachers": [{"name": "bench", "model": args.model, "k": args.k, "batch_size": args.batch_size,
                      "sampling": {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": args.max_new_tokens}}],
        "seed": 0,
    })
    loaded = load_model(args.model)
    bare_loop(loaded, config)  # warm-up (allocator, kernels), not timed
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            tokens_bare, t_bare = bare_loop(loaded, config)
            tokens_ours, t_ours = datasteer_run(loaded, config, Path(tmp) / f"run{i}")
            assert tokens_bare == tokens_ours, (tokens_bare, tokens_ours)  # same seeds, same tokens
            bare.append(tokens_bare / t_bare)
            ours.append(tokens_ours / t_ours)
            print(f"repeat {i}: bare {bare[-1]:.1f} tok/s, datasteer {ours[-1]:.1f} tok/s "
                  f"({tokens_ours} tokens)", flush=True)
    med_bare, med_ours = statistics.median(bare), statistics.median(ours)
    overhead = 1 - med_ours / med_bare
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {torch.get_num_threads()} "
        f"threads, {'cuda' if torch.cuda.is_available() else 'cpu'}", "model": args.model, "prompts": args.prompts,
        "k": args.k, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "bare_tok_s": round(med_bare, 1), "datasteer_tok_s": round(med_ours, 1),
        "ratio": round(med_ours / med_bare, 3), "overhead_pct": round(100 * overhead, 1),
    }
    print(json.dumps(result))
    print("| date | machine | model | prompts x k | batch | max new | bare tok/s | datasteer tok/s | ratio |")
    print(f"| {result['date']} | {result['machine']} | {args.model} | {args.prompts} x {args.k} | "
          f"{args.batch_size} | {args.max_new_tokens} | {result['bare_tok_s']} | {result['datasteer_tok_s']} | "
          f"{result['ratio']} |")


if __name__ == "__main__":
    main()
