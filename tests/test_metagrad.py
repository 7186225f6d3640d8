"""Metagradient engine: exact scores against float64 central differences, train against torch.optim,
checkpoint schedules against each other, and the refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, get_scheduler

from datasteer.errors import ConfigError, InputError
from datasteer.metagrad import TrainingConfig, metagradients, train
from datasteer.metagrad.checkpoint import plan, simulate
from datasteer.metagrad.data import step_batches, step_denominators

VOCAB = 32


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, attn_implementation="eager")
    return GPT2LMHeadModel(cfg).double().eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32, attn_implementation="eager",
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).double().eval()


def make_examples(n: int = 6, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(4, 11, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        row = {"input_ids": ids}
        if i % 3 == 2:  # a "prompt" that is not trained on
            row["labels"] = [-100] * 3 + ids[3:]
        rows.append(row)
    return rows


HELD = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))


def heldout_metric(model, params):
    """Minus the loss on held-out token sequences: a metric through the model."""
    logits = functional_call(model, params, (HELD,)).logits[:, :-1]
    return -F.cross_entropy(logits.reshape(-1, VOCAB), HELD[:, 1:].reshape(-1))


def head_metric(model, params):
    """A metric on the weights alone: a slice of the (tied) LM head pushed toward a pattern."""
    name = "transformer.wte.weight" if "transformer.wte.weight" in params else "lm_head.weight"
    block = params[name][:4, :5]
    pattern = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]] * 4, dtype=block.dtype)
    return -F.softplus(-5.0 * pattern * block).mean()


def finite_differences(model, examples, metric, config, h, weights=None):
    """Central differences with one Richardson step, (4 D(h/2) - D(h)) / 3: error O(h^4), an independent reference.

    Adam is rough: coordinates whose gradient is analytically zero (GPT-2's key biases shift every
    attention logit of a row equally) carry roundoff-sized gradients, where the update g / (|g| + eps)
    bends on the scale of eps; plain central differences then converge only like 1e9 * h^2.
    """
    base = torch.ones(len(examples), dtype=torch.float64) if weights is None else weights

    def central(step):
        out = []
        for i in range(len(examples)):
            values = []
            for sign in (1.0, -1.0):
                w = base.clone()
                w[i] += sign * step
                values.append(float(metric(model, train(model, examples, config, weights=w))))
            out.append((values[0] - values[1]) / (2 * step))
        return torch.tensor(out, dtype=torch.float64)

    return (4 * central(h / 2) - central(h)) / 3


def relative_error(exact: torch.Tensor, approx: torch.Tensor) -> float:
    return float((exact - approx).abs().max() / exact.abs().max())


BASE = dict(dtype="float64", batch_size=3, epochs=2)
CASES = {
    "sgd": (dict(optimizer="sgd", learning_rate=0.1), 1e-5),
    "sgd-momentum-wd": (dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
                        1e-5),
    "sgd-nesterov": (dict(optimizer="sgd", learning_rate=0.05, momentum=0.8, nesterov=True), 1e-5),
    "adam-l2": (dict(optimizer="adam", learning_rate=0.01, weight_decay=0.01), 1e-7),
    "adamw": (dict(optimizer="adamw", learning_rate=0.01, betas=(0.9, 0.95), weight_decay=0.1), 1e-7),
    "adamw-microbatch-linear": (dict(optimizer="adamw", learning_rate=0.01, batch_size=4, micro_batch_size=2,
                                     schedule="linear", warmup_steps=1), 1e-7),
    "sgd-microbatch-cosine": (dict(optimizer="sgd", learning_rate=0.1, momentum=0.5, batch_size=4, micro_batch_size=1,
                                   schedule="cosine", warmup_steps=1, epochs=3), 1e-5),
    # the DPG authors' settings (docs/dpg.md), each changing the math: loss_i over max_length, micro-batch means
    # summed (uneven micro-batches of 2 and 1), optax's eps_root inside Adam's square root, and all of them at once
    "sgd-loss-over-max-length": (dict(optimizer="sgd", learning_rate=0.5, loss_normalization="max_length",
                                      max_length=12), 1e-5),
    "sgd-momentum-summed-microbatches": (dict(optimizer="sgd", learning_rate=0.05, momentum=0.9, micro_batch_size=2,
                                              accumulation="sum"), 1e-5),
    # eps_root smooths Adam's update near zero gradients: differences converge at h = 1e-5 here, as for SGD (at
    # 1e-7 rounding dominates: 3e-7)
    "adamw-eps-root": (dict(optimizer="adamw", learning_rate=0.01, eps_root=1e-6), 1e-5),
    "adamw-authors": (dict(optimizer="adamw", learning_rate=0.01, eps_root=1e-9, micro_batch_size=2,
                           accumulation="sum", loss_normalization="max_length", max_length=12), 1e-5),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("metric", [heldout_metric, head_metric], ids=["heldout-loss", "head-weights"])
def test_scores_match_central_differences(case, metric):
    model = tiny_gpt2()
    examples = make_examples()
    overrides, h = CASES[case]
    config = TrainingConfig(**{**BASE, **overrides})
    result = metagradients(model, examples, metric, config, weights=torch.ones(len(examples)))
    assert result.stats["steps"] >= 3
    assert math.isclose(result.value, float(metric(model, train(model, examples, config))), rel_tol=1e-12)
    fd = finite_differences(model, examples, metric, config, h)
    assert relative_error(result.scores, fd) <= 1e-6, (result.scores, fd)


def _rmsnorm_in_input_dtype(self, hidden_states):
    """LlamaRMSNorm without its float32 round trip, so float64 finite differences are not float32 noise."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.mark.parametrize("overrides,weights", [
    (dict(optimizer="sgd", learning_rate=0.2, momentum=0.9), [0.5, 1.5, 1.0, 0.0, 2.0]),
    (dict(optimizer="adamw", learning_rate=0.02), [0.5, 1.5, 1.0, 0.25, 2.0]),
], ids=["sgd-momentum-zero-weight", "adamw"])
def test_llama_scores_at_non_unit_weights(monkeypatch, overrides, weights):
    from transformers.models.llama import modeling_llama

    # Llama's RMSNorm and eager softmax round-trip through float32; keep them in float64 for the check
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rmsnorm_in_input_dtype)
    softmax = F.softmax
    monkeypatch.setattr(torch.nn.functional, "softmax",
                        lambda x, dim=None, _stacklevel=3, dtype=None: softmax(x, dim=dim, dtype=None))
    model = tiny_llama()
    examples = make_examples(5, seed=3)
    config = TrainingConfig(batch_size=2, epochs=2, dtype="float64", **overrides)
    weights = torch.tensor(weights, dtype=torch.float64)
    result = metagradients(model, examples, heldout_metric, config, weights=weights)
    h = 1e-5 if overrides["optimizer"] == "sgd" else 1e-7
    fd = finite_differences(model, examples, heldout_metric, config, h, weights=weights)
    assert relative_error(result.scores, fd) <= 1e-6, (result.scores, fd)
    assert (result.scores != 0).all()  # a zero-weight example still gets a score: what up-weighting it would do


@pytest.mark.parametrize("optimizer", [
    dict(optimizer="sgd", weight_decay=0.1), dict(optimizer="sgd", momentum=0.9, dampening=0.2, weight_decay=0.1),
    dict(optimizer="sgd", momentum=0.9, nesterov=True), dict(optimizer="adam", weight_decay=0.1),
    dict(optimizer="adamw", weight_decay=0.1), dict(optimizer="adamw", weight_decay=0.0),
    dict(optimizer="adamw", eps_root=1e-3), dict(optimizer="adam", eps_root=1e-9, weight_decay=0.1)])
@pytest.mark.parametrize("step", [0, 3])
def test_optimizer_vjp_matches_autograd(optimizer, step):
    """The hand-written VJP of each update against autograd through the same update, incl. v = 0 coordinates."""
    from datasteer.metagrad.optim import make_optimizer

    opt = make_optimizer(TrainingConfig(**optimizer))
    g = torch.Generator().manual_seed(step)
    params = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)]
    grads = [torch.randn_like(p) for p in params]
    grads[1][:2] = 0.0
    slots = {name: [torch.rand(p.shape, generator=g, dtype=torch.float64) for p in params]
             for name in opt.slot_names}
    if "exp_avg_sq" in slots:
        slots["exp_avg_sq"][1][:2] = 0.0
        slots["exp_avg"][1][:2] = 0.0  # a coordinate that has never had a gradient
    adj_p = [torch.randn_like(p) for p in params]
    adj_s = {name: [torch.randn_like(p) for p in params] for name in opt.slot_names}
    p_in = [p.clone().requires_grad_(True) for p in params]
    s_in = {k: [x.clone().requires_grad_(True) for x in v] for k, v in slots.items()}
    g_in = [x.clone().requires_grad_(True) for x in grads]
    new_p, new_s = opt.update(p_in, s_in, g_in, 0.1, step)
    outputs = new_p + [x for k in opt.slot_names for x in new_s[k]]
    cot = adj_p + [x for k in opt.slot_names for x in adj_s[k]]
    inputs = p_in + [x for k in opt.slot_names for x in s_in[k]] + g_in
    auto = torch.autograd.grad(outputs, inputs, cot, allow_unused=True)
    auto = [torch.zeros_like(x) if a is None else a for a, x in zip(auto, inputs)]
    mine_p, mine_s, mine_g = opt.vjp(params, slots, grads, 0.1, step, [a.clone() for a in adj_p],
                                     {k: [x.clone() for x in v] for k, v in adj_s.items()})
    mine = mine_p + [x for k in opt.slot_names for x in mine_s[k]] + mine_g
    for a, b in zip(auto, mine):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def _reference_training(model, examples, config: TrainingConfig, weights):
    """The same fine-tuning with torch.optim, per-example forward passes (no padding) and transformers' scheduler."""
    model = copy.deepcopy(model).train(False)
    params = [p for p in model.parameters()]
    wd = config.resolved_weight_decay
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum, dampening=config.dampening,
                              nesterov=config.nesterov, weight_decay=wd)
    elif config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.learning_rate, betas=config.betas, eps=config.eps, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(params, lr=config.learning_rate, betas=config.betas, eps=config.eps, weight_decay=wd)
    steps = step_batches(len(examples), config)
    sched = get_scheduler(config.schedule if config.schedule != "constant" else "constant_with_warmup", opt,
                          num_warmup_steps=config.warmup_steps, num_training_steps=len(steps))
    for index in steps:
        opt.zero_grad()
        for i in index:
            ids = torch.tensor([examples[i]["input_ids"]])
            labels = torch.tensor([examples[i].get("labels", examples[i]["input_ids"])])
            logits = model(ids).logits[0, :-1]
            loss_i = F.cross_entropy(logits, labels[0, 1:], ignore_index=-100)
            (weights[i] * loss_i / len(index)).backward()
        opt.step()
        sched.step()
    return dict(model.named_parameters())


@pytest.mark.parametrize("overrides", [
    dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, schedule="linear",
         warmup_steps=2),
    dict(optimizer="adam", learning_rate=0.01, weight_decay=0.05, schedule="cosine", warmup_steps=1),
    dict(optimizer="adamw", learning_rate=0.01, micro_batch_size=2, batch_size=4),
], ids=["sgd-nesterov-linear", "adam-cosine", "adamw-microbatch"])
def test_train_matches_torch_optim(overrides):
    model = tiny_gpt2(seed=2)
    # GPT-2's key biases get an analytically zero gradient (roundoff, ~1e-21). Started at exactly 0, Adam with L2
    # decay turns them chaotic (the decay term wd*p, normalised by Adam, overshoots by lr*wd/eps per step), so two
    # correct implementations part ways on roundoff alone. Non-zero biases keep the comparison well-conditioned.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    examples = make_examples(7, seed=5)
    config = TrainingConfig(**{**dict(dtype="float64", batch_size=3, epochs=3), **overrides})
    weights = torch.linspace(0.5, 1.5, len(examples), dtype=torch.float64)
    ours = train(model, examples, config, weights=weights)
    ref = _reference_training(model, examples, config, weights)
    before = dict(model.named_parameters())
    for name, p in ref.items():
        moved = (p - before[name]).abs().max()
        err = (ours[name] - p).abs().max()
        assert err <= 1e-6 * max(float(p.abs().max()), 1e-12), name
        if "wte" in name:
            assert moved > 1e-4  # training moved it, so the comparison is not vacuous


def test_checkpoint_strategies_agree(tmp_path):
    model = tiny_gpt2()
    examples = make_examples(10, seed=4)
    base = dict(optimizer="adamw", learning_rate=0.01, batch_size=2, epochs=2, dtype="float64")  # 10 steps
    reference = metagradients(model, examples, heldout_metric, TrainingConfig(**base, checkpoint="all"))
    assert reference.stats["peak_states"] == 10 and reference.stats["forward_steps"] == 10
    variants = [dict(checkpoint="replay", replay_k=2), dict(checkpoint="replay", replay_k=3),
                dict(checkpoint="disk", checkpoint_dir=str(tmp_path)),
                dict(checkpoint="auto", memory_budget=5 * reference.stats["state_bytes"])]
    for extra in variants:
        result = metagradients(model, examples, heldout_metric, TrainingConfig(**base, **extra))
        assert (result.scores - reference.scores).abs().max() <= 1e-10, extra
        assert result.value == pytest.approx(reference.value, abs=1e-12)
        if extra["checkpoint"] != "disk":
            assert result.stats["peak_states"] < 10
            assert result.stats["forward_steps"] > 10
    budget = 5 * reference.stats["state_bytes"]
    budgeted = metagradients(model, examples, heldout_metric, TrainingConfig(**base, memory_budget=budget))
    assert budgeted.stats["strategy"] == "replay" and budgeted.stats["peak_states"] <= 5
    assert list(tmp_path.iterdir()) == []  # the disk strategy cleans up after itself


def test_replay_memory_grows_logarithmically():
    peaks = {t: simulate(t, 2).peak for t in (8, 32, 96, 1024)}
    for t, peak in peaks.items():
        assert peak <= math.ceil(math.log2(t)) + 1, (t, peak)
    assert peaks[1024] <= 11 and simulate(1024, None).peak == 1024
    steps = {t: simulate(t, 4).forward_steps for t in (16, 64)}
    assert steps[16] <= 16 * 2 + 16 and steps[64] <= 64 * 3 + 64
    # the budget picks the densest schedule that fits, and says what to do when none fits
    chosen = plan("auto", 96, 100, None, 100 * 20)
    assert chosen.strategy == "replay" and chosen.peak_states <= 20
    assert simulate(96, chosen.k + 1).peak > 20
    assert plan("auto", 96, 100, None, 100 * 96).strategy == "all"
    with pytest.raises(ConfigError, match="disk"):
        plan("auto", 96, 100, None, 100 * 3)


def test_model_left_untouched_and_mode_restored():
    model = tiny_gpt2()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metagradients(model, make_examples(), heldout_metric,
                  TrainingConfig(dtype="float64", batch_size=3, learning_rate=0.1))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_trainable_subset_and_float32():
    model = tiny_gpt2().float()
    examples = make_examples()
    config = TrainingConfig(optimizer="sgd", learning_rate=0.1, batch_size=3, trainable=[r"^transformer\.h\.1\."])
    params = train(model, examples, config)
    frozen_same = torch.equal(params["transformer.wte.weight"], model.transformer.wte.weight)
    trained_moved = not torch.equal(params["transformer.h.1.mlp.c_fc.weight"], model.transformer.h[1].mlp.c_fc.weight)
    assert frozen_same and trained_moved

    result = metagradients(model, examples, heldout_metric, config)  # float32 model and training
    assert result.scores.dtype == torch.float64 and torch.isfinite(result.scores).all()
    config64 = config.model_copy(update={"dtype": "float64"})
    reference = metagradients(model.double(), examples, heldout_metric, config64)
    assert relative_error(reference.scores, result.scores) < 1e-3
    fd = finite_differences(model, examples, heldout_metric, config64, 1e-5)
    assert relative_error(reference.scores, fd) <= 1e-6


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_bf16_autocast_scores_track_float64_with_sgd(make):
    """precision bf16: the model's ops under autocast, the rest float32. With SGD the scores stay within a few percent
    of the float64 ones (measured 0.3-1.7%); they differ from fp32's, so autocast really ran."""
    examples = make_examples(12)
    base = {"optimizer": "sgd", "learning_rate": 0.5, "batch_size": 4, "micro_batch_size": 2}
    reference = metagradients(make(), examples, heldout_metric, TrainingConfig(dtype="float64", **base)).scores
    fp32 = metagradients(make().float(), examples, heldout_metric, TrainingConfig(**base)).scores
    bf16 = metagradients(make().float(), examples, heldout_metric, TrainingConfig(precision="bf16", **base))
    assert relative_error(reference, fp32) < 1e-4
    assert 1e-4 < relative_error(reference, bf16.scores) < 0.05
    assert F.cosine_similarity(reference, bf16.scores, dim=0) > 0.999
    trained = train(make().float(), examples, TrainingConfig(precision="bf16", **base))
    assert all(t.dtype == torch.float32 for t in trained.values())  # float32 master weights


def test_reduced_precision_refusals():
    with pytest.raises(ValueError, match="Adam's update divides"):
        TrainingConfig(precision="bf16", optimizer="adamw")
    with pytest.raises(ValueError, match="needs dtype float32"):
        TrainingConfig(precision="bf16", optimizer="sgd", dtype="float64")
    with pytest.raises(ConfigError, match="tf32 is a CUDA format"):
        metagradients(tiny_gpt2().float(), make_examples(), heldout_metric,
                      TrainingConfig(precision="tf32", optimizer="sgd"))
    # the TF32 switch is put back however the run ends
    from datasteer.metagrad.engine import _tf32

    before = torch.backends.cuda.matmul.fp32_precision
    with pytest.raises(RuntimeError), _tf32(True):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        raise RuntimeError
    assert torch.backends.cuda.matmul.fp32_precision == before


def test_refusals():
    examples = make_examples()
    sdpa = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32,
                                      attn_implementation="sdpa"))
    with pytest.raises(ConfigError, match="eager"):
        metagradients(sdpa, examples, heldout_metric, TrainingConfig())
    model = tiny_gpt2()
    with pytest.raises(InputError, match="no trained token"):
        train(model, [{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}], TrainingConfig())
    with pytest.raises(InputError, match="weights has 2 entries"):
        train(model, examples, TrainingConfig(), weights=[1.0, 2.0])
    with pytest.raises(InputError, match="NaN"):
        train(model, examples, TrainingConfig(), weights=[float("nan")] * len(examples))
    with pytest.raises(InputError, match="0-d tensor"):
        metagradients(model, examples, lambda m, p: p["transformer.wte.weight"], TrainingConfig(dtype="float64"))
    with pytest.raises(InputError, match="does not depend"):
        metagradients(model, examples, lambda m, p: torch.tensor(1.0), TrainingConfig(dtype="float64"))
    with pytest.raises(InputError, match="no examples"):
        train(model, [], TrainingConfig())
    with pytest.raises(ConfigError, match="matched nothing"):
        train(model, examples, TrainingConfig(trainable=["no-such-layer"]))
    with pytest.raises(ValueError, match="exceeds batch_size"):
        TrainingConfig(batch_size=2, micro_batch_size=4)
    with pytest.raises(ValueError, match="not a size"):
        TrainingConfig(memory_budget="lots")
    assert TrainingConfig(memory_budget="2GiB").memory_budget == 2 * 2**30


# -- the DPG authors' settings (docs/dpg.md); their metagradients are checked in CASES above ------------------
def test_loss_over_max_length_is_the_summed_token_loss_over_max_length():
    """loss_i = summed token loss / max_length = the default's mean token loss reweighted by n_i / max_length."""
    model, examples = tiny_gpt2(), make_examples()
    mean = TrainingConfig(optimizer="sgd", learning_rate=0.5, batch_size=3, epochs=2, dtype="float64", max_length=8)
    full = mean.model_copy(update={"loss_normalization": "max_length"})
    trained = torch.tensor([sum(label != -100 for label in e.get("labels", e["input_ids"])[1:8]) for e in examples],
                           dtype=torch.float64)
    reweighted = train(model, examples, mean, weights=trained / 8)
    for name, p in train(model, examples, full).items():
        torch.testing.assert_close(p, reweighted[name], rtol=1e-12, atol=1e-14)
    assert not torch.equal(reweighted["transformer.wte.weight"], train(model, examples, mean)["transformer.wte.weight"])


def test_summed_micro_batches_are_the_mean_times_their_number():
    """accumulation 'sum' over 3 micro-batches of 1 is the batch mean at 3 x the learning rate (SGD), values and
    metagradients alike; micro-batches are cut from the whole step, so a rank's share does not change them."""
    model, examples = tiny_gpt2(), make_examples()
    summed = TrainingConfig(optimizer="sgd", learning_rate=0.05, batch_size=3, micro_batch_size=1, epochs=2,
                            dtype="float64", accumulation="sum")
    mean = summed.model_copy(update={"accumulation": "mean", "learning_rate": 0.15})
    a, b = (metagradients(model, examples, heldout_metric, c) for c in (summed, mean))
    assert a.value == pytest.approx(b.value, rel=1e-12)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-10, atol=0.0)
    assert a.losses == pytest.approx([3 * loss for loss in b.losses], rel=1e-12)
    uneven = TrainingConfig(batch_size=5, micro_batch_size=2, accumulation="sum")
    assert step_denominators(5, uneven) == [2, 2, 2, 2, 1]
    assert step_denominators(5, uneven.model_copy(update={"accumulation": "mean"})) == [5] * 5


def _optax_adamw(params, grads_per_step, lr, b1, b2, eps, eps_root, wd):
    """optax.adamw as its code reads (scale_by_adam, add_decayed_weights, scale_by_learning_rate), written out."""
    mu = [torch.zeros_like(p) for p in params]
    nu = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        out = []
        for i, (p, g) in enumerate(zip(params, grads)):
            mu[i] = b1 * mu[i] + (1 - b1) * g
            nu[i] = b2 * nu[i] + (1 - b2) * g * g
            mu_hat, nu_hat = mu[i] / (1 - b1**t), nu[i] / (1 - b2**t)
            out.append(p - lr * (mu_hat / (torch.sqrt(nu_hat + eps_root) + eps) + wd * p))
        params = out
    return params


def test_eps_root_is_optax_adam():
    from datasteer.metagrad.optim import make_optimizer

    g = torch.Generator().manual_seed(0)
    params = [torch.randn(4, 3, generator=g, dtype=torch.float64)]
    steps = [[torch.randn(4, 3, generator=g, dtype=torch.float64) * 1e-4] for _ in range(3)]
    steps[1][0][0] = 0.0  # a row without gradient for a step
    config = TrainingConfig(optimizer="adamw", betas=(0.9, 0.95), eps=1e-8, eps_root=1e-9, weight_decay=1e-4)
    opt = make_optimizer(config)
    ours, slots = params, opt.init(params)
    for t, grads in enumerate(steps):
        ours, slots = opt.update(ours, slots, grads, 5e-6, t)
    reference = _optax_adamw(params, steps, 5e-6, 0.9, 0.95, 1e-8, 1e-9, 1e-4)
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-14, atol=1e-18)
    without = make_optimizer(config.model_copy(update={"eps_root": 0.0}))
    plain, slots = params, without.init(params)
    for t, grads in enumerate(steps):
        plain, slots = without.update(plain, slots, grads, 5e-6, t)
    assert (plain[0] - ours[0]).abs().max() > 1e-9  # at gradients ~1e-4, eps_root 1e-9 changes the steps
    with pytest.raises(ValueError, match="eps_root"):
        TrainingConfig(optimizer="sgd", eps_root=1e-9)


def untied_head_metric(model, params):
    """A pattern pushed into a slice of the untied LM head (not the embedding)."""
    block = params["lm_head.weight"][:4, :5]
    pattern = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]] * 4, dtype=block.dtype)
    return -F.softplus(-5.0 * pattern * block).mean()


@pytest.mark.parametrize("overrides, h", [
    (dict(optimizer="sgd", learning_rate=0.1, momentum=0.9), 1e-5),
    (dict(optimizer="adamw", learning_rate=0.01, eps_root=1e-9), 1e-5),
], ids=["sgd-momentum", "adamw-eps-root"])
@pytest.mark.parametrize("metric", [heldout_metric, untied_head_metric], ids=["heldout-loss", "head-weights"])
def test_untied_head_scores_match_central_differences(overrides, h, metric):
    """`target.untie` (the DPG authors' GPT-2): the LM head a parameter of its own, equal to the embedding at first;
    they then train apart, and the metagradients through both match finite differences."""
    from datasteer.dpg.targets import untie_lm_head

    tied, model = tiny_gpt2(), tiny_gpt2()
    assert untie_lm_head(model) == "lm_head.weight"
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    model.tie_weights()  # the config no longer ties them: a later tie_weights leaves them apart
    assert model.lm_head.weight is not model.transformer.wte.weight
    with pytest.raises(ConfigError, match="already separate"):
        untie_lm_head(model)
    examples = make_examples()
    config = TrainingConfig(**{**BASE, **overrides})
    params = train(model, examples, config)
    assert (params["lm_head.weight"] - params["transformer.wte.weight"]).abs().max() > 1e-4
    result = metagradients(model, examples, metric, config)
    fd = finite_differences(model, examples, metric, config, h)
    assert relative_error(result.scores, fd) <= 1e-6, (result.scores, fd)
    if metric is heldout_metric:  # untying changes the trained model, so the scores too
        assert relative_error(result.scores, metagradients(tied, examples, metric, config).scores) > 1e-3


# -- datasteer attribute -------------------------------------------------------------------------------
def _write(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_attribute_cli_scores_rows(tmp_path):
    import json

    from datasteer.cli import main

    held = "the quick brown fox jumps over the lazy dog"
    rows = [{"text": held}, {"text": "zebra quantum yellow seventeen marmalade"},
            {"prompt": "Name an animal.", "completion": "A fox, quick and brown."},
            {"text": "dogs and foxes are lazy and quick"}]
    data = _write(tmp_path / "rows.jsonl", rows)
    (tmp_path / "held.txt").write_text(held + "\n")
    out = tmp_path / "scored.jsonl"
    main(["attribute", str(data), "--eval-texts", str(tmp_path / "held.txt"), "--model", "tiny:gpt2", "--out", str(out),
          "-q", "--set", "training.optimizer=sgd", "--set", "training.learning_rate=0.5",
          "--set", "training.batch_size=2", "--set", "training.dtype=float64"])
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "metagrad"} for r in scored] == rows
    scores = [r["metagrad"] for r in scored]
    # training on the held-out text itself lowers the held-out loss the most: the largest, positive score
    assert scores[0] > 0 and scores[0] == max(scores)
    meta = json.loads((tmp_path / "scored.jsonl.meta.json").read_text())
    assert meta["rows"] == 4 and meta["stats"]["steps"] == 2 and meta["metric"].startswith("-heldout_loss")
    assert meta["value"] < 0


def test_attribute_cli_errors(tmp_path, capsys):
    from datasteer.cli import main

    data = _write(tmp_path / "rows.jsonl", [{"question": "no usable field"}])
    (tmp_path / "held.txt").write_text("held out\n")
    out = tmp_path / "scored.jsonl"
    cases = [
        (["attribute", str(data), "--model", "tiny:gpt2", "--out", str(out)], "--eval"),
        (["attribute", str(data), "--eval-texts", str(tmp_path / "held.txt"), "--model", "tiny:gpt2",
          "--out", str(out)], "neither a 'text'"),
        (["attribute", str(tmp_path / "missing.jsonl"), "--eval-texts", "x.txt", "--out", str(out)], "not found"),
        (["attribute", str(data), "--eval-texts", str(tmp_path / "held.txt"), "--out", str(out),
          "--set", "training.optimizer=rmsprop"], "optimizer"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "scored.jsonl.meta.json").exists()
