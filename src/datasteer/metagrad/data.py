"""Examples, the data order, micro-batches and the per-example loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from torch.func import functional_call

from datasteer.errors import InputError
from datasteer.metagrad.chunked import LinearHead, token_nll
from datasteer.metagrad.config import TrainingConfig

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass
class MicroBatch:
    index: Tensor          # [m] positions of the examples in the caller's list
    input_ids: Tensor      # [m, L], right-padded
    attention_mask: Tensor  # [m, L]
    labels: Tensor         # [m, L], IGNORE on padding and untrained tokens
    # [m] what each example's w_i * loss_i is divided by in its step's loss (`step_denominators`); None outside a
    # training step (a metric's batch)
    denominators: Tensor | None = None


def prepare_examples(examples: Sequence[Mapping[str, Any]], max_length: int) -> list[Example]:
    """Validate and truncate: input_ids required, labels optional (default: input_ids), -100 = not trained."""
    if len(examples) == 0:
        raise InputError("no examples to train on")
    prepared = []
    for i, row in enumerate(examples):
        if "input_ids" not in row:
            raise InputError(f"example {i} has no 'input_ids'")
        ids = [int(t) for t in _as_list(row["input_ids"])]
        labels = [int(t) for t in _as_list(row["labels"])] if row.get("labels") is not None else list(ids)
        if len(labels) != len(ids):
            raise InputError(f"example {i}: labels has {len(labels)} entries, input_ids {len(ids)}")
        ids, labels = ids[:max_length], labels[:max_length]
        if not any(label != IGNORE for label in labels[1:]):
            raise InputError(f"example {i} has no trained token after the first position (within max_length "
                             f"{max_length}); a loss needs at least one label that is not -100")
        prepared.append(Example(tuple(ids), tuple(labels)))
    return prepared


def _as_list(value: Any) -> list:
    if isinstance(value, Tensor):
        return value.reshape(-1).tolist()
    return list(value)


def step_batches(n_examples: int, config: TrainingConfig) -> list[list[int]]:
    """Example indices of every optimizer step: epochs x batches, shuffled per epoch with a seeded generator."""
    generator = torch.Generator().manual_seed(config.seed)
    steps = []
    for _ in range(config.epochs):
        order = torch.randperm(n_examples, generator=generator).tolist() if config.shuffle else list(range(n_examples))
        steps.extend(order[i:i + config.batch_size] for i in range(0, n_examples, config.batch_size))
    return steps


def step_denominators(step_size: int, config: TrainingConfig) -> list[int]:
    """What w_i * loss_i of each position of a step's batch is divided by in the step's loss.

    accumulation 'mean': |B_t| for every example (the batch mean, however it is micro-batched); 'sum': the size
    of the example's micro-batch, so that the step's loss is the sum of its micro-batches' means (the DPG authors'
    gradient accumulation). Micro-batches are cut from the whole step, as one process cuts them, so the loss does
    not depend on how many processes share the step.
    """
    if config.accumulation == "mean":
        return [step_size] * step_size
    size, out = config.resolved_micro_batch_size, []
    for start in range(0, step_size, size):
        part = min(size, step_size - start)
        out.extend([part] * part)
    return out


def collate(examples: list[Example], index: list[int], pad_id: int, device: torch.device) -> MicroBatch:
    rows = [examples[i] for i in index]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for j, r in enumerate(rows):
        n = len(r.input_ids)
        ids[j, :n] = torch.tensor(r.input_ids)
        mask[j, :n] = 1
        labels[j, :n] = torch.tensor(r.labels)
    return MicroBatch(torch.tensor(index), ids.to(device), mask.to(device), labels.to(device))


def micro_batches(examples: list[Example], step_index: list[int], config: TrainingConfig, pad_id: int,
                  device: torch.device, denominators: list[int]) -> list[MicroBatch]:
    """`step_index`: the examples (this process's share of a step), `denominators`: theirs (`step_denominators`)."""
    size = config.resolved_micro_batch_size
    batches = []
    for i in range(0, len(step_index), size):
        batch = collate(examples, step_index[i:i + size], pad_id, device)
        batch.denominators = torch.tensor(denominators[i:i + size], device=device)
        batches.append(batch)
    return batches


def _targets(batch: MicroBatch) -> Tensor:
    """Position j predicts token j + 1: the labels shifted left, IGNORE at the last position."""
    return torch.cat([batch.labels[:, 1:], torch.full_like(batch.labels[:, :1], IGNORE)], dim=1)


def example_losses(model: torch.nn.Module, tensors: dict[str, Tensor], batch: MicroBatch,
                   length: int | None = None, chunk: int | None = None, head: LinearHead | None = None) -> Tensor:
    """[m] each example's summed next-token cross-entropy over its trained tokens divided by their number (the
    mean), or by `length` when given (the DPG authors' normalisation by the full sequence length), in the
    parameters' dtype.

    Computed here rather than by the model's `labels=` path, which upcasts to float32. With `chunk` (and `head`,
    `chunked.linear_head(model)`) the logits are never whole: the cross-entropy of the trained tokens is computed
    from the backbone's last hidden states, `chunk` tokens of logits at a time in every pass (`chunked.token_nll`).
    """
    if chunk is not None:
        return _chunked_example_losses(head, tensors, batch, length, chunk)
    out = functional_call(model, tensors, args=(),
                          kwargs={"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                                  "use_cache": False})
    logits = out.logits
    # shift the labels, not the logits (slicing logits costs a full copy and a zero-filled gradient in each
    # backward pass)
    targets = _targets(batch)
    trained = targets != IGNORE
    # cross-entropy as logsumexp - logit of the target: its second derivative is cheaper in autograd than that
    # of log_softmax's backward
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_nll = (torch.logsumexp(logits, dim=-1) - picked) * trained
    return token_nll.sum(dim=1) / (trained.sum(dim=1) if length is None else length)


def _chunked_example_losses(head: LinearHead | None, tensors: dict[str, Tensor], batch: MicroBatch,
                            length: int | None, chunk: int) -> Tensor:
    if head is None:
        raise ValueError("example_losses: `chunk` needs `head` (chunked.linear_head(model))")
    hidden = head.hidden_states(tensors, batch.input_ids, batch.attention_mask)
    targets = _targets(batch)
    trained = targets != IGNORE
    # only the trained positions reach the head: padding and prompts cost no logits
    rows = trained.nonzero(as_tuple=True)[0]
    weight, bias = head.weight_and_bias(tensors)
    nll = token_nll(hidden[trained], weight, bias, targets[trained], chunk)
    summed = torch.zeros(batch.input_ids.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return summed / (trained.sum(dim=1) if length is None else length)
