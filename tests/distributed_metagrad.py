"""Run by tests/test_scaling_metagrad.py under torchrun (gloo; NCCL with `nccl` as second argument, one GPU per
rank): every case of `CASES` on every rank, each rank's results saved to OUT/rank-R.pt (on the CPU). Also
importable: the tests run the same cases in one process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from datasteer.metagrad import TrainingConfig, metagradients, train
from tests.test_metagrad import HELD, VOCAB, make_examples, tiny_gpt2, tiny_llama


def heldout_metric(model, params):
    """Minus the loss on held-out token sequences (on the parameters' device)."""
    held = HELD.to(next(iter(params.values())).device)
    logits = functional_call(model, params, (held,)).logits[:, :-1]
    return -F.cross_entropy(logits.reshape(-1, VOCAB), held[:, 1:].reshape(-1))


def head_metric(model, params):
    """A metric on the weights alone: a slice of the LM head pushed toward a pattern."""
    name = "transformer.wte.weight" if "transformer.wte.weight" in params else "lm_head.weight"
    block = params[name][:4, :5]
    pattern = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]] * 4, dtype=block.dtype, device=block.device)
    return -F.softplus(-5.0 * pattern * block).mean()


# (name, model builder, metric, config): SGD with momentum and AdamW, micro-batched, uneven last steps (7
# examples), one case whose steps are a single micro-batch per rank (the kept-graph path) under replay
CASES = [
    ("sgd-momentum-micro", tiny_gpt2, heldout_metric,
     dict(optimizer="sgd", momentum=0.9, learning_rate=0.05, batch_size=4, micro_batch_size=1, epochs=2)),
    ("adamw-micro", tiny_llama, heldout_metric,
     dict(optimizer="adamw", learning_rate=1e-2, batch_size=4, micro_batch_size=2, epochs=2, weight_decay=0.01)),
    ("adamw-head-replay", tiny_gpt2, head_metric,
     dict(optimizer="adamw", learning_rate=1e-2, batch_size=3, epochs=2, checkpoint="replay", replay_k=2)),
    # the DPG authors' settings: summed micro-batch means, loss over max_length, eps_root inside Adam's square root
    ("authors-summed-maxlen-epsroot", tiny_gpt2, heldout_metric,
     dict(optimizer="adamw", learning_rate=1e-2, batch_size=5, micro_batch_size=2, epochs=2, eps_root=1e-9,
          accumulation="sum", loss_normalization="max_length", max_length=12)),
    ("sgd-summed-uneven", tiny_gpt2, head_metric,
     dict(optimizer="sgd", momentum=0.9, learning_rate=0.05, batch_size=5, micro_batch_size=2, epochs=2,
          accumulation="sum")),
]


def _cpu(tensors: dict) -> dict:
    return {k: v.detach().cpu() for k, v in tensors.items()}


def run_cases(device: str = "cpu") -> dict[str, dict]:
    examples = make_examples(7)
    weights = torch.linspace(0.5, 1.5, len(examples), dtype=torch.float64)
    out = {}
    for name, build, metric, settings in CASES:
        config = TrainingConfig(dtype="float64", **settings)
        model = build().to(device)
        result = metagradients(model, examples, metric, config, weights=weights)
        trained = train(model, examples, config, weights=weights)
        out[name] = {"value": result.value, "scores": result.scores, "losses": result.losses,
                     "params": _cpu(result.params), "trained": _cpu(trained), "world": result.stats["world_size"]}
    return out


if __name__ == "__main__":
    import torch.distributed as dist

    backend = sys.argv[2] if len(sys.argv) > 2 else "gloo"
    device = "cpu"
    if backend == "nccl":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    torch.set_num_threads(1)
    results = run_cases(device)
    torch.save(results, Path(sys.argv[1]) / f"rank-{dist.get_rank()}.pt")
    dist.destroy_process_group()
