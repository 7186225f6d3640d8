"""Run by tests/test_scaling_metagrad.py under torchrun (gloo): every case of `CASES` on every rank, each rank's
results saved to OUT/rank-R.pt. Also importable: the test runs the same cases in one process."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from datasteer.metagrad import TrainingConfig, metagradients, train
from tests.test_metagrad import head_metric, heldout_metric, make_examples, tiny_gpt2, tiny_llama

# (name, model builder, metric, config): SGD with momentum and AdamW, micro-batched, uneven last steps (7
# examples), one case whose steps are a single micro-batch per rank (the kept-graph path) under replay
CASES = [
    ("sgd-momentum-micro", tiny_gpt2, heldout_metric,
     dict(optimizer="sgd", momentum=0.9, learning_rate=0.05, batch_size=4, micro_batch_size=1, epochs=2)),
    ("adamw-micro", tiny_llama, heldout_metric,
     dict(optimizer="adamw", learning_rate=1e-2, batch_size=4, micro_batch_size=2, epochs=2, weight_decay=0.01)),
    ("adamw-head-replay", tiny_gpt2, head_metric,
     dict(optimizer="adamw", learning_rate=1e-2, batch_size=3, epochs=2, checkpoint="replay", replay_k=2)),
]


def run_cases() -> dict[str, dict]:
    examples = make_examples(7)
    weights = torch.linspace(0.5, 1.5, len(examples), dtype=torch.float64)
    out = {}
    for name, build, metric, settings in CASES:
        config = TrainingConfig(dtype="float64", **settings)
        model = build()
        result = metagradients(model, examples, metric, config, weights=weights)
        trained = train(model, examples, config, weights=weights)
        out[name] = {"value": result.value, "scores": result.scores, "losses": result.losses,
                     "params": result.params, "trained": trained, "world": result.stats["world_size"]}
    return out


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = run_cases()
    torch.save(results, Path(sys.argv[1]) / f"rank-{dist.get_rank()}.pt")
    dist.destroy_process_group()
