"""Fine-tuning step cost on CPU: full vs LoRA vs last-N-layers, side by side in one process.

One optimizer step = forward + backward + AdamW on a batch of 8 sequences of 110 tokens (the demo's
shape) with the embedded SmolLM2-135M-Instruct in float32. Methods are timed round-robin (each round
runs one step of every method) so machine noise hits them alike; the median over rounds is reported,
with the ratio to full fine-tuning.

    python benchmarks/finetune.py [--rounds 4] [--layers 8]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    from datasteer.inheritance.finetune import _layer_stack, restrict_to_last_layers
    from datasteer.models import load_model

    base = load_model("embedded:smollm2").model
    base.train()
    torch.manual_seed(0)
    batch = torch.randint(100, 40000, (8, 110))
    _, stack = _layer_stack(base)
    last = list(range(len(stack) - args.layers, len(stack)))
    linear = sorted({n.split(".")[-1] for n, m in base.named_modules()
                     if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head"})

    def lora(layers):
        return get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=linear,
                                                              layers_to_transform=layers, task_type="CAUSAL_LM"))

    last_only = copy.deepcopy(base)
    restrict_to_last_layers(last_only, args.layers)
    methods = {"full": base, "lora (all layers)": lora(None), f"full, last {args.layers} layers": last_only,
               f"lora, last {args.layers} layers": lora(last)}
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                  for k, m in methods.items()}
    times: dict[str, list[float]] = {k: [] for k in methods}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, model in methods.items():
            start = time.perf_counter()
            model(input_ids=batch, labels=batch).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if round_:
                times[name].append(time.perf_counter() - start)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{datetime.date.today()}, torch {torch.__version__}")
    print("| method | s/step (median) | vs full |")
    print("|---|---|---|")
    full = statistics.median(times["full"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {med / full:.2f}x |")


if __name__ == "__main__":
    main()
