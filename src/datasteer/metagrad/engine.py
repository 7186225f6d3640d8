"""`train` and `metagradients`: fine-tuning unrolled functionally, and its exact reverse pass.

Notation: theta_t, s_t = parameters and optimizer slots before step t; B_t = the examples of step t;
L_t(theta, w) = sum_{i in B_t} w_i loss_i(theta) / |B_t|; g_t = grad L_t(theta_t); the optimizer step
(theta_{t+1}, s_{t+1}) = U(theta_t, s_t, g_t, lr_t). The value is V = metric(theta_T).

Reverse pass, from (theta_bar, s_bar) = (grad V(theta_T), 0), for t = T-1 .. 0:
1. (theta_bar_U, s_bar, g_bar) = VJP of U at (theta_t, s_t, g_t) against (theta_bar, s_bar);
2. per micro-batch, with u_i = w_i / |B_t| as leaves: G = grad_theta sum_i u_i loss_i (graph kept) and
   s = <G, g_bar>; one more backward of s gives, at once, d s / d u_i = <grad loss_i(theta_t), g_bar>
   for every example of the micro-batch and d s / d theta = H_t g_bar (the Hessian-vector product);
3. dV/dw_i += <grad loss_i, g_bar> / |B_t|; theta_bar = theta_bar_U + H_t g_bar.

With `accumulation: sum` (the DPG authors' gradient accumulation) example i's |B_t| becomes the size of its
micro-batch, d_i, throughout (L_t = sum_i w_i loss_i / d_i); with `loss_normalization: max_length`, loss_i is the
summed token cross-entropy divided by max_length instead of by its number of trained tokens.

With `loss_chunk` (tokens per chunk), loss_i comes from the backbone's last hidden states and the linear LM head
through `chunked.token_nll`, whose forward, backward and backward-of-backward recompute the logits one chunk at a
time: step 2 is unchanged (plain autograd), but no pass holds more than a chunk of [tokens, vocabulary] numbers.

Step 2 stands in for a forward-mode product: the per-example directional derivatives come out of the
same double backward that forms the Hessian-vector product.

Data parallel: when `torch.distributed` has a process group of several processes (torchrun, `accelerate
launch`; gloo on CPU, NCCL on GPUs) and every rank calls `train`/`metagradients` with the same arguments, each
rank takes a contiguous share of every step's examples (micro-batched as configured), and the sums that span
the batch are all-reduced: g_t and the batch loss after the forward pass of a step, H_t g_bar after its reverse
step, the scores at the end (each rank fills only its own examples' entries). Every rank then holds the value,
scores and trained parameters of a one-process run (equal up to the order of floating-point sums).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from datasteer import distributed
from datasteer.errors import ConfigError, InputError
from datasteer.metagrad import checkpoint as ckpt
from datasteer.metagrad.chunked import check_head, linear_head
from datasteer.metagrad.config import TrainingConfig
from datasteer.metagrad.data import (
    Example,
    MicroBatch,
    example_losses,
    micro_batches,
    prepare_examples,
    step_batches,
    step_denominators,
)
from datasteer.metagrad.optim import Slots, learning_rates, make_optimizer
from datasteer.training import EXPLODED_LOSS, check_loss, check_parameters

Metric = Callable[[torch.nn.Module, dict[str, Tensor]], Tensor]
Progress = Callable[[int, int], None]   # (steps done, steps in all: forward, replayed and reverse)

_DOUBLE_BACKWARD_OK = {None, "eager"}


@dataclass
class TrainState:
    params: list[Tensor]
    slots: Slots


@dataclass
class MetagradResult:
    """Outcome of `metagradients`."""

    value: float                      # metric of the trained target
    scores: Tensor                    # [n] d value / d weights_i, float64 on CPU
    params: dict[str, Tensor]         # trained parameters (every named parameter, detached)
    losses: list[float]               # weighted batch loss of every step, in order
    stats: dict[str, Any] = field(default_factory=dict)  # schedule, stored states, timings


def check_model(model: torch.nn.Module) -> None:
    """Refuse what cannot be differentiated twice before autograd fails somewhere deep."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in _DOUBLE_BACKWARD_OK:
        raise ConfigError(f"metagradients need second derivatives, which '{impl}' attention does not provide; load "
                          f"the model with attn_implementation='eager' (or model.set_attn_implementation('eager'))")
    if getattr(model, "is_activation_checkpointing", False):
        raise ConfigError("metagradients cannot run through gradient checkpointing; call "
                          "model.gradient_checkpointing_disable() first")


@contextmanager
def _tf32(on: bool) -> Iterator[None]:
    """CUDA float32 matmuls and cuDNN convolutions in TensorFloat-32 for the duration; the caller's settings come
    back afterwards."""
    if not on:
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision, conv.fp32_precision = "tf32", "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def check_precision(config: TrainingConfig, device: torch.device) -> None:
    if config.precision == "tf32" and device.type != "cuda":
        raise ConfigError(f"training.precision tf32 is a CUDA format and the target is on {device.type}; use fp32 "
                          f"(exact) or bf16 (autocast) there")


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off (metagradients must be deterministic); the caller's mode comes back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class Unroll:
    """One fine-tuning run of `model` on `examples`, as pure functions of the training state."""

    def __init__(self, model: torch.nn.Module, examples: Sequence[Mapping[str, Any]], config: TrainingConfig,
                 weights: Tensor | Sequence[float] | None):
        check_model(model)
        self.model, self.config = model, config
        self.dtype = getattr(torch, config.dtype)
        first = next(model.parameters())
        self.device = torch.device(config.device) if config.device else first.device
        check_precision(config, self.device)
        self.examples: list[Example] = prepare_examples(examples, config.max_length)
        n = len(self.examples)
        if weights is None:
            self.weights = torch.ones(n, dtype=self.dtype, device=self.device)
        else:
            self.weights = torch.as_tensor(weights, dtype=self.dtype).detach().to(self.device).reshape(-1)
            if self.weights.numel() != n:
                raise InputError(f"weights has {self.weights.numel()} entries for {n} examples")
            if not torch.isfinite(self.weights).all():
                raise InputError("weights contain NaN or infinity")

        named = dict(model.named_parameters())
        if config.trainable:
            import re

            patterns = [re.compile(p) for p in config.trainable]
            self.names = [name for name in named if any(p.search(name) for p in patterns)]
        else:
            self.names = [name for name, p in named.items() if p.requires_grad]
        if not self.names:
            raise ConfigError("no parameter to train: `trainable` matched nothing (or every parameter is frozen)")
        cast = {name: p.detach().to(self.device, self.dtype) for name, p in named.items()}
        self.initial = [cast[name].clone() for name in self.names]
        trained = set(self.names)
        self.frozen = {name: t for name, t in cast.items() if name not in trained}
        self.buffers = {name: (b.detach().to(self.device, self.dtype) if b.is_floating_point()
                               else b.detach().to(self.device)) for name, b in model.named_buffers()}
        self.optimizer = make_optimizer(config)
        self.steps = step_batches(n, config)
        self.lrs = learning_rates(config, len(self.steps))
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        pad = pad if isinstance(pad, int) else 0
        # data parallel: this rank's contiguous share of every step's examples (the whole step in one process)
        self.world, self.rank = (distributed.world_size(), distributed.rank()) if distributed.active() else (1, 0)
        self.batches: list[list[MicroBatch]] = []
        for idx in self.steps:
            share = distributed.shard(len(idx), self.world, self.rank)
            denominators = step_denominators(len(idx), config)
            self.batches.append(micro_batches(self.examples, [idx[i] for i in share], config, pad, self.device,
                                              [denominators[i] for i in share]))
        # None: each example's loss is its mean over trained tokens; else divided by max_length (the DPG authors')
        self.loss_length = config.max_length if config.loss_normalization == "max_length" else None
        # loss_chunk: the cross-entropy from the backbone's hidden states and the linear head, chunk by chunk
        self.head = linear_head(model) if config.loss_chunk is not None else None
        if self.head is not None:
            check_head(model, self.head, self.tensors(self.initial), torch.tensor(self.examples[0].input_ids[:8],
                                                                                  device=self.device))
        self.losses: dict[int, float] = {}
        self.label, self.hint = "the inner fine-tuning", "training.learning_rate"  # named in a divergence error
        weights = self.weights.detach().to("cpu", torch.float64).abs()
        # each step's sum of |w_i| / d_i: the batch's mean |weight| (times the micro-batches with accumulation 'sum')
        self.masses = [float(weights[idx].mean()) if config.accumulation == "mean" else
                       float((weights[idx] / torch.tensor(step_denominators(len(idx), config))).sum())
                       for idx in self.steps]
        self.progress: Progress | None = None
        self.work = (0, 0)  # (done, total) steps for `progress`

    def _tick(self) -> None:
        if self.progress is not None:
            self.work = (self.work[0] + 1, self.work[1])
            self.progress(*self.work)

    # -- the pieces ------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return len(self.steps)

    def tensors(self, params: Sequence[Tensor], with_buffers: bool = True) -> dict[str, Tensor]:
        out = dict(self.buffers) if with_buffers else {}
        out.update(self.frozen)
        out.update(zip(self.names, params))
        return out

    def initial_state(self) -> TrainState:
        return TrainState([p.clone() for p in self.initial], self.optimizer.init(self.initial))

    def state_bytes(self) -> int:
        per = sum(p.numel() * p.element_size() for p in self.initial)
        return per * (1 + len(self.optimizer.slot_names))

    def _scaled(self, batch: MicroBatch) -> Tensor:
        """u_i = w_i / d_i: example i's factor on loss_i in its step's loss."""
        return self.weights[batch.index.to(self.device)] / batch.denominators

    def _losses(self, leaves: list[Tensor], batch: MicroBatch) -> Tensor:
        # bf16: the model's ops under autocast (the two backward passes follow the forward's dtypes); the losses,
        # and everything downstream of them, back in the parameters' dtype
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16"):
            losses = example_losses(self.model, self.tensors(leaves), batch, self.loss_length,
                                    self.config.loss_chunk, self.head)
        return losses.to(self.dtype)

    def gradient(self, params: list[Tensor], t: int, record: bool = True) -> list[Tensor]:
        """g_t at `params`, accumulated over micro-batches (and ranks), no graph kept; logs the weighted batch loss
        unless `record` is False (the reverse pass, where a rank's kept-graph share of the loss is not summed)."""
        leaves = [p.detach().requires_grad_(True) for p in params]
        grads = [torch.zeros_like(p) for p in params]
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in self.batches[t]:
            loss = (self._scaled(batch) * self._losses(leaves, batch)).sum()
            parts = torch.autograd.grad(loss, leaves, allow_unused=True)
            for g, part in zip(grads, parts):
                if part is not None:
                    g.add_(part)
            loss_total += loss.detach().double()
        self._reduce(grads, loss_total)
        if record:
            self.losses[t] = float(loss_total)
        return grads

    def _reduce(self, grads: list[Tensor], loss: Tensor) -> None:
        """Sum a step's gradient and loss over the ranks (one process: nothing to do). Every rank calls this with
        the same layout, whichever path got its share of the gradient."""
        if self.world > 1:
            distributed.all_reduce_sum([*grads, loss])

    def forward_step(self, state: TrainState, t: int) -> TrainState:
        grads = self.gradient(state.params, t)
        # a diverged inner run is an error at the step where it shows, never a metagradient of NaN weights
        check_loss(self.losses[t], self.label, t + 1, self.hint)
        if self.masses[t] > 0:  # per unit of weight: the mean token loss, whatever the examples' weights
            check_loss(self.losses[t] / self.masses[t], self.label, t + 1, self.hint, EXPLODED_LOSS,
                       name="the mean token loss")
        with torch.no_grad():
            params, slots = self.optimizer.update(state.params, state.slots, grads, self.lrs[t], t)
        if t == self.total_steps - 1:  # earlier steps: non-finite weights show in the next step's loss, checked above
            check_parameters(zip(self.names, params), self.label, t + 1, self.hint)
        self._tick()
        return TrainState([p.detach() for p in params], {k: [s.detach() for s in v] for k, v in slots.items()})

    def train(self) -> TrainState:
        state = self.initial_state()
        for t in range(self.total_steps):
            state = self.forward_step(state, t)
        return state

    # -- reverse -----------------------------------------------------------------------------------
    def _first_order(self, batch: MicroBatch, leaves: list[Tensor]) -> tuple[Tensor, list[Tensor | None]]:
        u = self._scaled(batch).detach().requires_grad_(True)
        loss = (u * self._losses(leaves, batch)).sum()
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        return u, list(grads)

    def reverse_step(self, state: TrainState, t: int, adjoint: TrainState, scores: Tensor) -> TrainState:
        leaves = [p.detach().requires_grad_(True) for p in state.params]
        batches = self.batches[t]
        kept = self._first_order(batches[0], leaves) if len(batches) == 1 else None
        if kept is not None:
            grads = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(kept[1], leaves)]
            if self.world > 1:  # reduced into copies: the kept graph still needs this rank's own gradient
                grads = [g.clone() for g in grads]
                self._reduce(grads, torch.zeros((), dtype=torch.float64, device=self.device))
        else:
            grads = self.gradient(state.params, t, record=False)

        # 1. VJP of the optimizer update
        adj_params, adj_slots, adj_grads = self.optimizer.vjp(state.params, state.slots, grads, self.lrs[t], t,
                                                              adjoint.params, adjoint.slots)
        del grads

        # 2. per-example scores and the Hessian-vector product, one micro-batch at a time (data parallel: this
        # rank's share of H_t g_bar is summed apart, then over the ranks)
        hvp = adj_params if self.world == 1 else [torch.zeros_like(p) for p in adj_params]
        for batch in batches:
            u, first = kept if kept is not None else self._first_order(batch, leaves)
            kept = None
            terms = [(g * a).sum() for g, a in zip(first, adj_grads) if g is not None and g.requires_grad]
            if not terms:
                continue
            second = torch.autograd.grad(torch.stack(terms).sum(), [u] + leaves, allow_unused=True)
            scores.index_add_(0, batch.index, second[0].detach().to("cpu", torch.float64) / batch.denominators.cpu())
            for j, h in enumerate(second[1:]):
                if h is not None:
                    hvp[j].add_(h.detach())
            del first, second, terms
        if hvp is not adj_params:
            distributed.all_reduce_sum(hvp)
            for a, h in zip(adj_params, hvp):
                a.add_(h)
        self._tick()
        return TrainState(adj_params, adj_slots)


def train(model: torch.nn.Module, examples: Sequence[Mapping[str, Any]], config: TrainingConfig | None = None,
          weights: Tensor | Sequence[float] | None = None) -> dict[str, Tensor]:
    """Fine-tune functionally (the model is left untouched); returns every named parameter after training."""
    config = config or TrainingConfig()
    with _eval_mode(model), _tf32(config.precision == "tf32"):
        unroll = Unroll(model, examples, config, weights)
        final = unroll.train()
    return unroll.tensors(final.params, with_buffers=False)


def metagradients(model: torch.nn.Module, examples: Sequence[Mapping[str, Any]], metric: Metric,
                  config: TrainingConfig | None = None, weights: Tensor | Sequence[float] | None = None,
                  progress: Progress | None = None) -> MetagradResult:
    """value = metric(model, params after training with per-example weights); scores = d value / d weights."""
    config = config or TrainingConfig()
    with _eval_mode(model), _tf32(config.precision == "tf32"):
        unroll = Unroll(model, examples, config, weights)
        unroll.progress = progress
        total = unroll.total_steps
        state_bytes = unroll.state_bytes()
        chosen = ckpt.plan(config.checkpoint, total, state_bytes, config.replay_k, config.memory_budget)
        scores = torch.zeros(len(unroll.examples), dtype=torch.float64)
        ledger = ckpt.Ledger()
        box: dict[str, Any] = {}
        clock = {"start": time.perf_counter()}

        def final(state: TrainState) -> None:
            clock["forward"] = time.perf_counter() - clock["start"]
            leaves = [p.detach().requires_grad_(True) for p in state.params]
            value = metric(model, unroll.tensors(leaves, with_buffers=False))
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise InputError("the metric must return a 0-d tensor (a differentiable scalar of the parameters)")
            if not torch.isfinite(value):
                raise InputError(f"the metric of the trained target is {float(value)}; check the metric and the "
                                 f"learning rate")
            if not value.requires_grad:
                raise InputError("the metric does not depend on the trained parameters (no gradient to follow)")
            adj = torch.autograd.grad(value.reshape(()), leaves, allow_unused=True)
            box["value"] = float(value.detach())
            box["params"] = [p.detach() for p in state.params]
            box["adjoint"] = TrainState([torch.zeros_like(p) if a is None else a.detach()
                                         for a, p in zip(adj, leaves)],
                                        {k: [torch.zeros_like(s) for s in v] for k, v in state.slots.items()})

        def back(state: TrainState, t: int) -> None:
            box["adjoint"] = unroll.reverse_step(state, t, box["adjoint"], scores)

        forward = total if chosen.strategy != "replay" else ckpt.simulate(total, chosen.k).forward_steps
        unroll.work = (0, forward + total)
        s0 = unroll.initial_state()
        if chosen.strategy == "all":
            ckpt.run_all(s0, total, unroll.forward_step, final, back, ledger)
        elif chosen.strategy == "replay":
            ckpt.run_replay(s0, total, chosen.k, unroll.forward_step, final, back, ledger)
        else:
            ckpt.run_disk(s0, total, unroll.forward_step, final, back, ledger, config.checkpoint_dir)
        if unroll.world > 1:  # each rank holds its own examples' scores, zeros elsewhere
            reduced = scores.to(unroll.device)
            distributed.all_reduce_sum([reduced])
            scores = reduced.to("cpu", torch.float64)
        if not torch.isfinite(scores).all():
            bad = int((~torch.isfinite(scores)).sum())
            raise InputError(f"{bad} metagradient scores are NaN or infinite; lower the learning rate or use float64")
        elapsed = time.perf_counter() - clock["start"]
        stats = {"strategy": chosen.strategy, "replay_k": chosen.k, "steps": total, "peak_states": ledger.peak,
                 "state_bytes": state_bytes, "forward_steps": ledger.forward_steps, "world_size": unroll.world,
                 "seconds": elapsed, "forward_seconds": clock.get("forward", math.nan)}
    return MetagradResult(box["value"], scores, unroll.tensors(box["params"], with_buffers=False),
                          [unroll.losses[t] for t in range(total)], stats)
