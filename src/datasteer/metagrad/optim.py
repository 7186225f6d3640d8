"""Differentiable optimizers and learning-rate schedules.

Each optimizer is a pure function of tensors: `update(params, slots, grads, lr, step)` returns new
parameters and new slots (momentum buffers, Adam moments) without touching its inputs, so autograd
can take the vector-Jacobian product of one training step with respect to the parameters, the
optimizer state and the gradient. The arithmetic follows torch.optim's single-tensor code paths
(`torch/optim/sgd.py`, `adam.py`, `adamw.py`) so a forward trajectory matches torch.optim.

`OPTIMIZERS` maps each name `TrainingConfig.optimizer` accepts to a factory from the training settings:
adding an optimizer is a class with `init`, `update` and `vjp` here and one entry there.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from torch import Tensor

Slots = dict[str, list[Tensor]]


class Settings(Protocol):
    """The training settings that optimizer factories and schedules read (`TrainingConfig` has them all);
    a protocol, so that the config can validate its optimizer against `OPTIMIZERS` without an import circle."""

    optimizer: str
    learning_rate: float
    momentum: float
    dampening: float
    nesterov: bool
    betas: tuple[float, float]
    eps: float
    eps_root: float
    schedule: str
    warmup_steps: int

    @property
    def resolved_weight_decay(self) -> float: ...


class _SafeSqrt(torch.autograd.Function):
    """sqrt whose derivative is 0 where the input is 0 (instead of inf).

    Adam's second moment v stays exactly 0 on coordinates that never receive a gradient (say the
    embedding of a token absent from every batch). There d sqrt(v)/dv = inf meets dv/dg = 2(1-b2)g = 0
    and autograd produces NaN; the true derivative of the update along that path is 0 because the
    first moment there is 0 as well. This is the masked derivative that optax's `eps_root` approximates.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.sqrt()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        positive = out > 0
        return torch.where(positive, grad / (2 * torch.where(positive, out, torch.ones_like(out))), 0.0)


safe_sqrt = _SafeSqrt.apply


class Optimizer(Protocol):
    slot_names: tuple[str, ...]

    def init(self, params: list[Tensor]) -> Slots: ...

    def update(self, params: list[Tensor], slots: Slots, grads: list[Tensor], lr: float,
               step: int) -> tuple[list[Tensor], Slots]: ...

    def vjp(self, params: list[Tensor], slots: Slots, grads: list[Tensor], lr: float, step: int,
            adj_params: list[Tensor], adj_slots: Slots) -> tuple[list[Tensor], Slots, list[Tensor]]:
        """Adjoints of (params, slots, grads) given those of update's outputs (written out by hand: one
        fused pass with no autograd graph over every parameter; a test checks it against autograd)."""
        ...


class SGD:
    """torch.optim.SGD: weight decay as L2 on the gradient, momentum buffer started at the first gradient."""

    def __init__(self, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        self.momentum, self.dampening, self.nesterov, self.weight_decay = momentum, dampening, nesterov, weight_decay
        self.slot_names = ("momentum_buffer",) if momentum else ()

    def init(self, params: list[Tensor]) -> Slots:
        return {name: [torch.zeros_like(p) for p in params] for name in self.slot_names}

    def update(self, params, slots, grads, lr, step):
        new_params, new_bufs = [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                if step == 0:
                    buf = g
                else:
                    buf = slots["momentum_buffer"][i] * self.momentum + (1 - self.dampening) * g
                new_bufs.append(buf)
                g = g + self.momentum * buf if self.nesterov else buf
            new_params.append(p - lr * g)
        return new_params, ({"momentum_buffer": new_bufs} if self.momentum else {})

    def vjp(self, params, slots, grads, lr, step, adj_params, adj_slots):
        out_p, out_b, out_g = [], [], []
        for i, (p, a) in enumerate(zip(params, adj_params)):
            adj_dir = a * -lr
            if self.momentum:
                adj_buf = adj_slots["momentum_buffer"][i]
                if self.nesterov:
                    adj_g = adj_dir
                    adj_buf = adj_buf + self.momentum * adj_dir
                else:
                    adj_g = torch.zeros_like(a)
                    adj_buf = adj_buf + adj_dir
                if step == 0:
                    adj_g = adj_g + adj_buf
                    out_b.append(torch.zeros_like(a))
                else:
                    adj_g = adj_g + (1 - self.dampening) * adj_buf
                    out_b.append(self.momentum * adj_buf)
            else:
                adj_g = adj_dir
            out_p.append(a + self.weight_decay * adj_g if self.weight_decay else a)
            out_g.append(adj_g)
        return out_p, ({"momentum_buffer": out_b} if self.momentum else {}), out_g


class Adam:
    """torch.optim.Adam (decoupled=False: weight decay added to the gradient) or AdamW (decoupled=True).

    With `eps_root` > 0 the denominator is optax's, sqrt(v / (1 - beta2^t) + eps_root) + eps (`optax.adam`'s
    eps_root, which the DPG authors set to 1e-9): its derivative at v = 0 is finite, where torch's sqrt(v) has an
    infinite one (`safe_sqrt` masks it instead). eps_root = 0 keeps torch.optim's arithmetic exactly.
    """

    slot_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, betas: tuple[float, float], eps: float, weight_decay: float, decoupled: bool,
                 eps_root: float = 0.0):
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay, self.decoupled, self.eps_root = eps, weight_decay, decoupled, eps_root

    def init(self, params: list[Tensor]) -> Slots:
        return {name: [torch.zeros_like(p) for p in params] for name in self.slot_names}

    def update(self, params, slots, grads, lr, step):
        count = step + 1
        bias_correction1 = 1 - self.beta1**count
        bias_correction2 = 1 - self.beta2**count
        bias_correction2_sqrt = math.sqrt(bias_correction2)
        step_size = lr / bias_correction1
        new_params, new_m, new_v = [], [], []
        for p, m, v, g in zip(params, slots["exp_avg"], slots["exp_avg_sq"], grads):
            if self.weight_decay:
                if self.decoupled:
                    p = p * (1 - lr * self.weight_decay)
                else:
                    g = g + self.weight_decay * p
            m = torch.lerp(m, g, 1 - self.beta1)
            v = v * self.beta2 + (1 - self.beta2) * g * g
            if self.eps_root:
                denom = torch.sqrt(v / bias_correction2 + self.eps_root) + self.eps
            else:
                denom = safe_sqrt(v) / bias_correction2_sqrt + self.eps
            new_params.append(p - step_size * (m / denom))
            new_m.append(m)
            new_v.append(v)
        return new_params, {"exp_avg": new_m, "exp_avg_sq": new_v}

    def vjp(self, params, slots, grads, lr, step, adj_params, adj_slots):
        count = step + 1
        bias_correction1 = 1 - self.beta1**count
        bias_correction2 = 1 - self.beta2**count
        bias_correction2_sqrt = math.sqrt(bias_correction2)
        step_size = lr / bias_correction1
        out_p, out_m, out_v, out_g = [], [], [], []
        for p, m, v, g, a, am, av in zip(params, slots["exp_avg"], slots["exp_avg_sq"], grads, adj_params,
                                          adj_slots["exp_avg"], adj_slots["exp_avg_sq"]):
            if self.weight_decay and not self.decoupled:
                g = g + self.weight_decay * p
            m_new = torch.lerp(m, g, 1 - self.beta1)
            v_new = torch.addcmul(v * self.beta2, g, g, value=1 - self.beta2)
            if self.eps_root:  # root = sqrt(v_new / c2^2 + eps_root) > 0, denom = root + eps
                root = v_new.div_(bias_correction2).add_(self.eps_root).sqrt_()
                denom = root + self.eps
            else:  # root = sqrt(v_new), denom = root / c2 + eps
                root = v_new.sqrt_()
                denom = (root / bias_correction2_sqrt).add_(self.eps)
            ratio = torch.div(a, denom).mul_(step_size)     # -d p_new / d m_new, times the adjoint
            adj_m = am - ratio
            # d p_new / d denom = step_size * m_new / denom^2; d denom / d v_new = 1 / (2 sqrt(v_new) c2), taken as
            # 0 at v_new = 0 (with eps_root: 1 / (2 root c2^2), finite everywhere)
            adj_v = ratio.mul_(m_new).div_(denom).div_(root)
            if self.eps_root:
                adj_v = adj_v.mul_(0.5 / bias_correction2).add_(av)
            else:
                adj_v = adj_v.mul_(0.5 / bias_correction2_sqrt).masked_fill_(root == 0, 0.0).add_(av)
            del m_new, v_new, root, denom, ratio
            adj_g = torch.addcmul(adj_m * (1 - self.beta1), adj_v, g, value=2 * (1 - self.beta2))
            out_m.append(adj_m.mul_(self.beta1))
            out_v.append(adj_v.mul_(self.beta2))
            if self.weight_decay and self.decoupled:
                out_p.append(a * (1 - lr * self.weight_decay))
            elif self.weight_decay:
                out_p.append(torch.add(a, adj_g, alpha=self.weight_decay))
            else:
                out_p.append(a.clone())
            out_g.append(adj_g)
        return out_p, {"exp_avg": out_m, "exp_avg_sq": out_v}, out_g


OPTIMIZERS: dict[str, Callable[[Settings], Optimizer]] = {
    "sgd": lambda c: SGD(c.momentum, c.dampening, c.nesterov, c.resolved_weight_decay),
    "adam": lambda c: Adam(c.betas, c.eps, c.resolved_weight_decay, decoupled=False, eps_root=c.eps_root),
    "adamw": lambda c: Adam(c.betas, c.eps, c.resolved_weight_decay, decoupled=True, eps_root=c.eps_root),
}


def make_optimizer(config: Settings) -> Optimizer:
    """The optimizer `config.optimizer` names (`TrainingConfig` has checked it is in `OPTIMIZERS`)."""
    return OPTIMIZERS[config.optimizer](config)


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """transformers' get_constant/linear/cosine_schedule_with_warmup multiplier for 0-based `step`."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def learning_rates(config: Settings, total_steps: int) -> list[float]:
    return [config.learning_rate * lr_factor(config.schedule, t, total_steps, config.warmup_steps)
            for t in range(total_steps)]
