"""Cross-entropy through the LM head in chunks of tokens, differentiable twice without the full logits.

The engine differentiates every example's loss twice (a backward with its graph kept, then a backward of
<G, g_bar>). Through autograd's own ops the logits [tokens, vocabulary] and their softmax stay alive for both
passes: at GPT-2's vocabulary that is the reverse step's memory floor. Here the loss comes from the model's last
hidden states h [N, H] and the head's weight W [V, H] (and bias b) through two custom Functions that recompute the
logits z = h W^T + b one chunk of rows at a time, in every pass:

    forward    nll_n = logsumexp(z_n) - z_{n, y_n}                      (saves h, W, b, y and logsumexp: [N])
    backward   with p = softmax(z), r = p - onehot(y), cotangent g [N]:
               dh = (g r) W,  dW = (g r)^T h,  db = sum_n g_n r_n
    backward of the backward (the second-order VJP), cotangents (a_h, a_W, a_b): with u = a_h W^T + h a_W^T + a_b
               and S = <a_h, dh> + <a_W, dW> + <a_b, db> = sum_n g_n <r_n, u_n>,
               dS/dg_n = <r_n, u_n>,  q = dS/dz = g p (u - <p, u>)  (the softmax's Jacobian, symmetric),
               dS/dh = (g r) a_W + q W,  dS/dW = (g r)^T a_h + q^T h,  dS/db = sum_n q_n.

Every [rows, V] tensor lives for one chunk only; what is kept between the passes is h, W, b, y, logsumexp and g.
A third derivative is refused (the engine needs two).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from datasteer.errors import ConfigError

# config attributes of heads that are not h W^T + b: (attribute, the value at which the head is plain)
# (Gemma 2/3's tanh cap, Cohere's logit_scale, Granite's logits_scaling); anything else is caught by `check_head`
_NOT_LINEAR = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(hidden, weight, bias)


def _softmax(hidden: Tensor, weight: Tensor, bias: Tensor | None, lse: Tensor) -> Tensor:
    """p = softmax(z) for one chunk of rows, in place of the chunk's logits."""
    return _logits(hidden, weight, bias).sub_(lse.unsqueeze(1)).exp_()


def _minus_onehot(p: Tensor, targets: Tensor) -> Tensor:
    """r = p - onehot(y), in place."""
    p[torch.arange(len(targets), device=p.device), targets] -= 1
    return p


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """[C] row-wise dot products without a [C, V] temporary."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).reshape(-1)


class _TokenNLL(torch.autograd.Function):
    """nll [N] = logsumexp(h W^T + b) - (h W^T + b)[y], chunk rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        lse = hidden.new_empty(hidden.shape[0])
        nll = hidden.new_empty(hidden.shape[0])
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            z = _logits(hidden[start:end], weight, bias)
            lse[start:end] = torch.logsumexp(z, dim=1)
            nll[start:end] = lse[start:end] - z.gather(1, targets[start:end].unsqueeze(1)).squeeze(1)
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        return nll

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:3])
        dh, dw, db = _TokenNLLBackward.apply(hidden, weight, bias, targets, lse, grad, ctx.chunk, need)
        return dh, dw, db, None, None


class _TokenNLLBackward(torch.autograd.Function):
    """(dh, dW, db) of `_TokenNLL` against the cotangent g, chunked; its own backward is the second-order VJP."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, lse, grad, chunk, need):
        need_h, need_w, need_b = need[0], need[1], need[2] and bias is not None
        dh = torch.zeros_like(hidden) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        db = torch.zeros_like(bias) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            end = start + chunk
            r = _minus_onehot(_softmax(hidden[start:end], weight, bias, lse[start:end]), targets[start:end])
            gr = r.mul_(grad[start:end].unsqueeze(1))
            if need_h:
                dh[start:end] = gr @ weight
            if need_w:
                dw.addmm_(gr.T, hidden[start:end])
            if need_b:
                db.add_(gr.sum(0))
            del r, gr
        ctx.save_for_backward(hidden, weight, bias, targets, lse, grad)
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        return dh, dw, db

    @staticmethod
    @once_differentiable
    def backward(ctx, a_h, a_w, a_b):
        hidden, weight, bias, targets, lse, grad = ctx.saved_tensors
        need_h, need_w, need_b, _, _, need_g = ctx.needs_input_grad[:6]
        need_b = need_b and bias is not None
        out_h = torch.zeros_like(hidden) if need_h else None
        out_w = torch.zeros_like(weight) if need_w else None
        out_b = torch.zeros_like(bias) if need_b else None
        out_g = torch.zeros_like(grad) if need_g else None
        if a_h is None and a_w is None and a_b is None:
            return out_h, out_w, out_b, None, None, out_g, None, None
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = start + ctx.chunk
            h, g, y = hidden[start:end], grad[start:end].unsqueeze(1), targets[start:end]
            p = _softmax(h, weight, bias, lse[start:end])
            # u = a_h W^T + h a_W^T + a_b: the direction the cotangents give each row's logits
            u = a_h[start:end] @ weight.T if a_h is not None else None
            if a_w is not None:
                u = h @ a_w.T if u is None else u.addmm_(h, a_w.T)
            if a_b is not None:
                u = a_b.expand(len(h), -1).clone() if u is None else u.add_(a_b)
            pu = _rowdot(p, u)
            if need_g:  # <r, u> = <p, u> - u[y]
                out_g[start:end] = pu - u.gather(1, y.unsqueeze(1)).squeeze(1)
            # q = g p (u - <p, u>): through the softmax (in place of u); then r = p - onehot(y) in place of p
            q = u.sub_(pu.unsqueeze(1)).mul_(p).mul_(g)
            r = _minus_onehot(p, y)
            gr = r.mul_(g)
            if need_h:
                out_h[start:end] = q @ weight
                if a_w is not None:
                    out_h[start:end] += gr @ a_w
            if need_w:
                out_w.addmm_(q.T, h)
                if a_h is not None:
                    out_w.addmm_(gr.T, a_h[start:end])
            if need_b:
                out_b.add_(q.sum(0))
            del p, q, r, gr, u
        return out_h, out_w, out_b, None, None, out_g, None, None


def token_nll(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
    """[N] next-token cross-entropy of rows `hidden` [N, H] against `targets` [N] through the linear head (weight
    [V, H], bias [V] or None), `chunk` rows of logits at a time in the forward, backward and double backward."""
    return _TokenNLL.apply(hidden, weight, bias, targets, int(chunk))


@dataclass(frozen=True)
class LinearHead:
    """Where a causal LM's logits come from: `backbone` (its last hidden states) and the head's parameters, each
    named by every name it has in `model.named_parameters(remove_duplicate=False)` (a tied head has two)."""

    backbone: torch.nn.Module
    prefix: str                              # the backbone's attribute name, e.g. "transformer", "model"
    weight: tuple[str, ...]
    bias: tuple[str, ...] | None
    aliases: dict[str, tuple[str, ...]]      # every name of a tied parameter -> all its names

    def pick(self, tensors: dict[str, Tensor], names: tuple[str, ...]) -> Tensor:
        for name in names:
            if name in tensors:
                return tensors[name]
        raise ConfigError(f"no tensor for the LM head parameter '{names[0]}'")  # not reachable from the engine

    def backbone_tensors(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        lead = self.prefix + "."
        out = {name[len(lead):]: t for name, t in tensors.items() if name.startswith(lead)}
        for name, group in self.aliases.items():  # a tied parameter passed under its name outside the backbone
            if name.startswith(lead) and name[len(lead):] not in out:
                for other in group:
                    if other in tensors:
                        out[name[len(lead):]] = tensors[other]
                        break
        return out

    def hidden_states(self, tensors: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        kwargs = {"input_ids": input_ids, "use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        out = functional_call(self.backbone, self.backbone_tensors(tensors), args=(), kwargs=kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def weight_and_bias(self, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        return self.pick(tensors, self.weight), (None if self.bias is None else self.pick(tensors, self.bias))


def linear_head(model: torch.nn.Module) -> LinearHead:
    """The backbone and linear head of a transformers causal LM, or a one-line ConfigError saying why the chunked
    cross-entropy cannot stand in for its logits."""
    fix = "; leave training.loss_chunk unset for this model"
    config = getattr(model, "config", None)
    for attribute, plain in _NOT_LINEAR.items():
        value = getattr(config, attribute, plain)
        if value is not None and value != plain and not (plain is None and value == 0):
            raise ConfigError(f"training.loss_chunk needs logits = hidden @ W^T + b, but this model's head applies "
                              f"{attribute}={value}{fix}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        raise ConfigError(f"training.loss_chunk needs a torch.nn.Linear LM head (get_output_embeddings()), not "
                          f"{type(head).__name__}{fix}")
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, torch.nn.Module) or backbone is model:
        raise ConfigError(f"training.loss_chunk needs a model with a separate backbone (base_model_prefix); "
                          f"{type(model).__name__} has none{fix}")
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    aliases = {n: tuple(group) for group in names.values() if len(group) > 1 for n in group}
    weight = tuple(names.get(id(head.weight), ()))
    bias = tuple(names.get(id(head.bias), ())) if head.bias is not None else None
    if not weight or (head.bias is not None and not bias):
        raise ConfigError(f"training.loss_chunk: the LM head's parameters are not among the model's{fix}")
    return LinearHead(backbone, prefix, weight, bias, aliases)


def check_head(model: torch.nn.Module, head: LinearHead, tensors: dict[str, Tensor], input_ids: Tensor) -> None:
    """Refuse a head whose logits are not hidden @ W^T + b (a scale or cap the config does not name): the model's
    own logits on a few tokens against the linear head's, which must agree to rounding."""
    with torch.no_grad():
        ids = input_ids.reshape(1, -1)
        full = functional_call(model, tensors, args=(), kwargs={"input_ids": ids, "use_cache": False}).logits
        weight, bias = head.weight_and_bias(tensors)
        mine = _logits(head.hidden_states(tensors, ids, None), weight, bias)
    scale = float(full.abs().max().clamp(min=1.0))
    tol = 1e-10 if full.dtype == torch.float64 else 1e-4
    if full.shape != mine.shape or float((full - mine).abs().max()) > tol * scale:
        raise ConfigError(f"training.loss_chunk needs logits = hidden @ W^T + b, but {type(model).__name__}'s logits "
                          f"differ from its head's linear map of the last hidden states; leave training.loss_chunk "
                          f"unset for this model")
