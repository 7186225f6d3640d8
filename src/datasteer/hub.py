"""Model cards, and `datasteer push`: a run's rows (as Parquet) and dataset card, or its model and model card, to a
Hugging Face Hub repository.

- `model_card_text(run_dir, manifest)`: the README.md of a fine-tuned student (a `finetune` run's `model/`) or a DPG
  generator (an arm's `model/`): the YAML header the Hub reads (huggingface_hub's `ModelCardData`: base model,
  library, pipeline tag, tags, the run's provenance under `datasteer:`; the licence left for the user), then what
  was trained on what, how (TRL's trainer and its settings), the outcome and how to load it. `finetune` and `dpg`
  write it into `model/` when they publish the model; `push` renders it again with the repository's name.
- `push(run_dir, repo)`: which repository a run makes is read from its manifest: a `finetune` run or a DPG arm
  (a `dpg` run: its main arm) pushes a model repository (the weights, tokenizer and the card); every other run
  with a dataset card (generate, score, select, profile, probe, inherit, ...) a dataset repository, each rows file
  converted to Parquet with the card's explicit schema (`data/<config>.parquet`) and the card rewritten to name
  those files. The upload is `huggingface_hub`'s `create_repo` and one `create_commit`, against `HF_ENDPOINT` when
  set (tests use a loopback stand-in of the Hub), with the token huggingface_hub finds (HF_TOKEN, or `hf auth
  login`). The token is registered with `secrets`, so no message shows it.

Floor 4: reads runs and rows (below); `finetune` (inheritance) and `dpg` import the model cards from here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from datasteer.errors import ConfigError, InputError, OutputError
from datasteer.rows import (
    CARD_FILE,
    RowsFile,
    _read_jsonl,
    card_metadata,
    parquet_bytes,
    provenance_of,
    provenance_rows,
    read_card,
    table_of,
)
from datasteer.runs import MANIFEST, atomic_write_text
from datasteer.secrets import redact_text

# embedded models and the Hub repositories their weights come from (a card's base_model links to it)
EMBEDDED_HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
MODEL_DIR = "model"
# files of a model directory that are datasteer's bookkeeping, not the model
NOT_UPLOADED = frozenset({".complete", CARD_FILE})
PLACEHOLDER_REPO = "path/to/this/model"

CITATIONS = {
    "dpg": ("Dataset Policy Gradient: Synthetic Data for any Differentiable Target", "2604.08423"),
    "inheritance": ("LLM See, LLM Do: Guiding Data Generation to Target Non-Differentiable Objectives",
                    "2407.01490"),
    "grpo": ("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", "2402.03300"),
}


def base_model_id(spec: str | None) -> str | None:
    """The Hub id a model spec stands for (None for tiny models and local directories)."""
    if not spec:
        return None
    if spec.startswith("embedded:"):
        return EMBEDDED_HUB_IDS.get(spec.split(":", 1)[1])
    if spec.startswith(("tiny:", ".", "/", "~")) or Path(spec).exists() or spec.count("/") != 1:
        return None
    return spec


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"{run_dir} is not a datasteer run directory (no readable {MANIFEST})") from None
    if not isinstance(manifest, dict) or "stage" not in manifest:
        raise InputError(f"{run_dir / MANIFEST} is not a datasteer run manifest")
    return manifest


def _input_run(run_dir: Path, manifest: dict[str, Any], name: str) -> Path | None:
    """The run directory an input file of this run came from (its training data's run), if any."""
    info = (manifest.get("inputs") or {}).get(name)
    if not isinstance(info, dict) or not isinstance(info.get("path"), str):
        return None
    for folder in (Path(info["path"]).parent, run_dir.parent / Path(info["path"]).parent.name):
        if (folder / MANIFEST).is_file():
            return folder
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def model_card_text(run_dir: str | Path, manifest: dict[str, Any] | None = None, *,
                    details: dict[str, Any] | None = None, repo_id: str | None = None) -> str:
    """The README.md of the model of a `finetune` run or a DPG arm (`details`: its summary, default the manifest's).
    `repo_id` names it in the loading example (default a placeholder path)."""
    from huggingface_hub import ModelCardData

    run_dir = Path(run_dir)
    manifest = manifest if manifest is not None else _read_manifest(run_dir)
    stage = manifest.get("stage", "")
    config = manifest.get("config") or {}
    details = details if details is not None else (manifest.get("summary") or {})
    version = (manifest.get("versions") or {}).get("datasteer", "unknown")
    versions = manifest.get("versions") or {}
    where = repo_id or PLACEHOLDER_REPO
    if stage == "finetune":
        spec = config.get("model")
        data_run = _input_run(run_dir, manifest, "rows")
        origin = provenance_of(data_run, _read_manifest(data_run)) if data_run else {}
        kind, trainer, tags, paper = "student", "SFT", ["sft"], "inheritance"
        title = f"{run_dir.name}: a student fine-tuned by datasteer"
        summary = (f"A fine-tuned version of `{spec}` trained with TRL's SFTTrainer ({config.get('method', 'full')} "
                   f"fine-tuning) on {details.get('examples', '?')} rows selected by datasteer (active inheritance, "
                   f"arXiv {CITATIONS['inheritance'][1]}).")
        rows = [("method", config.get("method")), ("epochs", config.get("num_train_epochs")),
                ("learning rate", config.get("learning_rate")),
                ("batch", f"{config.get('per_device_train_batch_size')} per device x "
                          f"{config.get('gradient_accumulation_steps')} accumulation"),
                ("max length", config.get("max_length")), ("steps", details.get("steps")),
                ("final loss", details.get("final_loss")), ("seed", manifest.get("seed"))]
        if config.get("method") == "lora":
            rows.insert(1, ("LoRA", ", ".join(f"{k} {v}" for k, v in (config.get("lora") or {}).items())))
    elif stage.startswith("dpg-"):
        generator, target = config.get("generator") or {}, config.get("target") or {}
        spec = generator.get("model")
        origin = {}
        grpo = config.get("grpo") or {}
        arm = stage.removeprefix("dpg-")
        kind, trainer, tags, paper = "generator", "GRPO", ["grpo", "dpg"], "dpg"
        title = f"{run_dir.parent.name}/{arm}: a DPG generator trained by datasteer"
        reward = "exact metagradients dPhi/dw (DPG)" if arm == "dpg" else f"the {arm} baseline's rewards"
        summary = (f"A generator fine-tuned from `{spec}` with TRL's GRPOTrainer so that a target "
                   f"(`{target.get('model')}`, objective `{target.get('kind')}`) fine-tuned on what it writes scores "
                   f"higher; rewards: {reward} (Dataset Policy Gradient, arXiv {CITATIONS['dpg'][1]}).")
        final = details.get("final_validation") or {}
        rows = [("reward", arm), ("target", f"`{target.get('model')}` ({target.get('kind')})"),
                ("policy steps", grpo.get("max_steps")),
                ("rollouts per step", f"{grpo.get('prompts_per_step')} prompts x {grpo.get('num_generations')}"),
                ("generator learning rate", grpo.get("learning_rate")),
                ("inner fine-tuning", ", ".join(f"{k} {(config.get('training') or {}).get(k)}"
                                                for k in ("optimizer", "learning_rate", "batch_size", "max_length"))),
                ("seed", manifest.get("seed"))]
        rows += [(f"final validation {k}", v) for k, v in final.items() if isinstance(v, (int, float))]
    else:
        raise InputError(f"{run_dir} is a {stage or 'unknown'} run: model cards are for finetune runs and DPG arms")
    origin = {**origin, "model_stage": stage, "datasteer_version": version}
    data = ModelCardData(base_model=base_model_id(spec), library_name="transformers", pipeline_tag="text-generation",
                         tags=["datasteer", "trl", *tags], model_name=title, datasteer=origin)
    lines = ["---", "# license: not set; add the licence (it follows the base model's and the data's terms)",
             data.to_yaml(), "---", "", f"# {title}", "", summary, "",
             "## Use it", "", "```python", "from transformers import pipeline", "",
             f'generator = pipeline("text-generation", model="{where}")',
             'print(generator([{"role": "user", "content": "Write a short poem."}], max_new_tokens=64))',
             "```", "", "## Training", "", "| | |", "|---|---|",
             f"| base model | `{spec}` |", f"| trainer | TRL {trainer}Trainer (trl {versions.get('trl', '?')}) |"]
    lines += [f"| {name} | {_fmt(value)} |" for name, value in rows if value is not None]
    lines += provenance_rows(origin)
    lines += ["", f"Made with datasteer {version} (`datasteer {'finetune' if kind == 'student' else 'dpg'}`); the "
              "run directory's `manifest.json` holds the full config, inputs and package versions.", "",
              "## Licence", "", "Not set: the weights follow the base model's licence and the terms of the models "
              "that wrote the training data; add a `license:` line to the header above before sharing them.", "",
              "## Citation", ""]
    for key in (paper, "grpo") if trainer == "GRPO" else (paper,):
        name, arxiv = CITATIONS[key]
        lines.append(f"- {name}, arXiv:{arxiv}")
    lines.append("- TRL: Transformer Reinforcement Learning, https://github.com/huggingface/trl")
    return "\n".join(lines) + "\n"


def write_model_card(model_dir: str | Path, text: str) -> Path:
    """Write a model card into a published model directory (atomically)."""
    path = Path(model_dir) / CARD_FILE
    atomic_write_text(path, text)
    return path


# ---------------------------------------------------------------- push

@dataclass
class PushResult:
    repo_id: str
    repo_type: str  # "model" or "dataset"
    url: str
    commit: str
    files: list[str]


def _model_dir(run_dir: Path, manifest: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """(the run whose model is pushed, its manifest): the run itself, or a dpg run's main arm."""
    if manifest.get("stage") == "dpg":
        arm = (manifest.get("config") or {}).get("reward", "dpg")
        return run_dir / arm, _read_manifest(run_dir / arm)
    return run_dir, manifest


def _dataset_files(run_dir: Path, repo_id: str) -> dict[str, bytes]:
    """{path in the repository: bytes}: each rows file of the card as Parquet, and the card naming them."""
    files = read_card(run_dir)
    if not files:
        raise InputError(f"{run_dir} has no dataset card ({CARD_FILE}) listing rows files: nothing to push")
    text = (run_dir / CARD_FILE).read_text(encoding="utf-8")
    header_text, body = text[3:].split("\n---", 1)
    header = yaml.safe_load(header_text)
    out: dict[str, bytes] = {}
    renamed: list[RowsFile] = []
    for f in files:
        source = run_dir / f.file
        if not source.is_file():
            raise InputError(f"{source} (listed in the card) is missing; rerun the command that wrote it")
        target = f"data/{f.config}.parquet"
        if source.suffix == ".parquet":
            data = source.read_bytes()
        else:
            data = parquet_bytes(table_of(_read_jsonl(source), f.schema))
        out[target] = data
        renamed.append(replace(f, file=target, bytes=len(data)))
        body = body.replace(f"`{f.file}`", f"`{target}`")
    fresh = card_metadata(renamed)
    header["configs"] = [{**old, "data_files": new["data_files"]}
                         for old, new in zip(header.get("configs") or fresh["configs"], fresh["configs"])]
    header["dataset_info"] = fresh["dataset_info"]
    body = body.replace("path/to/this/directory", repo_id)
    license_line = next((line for line in header_text.splitlines() if line.startswith("# license")), None)
    card = "---\n" + (license_line + "\n" if license_line else "") + yaml.safe_dump(
        header, sort_keys=False, allow_unicode=True, width=1000) + "---" + body
    out[CARD_FILE] = card.encode("utf-8")
    return out


def _model_files(run_dir: Path, manifest: dict[str, Any], repo_id: str) -> dict[str, Any]:
    """{path in the repository: local path or bytes}: the model directory's files and its card."""
    model_dir = run_dir / MODEL_DIR
    if not model_dir.is_dir():
        raise InputError(f"{model_dir} is missing; rerun the command that trains it")
    out: dict[str, Any] = {}
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and path.name not in NOT_UPLOADED and ".tmp-" not in path.name:
            out[path.relative_to(model_dir).as_posix()] = path
    out[CARD_FILE] = model_card_text(run_dir, manifest, repo_id=repo_id).encode("utf-8")
    return out


def _token(token: str | None) -> str | None:
    """The token huggingface_hub would use; registered with `secrets` (through HF_TOKEN, one of the variables it
    masks) so that no error or log line can show it."""
    from huggingface_hub import get_token

    token = token or get_token()
    if token and not os.environ.get("HF_TOKEN"):
        os.environ["HF_TOKEN"] = token
    return token


def push(run_dir: str | Path, repo: str, *, private: bool = False, token: str | None = None,
         endpoint: str | None = None, message: str | None = None) -> PushResult:
    """Upload a finished run to the Hub repository `repo` (created if needed, `private` then): a model (finetune
    run, DPG arm or dpg run) with its card, or the rows of any other run as Parquet with its dataset card."""
    run_dir = Path(run_dir)
    manifest = _read_manifest(run_dir)
    if manifest.get("status") != "complete":
        raise InputError(f"{run_dir} is a {manifest.get('stage')} run that has not finished; rerun its command to "
                         "complete it, then push")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConfigError("HF_HUB_OFFLINE is set: pushing needs the Hub; unset it (and HF_ENDPOINT points "
                          "elsewhere than huggingface.co when set)")
    if not repo or repo.count("/") > 1 or repo.strip() != repo:
        raise ConfigError(f"--repo '{repo}' is not a repository name; use NAME or OWNER/NAME")
    stage = manifest.get("stage", "")
    is_model = stage in ("finetune", "dpg") or stage.startswith("dpg-")
    import httpx
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=_token(token))
    repo_type = "model" if is_model else "dataset"
    try:
        url = api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
        repo_id = url.repo_id
        if is_model:
            source, source_manifest = _model_dir(run_dir, manifest)
            files = _model_files(source, source_manifest, repo_id)
        else:
            files = _dataset_files(run_dir, repo_id)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(data) if isinstance(data, Path)
                                         else data) for name, data in files.items()]
        commit = api.create_commit(repo_id, operations, repo_type=repo_type,
                                   commit_message=message or f"datasteer push: the {stage} run {run_dir.name}")
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        reason = " ".join(redact_text(str(err)).split())
        if status in (401, 403):
            raise ConfigError(f"the Hub refused {repo} ({status}): log in with `hf auth login` or set HF_TOKEN to a "
                              f"token with write access; {reason}") from None
        raise OutputError(f"pushing to {repo} failed: {reason}") from None
    except ValueError as err:  # the Hub's metadata check refused the card
        raise OutputError(f"the Hub refused the card of {run_dir}: {' '.join(redact_text(str(err)).split())}") \
            from None
    except (OSError, httpx.HTTPError) as err:  # the endpoint cannot be reached
        raise OutputError(f"pushing to {repo} failed: {type(err).__name__}: {redact_text(str(err))}") from None
    return PushResult(repo_id=repo_id, repo_type=repo_type, url=str(url), commit=commit.oid, files=list(files))
