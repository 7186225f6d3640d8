"""Log-likelihoods of continuations on a causal LM: tokenisation with the model's own BOS, then batched forwards.

Tokenisation (`Encoder`), per request (context, continuation):
- the context's trailing whitespace moves to the continuation ("Answer: " + "Paris" -> "Answer:" + " Paris"),
  unless the request says otherwise (`move_space`: a chat template's prompt keeps its final newline);
- tokens = [BOS] + tokens(context) + tokens(continuation), where the continuation's tokens are those of
  tokens(context + continuation) after the context's when that prefix matches (so a tokenizer that merges across
  the boundary is honoured, as lm-eval-harness does), else tokens(continuation) on its own;
- texts are encoded without special tokens and the BOS is added here, once: the tokenizer's `bos_token_id` (the
  model's own convention: `<|endoftext|>` for GPT-2, `<s>` for Llama 2, `<|im_start|>` for SmolLM2-Instruct), else
  the model config's. `bos: none` adds none; a whole sentence (empty context) is then scored from its second
  token. The BOS is never counted as part of what is scored.

Scoring (`LikelihoodScorer`): the continuations that share a context (the options of one question) are packed
into one row: the context once, then each option, every option attending to the context and to itself only, its
positions restarting after the context (a 4D attention mask and position ids), which is exactly what a forward on
context + option alone computes, for the context's cost once instead of once per option (3x fewer tokens on BBQ,
4x on MMLU). A self-check on the first packed row compares it with its options scored one by one and turns
packing off for a model whose attention does not honour a 4D mask. Rows are sorted by length and cut into batches
of at most `batch_size` scored sequences; each batch is right-padded (padding attends to itself only) and run in
one forward. Only the positions that predict continuation tokens go through the LM head (the model's hidden
states, gathered), which a second self-check compares with the model's own logits; a model whose head does more
than a linear layer (logit soft-capping, scaling) is scored from its full logits instead. Log-probabilities are
log-softmax in float32 and summed in float64.
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
            ctx = r.context.rstrip() if r.move_space else r.context
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


@dataclasses.dataclass
class _Row:
    """One row of a forward pass: a shared prefix and the continuations scored after it (their indices in the
    caller's list). A row with several continuations is packed: each continuation attends to the prefix and to
    itself only, with positions that restart after the prefix, which is what a forward on prefix + continuation
    alone computes."""

    prefix: tuple[int, ...]
    members: list[tuple[int, tuple[int, ...]]]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(c) for _, c in self.members)


class LikelihoodScorer:
    """Batched, exact per-sequence log-likelihoods of encoded requests on a loaded causal LM.

    Sequences that share their context (the options of one question) are packed into one row by default, so the
    context runs through the model once instead of once per option (`pack`); a self-check on the first packed row
    compares it with the options scored one by one and turns packing off for a model whose attention does not
    take a 4D mask and position ids."""

    def __init__(self, model: Any, *, batch_size: int = 16, pad_id: int = 0, pack: bool = True):
        self.model = model
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.pack = pack
        self._fast: bool | None = None
        self._packs: bool | None = None if pack else False

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def score(self, encoded: Sequence[Encoded]) -> list[LogLik]:
        """The log-likelihood of each encoded sequence's scored span, in input order."""
        import torch

        results: list[LogLik | None] = [None] * len(encoded)
        with torch.inference_mode():
            rows = self._rows(encoded)
            if self._packs is None and any(len(r.members) > 1 for r in rows):
                first = next(r for r in rows if len(r.members) > 1)
                self._packs = self._check_packing(first)
                if not self._packs:
                    rows = self._rows(encoded)
            rows.sort(key=lambda r: -r.length)
            batch: list[_Row] = []
            for row in rows + [None]:  # type: ignore[list-item]
                if row is not None and (not batch or sum(len(r.members) for r in batch) + len(row.members)
                                        <= self.batch_size):
                    batch.append(row)
                    continue
                if batch:
                    for (index, cont), value in zip([m for r in batch for m in r.members], self._forward(batch)):
                        results[index] = LogLik(value, len(cont))
                batch = [row] if row is not None else []
        return results  # type: ignore[return-value]

    def _rows(self, encoded: Sequence[Encoded]) -> list[_Row]:
        if not self._packs and self._packs is not None:
            return [_Row(e.ids[:e.start], [(i, e.ids[e.start:])]) for i, e in enumerate(encoded)]
        groups: dict[tuple[int, ...], _Row] = {}
        for i, e in enumerate(encoded):
            prefix = e.ids[:e.start]
            row = groups.setdefault(prefix, _Row(prefix, []))
            row.members.append((i, e.ids[e.start:]))
        return list(groups.values())

    def _forward(self, batch: Sequence[_Row], packed: bool | None = None) -> list[float]:
        """One forward over the rows of `batch`: each member continuation's summed log-probability."""
        import torch

        packed = bool(self._packs) if packed is None else packed
        width = max(r.length for r in batch)
        device = self.device
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        rows, where, targets, owner = [], [], [], []
        member = 0
        for r, row in enumerate(batch):
            c = len(row.prefix)
            ids[r, :c] = torch.tensor(row.prefix)
            positions[r, :c] = torch.arange(c)
            at = c
            for _, cont in row.members:
                n = len(cont)
                ids[r, at:at + n] = torch.tensor(cont)
                positions[r, at:at + n] = torch.arange(c, c + n)
                for j, token in enumerate(cont):  # token j is predicted at the position before it
                    rows.append(r)
                    where.append(c - 1 if j == 0 else at + j - 1)
                    targets.append(token)
                    owner.append(member)
                member += 1
                at += n
        if packed:
            mask = self._mask(batch, width)
            kwargs = {"attention_mask": mask.to(device), "position_ids": positions.to(device)}
        else:
            mask2 = torch.zeros((len(batch), width), dtype=torch.long)
            for r, row in enumerate(batch):
                mask2[r, :row.length] = 1
            kwargs = {"attention_mask": mask2.to(device)}
        ids = ids.to(device)
        rows_t, where_t = torch.tensor(rows, device=device), torch.tensor(where, device=device)
        targets_t = torch.tensor(targets, device=device)
        if self._fast is None:
            plain = batch[0].prefix + batch[0].members[0][1]
            self._fast = self._check_fast_path(torch.tensor([plain], device=device))
        if self._fast:
            hidden = self.model.base_model(input_ids=ids, **kwargs).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[rows_t, where_t])
        else:
            logits = self.model(input_ids=ids, **kwargs).logits[rows_t, where_t]
        logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets_t[:, None])[:, 0].double()
        sums = torch.zeros(member, dtype=torch.float64, device=device).index_add_(
            0, torch.tensor(owner, device=device), logp)
        return sums.tolist()

    def _mask(self, batch: Sequence[_Row], width: int) -> Any:
        """The 4D additive attention mask of packed rows: 0 where a query may attend, the dtype's minimum elsewhere;
        padding attends to itself only (a fully masked row would turn into NaN and spread through the values)."""
        import torch

        dtype = next(self.model.parameters()).dtype
        blocked = torch.finfo(dtype).min
        mask = torch.full((len(batch), 1, width, width), blocked, dtype=dtype)
        tril = torch.tril(torch.ones((width, width), dtype=torch.bool))
        for r, row in enumerate(batch):
            c = len(row.prefix)
            mask[r, 0, :c, :c].masked_fill_(tril[:c, :c], 0.0)
            at = c
            for _, cont in row.members:
                n = len(cont)
                mask[r, 0, at:at + n, :c] = 0.0
                mask[r, 0, at:at + n, at:at + n].masked_fill_(tril[:n, :n], 0.0)
                at += n
            for p in range(at, width):
                mask[r, 0, p, p] = 0.0
        return mask

    def _check_packing(self, row: _Row) -> bool:
        """Whether a packed row scores its continuations as they score alone (checked once, on real data)."""
        import torch

        try:
            packed = self._forward([row], packed=True)
        except (TypeError, ValueError, RuntimeError, IndexError):
            return False
        alone = [self._forward([_Row(row.prefix, [m])], packed=False)[0] for m in row.members]
        return bool(torch.allclose(torch.tensor(packed), torch.tensor(alone), rtol=1e-5, atol=1e-4))

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
