"""Log-likelihoods of continuations on a causal LM: tokenisation with the model's own BOS, then batched forwards.

Tokenisation (`Encoder`), per request (context, continuation):
- the context's trailing whitespace moves to the continuation ("Answer: " + "Paris" -> "Answer:" + " Paris");
- tokens = [BOS] + tokens(context) + tokens(continuation), where the continuation's tokens are those of
  tokens(context + continuation) after the context's when that prefix matches (so a tokenizer that merges across
  the boundary is honoured, as lm-eval-harness does), else tokens(continuation) on its own;
- texts are encoded without special tokens and the BOS is added here, once: the tokenizer's `bos_token_id` (the
  model's own convention: `<|endoftext|>` for GPT-2, `<s>` for Llama 2, `<|im_start|>` for SmolLM2-Instruct), else
  the model config's. `bos: none` adds none; a whole sentence (empty context) is then scored from its second
  token. The BOS is never counted as part of what is scored.

Scoring (`LikelihoodScorer`): sequences are sorted by length and cut into batches of `batch_size`; each batch is
right-padded with an attention mask and run in one forward (padding after the real tokens never changes what a
causal model computes for them). Only the positions that predict continuation tokens go through the LM head (the
model's hidden states, gathered), which a self-check at start-up compares with the model's own logits; a model
whose head does more than a linear layer (logit soft-capping, scaling) is scored from its full logits instead.
Log-probabilities are log-softmax in float32 and summed in float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from datasteer.errors import ConfigError, InputError
from datasteer.probes.base import LogLik, Request

Bos = Literal["auto", "none"]
TooLong = Literal["error", "truncate"]


@dataclasses.dataclass(frozen=True)
class Encoded:
    ids: tuple[int, ...]
    start: int  # index of the first scored token
    truncated: bool = False

    @property
    def scored(self) -> int:
        return len(self.ids) - self.start


def bos_token_id(tokenizer: Any, model_config: Any = None) -> int | None:
    """The model's own BOS: its tokenizer's `bos_token_id`, else its config's; None when it has none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None and model_config is not None:
        bos = getattr(model_config, "bos_token_id", None)
        if isinstance(bos, (list, tuple)):
            bos = bos[0] if bos else None
    return bos if isinstance(bos, int) else None


class Encoder:
    """Requests -> token ids with the scored span marked (see the module docstring)."""

    def __init__(self, tokenizer: Any, *, bos: Bos = "auto", model_config: Any = None, max_length: int | None = None,
                 too_long: TooLong = "error", model: str = "the model"):
        self.tokenizer = tokenizer
        self.mode = bos
        self.bos_id = bos_token_id(tokenizer, model_config) if bos == "auto" else None
        self.max_length = max_length
        self.too_long = too_long
        self.model = model

    @property
    def bos_text(self) -> str | None:
        if self.bos_id is None:
            return None
        return self.tokenizer.convert_ids_to_tokens(self.bos_id)

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def encode(self, requests: Sequence[Request], who: Sequence[str] | None = None) -> list[Encoded]:
        """Encode all requests (batched tokenizer calls); `who[i]` names request i's item in errors."""
        contexts, wholes, conts = [], [], []
        for r in requests:
            ctx = r.context.rstrip()
            cont = r.context[len(ctx):] + r.continuation
            contexts.append(ctx)
            wholes.append(ctx + cont)
            conts.append(cont)
        unique = sorted({c for c in contexts if c})
        ctx_ids = dict(zip(unique, self._encode_texts(unique)))
        whole_ids = self._encode_texts(wholes)
        alone_needed = [i for i, c in enumerate(contexts)
                        if c and tuple(whole_ids[i][:len(ctx_ids[c])]) != tuple(ctx_ids[c])]
        alone = dict(zip(alone_needed, self._encode_texts([conts[i] for i in alone_needed])))
        prefix = [self.bos_id] if self.bos_id is not None else []
        out = []
        for i, (ctx, whole) in enumerate(zip(contexts, whole_ids)):
            name = who[i] if who is not None else f"request {i}"
            if not requests[i].continuation.strip():
                raise InputError(f"{name}: an empty text to score; every option and sentence needs text")
            if ctx:
                c_ids = ctx_ids[ctx]
                cont_ids = alone[i] if i in alone else whole[len(c_ids):]
                ids = prefix + list(c_ids) + list(cont_ids)
                start = len(prefix) + len(c_ids)
            else:
                if not prefix and self.mode == "auto":
                    raise ConfigError(
                        f"{self.model} has no BOS token (its tokenizer names none and its config has no "
                        f"bos_token_id), which scoring a whole sentence ({name}) needs for its first token; set "
                        "scoring bos: none to score sentences from their second token")
                ids = prefix + list(whole)
                start = 1  # after the BOS; without one, the first token has nothing to be predicted from
            if len(ids) - start < 1:
                raise InputError(f"{name}: '{requests[i].continuation[:40]}' has no token to score (a one-token "
                                 "sentence without a BOS); use scoring bos: auto with a model that has one")
            out.append(self._fit(Encoded(tuple(ids), start), len(prefix), name))
        return out

    def _fit(self, enc: Encoded, n_prefix: int, name: str) -> Encoded:
        """A sequence longer than the model's context: refused, or (too_long: truncate) its context cut from the
        left, BOS kept."""
        if self.max_length is None or len(enc.ids) <= self.max_length:
            return enc
        over = len(enc.ids) - self.max_length
        context = enc.start - n_prefix
        if self.too_long == "error" or over > context or enc.start - over < 1:
            raise InputError(f"{name}: {len(enc.ids)} tokens, more than {self.model}'s context of {self.max_length}; "
                             "set scoring too_long: truncate to cut contexts from the left, or leave the item out")
        ids = enc.ids[:n_prefix] + enc.ids[n_prefix + over:]
        return Encoded(ids, enc.start - over, truncated=True)


class LikelihoodScorer:
    """Batched, exact per-sequence log-likelihoods of encoded requests on a loaded causal LM."""

    def __init__(self, model: Any, *, batch_size: int = 16, pad_id: int = 0):
        self.model = model
        self.batch_size = batch_size
        self.pad_id = pad_id
        self._fast: bool | None = None

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def score(self, encoded: Sequence[Encoded]) -> list[LogLik]:
        """The log-likelihood of each encoded sequence's scored span, in input order."""
        import torch

        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i].ids), i))
        results: list[LogLik | None] = [None] * len(encoded)
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                batch = [encoded[i] for i in order[b:b + self.batch_size]]
                for i, value in zip(order[b:b + self.batch_size], self._batch(batch)):
                    results[i] = value
        return results  # type: ignore[return-value]

    def _batch(self, batch: Sequence[Encoded]) -> list[LogLik]:
        import torch

        width = max(len(e.ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows, positions, targets, owner = [], [], [], []
        for r, e in enumerate(batch):
            ids[r, :len(e.ids)] = torch.tensor(e.ids)
            mask[r, :len(e.ids)] = 1
            for t in range(e.start, len(e.ids)):  # token t is predicted at position t - 1
                rows.append(r)
                positions.append(t - 1)
                targets.append(e.ids[t])
                owner.append(r)
        device = self.device
        ids, mask = ids.to(device), mask.to(device)
        rows_t = torch.tensor(rows, device=device)
        pos_t = torch.tensor(positions, device=device)
        tgt_t = torch.tensor(targets, device=device)
        if self._fast is None:
            self._fast = self._check_fast_path(ids[:1, :len(batch[0].ids)])
        if self._fast:
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[rows_t, pos_t])
        else:
            logits = self.model(input_ids=ids, attention_mask=mask).logits[rows_t, pos_t]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, tgt_t[:, None])[:, 0].double()
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(
            0, torch.tensor(owner, device=device), logp)
        return [LogLik(float(s), e.scored) for s, e in zip(sums.tolist(), batch)]

    def _check_fast_path(self, ids: Any) -> bool:
        """Whether hidden states x the output embedding reproduce the model's logits (no soft-capping, scaling or
        other work after the head), checked once on a real sequence."""
        import torch

        base, head = getattr(self.model, "base_model", None), None
        get_head = getattr(self.model, "get_output_embeddings", None)
        if get_head is not None:
            head = get_head()
        if base is None or base is self.model or not isinstance(head, torch.nn.Linear):
            return False
        try:
            hidden = base(input_ids=ids).last_hidden_state
            fast = head(hidden).float()
            full = self.model(input_ids=ids).logits.float()
        except (TypeError, AttributeError, RuntimeError):
            return False
        return fast.shape == full.shape and bool(torch.allclose(fast, full, rtol=1e-4, atol=1e-4))
