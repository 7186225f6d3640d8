"""Throughput of the metrics, and datasteer's MTLD against lexicalrichness on the same texts in one run.

The texts are real prose (the Python language reference and standard-library docstrings, one to
eight paragraphs each; `datasteer.metrics.corpus.real_texts`). MTLD runs alternate (lexicalrichness,
datasteer, ...) so machine noise hits both alike; the table reports medians, and the script
checks that both sides give identical values on every text. The first datasteer call in a
fresh process (numba loading its compiled kernels from cache, or compiling them once) is
timed separately and excluded from throughput.

    python benchmarks/metrics.py [--texts 10000] [--repeats 3] [--judge-texts 16]
                                 [--detoxify CKPT --detoxify-config DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

from datasteer.metrics import build_scorers
from datasteer.metrics.corpus import real_texts
from datasteer.metrics.lexical import COMPILED, mtld_batch


def lexicalrichness_mtld(texts: list[str]) -> list[float]:
    from lexicalrichness import LexicalRichness

    out = []
    for text in texts:
        try:
            out.append(LexicalRichness(text).mtld(threshold=0.72))
        except ZeroDivisionError:
            out.append(0.0)
    return out


def timed(fn, *args):
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--judge-texts", type=int, default=16, help="texts for the judge (a real LLM call each)")
    parser.add_argument("--detoxify", help="a Detoxify checkpoint, to include that backend")
    parser.add_argument("--detoxify-config", help="its Hugging Face config directory (offline loading)")
    args = parser.parse_args()

    texts = real_texts(args.texts, seed=0)
    words = sum(len(t.split()) for t in texts)
    _, first_call = timed(mtld_batch, texts[:8])

    ref_times, our_times = [], []
    ref = ours = None
    for _ in range(args.repeats):
        ref, seconds = timed(lexicalrichness_mtld, texts)
        ref_times.append(seconds)
        ours, seconds = timed(mtld_batch, texts)
        our_times.append(seconds)
    identical = ours == ref
    max_diff = max(abs(a - b) for a, b in zip(ours, ref))
    ref_t, our_t = statistics.median(ref_times), statistics.median(our_times)

    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}",
        "texts": len(texts), "words": words, "numba": COMPILED, "first_call_s": first_call,
        "mtld": {"lexicalrichness_texts_per_s": len(texts) / ref_t, "datasteer_texts_per_s": len(texts) / our_t,
                 "speedup": ref_t / our_t, "identical": identical, "max_abs_diff": max_diff,
                 "repeats": {"lexicalrichness_s": ref_times, "datasteer_s": our_times}},
        "scorers": {},
    }

    specs = ["length_chars", "length_words", "length_tokens", "length_sentences", "mtld", "ttr", "mattr", "hdd",
             "flesch_reading_ease", "flesch_kincaid_grade", "gunning_fog", "rix", "toxicity"]
    if args.detoxify:
        specs.append(f"toxicity[backend=detoxify,checkpoint={args.detoxify}"
                     + (f",config_path={args.detoxify_config}" if args.detoxify_config else "") + "]")
    for spec in specs:
        (scorer,) = build_scorers([spec])
        scorer.score(texts[:8])  # load models / dictionaries outside the timing
        _, seconds = timed(lambda s=scorer: [v for lo in range(0, len(texts), s.batch_size)
                                             for v in s.score(texts[lo:lo + s.batch_size])])
        results["scorers"][scorer.name] = {"texts": len(texts), "texts_per_s": len(texts) / seconds}
    if args.judge_texts:
        (judge,) = build_scorers(["judge"])
        subset = texts[:args.judge_texts]
        prompts = ["Explain this passage." for _ in subset]
        judge.score(subset[:1], prompts[:1])  # load the model outside the timing
        values, seconds = timed(judge.score, subset, prompts)
        judge.close()
        results["scorers"]["judge"] = {"texts": len(subset), "texts_per_s": len(subset) / seconds,
                                       "unparseable": sum(v != v for v in values), "model": "embedded:smollm2"}

    print(json.dumps(results, indent=2))
    m = results["mtld"]
    print(f"\nMTLD on {len(texts)} real texts ({words} words): lexicalrichness {m['lexicalrichness_texts_per_s']:,.0f} "
          f"texts/s, datasteer {m['datasteer_texts_per_s']:,.0f} texts/s -> {m['speedup']:.1f}x; identical values: "
          f"{identical} (max |diff| {max_diff:.3g}); first call {first_call:.2f}s")
    print("\n| metric | texts | texts/s |\n|---|---|---|")
    for name, r in results["scorers"].items():
        print(f"| {name} | {r['texts']} | {r['texts_per_s']:,.1f} |")


if __name__ == "__main__":
    main()
