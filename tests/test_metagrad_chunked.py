"""`training.loss_chunk`: the cross-entropy and its double backward computed chunk by chunk from the hidden states
and the linear LM head. In float64 the chunked engine gives the whole-logits engine's value, scores, trained
parameters and losses (1e-10 relative), tied and untied heads, with and without a head bias, for SGD with momentum
and AdamW with the DPG authors' options, micro-batched, at chunk sizes that do not divide the token count, on one
process and on two gloo ranks. The custom Functions pass gradcheck and gradgradcheck; the tensors the double
backward keeps no longer hold batch x length x vocabulary numbers."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from datasteer.errors import ConfigError
from datasteer.metagrad import TrainingConfig, metagradients, train
from datasteer.metagrad.chunked import linear_head, token_nll
from datasteer.metagrad.data import collate, example_losses, prepare_examples
from tests.test_metagrad import VOCAB, head_metric, heldout_metric, make_examples, tiny_gpt2, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
REL = 1e-10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of the reference `b`."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


# -- the custom Functions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_token_nll_gradcheck_and_gradgradcheck(chunk, with_bias):
    g = torch.Generator().manual_seed(chunk)
    n, hidden, vocab = 7, 4, 6
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(vocab, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    y = torch.randint(0, vocab, (n,), generator=g)
    inputs = (h, w, b) if with_bias else (h, w)

    def f(*args):
        return token_nll(args[0], args[1], args[2] if with_bias else None, y, chunk)

    reference = F.cross_entropy(F.linear(h, w, b), y, reduction="none")
    torch.testing.assert_close(f(*inputs), reference, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    # the Hessian-vector product the engine forms, against autograd through the whole logits
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    for fn in (f, lambda *a: F.cross_entropy(F.linear(a[0], a[1], a[2] if with_bias else None), y,
                                                reduction="none")):
        first = torch.autograd.grad((weights * fn(*inputs)).sum(), inputs, create_graph=True)
        direction = [torch.ones_like(x) for x in inputs]
        second = torch.autograd.grad(sum((d * v).sum() for d, v in zip(first, direction)), inputs)
        if fn is f:
            mine = second
        else:
            for a, b_ in zip(mine, second):
                torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-13)


def test_token_nll_frozen_inputs_and_no_third_derivative():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)  # a frozen head
    y = torch.randint(0, 4, (5,), generator=g)
    assert torch.autograd.gradgradcheck(lambda x: token_nll(x, w, None, y, 2), (h,))
    first = torch.autograd.grad(token_nll(h, w, None, y, 2).sum(), h, create_graph=True)[0]
    second = torch.autograd.grad(first.sum(), h, create_graph=True)[0]
    with pytest.raises(RuntimeError):  # the engine needs two derivatives; a third is refused, not wrong
        torch.autograd.grad(second.sum(), h)


# -- the engine, chunked against whole logits ----------------------------------------------------------------
def gpt2_untied(seed: int = 0):
    from datasteer.dpg.targets import untie_lm_head

    model = tiny_gpt2(seed)
    untie_lm_head(model)
    return model


def gpt2_head_bias(seed: int = 0):
    """An untied head with a bias (as GPT-J's or Phi's): logits = h W^T + b."""
    model = gpt2_untied(seed)
    head = torch.nn.Linear(16, VOCAB, bias=True).double()
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    model.lm_head = head
    return model


def llama_tied(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32, attn_implementation="eager",
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).double().eval()


MODELS = {"gpt2-tied": tiny_gpt2, "gpt2-untied": gpt2_untied, "gpt2-head-bias": gpt2_head_bias,
          "llama-untied": tiny_llama, "llama-tied": llama_tied}
SETTINGS = {
    "sgd-momentum-micro": dict(optimizer="sgd", momentum=0.9, learning_rate=0.05, batch_size=4, micro_batch_size=2,
                               epochs=2),
    # the DPG authors' inner loop: summed micro-batch means, loss over max_length, eps_root (uneven micro-batches)
    "adamw-authors": dict(optimizer="adamw", learning_rate=1e-2, batch_size=3, micro_batch_size=2, epochs=2,
                          eps_root=1e-9, accumulation="sum", loss_normalization="max_length", max_length=12),
}


def assert_same_run(chunked, whole):
    assert abs(chunked.value - whole.value) <= REL * abs(whole.value)
    assert whole.scores.abs().min() > 0
    assert rel(chunked.scores, whole.scores) <= REL, (chunked.scores, whole.scores)
    assert chunked.losses == pytest.approx(whole.losses, rel=REL)
    for name, p in whole.params.items():
        assert rel(chunked.params[name], p) <= REL, name


@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_chunked_engine_equals_whole_logits(model_name, settings):
    model = MODELS[model_name]()
    examples = make_examples(7)
    weights = torch.linspace(0.5, 1.5, len(examples), dtype=torch.float64)
    whole_config = TrainingConfig(dtype="float64", **SETTINGS[settings])
    whole = metagradients(model, examples, heldout_metric, whole_config, weights=weights)
    trained_whole = train(model, examples, whole_config, weights=weights)
    # micro-batches hold 6 to 16 trained tokens: neither 5 nor 7 divides them all
    config = whole_config.model_copy(update={"loss_chunk": 5})
    assert_same_run(metagradients(model, examples, heldout_metric, config, weights=weights), whole)
    for name, p in train(model, examples, config.model_copy(update={"loss_chunk": 7}), weights=weights).items():
        assert rel(p, trained_whole[name]) <= REL, name


@pytest.mark.parametrize("case", ["head-metric-replay", "frozen-head"])
def test_chunked_engine_head_metric_and_frozen_head(case):
    """A metric on the head's weights (through the head's own second derivative), and a frozen head (the chunked
    backward skips dW) under a trainable subset."""
    model = tiny_gpt2()
    examples = make_examples(7)
    if case == "head-metric-replay":
        settings = dict(optimizer="adamw", learning_rate=1e-2, batch_size=3, epochs=2, checkpoint="replay",
                        replay_k=2)
        metric = head_metric
    else:
        settings = dict(optimizer="sgd", momentum=0.9, learning_rate=0.1, batch_size=3, epochs=2,
                        trainable=[r"^transformer\.h\.1\."])
        metric = heldout_metric
    whole_config = TrainingConfig(dtype="float64", **settings)
    whole = metagradients(model, examples, metric, whole_config)
    chunked = metagradients(model, examples, metric, whole_config.model_copy(update={"loss_chunk": 3}))
    assert_same_run(chunked, whole)


def test_default_path_is_unchanged_and_losses_agree():
    """loss_chunk None is today's computation; the chunked per-example losses and their gradients agree."""
    model = tiny_llama()
    examples = prepare_examples(make_examples(5), 12)
    batch = collate(examples, [0, 1, 2, 3, 4], 0, torch.device("cpu"))
    tensors = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    whole = example_losses(model, tensors, batch)
    chunked = example_losses(model, tensors, batch, chunk=4, head=linear_head(model))
    torch.testing.assert_close(chunked, whole, rtol=1e-14, atol=0.0)
    gw = torch.autograd.grad(whole.sum(), list(tensors.values()))
    gc = torch.autograd.grad(chunked.sum(), list(tensors.values()))
    for a, b in zip(gc, gw):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert TrainingConfig().loss_chunk is None
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        TrainingConfig(loss_chunk=0)


def test_float32_chunked_agrees_with_whole_logits_to_rounding():
    """The engine's float32 (the DPG inner loop): chunked sums in another order, nothing more."""
    model = tiny_gpt2().float()
    examples = make_examples(7)
    config = TrainingConfig(optimizer="adamw", learning_rate=1e-2, batch_size=4, micro_batch_size=2, epochs=2)
    whole = metagradients(model, examples, heldout_metric, config)
    chunked = metagradients(model, examples, heldout_metric, config.model_copy(update={"loss_chunk": 5}))
    assert abs(chunked.value - whole.value) <= 1e-5 * abs(whole.value)
    assert rel(chunked.scores, whole.scores) <= 1e-3, (chunked.scores, whole.scores)


# -- refusals ------------------------------------------------------------------------------------------------
class _ScaledGPT2(GPT2LMHeadModel):
    """A head that scales its logits without a config attribute saying so."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_refuses_heads_that_are_not_linear():
    examples = make_examples()
    config = TrainingConfig(dtype="float64", loss_chunk=4)
    capped = tiny_gpt2()
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="final_logit_softcapping=30.0") as info:
        train(capped, examples, config)
    assert "\n" not in str(info.value)
    scaled = tiny_gpt2()
    scaled.config.logit_scale = 0.0625
    with pytest.raises(ConfigError, match="logit_scale"):
        train(scaled, examples, config)
    wrapped = tiny_gpt2()
    wrapped.lm_head = torch.nn.Sequential(torch.nn.Linear(16, VOCAB, bias=False)).double()
    with pytest.raises(ConfigError, match="torch.nn.Linear"):
        train(wrapped, examples, config)
    torch.manual_seed(0)
    hidden_scale = _ScaledGPT2(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32,
                                          attn_implementation="eager")).double().eval()
    with pytest.raises(ConfigError, match="differ from its head's linear map"):
        train(hidden_scale, examples, config)
    train(hidden_scale, examples, config.model_copy(update={"loss_chunk": None}))  # the whole-logits path runs
    plain = tiny_gpt2()
    plain.config.final_logit_softcapping = None  # the neutral values are accepted
    plain.config.logit_scale = 1.0
    train(plain, examples, config)


# -- memory: what the double backward keeps --------------------------------------------------------------------
BIG_VOCAB = 32_000


def _saved_tensor_sizes(model, examples, config) -> list[int]:
    """numel of every tensor autograd saves for the engine's second-order pass (forward, then the backward with
    its graph kept), one reverse micro-batch of `metagrad.engine`."""
    from datasteer.metagrad.engine import Unroll

    unroll = Unroll(model, examples, config, None)
    leaves = [p.detach().requires_grad_(True) for p in unroll.initial]
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        u, first = unroll._first_order(unroll.batches[0][0], leaves)
    terms = [(g * g.detach()).sum() for g in first if g is not None and g.requires_grad]
    torch.autograd.grad(torch.stack(terms).sum(), [u] + leaves, allow_unused=True)
    return sizes


def test_double_backward_keeps_no_vocabulary_sized_activation():
    """Vocabulary 32,000, hidden 16, 4 examples x 32 tokens: the whole-logits graph keeps [4, 32, 32000] tensors
    (logits, softmax); the chunked one keeps nothing larger than the head itself (V x H) beyond one chunk."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=BIG_VOCAB, n_positions=64,
                     attn_implementation="eager")
    model = GPT2LMHeadModel(cfg).double().eval()
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(0, BIG_VOCAB, (32,), generator=g).tolist()} for _ in range(4)]
    base = TrainingConfig(dtype="float64", batch_size=4, optimizer="sgd", learning_rate=0.1, max_length=32)
    logits = 4 * 32 * BIG_VOCAB
    whole = _saved_tensor_sizes(model, examples, base)
    chunked = _saved_tensor_sizes(model, examples, base.model_copy(update={"loss_chunk": 8}))
    head = BIG_VOCAB * 16
    assert max(whole) >= logits and sum(s >= logits for s in whole) >= 2
    assert max(chunked) <= head, max(chunked)
    # what the graph keeps in all, parameters included: whole logits dominate; chunked it is about the parameters
    assert sum(whole) > 4 * sum(chunked), (sum(whole), sum(chunked))


MEMORY_CHILD = """
import json, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
from datasteer.metagrad import TrainingConfig, metagradients
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32000, n_positions=64,
                                   attn_implementation="eager")).double().eval()
g = torch.Generator().manual_seed(0)
examples = [{"input_ids": torch.randint(0, 32000, (32,), generator=g).tolist()} for _ in range(8)]
chunk = None if sys.argv[1] == "none" else int(sys.argv[1])
config = TrainingConfig(dtype="float64", batch_size=8, optimizer="sgd", learning_rate=0.1, max_length=32,
                        loss_chunk=chunk)
metric = lambda m, p: -(p["transformer.wte.weight"][:4] ** 2).sum()
metagradients(model, examples[:1], metric, config.model_copy(update={"batch_size": 1}))  # warm up the allocator
def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM); ru_maxrss would carry the parent's over exec
    f.write("5")
before = status("VmRSS")
metagradients(model, examples, metric, config)
print(json.dumps({"growth": status("VmHWM") - before}))
"""


def test_peak_memory_of_a_reverse_step_drops():
    """Peak RSS growth of `metagradients` in a fresh process, vocabulary 32,000, 8 x 32 tokens in one micro-batch
    (each whole-logits tensor 65 MB in float64): chunks of 16 tokens take the floor down by more than 3x."""
    # a fixed mmap threshold: freed tensors leave RSS, so the peak is what was alive, not what malloc retained
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    growth = {}
    for chunk in ("none", "16"):
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, chunk], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        growth[chunk] = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    assert growth["none"] > 3 * 65e6, growth
    assert growth["16"] * 3 < growth["none"], growth


# -- data parallel: two gloo ranks, chunked, equal one process with whole logits -----------------------------------
DP_CASES = {
    "sgd-momentum-micro": (tiny_gpt2, dict(SETTINGS["sgd-momentum-micro"], batch_size=4, micro_batch_size=1)),
    "adamw-authors": (tiny_llama, dict(SETTINGS["adamw-authors"], batch_size=5)),
}


def _dp_run(chunk: int | None) -> dict:
    examples = make_examples(7)
    weights = torch.linspace(0.5, 1.5, len(examples), dtype=torch.float64)
    out = {}
    for name, (build, settings) in DP_CASES.items():
        result = metagradients(build(), examples, heldout_metric,
                               TrainingConfig(dtype="float64", loss_chunk=chunk, **settings), weights=weights)
        out[name] = {"value": result.value, "scores": result.scores, "losses": result.losses,
                     "params": {k: v.detach().cpu() for k, v in result.params.items()},
                     "world": result.stats["world_size"]}
    return out


def test_two_gloo_ranks_chunked_equal_one_process_whole_logits(tmp_path):
    from tests.conftest import two_processes

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(two_processes("torchrun", "tests.test_metagrad_chunked", str(tmp_path)), cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=False) for r in range(2)]
    single = _dp_run(None)
    for name in DP_CASES:
        for rank in ranks:
            got, want = rank[name], copy.deepcopy(single[name])
            assert got["world"] == 2 and want["world"] == 1
            assert abs(got["value"] - want["value"]) <= REL * abs(want["value"])
            assert rel(got["scores"], want["scores"]) <= REL
            assert got["losses"] == pytest.approx(want["losses"], rel=REL)
            for key, p in want["params"].items():
                assert rel(got["params"][key], p) <= REL, key


if __name__ == "__main__":  # one rank of the data-parallel test, under torchrun
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = _dp_run(3)
    torch.save(results, Path(sys.argv[1]) / f"rank-{dist.get_rank()}.pt")
    dist.destroy_process_group()
