"""Read and write rows: JSONL, JSON, Parquet, CSV and Hugging Face `datasets`.

Every reader raises `InputError` with the file and row number of the first problem, so that a
malformed row is a one-line message, not a traceback.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from datasteer.config import StrictModel
from datasteer.errors import InputError, MissingDependencyError
from datasteer.runs import sha256_file

HF_PREFIX = "hf:"
BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = Path(__file__).resolve().parent / "data" / "prompts"


def builtin_prompt_sets() -> dict[str, Path]:
    """Prompt sets shipped in the package, by name (`builtin:NAME`)."""
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.jsonl"))}


def resolve_path(path: str | Path) -> Path:
    """A file path, with `builtin:NAME` turned into the shipped prompt set of that name."""
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX):]
        sets = builtin_prompt_sets()
        if name not in sets:
            raise InputError(f"unknown built-in prompt set '{name}'; available: "
                             + ", ".join(f"{BUILTIN_PREFIX}{n}" for n in sets))
        return sets[name]
    return Path(path)


class PromptsConfig(StrictModel):
    """Where prompts come from: a JSONL/JSON/Parquet/CSV file, `builtin:NAME` or a `datasets` name (hf:NAME)."""

    path: str = Field(..., description="a .jsonl/.json/.parquet/.csv file, builtin:NAME or hf:DATASET")
    prompt_field: str = Field("prompt", description="column holding the prompt text; a dotted path reaches into "
                              "nested records (prompt.text for the hub's RealToxicityPrompts)")
    template: str | None = Field(None, description="wrap every prompt: the text with {prompt} replaced by the "
                                 "row's prompt (e.g. an instruction to continue a RealToxicityPrompts prefix)")
    id_field: str | None = Field(None, description="column holding a stable prompt id; default: 'prompt_id' or "
                                 "'id' when present, else the row number")
    split: str = Field("train", description="split, for hf:DATASET prompts")
    subset: str | None = Field(None, description="the dataset's config name, for hf:DATASET prompts (e.g. "
                               "20231101.en for wikimedia/wikipedia)")
    max_chars: int | None = Field(None, ge=1, description="cut each prompt text (before the template) to at most N "
                                  "characters, at the last whitespace before the cut: long articles as prompts")
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")

    @model_validator(mode="before")
    @classmethod
    def _path_alone(cls, data: Any) -> Any:
        """`prompts: file.jsonl` is short for `prompts: {path: file.jsonl}`."""
        return {"path": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _template_has_slot(self) -> PromptsConfig:
        if self.template is not None and "{prompt}" not in self.template:
            raise ValueError(f"prompts.template {self.template!r} has no {{prompt}} slot for the prompt text")
        return self

    def apply(self, text: str) -> str:
        """The prompt as the model sees it: the text cut to `max_chars`, then `template` with {prompt} replaced
        (other braces stay as written)."""
        text = cut_text(text, self.max_chars)
        return text if self.template is None else self.template.replace("{prompt}", text)


def cut_text(text: str, limit: int | None) -> str:
    """`text` cut to at most `limit` characters, at the last whitespace before the cut when there is one."""
    if limit is None or len(text) <= limit:
        return text
    head = text[:limit]
    space = max(head.rfind(" "), head.rfind("\n"))
    return (head[:space] if space > 0 else head).rstrip()


def field_value(row: dict[str, Any], field: str) -> tuple[bool, Any]:
    """(found, value) of `field` in `row`: the column of that name, else a dotted path into nested records."""
    if field in row:
        return True, row[field]
    value: Any = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    prompt: str


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl/.json/.parquet/.csv file (or a `builtin:` prompt set) as dicts."""
    path = resolve_path(path)
    if not path.exists():
        raise InputError(f"file not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a directory; give a .jsonl, .json, .parquet or .csv file")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet,
               ".csv": _read_csv}
    if suffix in readers:
        try:
            return readers[suffix](path)
        except OSError as err:  # permission denied, an I/O error: one line naming the file
            raise InputError(f"cannot read {path}: {err.strerror or type(err).__name__}; check the file and its "
                             "permissions") from None
    raise InputError(f"{path}: unsupported file type '{suffix}'; use .jsonl, .json, .parquet or .csv")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or remove that line") from None
                if not isinstance(row, dict):
                    raise InputError(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
                rows.append(row)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; convert it to UTF-8") from None
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and path.read_text(encoding="utf-8")[:err.pos].strip().startswith("{"):
            return _read_jsonl(path)  # JSON lines under a .json name (RealToxicityPrompts' own files are)
        raise InputError(f"{path}: not a valid UTF-8 JSON file ({err}); fix the file") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not a valid UTF-8 JSON file ({err}); fix the file") from None
    if isinstance(data, dict):
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f"{path}: expected a JSON list of objects (or JSONL, one object per line)")
    return data


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise InputError(f"{path}: not a readable Parquet file ({type(err).__name__}); check the file") from None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = []
            for lineno, row in enumerate(reader, 2):
                if None in row or any(v is None for v in row.values()):
                    raise InputError(f"{path}:{lineno}: wrong number of fields for header {reader.fieldnames}")
                rows.append(dict(row))
            return rows
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text; convert it to UTF-8") from None
    except csv.Error as err:
        raise InputError(f"{path}: malformed CSV ({err})") from None


def _read_hf(name: str, split: str, subset: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError("reading prompts from a datasets name", "pip install datasets") from None
    if limit is not None and "[" not in split:  # with a limit only its first rows are materialised
        split = f"{split}[:{limit}]"
    try:
        return list(datasets.load_dataset(name, subset, split=split))
    except Exception as err:  # datasets raises many types for "not found / offline"
        raise InputError(f"could not load dataset '{name}' split '{split}' ({type(err).__name__}); "
                         "check the name, or give a local .jsonl/.parquet/.csv file") from None


def read_prompts(config: PromptsConfig) -> list[Prompt]:
    """Prompts with stable ids, validated: no empty text, no duplicate ids, at least one prompt."""
    if config.path.startswith(HF_PREFIX):
        source = config.path[len(HF_PREFIX):]
        rows = _read_hf(source, config.split, config.subset, config.limit)
    else:
        source = config.path
        rows = read_rows(config.path)
    if not rows:
        raise InputError(f"{source}: no prompts found; the prompt set is empty")
    id_field = config.id_field
    if id_field is None:
        id_field = next((f for f in ("prompt_id", "id") if f in rows[0]), None)
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        where = f"{source}: row {index + 1}"
        found, text = field_value(row, config.prompt_field)
        if not found:
            raise InputError(f"{where} has no '{config.prompt_field}' field (fields: {', '.join(map(str, row))}); "
                             "pass --prompt-field to name the prompt column")
        if not isinstance(text, str):
            raise InputError(f"{where}: '{config.prompt_field}' must be text, got {type(text).__name__}")
        if not text.strip():
            raise InputError(f"{where}: the prompt is empty; remove the row or fill it in")
        if id_field is not None:
            if row.get(id_field) is None:
                raise InputError(f"{where} has no '{id_field}' value; give every row an id or drop the id column")
            prompt_id = str(row[id_field])
        else:
            prompt_id = str(index)
        if prompt_id in seen:
            raise InputError(f"{where}: duplicate prompt id '{prompt_id}'; ids must be unique")
        seen.add(prompt_id)
        prompts.append(Prompt(prompt_id=prompt_id, prompt=config.apply(text)))
        if config.limit is not None and len(prompts) >= config.limit:
            break
    return prompts


def describe_input(config: PromptsConfig, prompts: list[Prompt]) -> dict[str, Any]:
    """What a manifest records about the prompt source, so that a changed file is noticed on resume."""
    info: dict[str, Any] = {"path": config.path, "rows": len(prompts)}
    if config.template is not None:
        info["template"] = config.template
    if config.max_chars is not None:
        info["max_chars"] = config.max_chars
    if not config.path.startswith(HF_PREFIX):
        info["sha256"] = sha256_file(resolve_path(config.path))
    return info


def read_texts(path: str, field: str = "text") -> list[str]:
    """Texts from a .txt file (one per line) or from the `field` column of a rows file; at least one."""
    resolved = resolve_path(path)
    if resolved.suffix.lower() == ".txt":
        if not resolved.is_file():
            raise InputError(f"file not found: {resolved}")
        texts = [line.strip() for line in resolved.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = []
        for i, row in enumerate(read_rows(resolved), 1):
            if not isinstance(row.get(field), str):
                raise InputError(f"{resolved}: row {i} has no '{field}' text")
            texts.append(row[field])
    if not texts:
        raise InputError(f"{resolved}: no texts to evaluate on")
    return texts
