"""Rows files that load as they are: explicit schemas, JSONL or Parquet, and a dataset card per run.

Every stage that writes rows (generate's candidates, score's scored rows, select's selection, a profile) writes
them through `write_rows` and then `write_card`:

    written = write_rows(run, "candidates", rows, format="jsonl")    # candidates.jsonl, atomic
    write_card(run, [written])                                         # README.md with the schema

- `schema_of(rows)` infers one Arrow schema over *all* rows. Readers that infer types from the first block of a
  file (datasets' JSON loader reads 10 MB at a time) see a column that is null for the first teacher and text
  for a later one as null and then fail; the schema here sees every row.
- JSONL is one compact JSON object per line, key order kept (`runs.dump_rows`); values JSON
  cannot hold (NaN, infinities) are written as null, the missing value everywhere in datasteer. Parquet carries
  the explicit schema inside the file.
- The card (`README.md`) has the YAML header that the Hugging Face Hub and `datasets` read: `configs` name the
  run's rows files and `dataset_info` gives their features, so `datasets.load_dataset(RUN_DIR)` applies the
  explicit schema at any file size (and checks the row count); `task_categories`, `size_categories` and `tags`
  for the Hub's search; `datasteer:` the provenance (`provenance(run)`: stage, datasteer version, seed, git
  commit, and from the run's manifest and the runs its inputs came from, the teachers with their sampling, the
  metrics and the selection objective). Its body says the same in Markdown and lists the files and columns. The
  licence is left for the user to set (a commented `license:` line).
- `load_rows(path)` loads one rows file as a `datasets.Dataset` with its explicit features (from the card
  beside it, else inferred over all rows).

`datasets` is imported only where it is needed (cards and `load_rows`); this module sits on the ground floor
beside `runs` and `io`.
"""

from __future__ import annotations

import io as _bytes_io
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from datasteer.errors import InputError
from datasteer.runs import Run, dump_rows, json_text

OutputFormat = Literal["jsonl", "parquet"]
FORMATS: tuple[str, ...] = ("jsonl", "parquet")
CARD_FILE = "README.md"
SPLIT = "train"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")

# What the columns datasteer writes mean (docs/architecture.md, "Rows"); the card's column table uses them.
COLUMN_DOCS: dict[str, str] = {
    "prompt_id": "stable id of the prompt",
    "prompt": "the prompt text",
    "completion": "the generated answer",
    "source": "the teacher (or profiled model) that wrote the completion",
    "sample_index": "index of this sample among the k samples of its prompt",
    "model": "model spec of the teacher",
    "backend": "generation backend (transformers, openai, vllm)",
    "base_url": "endpoint of an openai-backend teacher (credentials removed)",
    "system_prompt": "system prompt (null: the chat template's default)",
    "sampling": "sampling parameters (temperature, top_p, top_k, max_new_tokens)",
    "prompt_tokens": "tokens in the rendered prompt",
    "completion_tokens": "tokens in the completion, end-of-turn included",
    "finish_reason": "stop (ended by itself), length (cut at max_new_tokens) or empty (the server sent no content)",
    "seed": "seed of the unit of work that sampled this row",
    "selection": "why this row won: objective, score, margin over the runner-up, eligible and all candidates",
    "reason": "why no candidate of this prompt was eligible",
    "candidates": "candidates of this prompt",
}


def rows_file(stem: str, format: str = "jsonl") -> str:
    """The file name of a rows output: `candidates` + `parquet` -> `candidates.parquet`."""
    if format not in FORMATS:
        raise InputError(f"unknown output format '{format}'; use one of {', '.join(FORMATS)}")
    return f"{stem}.{format}"


# ---------------------------------------------------------------- schemas

def _column_type(values: list[Any]) -> pa.DataType:
    try:
        return pa.array(values, from_pandas=True).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError, ValueError):
        # Values of several kinds in one column (text and numbers, structs whose fields change type):
        # stored as JSON text with the JSON extension type, which `datasets` reads back as Json().
        return pa.json_()


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Column names in order of first appearance over all rows."""
    names: dict[str, None] = {}
    for row in rows:
        for key in row:
            names.setdefault(key, None)
    return list(names)


def schema_of(rows: Sequence[dict[str, Any]]) -> pa.Schema:
    """The Arrow schema of `rows`, each column's type inferred over every row (not the first block).

    A column that is null in early rows and text later is text; ints and floats together are float64; a column
    no single type can hold is JSON (`pa.json_()`); a column that is null everywhere keeps the null type.
    """
    return pa.schema([pa.field(name, _column_type([row.get(name) for row in rows])) for name in _columns(rows)])


def _column(values: list[Any], type: pa.DataType) -> pa.Array:
    if isinstance(type, pa.JsonType):
        text = [None if v is None else json_text(v) for v in values]
        return pa.ExtensionArray.from_storage(type, pa.array(text, pa.string()))
    return pa.array(values, type=type, from_pandas=True)  # from_pandas: NaN is null, as in the JSONL


def table_of(rows: Sequence[dict[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    """`rows` as an Arrow table with `schema` (default: `schema_of(rows)`)."""
    schema = schema if schema is not None else schema_of(rows)
    extra = [name for name in _columns(rows) if name not in schema.names]
    if extra:
        raise InputError(f"rows have column(s) {extra} that the schema does not list")
    return pa.Table.from_arrays([_column([row.get(f.name) for row in rows], f.type) for f in schema], schema=schema)


# ---------------------------------------------------------------- writing





def parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buffer = _bytes_io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


@dataclass(frozen=True)
class RowsFile:
    """A rows file of a run: its config name in the card, its path inside the run, schema and row count."""

    config: str
    file: str  # relative to the run directory, '/'-separated
    schema: pa.Schema
    rows: int
    bytes: int = 0  # size of the file
    descriptions: dict[str, str] | None = None  # column -> meaning, beyond COLUMN_DOCS


def write_rows(run: Run, stem: str, rows: Sequence[dict[str, Any]], *, format: str = "jsonl",
               schema: pa.Schema | None = None, descriptions: dict[str, str] | None = None) -> RowsFile:
    """Write `rows` into the run as `<stem>.jsonl` or `<stem>.parquet` (atomically, through `run.write_output`).

    The schema is inferred over all rows unless given; Parquet stores it, the card (`write_card`) publishes it
    for JSONL.
    """
    name = rows_file(stem, format)
    schema = schema if schema is not None else schema_of(rows)
    data = parquet_bytes(table_of(rows, schema)) if format == "parquet" else dump_rows(rows)
    run.write_output(name, data)
    return RowsFile(config=stem, file=name, schema=schema, rows=len(rows), bytes=len(data),
                    descriptions=descriptions)


# ---------------------------------------------------------------- the dataset card

_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
          (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))


def size_category(rows: int) -> str:
    """The Hub's `size_categories` value for a number of rows."""
    return next((label for bound, label in _SIZES if rows < bound), "n>1B")


def _features(schema: pa.Schema) -> Any:
    from datasets import Features

    return Features.from_arrow_schema(schema)


# ---------------------------------------------------------------- provenance

TEACHER_FIELDS = ("name", "model", "backend", "k", "sampling", "system_prompt")
SELECTION_FIELDS = ("objectives", "combine", "constraints", "sources")
LINEAGE_DEPTH = 6


def _manifest(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "stage" in data else None


def lineage(run_dir: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifests of the runs this run's inputs came from, nearest first (a select run's score run, then its
    generate run): an input file whose folder holds a run's manifest, found where the manifest recorded it or, for
    a run moved with its siblings, beside this run."""
    found, seen, queue = [], {run_dir.resolve()}, [(run_dir, manifest, 0)]
    while queue:
        here, current, depth = queue.pop(0)
        if depth >= LINEAGE_DEPTH:
            continue
        for info in (current.get("inputs") or {}).values():
            if not isinstance(info, dict) or not isinstance(info.get("path"), str) or ":" in info["path"][:8]:
                continue  # builtin:NAME, hf:NAME and the like are not runs
            recorded = Path(info["path"]).parent
            for folder in (recorded, here.parent / recorded.name):
                try:
                    key = folder.resolve()
                except OSError:
                    continue
                upstream = _manifest(folder) if key not in seen else None
                if upstream is not None:
                    seen.add(key)
                    found.append(upstream)
                    queue.append((folder, upstream, depth + 1))
                    break
    return found


def provenance(run: Run) -> dict[str, Any]:
    """Where a run's rows come from, for its card: stage, datasteer version, seed, git commit, and from its config
    or the configs of the runs upstream of it, the teachers (model, backend, k, sampling), the metrics and the
    selection objective."""
    return provenance_of(run.path, run.manifest)


def provenance_of(run_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """`provenance` of the run in `run_dir` with this manifest (a model card's training data: its finetune run)."""
    out: dict[str, Any] = {"stage": manifest.get("stage"),
                           "datasteer_version": (manifest.get("versions") or {}).get("datasteer"),
                           "seed": manifest.get("seed")}
    if manifest.get("git_commit"):
        out["git_commit"] = manifest["git_commit"]
    chain = [manifest, *lineage(Path(run_dir), manifest)]
    if len(chain) > 1:
        out["upstream"] = [m.get("stage") for m in chain[1:]]
    for entry in chain:
        config = entry.get("config") or {}
        if "teachers" not in out and isinstance(config.get("teachers"), list):
            out["teachers"] = [{k: t.get(k) for k in TEACHER_FIELDS if t.get(k) is not None}
                               for t in config["teachers"] if isinstance(t, dict)]
        if "metrics" not in out and isinstance(config.get("metrics"), list):
            out["metrics"] = [m if isinstance(m, str) else json_text(m) for m in config["metrics"]]
        rule = config.get("selection") if isinstance(config.get("selection"), dict) else config
        if "selection" not in out and isinstance(rule.get("objectives"), list):
            out["selection"] = {k: rule.get(k) for k in SELECTION_FIELDS if rule.get(k) not in (None, [])}
    return out


def card_metadata(files: Sequence[RowsFile], default: str | None = None, title: str | None = None,
                  origin: dict[str, Any] | None = None) -> dict[str, Any]:
    """The YAML header of a card: what the Hub indexes (task, size, tags), `configs` (the rows files),
    `dataset_info` (their features, in datasets' own YAML form, and row counts, which `datasets` checks on loading)
    and `datasteer` (the run's provenance)."""
    files = [f for f in files if f.rows > 0]  # datasets cannot load an empty file: it gets no config
    default = default or (files[0].config if files else None)
    configs, infos = [], []
    for f in files:
        entry: dict[str, Any] = {"config_name": f.config, "data_files": [{"split": SPLIT, "path": f.file}]}
        if f.config == default:
            entry["default"] = True
        configs.append(entry)
        infos.append({"config_name": f.config, "features": _features(f.schema)._to_yaml_list(),
                      "splits": [{"name": SPLIT, "num_bytes": f.bytes, "num_examples": f.rows}]})
    meta: dict[str, Any] = {
        "pretty_name": title,
        "task_categories": ["text-generation"],
        "size_categories": [size_category(max((f.rows for f in files), default=0))],
        "tags": ["datasteer", "synthetic"],
        "configs": configs,
        "dataset_info": infos,
    }
    if origin:
        meta["datasteer"] = origin
    return meta


def _type_text(type: pa.DataType) -> str:
    return "json" if isinstance(type, pa.JsonType) else str(type)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def provenance_rows(origin: dict[str, Any]) -> list[str]:
    """Rows of a Markdown `| | |` table: the runs upstream, the teachers, the metrics and the selection."""
    lines: list[str] = []
    if origin.get("upstream"):
        lines.append(f"| made from | {', '.join(f'`{s}` run' for s in origin['upstream'])} |")
    for teacher in origin.get("teachers", []):
        sampling = ", ".join(f"{k} {v}" for k, v in (teacher.get("sampling") or {}).items() if v is not None)
        lines.append(f"| teacher `{_cell(teacher.get('name'))}` | `{_cell(teacher.get('model'))}` "
                     f"({teacher.get('backend', '?')}), k {teacher.get('k', 1)}; {_cell(sampling)} |")
    if origin.get("metrics"):
        lines.append(f"| metrics | {_cell(', '.join(origin['metrics']))} |")
    if origin.get("selection"):
        rule = origin["selection"]
        shown = ", ".join(f"`{o}`" for o in rule.get("objectives", []))
        extra = "; ".join(f"{k} {_cell(v if isinstance(v, str) else json_text(v))}" for k, v in rule.items()
                          if k != "objectives")
        lines.append(f"| selection | {shown}{'; ' + extra if extra else ''} |")
    return lines


def card_text(run: Run, files: Sequence[RowsFile], *, title: str | None = None, description: str | None = None,
              default: str | None = None) -> str:
    """The whole README.md of a run: YAML header, then files, columns and provenance in Markdown."""
    import yaml

    manifest = run.manifest
    stage = manifest.get("stage", "run")
    version = manifest.get("versions", {}).get("datasteer", "unknown")
    title = title or f"datasteer {stage} run"
    origin = provenance(run)
    meta = card_metadata(files, default, title, origin)
    kept = [f for f in files if f.rows > 0]
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    lines = ["---", "# license: not set; add the licence of this data (it depends on the models' terms)",
             header.rstrip("\n"), "---", "", f"# {title}", ""]
    lines += [description or f"Rows written by `datasteer {stage}` (datasteer {version}).", ""]
    if kept:
        first = next((f.config for f in kept if f.config == default), kept[0].config)
        lines += ["Load them with `datasets` (the header above gives every column's type, at any file size):", "",
                  "```python", "from datasets import load_dataset", "",
                  f'rows = load_dataset("path/to/this/directory", split="{SPLIT}")  # {first}']
        lines += [f'{f.config.replace("-", "_")} = load_dataset("path/to/this/directory", "{f.config}", '
                  f'split="{SPLIT}")' for f in kept if f.config != first]
        lines += ["```", "", "or one file with `datasteer.load_rows(PATH)`, or with pandas "
                  "(`pandas.read_json(PATH, lines=True)` / `pandas.read_parquet(PATH)`).", ""]
    lines += ["## Files", "", "| config | file | rows |", "|---|---|---|"]
    for f in files:
        lines.append(f"| {f.config if f.rows else '(none: empty)'} | `{f.file}` | {f.rows} |")
    for f in kept:
        docs = {**COLUMN_DOCS, **(f.descriptions or {})}
        lines += ["", f"## Columns of `{f.config}`", "", "| column | type | meaning |", "|---|---|---|"]
        lines += [f"| `{field.name}` | `{_cell(_type_text(field.type))}` | {_cell(docs.get(field.name, ''))} |"
                  for field in f.schema]
    inputs = manifest.get("inputs") or {}
    lines += ["", "## Provenance", "", "| | |", "|---|---|", f"| stage | `{stage}` |",
              f"| seed | {manifest.get('seed')} |", f"| datasteer | {version} |"]
    if manifest.get("git_commit"):
        lines.append(f"| git commit | `{manifest['git_commit']}` |")
    for name, info in inputs.items():
        if isinstance(info, dict) and "path" in info:
            digest = f" (sha256 `{info['sha256'][:16]}…`)" if info.get("sha256") else ""
            lines.append(f"| input `{name}` | `{_cell(Path(str(info['path'])).name)}`{digest} |")
    lines += provenance_rows(origin)
    lines += ["", "The full config, inputs and package versions are in `manifest.json`.", "",
              "## Licence", "", "Not set. Generated data follows the terms of the models that wrote it; add a "
              "`license:` line to the header above before sharing it.", ""]
    return "\n".join(lines)


def write_card(run: Run, files: Sequence[RowsFile], *, title: str | None = None, description: str | None = None,
               default: str | None = None) -> Path:
    """Write the run's dataset card (`README.md`): configs and features of `files`, provenance from the manifest."""
    text = card_text(run, files, title=title, description=description, default=default)
    return run.write_output(CARD_FILE, text.encode("utf-8"))


def _card_header(directory: Path) -> dict[str, Any] | None:
    import yaml

    path = directory / CARD_FILE
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---"):
        return None
    try:
        header = yaml.safe_load(text.split("\n---", 1)[0][3:])
    except yaml.YAMLError:
        return None
    return header if isinstance(header, dict) else None


def read_card(directory: str | Path) -> list[RowsFile]:
    """The rows files a run directory's card lists (with their schemas), default config first; [] without one."""
    from datasets import Features

    directory = Path(directory)
    header = _card_header(directory)
    if header is None:
        return []
    infos = header.get("dataset_info") or []
    infos = [infos] if isinstance(infos, dict) else infos
    by_name = {i.get("config_name", "default"): i for i in infos if isinstance(i, dict)}
    files = []
    for config in header.get("configs") or []:
        name = config.get("config_name", "default")
        data_files = config.get("data_files")
        if isinstance(data_files, list) and len(data_files) == 1 and isinstance(data_files[0], dict):
            file = data_files[0].get("path")
        else:
            file = data_files if isinstance(data_files, str) else None
        info = by_name.get(name)
        if not isinstance(file, str) or not info or "features" not in info:
            continue
        split = next((s for s in info.get("splits") or [] if isinstance(s, dict) and s.get("name") == SPLIT), {})
        entry = RowsFile(config=name, file=file, schema=Features._from_yaml_list(info["features"]).arrow_schema,
                         rows=split.get("num_examples", 0), bytes=split.get("num_bytes", 0))
        files.insert(0, entry) if config.get("default") else files.append(entry)
    return files


def gather_cards(directory: str | Path, parts: Sequence[str]) -> list[RowsFile]:
    """The rows files of sub-runs (`parts`, directories inside `directory`), as one card at the top lists them:
    config `<part>` for a sub-run's default file, `<part>-<config>` for its others; paths relative to the top."""
    directory = Path(directory)
    gathered = []
    for part in parts:
        for i, f in enumerate(read_card(directory / part)):
            gathered.append(replace(f, config=part if i == 0 else f"{part}-{f.config}", file=f"{part}/{f.file}"))
    return gathered


# ---------------------------------------------------------------- loading

def _card_features(path: Path) -> Any:
    """The features the card beside `path` gives for it, or None."""
    for f in read_card(path.parent):
        if f.file == path.name:
            return _features(f.schema)
    return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or remove that line") from None
    return rows


def load_rows(path: str | Path, **load_kwargs: Any) -> Any:
    """A rows file (.jsonl/.json/.parquet) or a run directory (its card's default file) as a `datasets.Dataset`
    with explicit features: Parquet's own schema; for JSON the card's features, else a schema inferred over all
    rows. `load_kwargs` go to `datasets.load_dataset` (cache_dir, keep_in_memory, ...)."""
    import datasets

    path = Path(path)
    if path.is_dir():
        files = read_card(path)
        if not files:
            raise InputError(f"{path} has no dataset card ({CARD_FILE}) listing rows files; give a rows file")
        path = path / files[0].file
    if not path.is_file():
        raise InputError(f"file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        if pq.read_metadata(path).num_rows == 0:
            return datasets.Dataset(pq.read_table(path))  # datasets cannot load an empty file
        return datasets.load_dataset("parquet", data_files=str(path), split=SPLIT, **load_kwargs)
    if suffix not in JSONL_SUFFIXES:
        raise InputError(f"{path}: load_rows reads .jsonl, .json and .parquet rows files, not '{suffix}'")
    if suffix != ".json":
        try:
            features = _card_features(path)
        except Exception:  # an unreadable or foreign card: infer instead
            features = None
        if features is not None:
            try:
                return datasets.load_dataset("json", data_files=str(path), features=features, split=SPLIT,
                                             **load_kwargs)
            except Exception:  # a card that no longer fits the file (edited by hand): infer instead
                pass
        rows = _read_jsonl(path)
        if not rows:
            return datasets.Dataset(pa.table({}))  # datasets cannot load an empty file
        features = _features(schema_of(rows))
        return datasets.load_dataset("json", data_files=str(path), features=features, split=SPLIT, **load_kwargs)
    return datasets.load_dataset("json", data_files=str(path), split=SPLIT, **load_kwargs)
