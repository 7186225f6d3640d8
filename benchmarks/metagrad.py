"""Metagradient cost, side by side in one run: time against plain training, and memory per checkpoint strategy.

Target: a GPT-2-shaped model (GPT-2's architecture and its 50,257-token vocabulary; width and depth
scaled down on CPU, GPT-2 small itself with --preset gpt2-small on a GPU). Examples are random token
sequences; the metric is minus the loss on held-out sequences; the inner loop is the DPG default
(AdamW, one epoch, every example in exactly one step).

1. Time: `metagradients` (checkpoint 'all') against `train` for the same T steps, run alternately
   for --rounds rounds; the median of each and their ratio are reported (target: at most 3x).
2. Memory: every (strategy, T) pair runs in a fresh subprocess; reported are the stored-state bytes
   the engine counts and the growth of the process's peak memory (peak RSS on CPU,
   torch.cuda.max_memory_allocated on a GPU) over its level before the call.

    python benchmarks/metagrad.py [--steps 8 32 96] [--rounds 3] [--device cpu|cuda] [--preset cpu|gpt2-small]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

PRESETS = {
    "cpu": dict(n_embd=64, n_layer=2, n_head=2, batch=4, length=64),
    "gpt2-small": dict(n_embd=768, n_layer=12, n_head=12, batch=8, length=128),
}


def build(preset: str, device: str, steps: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    p = PRESETS[preset]
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

    return model, examples, metric, p


def sft_config(p: dict, device: str, **extra):
    from datasteer.metagrad import TrainingConfig

    return TrainingConfig(batch_size=p["batch"], learning_rate=1e-4, max_length=p["length"], device=device, **extra)


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def current_bytes(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def memory_child(args: argparse.Namespace) -> None:
    """One (strategy, T) measurement in this fresh process; prints one JSON line."""
    from datasteer.metagrad import metagradients

    model, examples, metric, p = build(args.preset, args.device, args.child_steps)
    extra = {"checkpoint": args.child_strategy}
    if args.child_strategy == "replay":
        extra["replay_k"] = args.replay_k
    config = sft_config(p, args.device, **extra)
    before = current_bytes(args.device)
    result = metagradients(model, examples, metric, config)
    print(json.dumps({"strategy": args.child_strategy, "steps": args.child_steps,
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
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child-strategy", help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_strategy:
        memory_child(args)
        return

    from datasteer.metagrad import metagradients, train

    print(f"# metagrad benchmark, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {args.device}, preset {args.preset}")
    model, examples, metric, p = build(args.preset, args.device, args.time_steps)
    n_params = sum(t.numel() for t in model.parameters())
    print(f"target: GPT-2 architecture, {n_params / 1e6:.1f}M parameters, batch {p['batch']} x {p['length']} tokens, "
          f"AdamW float32, T = {args.time_steps} steps")
    config = sft_config(p, args.device, checkpoint="all")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {"train": [], "metagradients": []}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name in times:
            sync()
            start = time.perf_counter()
            if name == "train":
                train(model, examples, config)
            else:
                metagradients(model, examples, metric, config)
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
    t_train, t_meta = statistics.median(times["train"]), statistics.median(times["metagradients"])
    print("\n| run | median wall time (s) | per step (s) | ratio to train |\n|---|---|---|---|")
    for name, value in (("train", t_train), ("metagradients (all)", t_meta)):
        print(f"| {name} | {value:.2f} | {value / args.time_steps:.3f} | {value / t_train:.2f}x |")

    print("\n| strategy | T | stored states (peak) | stored-state MB | peak memory growth MB | forward steps | "
          "seconds |\n|---|---|---|---|---|---|---|")
    for steps in args.steps:
        for strategy in ("all", "replay", "disk"):
            cmd = [sys.executable, __file__, "--child-strategy", strategy, "--child-steps", str(steps),
                   "--device", args.device, "--preset", args.preset, "--replay-k", str(args.replay_k),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            row = json.loads(out)
            label = f"replay (k={args.replay_k})" if strategy == "replay" else strategy
            print(f"| {label} | {steps} | {row['stored_states']} | "
                  f"{row['stored_states'] * row['state_bytes'] / 1e6:.0f} | {row['peak_growth'] / 1e6:.0f} | "
                  f"{row['forward_steps']} | {row['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
