"""What a pattern recipe can reach at all: a direct search over datasets, no generator involved.

DPG's validation trains a fresh target on n rollouts of L tokens from the generator's alphabet and reads the pixel
accuracy of the LM-head slice's change. The oracle asks what the best such dataset achieves: it searches the
datasets themselves (n strings of L characters from the same alphabet) by coordinate ascent, and scores its answer
with the very fine-tuning and readout validation uses (`metagrad.train`, the target's `readout`).

The search is exact for the inner loop it accepts, one plain SGD step on the whole dataset from the target's
initial weights: the slice then moves by -lr/n times the sum of the examples' own gradients at the initial
weights, so a dataset's change is a sum over its strings, and replacing one character of one string changes one
term. Each move scores every single-character edit of one string (per-example gradients through `torch.func`)
and keeps the best, on the objective sum_j min(m_j / s, 1) over pixels j: m_j is the pixel's signed margin
(positive: the change has the pattern's sign), s a fixed scale (a quarter of the median |change| of the random
start), so wrong pixels pull hardest and a pixel past the margin stops counting. Sweeps over all strings repeat
until one changes nothing or `sweeps` are done.

Other inner loops (several steps, momentum across steps, Adam, weight decay, schedules) are refused: the sum
decomposition would not hold, and a search scored by anything but the real fine-tuning would not be an oracle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from datasteer.dpg.config import DPGConfig
from datasteer.dpg.rewards import InnerLoop, target_examples
from datasteer.dpg.targets import LMHeadPattern
from datasteer.errors import ConfigError, InputError
from datasteer.metagrad import train


@dataclass
class OracleResult:
    strings: list[str]              # the dataset found
    pixel_accuracy: float           # scored by the real fine-tuning and readout
    phi: float
    start_accuracy: float           # of the random dataset the search started from
    delta: list[list[float]]        # the slice's change after the real fine-tuning on `strings`
    sweeps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)   # per sweep: accuracy (predicted), objective


def check_oracle_config(config: DPGConfig) -> tuple[list[str], int, int]:
    """(alphabet, strings per dataset, characters per string) for a recipe the oracle is exact for."""
    training = config.training
    if config.target.kind != "lm_head_pattern":
        raise ConfigError(f"the oracle searches LM-head pattern targets, not '{config.target.kind}'")
    if not isinstance(config.generator.allowed_tokens, list):
        raise ConfigError("the oracle needs the generator's alphabet as a list (generator.allowed_tokens)")
    n = (config.validation.limit or config.grpo.prompts_per_step) * (config.validation.num_generations
                                                                     or config.grpo.num_generations)
    plain = (training.optimizer == "sgd" and training.epochs == 1 and training.batch_size >= n
             and not (training.weight_decay or 0) and training.warmup_steps == 0 and training.accumulation == "mean")
    if not plain:
        raise ConfigError("the oracle is exact for one plain SGD step on the whole dataset (optimizer sgd, one "
                          "epoch, batch_size >= the validation's rollouts, no weight decay or warm-up, accumulation "
                          "mean); this recipe's training differs")
    if config.generator.allow_eos:
        raise ConfigError("the oracle searches strings of exactly max_completion_length characters: set "
                          "generator.allow_eos false, as a run that may stop early explores other datasets")
    return list(config.generator.allowed_tokens), n, config.grpo.max_completion_length


class SliceGradients:
    """Per-example gradients of the LM-head slice at the target's initial weights, for strings of token ids."""

    def __init__(self, inner: InnerLoop, chunk: int = 64):
        from torch.func import functional_call, grad, vmap

        model, target = inner.model, inner.target
        assert isinstance(target, LMHeadPattern)
        self.target, self.chunk = target, chunk
        base = {name: p.detach() for name, p in model.named_parameters()}
        length = inner.training.max_length if inner.training.loss_normalization == "max_length" else None

        def loss(weight: Tensor, ids: Tensor) -> Tensor:
            params = {**base, target.param: weight}
            ids = ids.unsqueeze(0)
            logits = functional_call(model, params, (ids,), {"attention_mask": torch.ones_like(ids),
                                                             "use_cache": False}).logits[0, :-1]
            nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, ids[0, 1:, None]).squeeze(-1)
            return nll.sum() / (length or nll.shape[0])

        self._grads = vmap(grad(loss), in_dims=(None, 0))
        self._weight = base[target.param]
        self._rows = torch.as_tensor(target.token_ids, device=self._weight.device)
        self._cols = torch.as_tensor(target.dims, device=self._weight.device)
        self._model = model

    def __call__(self, ids: Tensor) -> Tensor:
        """[m, rows, cols] float64: d loss_i / d slice for each row of `ids` ([m, L])."""
        out = []
        was_training = self._model.training
        self._model.eval()
        try:
            for start in range(0, ids.shape[0], self.chunk):
                full = self._grads(self._weight, ids[start:start + self.chunk])
                out.append(full.index_select(1, self._rows).index_select(2, self._cols).double())
        finally:
            self._model.train(was_training)
        return torch.cat(out)


def alphabet_ids(alphabet: list[str], tokenizer: Any) -> list[int]:
    ids = []
    for piece in alphabet:
        found = tokenizer(piece, add_special_tokens=False)["input_ids"]
        if len(found) != 1:
            raise InputError(f"alphabet piece {piece!r} is {len(found)} tokens for the target's tokenizer, not one; "
                             "the oracle edits strings one token at a time")
        ids.append(found[0])
    return ids


def search(config: DPGConfig, inner: InnerLoop, *, sweeps: int = 8, seed: int = 0,
           say: Callable[[str], None] | None = None) -> OracleResult:
    """The best dataset the coordinate search finds for `config`'s pattern (see the module's docstring)."""
    alphabet, n, length = check_oracle_config(config)
    target = inner.target
    if not isinstance(target, LMHeadPattern):
        raise ConfigError("the oracle searches LM-head pattern targets")
    started = time.perf_counter()
    letters = torch.as_tensor(alphabet_ids(alphabet, inner.tokenizer))
    signs = target.pattern.double()
    gradients = SliceGradients(inner)
    generator = torch.Generator().manual_seed(seed)
    ids = letters[torch.randint(len(letters), (n, length), generator=generator)]
    per_string = gradients(ids)                                   # [n, rows, cols]
    total = per_string.sum(0)
    # the slice moves by -lr/n * total: a pixel is right when -total has the pattern's sign
    scale = 0.25 * total.abs().median().clamp_min(1e-30)

    def objective(totals: Tensor) -> Tensor:              # [..., rows, cols] -> [...]
        margin = -signs * totals / scale
        return margin.clamp(max=1.0).flatten(-2).sum(-1)

    def accuracy(totals: Tensor) -> float:
        return float(((-signs * totals) > 0).double().mean())

    start_accuracy = accuracy(total)
    history = [{"sweep": 0, "accuracy": start_accuracy, "objective": float(objective(total))}]
    # every single-character edit of one string: position p gets letter c
    positions = torch.arange(length).repeat_interleave(len(letters))
    choices = letters.repeat(length)
    done = 0
    for sweep in range(1, sweeps + 1):
        changed = 0
        for i in torch.randperm(n, generator=generator).tolist():
            candidates = ids[i].repeat(len(positions), 1)
            candidates[torch.arange(len(positions)), positions] = choices
            keep = (candidates != ids[i]).any(1)
            candidates = candidates[keep]
            options = gradients(candidates)
            scores = objective(total - per_string[i] + options)
            best = int(scores.argmax())
            if scores[best] > objective(total) + 1e-12:
                total = total - per_string[i] + options[best]
                per_string[i], ids[i] = options[best], candidates[best]
                changed += 1
        done = sweep
        history.append({"sweep": sweep, "accuracy": accuracy(total), "objective": float(objective(total)),
                        "changed": changed})
        if say:
            say(f"oracle sweep {sweep}: predicted pixel accuracy {accuracy(total):.3f}, {changed} strings changed")
        if not changed or accuracy(total) == 1.0 and float(objective(total)) >= signs.numel() - 1e-9:
            break
    strings = [inner.tokenizer.decode(row.tolist()) for row in ids]
    examples, _ = target_examples(strings, inner.tokenizer, inner.training.max_length)
    params = train(inner.model, examples, inner.training)
    readout = target.readout(inner.model, params)
    delta = target.delta(params).detach().cpu().tolist()
    return OracleResult(strings, readout["pixel_accuracy"], readout["phi"], start_accuracy, delta, done,
                        time.perf_counter() - started, history)
