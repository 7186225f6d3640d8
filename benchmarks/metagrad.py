"""Metagradient cost, side by side in one run: time against plain training, and memory per checkpoint strategy.

Target: a GPT-2-shaped model (GPT-2's architecture and its 50,257-token vocabulary; width and depth
scaled down on CPU, GPT-2 small itself with --preset gpt2-small on a GPU). Examples are random token
sequences; the metric is minus the loss on held-out sequences; the inner loop is the DPG default
(AdamW, one epoch, every example in exactly one step).

1. Time: `metagradients` (checkpoint 'all') against `train` for the same T steps, run alternately
   for --rounds rounds; the median of each and their ratio are reported (target: at most 3x).
2. Memory: every (strategy, T) pair runs in a fresh subprocess; reported are the stored-state bytes
   the engine counts and the growth of the process's peak memory (peak RSS, VmHWM, on CPU, with glibc's mmap
   threshold fixed at 1 MiB so that freed tensors leave RSS; torch.cuda.max_memory_allocated on a GPU) over its
   level before the call.

Both are repeated for every --loss-chunks value: `none` is the whole-logits cross-entropy, a number N is
`training.loss_chunk: N` (the cross-entropy and its double backward N tokens at a time); ratios are to `train`
with whole logits. --shape picks the model (--preset is its old name); --n-embd, --n-layer, --n-head, --length,
--batch and --micro-batch override the shape's values, for a reduced GPT-2-small on a small machine.

    python benchmarks/metagrad.py [--steps 8 32 96] [--rounds 3] [--device cpu|cuda] [--shape cpu|gpt2-small]
        [--loss-chunks none 1024] [--micro-batch 4] [--n-layer 2 --n-embd 128 --length 32]
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
import time

import torch

PRESETS = {
    "cpu": dict(n_embd=64, n_layer=2, n_head=2, batch=4, length=64, micro_batch=None),
    # GPT-2 small (124M, 50,257 vocabulary), the paper's 128 tokens, batches of 8 in micro-batches of 4
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12, batch=8, length=128, micro_batch=4),
}
# glibc's malloc raises its mmap threshold as large blocks are freed and then keeps freed memory in the heap, so
# peak RSS would count what the allocator retains, not what is alive; a fixed threshold returns every block of
# 1 MiB or more to the system when torch frees it
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
OVERRIDES = ("n_embd", "n_layer", "n_head", "length", "batch", "micro_batch")


def shape(args: argparse.Namespace) -> dict:
    p = dict(PRESETS[args.shape])
    p.update({key: getattr(args, key) for key in OVERRIDES if getattr(args, key) is not None})
    return p


def build(p: dict, device: str, steps: int, seed: int = 0, chunk: int | None = None):
    """Model, examples, metric and the shape; with `chunk` the metric's held-out cross-entropy is chunked as the
    engine's loss (`metagrad.chunked`), so that the metric's own logits do not become the floor."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=p["n_embd"], n_layer=p["n_layer"], n_head=p["n_head"], attn_implementation="eager")
    model = GPT2LMHeadModel(config).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    examples = [{"input_ids": torch.randint(0, config.vocab_size, (p["length"],), generator=g).tolist()}
                for _ in range(steps * p["batch"])]
    held = torch.randint(0, config.vocab_size, (4, p["length"]), generator=g).to(device)

    def metric(m, params):
        from torch.func import functional_call

        logits = functional_call(m, params, (held,)).logits[:, :-1]
        return -torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), held[:, 1:].reshape(-1))

    def chunked_metric(m, params):
        from datasteer.metagrad.chunked import linear_head, token_nll

        head = linear_head(m)
        hidden = head.hidden_states(params, held, None)[:, :-1]
        weight, bias = head.weight_and_bias(params)
        return -token_nll(hidden.reshape(-1, hidden.shape[-1]), weight, bias, held[:, 1:].reshape(-1), chunk).mean()

    return model, examples, (metric if chunk is None else chunked_metric), p


def sft_config(p: dict, device: str, **extra):
    from datasteer.metagrad import TrainingConfig

    return TrainingConfig(batch_size=p["batch"], micro_batch_size=p["micro_batch"], learning_rate=1e-4,
                          max_length=p["length"], device=device, **extra)


def chunk_value(text: str) -> int | None:
    return None if text == "none" else int(text)


def chunk_label(chunk: int | None) -> str:
    return "whole logits" if chunk is None else f"loss_chunk {chunk}"


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_bytes(device: str) -> int:
    """Peak since `current_bytes`. On CPU this is the process's VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss across fork and exec, so a child started by a parent that already holds gigabytes would report the
    parent's peak as its own (the first versions of this benchmark did: every row showed the parent's ~1.7 GB)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return _status_bytes("VmHWM")


def current_bytes(device: str) -> int:
    """Memory in use now; also resets the peak that `peak_bytes` reads."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS
        f.write("5")
    return _status_bytes("VmRSS")


def memory_child(args: argparse.Namespace) -> None:
    """One (strategy, T) measurement in this fresh process; prints one JSON line."""
    from datasteer.metagrad import metagradients

    model, examples, metric, p = build(shape(args), args.device, args.child_steps,
                                       chunk=chunk_value(args.child_chunk))
    extra = {"checkpoint": args.child_strategy, "loss_chunk": chunk_value(args.child_chunk)}
    if args.child_strategy == "replay":
        extra["replay_k"] = args.replay_k
    config = sft_config(p, args.device, **extra)
    before = current_bytes(args.device)
    result = metagradients(model, examples, metric, config)
    print(json.dumps({"strategy": args.child_strategy, "steps": args.child_steps, "loss_chunk": args.child_chunk,
                      "peak_growth": peak_bytes(args.device) - before, "stored_states": result.stats["peak_states"],
                      "state_bytes": result.stats["state_bytes"], "forward_steps": result.stats["forward_steps"],
                      "seconds": result.stats["seconds"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 32, 96])
    parser.add_argument("--time-steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replay-k", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", "--preset", dest="shape", choices=list(PRESETS), default="cpu")
    for key in OVERRIDES:
        parser.add_argument("--" + key.replace("_", "-"), dest=key, type=int, default=None,
                            help="override the shape's value")
    parser.add_argument("--loss-chunks", nargs="+", default=["none"],
                        help="'none' (whole logits) and/or tokens per chunk of the cross-entropy")
    parser.add_argument("--strategies", nargs="+", default=["all", "replay", "disk"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child-strategy", help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-chunk", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_strategy:
        memory_child(args)
        return

    from datasteer.metagrad import metagradients, train

    p = shape(args)
    chunks = [chunk_value(c) for c in args.loss_chunks]
    print(f"# metagrad benchmark, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}, shape {args.shape} {p}")
    built = {c: build(p, args.device, args.time_steps, chunk=c) for c in chunks}
    model, examples = built[chunks[0]][:2]
    metrics = {c: b[2] for c, b in built.items()}
    n_params = sum(t.numel() for t in model.parameters())
    print(f"target: GPT-2 architecture, {n_params / 1e6:.1f}M parameters, batch {p['batch']} x {p['length']} tokens "
          f"(micro-batches of {p['micro_batch'] or p['batch']}), AdamW float32, T = {args.time_steps} steps")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    runs = [("train", None)] + [("metagradients", c) for c in chunks] + [("train", c) for c in chunks if c]
    times: dict[tuple, list[float]] = {run: [] for run in runs}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, chunk in runs:
            config = sft_config(p, args.device, checkpoint="all", loss_chunk=chunk)
            sync()
            start = time.perf_counter()
            if name == "train":
                train(model, examples, config)
            else:
                metagradients(model, examples, metrics[chunk], config)
            sync()
            if round_:
                times[(name, chunk)].append(time.perf_counter() - start)
    t_train = statistics.median(times[("train", None)])
    print("\n| run | cross-entropy | median wall time (s) | per step (s) | ratio to train (whole logits) |\n"
          "|---|---|---|---|---|")
    for (name, chunk), values in times.items():
        value = statistics.median(values)
        label = "metagradients (all)" if name == "metagradients" else name
        print(f"| {label} | {chunk_label(chunk)} | {value:.2f} | {value / args.time_steps:.3f} | "
              f"{value / t_train:.2f}x |")

    print("\n| strategy | cross-entropy | T | stored states (peak) | stored-state MB | peak memory growth MB | "
          "forward steps | seconds |\n|---|---|---|---|---|---|---|---|")
    for steps in args.steps:
        for strategy in args.strategies:
            for chunk in args.loss_chunks:
                cmd = [sys.executable, __file__, "--child-strategy", strategy, "--child-steps", str(steps),
                       "--device", args.device, "--shape", args.shape, "--replay-k", str(args.replay_k),
                       "--threads", str(args.threads), "--child-chunk", chunk]
                for key in OVERRIDES:
                    if getattr(args, key) is not None:
                        cmd += ["--" + key.replace("_", "-"), str(getattr(args, key))]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                     env=CHILD_ENV).stdout.strip().splitlines()[-1]
                row = json.loads(out)
                label = f"replay (k={args.replay_k})" if strategy == "replay" else strategy
                print(f"| {label} | {chunk_label(chunk_value(chunk))} | {steps} | {row['stored_states']} | "
                      f"{row['stored_states'] * row['state_bytes'] / 1e6:.0f} | {row['peak_growth'] / 1e6:.0f} | "
                      f"{row['forward_steps']} | {row['seconds']:.1f} |", flush=True)

if __name__ == "__main__":
    main()
