"""DPG targets: pattern rendering, QR decoding back to the payload, Phi values and gradients, readouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from datasteer.dpg.glyphs import from_file, from_rows, glyph, qr, to_rows
from datasteer.dpg.targets import custom, l2_norm, lm_head_pattern, parameter_name, text_loss, writable_token_ids
from datasteer.errors import ConfigError, InputError
from datasteer.metagrad import TrainingConfig, metagradients, train


def test_glyph_67_is_the_papers_7_by_6_pattern():
    assert to_rows(glyph("67")) == ["######", "#....#", "#....#", "###..#", "#.#..#", "#.#..#", "###..#"]
    wide = glyph("Hi!")  # 5x7 letters with one blank column between glyphs
    assert wide.shape == (7, 17) and set(wide.unique().tolist()) == {-1.0, 1.0}
    assert to_rows(wide)[3] == "#####" + "." + "..#.." + "." + "..#.."
    with pytest.raises(InputError, match="no glyph for '@'"):
        glyph("a@")
    with pytest.raises(InputError, match="unknown font"):
        glyph("1", font="9x9")


def test_pattern_files_roundtrip(tmp_path):
    path = tmp_path / "smile.txt"
    path.write_text("#..#\n....\n#..#\n.##.\n")
    assert to_rows(from_file(path)) == ["#..#", "....", "#..#", ".##."]
    path.write_text("#..#\n#.#\n")
    with pytest.raises(InputError, match="row 2 must be 4 characters"):
        from_file(path)
    with pytest.raises(InputError, match="not found"):
        from_file(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="no pattern rows"):
        from_rows(["", "  "])


def test_qr_pattern_decodes_back_to_its_payload():
    cv2 = pytest.importorskip("cv2")
    import numpy as np

    pattern = qr("datasteer")
    assert pattern.shape == (21, 21)  # version 1
    image = np.pad(np.where(pattern.numpy() > 0, 0, 255).astype(np.uint8), 4, constant_values=255)
    image = cv2.resize(image, None, fx=10, fy=10, interpolation=cv2.INTER_NEAREST)
    assert cv2.QRCodeDetector().detectAndDecode(image)[0] == "datasteer"
    with pytest.raises(InputError, match="too long"):
        qr("x" * 200, version=1)


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32,
                                      attn_implementation="eager")).double().eval()


def test_lm_head_names_and_writable_tokens():
    from datasteer.models import load_tokenizer

    assert parameter_name(tiny_gpt2()) == "transformer.wte.weight"  # tied head
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                         tie_word_embeddings=False))
    assert parameter_name(llama) == "lm_head.weight"
    with pytest.raises(ConfigError, match="no parameter"):
        parameter_name(llama, "nope")
    tokenizer = load_tokenizer("tiny:gpt2")
    ids = writable_token_ids(tokenizer, 21)
    texts = [tokenizer.decode([i]) for i in ids]
    assert len(set(ids)) == 21 and all(len(t) == 1 and t.isprintable() and not t.isspace() for t in texts)
    assert not set(ids) & set(tokenizer.all_special_ids)


def test_pattern_phi_gradient_and_readout():
    model = tiny_gpt2()
    pattern = glyph("67")
    target = lm_head_pattern(model, pattern, token_ids=list(range(10, 17)), dims=list(range(2, 8)), beta=20.0)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert target.readout(model, params)["pixel_accuracy"] == 0.0  # nothing moved yet
    assert float(target.phi(model, params)) == pytest.approx(-F.softplus(torch.tensor(0.0)).item())
    # move the slice toward the pattern on 30 of the 42 pixels
    head = params["transformer.wte.weight"]
    moved = pattern.clone().double() * 0.01
    moved.view(-1)[30:] *= -1
    head[10:17, 2:8] += moved
    assert target.readout(model, params)["pixel_accuracy"] == pytest.approx(30 / 42)
    # the gradient: autograd against the closed form beta * S * sigmoid(-beta * S * delta) / N
    leaf = head.clone().requires_grad_(True)
    phi = target.phi(model, {**params, "transformer.wte.weight": leaf})
    (grad,) = torch.autograd.grad(phi, leaf)
    s = pattern.double()
    expected = 20.0 * s * torch.sigmoid(-20.0 * s * moved) / 42
    torch.testing.assert_close(grad[10:17, 2:8], expected, rtol=1e-12, atol=1e-15)
    assert grad.abs().sum() == grad[10:17, 2:8].abs().sum()  # nothing outside the slice
    with pytest.raises(ConfigError, match="7 x 6"):
        lm_head_pattern(model, pattern, token_ids=[1, 2], dims=list(range(6)))
    with pytest.raises(ConfigError, match="outside the LM head"):
        lm_head_pattern(model, pattern, token_ids=list(range(60, 67)), dims=list(range(6)))


def test_l2_and_text_loss_targets():
    from datasteer.models import load_model

    model = tiny_gpt2()
    params = dict(model.named_parameters())
    target = l2_norm(model)
    head = params["transformer.wte.weight"]
    assert target.readout(model, params)["l2"] == pytest.approx(float(head.detach().norm()))
    (grad,) = torch.autograd.grad(target.phi(model, params), head)
    torch.testing.assert_close(grad, -head.detach() / head.detach().norm())

    loaded = load_model("tiny:gpt2", attn_implementation="eager")
    uuid = "3f2b9c1e-8d4a-4f6b-9a2e-7c5d1b0e4f3a"
    loss_target = text_loss([uuid], loaded.tokenizer)
    ids = torch.tensor([loss_target.examples[0]["input_ids"]])
    reference = float(loaded.model(ids, labels=ids).loss)  # transformers' own loss, an independent reference
    got = loss_target.readout(loaded.model, dict(loaded.model.named_parameters()))
    assert got["loss"] == pytest.approx(reference, rel=1e-5) and got["phi"] == -got["loss"]
    with pytest.raises(InputError, match="non-empty"):
        text_loss(["  "], loaded.tokenizer)



def test_last_word_text_loss_is_lambadas_split_and_its_metagradients_match_differences():
    """score last_word: lm-eval's LAMBADA split (context = the words before the last space, target = " " + the
    last word), scored as the word's summed loss; checked against the model's own log-probabilities in float64, and the
    metagradients through it against central differences."""
    from datasteer.models import load_model
    from tests.test_metagrad import finite_differences, relative_error

    loaded = load_model("tiny:gpt2?seed=3", attn_implementation="eager")
    model, tokenizer = loaded.model.double().eval(), loaded.tokenizer
    texts = ["the old fisherman pulled in his net and found a silver key",
             "after the long storm she walked home through the rain to Zanzibar"]
    target = text_loss(texts, tokenizer, score="last_word")
    word = tokenizer(" Zanzibar", add_special_tokens=False)["input_ids"]
    example = target.examples[1]
    assert len(word) > 1 and example["input_ids"][-len(word):] == word
    assert example["labels"] == [-100] * (len(example["input_ids"]) - len(word)) + word
    sums = []  # an independent reference: log_softmax of the model's float64 logits at the word's positions
    for row in target.examples:
        logprobs = torch.log_softmax(model(torch.tensor([row["input_ids"]])).logits[0], dim=-1)
        n = len(row["input_ids"])
        sums.append(-sum(float(logprobs[j - 1, row["input_ids"][j]]) for j in range(n) if row["labels"][j] != -100))
    params = dict(model.named_parameters())
    got = target.readout(model, params)
    assert got["loss"] == pytest.approx(sum(sums) / 2, rel=1e-10) and got["phi"] == -got["loss"]
    per_128 = text_loss(texts, tokenizer, score="last_word", length=128).readout(model, params)
    assert per_128["loss"] == pytest.approx(sum(sums) / 2 / 128, rel=1e-10)
    short = text_loss(texts, tokenizer, max_length=len(word) + 2, score="last_word").examples[1]
    assert short["input_ids"][-len(word):] == word and len(short["input_ids"]) == len(word) + 2  # lost its start
    with pytest.raises(InputError, match="words before its last one"):
        text_loss(["Zanzibar"], tokenizer, score="last_word")
    with pytest.raises(InputError, match="not one of"):
        text_loss(texts, tokenizer, score="first_word")

    examples = [{"input_ids": tokenizer(t, add_special_tokens=False)["input_ids"]}
                for t in ["a silver key", "the rain in the night", "he found the key", "home to the sea"]]
    config = TrainingConfig(dtype="float64", optimizer="sgd", learning_rate=0.5, batch_size=2)
    result = metagradients(model, examples, target, config)
    fd = finite_differences(model, examples, target, config, 1e-5)
    assert relative_error(result.scores, fd) <= 1e-6, (result.scores, fd)

def double_head(model, params):
    """A custom target for the test below."""
    return params["transformer.wte.weight"].sum() * 2


def test_custom_target_and_targets_as_metagradient_metrics():
    model = tiny_gpt2()
    params = dict(model.named_parameters())
    target = custom("tests.test_dpg_targets:double_head")
    assert float(target(model, params)) == pytest.approx(2 * float(params["transformer.wte.weight"].sum()))
    with pytest.raises(ConfigError, match="package.module:function"):
        custom("no_colon")

    # every target is a metric for the engine: the pattern target's scores against central differences
    pattern = lm_head_pattern(model, glyph("67"), token_ids=list(range(10, 17)), beta=20.0)
    examples = [{"input_ids": torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(i)).tolist()}
                for i in range(4)]
    config = TrainingConfig(optimizer="sgd", learning_rate=0.5, batch_size=2, dtype="float64")
    result = metagradients(model, examples, pattern, config)
    h = 1e-5
    fd = []
    for i in range(4):
        values = []
        for sign in (1, -1):
            w = torch.ones(4, dtype=torch.float64)
            w[i] += sign * h
            values.append(float(pattern(model, train(model, examples, config, weights=w))))
        fd.append((values[0] - values[1]) / (2 * h))
    fd = torch.tensor(fd, dtype=torch.float64)
    assert float((result.scores - fd).abs().max() / fd.abs().max()) < 1e-6


def test_qr_error_level_and_mask_choose_the_code():
    assert qr("https://arxiv.org/abs/2604.08423").shape == (25, 25)  # 32 bytes: version 2 even at level L
    assert qr("bit.ly/3Ka4jDS", "M").shape == (21, 21)  # 14 bytes fit version 1 at M
    assert not torch.equal(qr("bit.ly/3Ka4jDS", "M", mask=1), qr("bit.ly/3Ka4jDS", "M", mask=2))
    assert torch.equal(qr("bit.ly/3Ka4jDS", "M"), qr("bit.ly/3Ka4jDS", "M", mask=1))  # segno's choice here
    with pytest.raises(InputError, match="too long"):
        qr("bit.ly/3Ka4jDS-x", "M", version=1)


def test_pattern_sign_and_layout_options():
    from datasteer.dpg.targets import LMHeadPatternSpec

    bitmap = ["##.", "...", "#.."]
    plain = LMHeadPatternSpec(model="tiny:gpt2", pattern={"bitmap": bitmap})
    theirs = LMHeadPatternSpec(model="tiny:gpt2", pattern={"bitmap": bitmap}, ink=-1, transpose=True)
    image = from_rows(bitmap)
    assert torch.equal(plain.signs(), image) and torch.equal(theirs.signs(), -image.T)
    for spec in (plain, theirs):
        assert torch.equal(spec.image(spec.signs()), image)  # the report's image reads as the pattern
    model = tiny_gpt2()
    target = lm_head_pattern(model, theirs.signs(), token_ids=[3, 4, 5], dims=[0, 1, 2])
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    # the weights that fall on ink score: image row r, column c is hidden dim r of token row c
    params[target.param][4, 0] -= 0.1   # image (0, 1): ink
    params[target.param][5, 0] += 0.1   # image (0, 2): background
    assert target.readout(model, params)["pixel_accuracy"] == pytest.approx(2 / 9)
    with pytest.raises(ValueError, match="exactly one of glyph, qr, file, bitmap"):
        LMHeadPatternSpec(model="tiny:gpt2", pattern={"bitmap": bitmap, "glyph": "6"})


def test_the_report_decodes_the_final_lm_head_image_and_shows_where_decoding_stops(tmp_path):
    """The QR recipe's code drawn as the report draws LM-head images decodes to its payload; flipped pixels in the
    data region are corrected up to the code's capacity (level M, version 1: 4 codewords) and stop decoding soon
    after; a flip in a finder pattern can stop it alone."""
    pytest.importorskip("cv2")
    from types import SimpleNamespace

    import numpy as np

    from datasteer.dpg.config import DPGConfig
    from datasteer.dpg.report import decode_qr, qr_picture, qr_section
    from datasteer.recipes import recipe_config

    spec = recipe_config(DPGConfig, "gpu-paper-qr").target
    image = spec.pattern.render().numpy()
    picture = qr_picture(image)
    assert picture.shape == (29 * 8, 29 * 8) and set(np.unique(picture)) == {0, 255}
    assert picture[4 * 8, 4 * 8] == 0  # the top-left finder's corner module is dark: ink is drawn dark
    assert decode_qr(image) == "bit.ly/3Ka4jDS"
    assert decode_qr(-image) is None  # the same code in the opposite sign is not read

    function = np.zeros((21, 21), bool)  # finders with separators and format bits, timing patterns
    function[:9, :9] = function[:9, 13:] = function[13:, :9] = True
    function[6, :] = function[:, 6] = True
    data = np.flatnonzero(~function)
    assert len(data) == 26 * 8  # version 1: 26 codewords
    rng = np.random.default_rng(0)
    decoded = {}
    for flips in (0, 2, 4, 8, 16):
        hits = 0
        for _ in range(20):
            noisy = image.copy()
            noisy.flat[rng.choice(data, flips, replace=False)] *= -1
            hits += decode_qr(noisy) == "bit.ly/3Ka4jDS"
        decoded[flips] = hits
    assert decoded[0] == decoded[2] == decoded[4] == 20  # at most 4 codewords hit: always corrected
    assert decoded[8] <= 5 and decoded[16] == 0
    corner = image.copy()
    corner[3, 3] *= -1
    corner[3, 17] *= -1
    corner[17, 3] *= -1  # one module in each finder's centre
    assert decode_qr(corner) is None

    # the report's section: the final slice of each arm, in the target's layout and sign
    final = spec.signs().numpy() * 0.01
    final[0, 10] *= -1  # one wrong pixel still decodes
    arms = [SimpleNamespace(arm="dpg", slices=[{"step": 0, "delta": (-final).tolist()},
                                                {"step": 768, "delta": final.tolist()}]),
            SimpleNamespace(arm="naive", slices=[{"step": 768, "delta": (-final).tolist()}])]
    lines, summary = qr_section(spec, arms)
    assert summary["dpg"] == {"step": 768, "decoded": "bit.ly/3Ka4jDS", "matches": True, "wrong_pixels": 1}
    assert summary["naive"]["decoded"] is None and summary["naive"]["wrong_pixels"] == 440
    assert any("dpg, step 768: 1 of 441 pixels wrong; decoded 'bit.ly/3Ka4jDS' (the payload)" in x for x in lines)
