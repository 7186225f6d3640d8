"""Where benchmark rows come from: local files in the benchmark's original format, or the Hugging Face hub.

A benchmark source is
- a local file (`.jsonl`, `.json`, `.csv`, `.parquet`) or a folder of them (BBQ's one file per category), in the
  format the benchmark was published in (each probe's module says which formats it reads);
- `hf:OWNER/NAME` (or a bare `OWNER/NAME` that is not a local path): `datasets.load_dataset(OWNER/NAME, subset,
  split=split)`, for users with a network. Class-label columns (CrowS-Pairs' `bias_type`, StereoSet's
  `gold_label`) come back as their names. Offline, this is a one-line error that says to give a local file.

Nothing here is shipped with datasteer: the benchmarks keep their own licences and sources.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from datasteer.errors import InputError, MissingDependencyError
from datasteer.io import read_rows
from datasteer.probes.base import Source
from datasteer.runs import file_input

HUB_PREFIX = "hf:"
TABLE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(text: str, subset: str | None = None, split: str | None = None) -> Source:
    """A source text as a local path or a hub id (a missing local path is an InputError)."""
    if text.startswith(HUB_PREFIX):
        return Source(text=text, hub=text[len(HUB_PREFIX):], subset=subset, split=split)
    path = Path(os.path.expanduser(text))
    if path.exists():
        return Source(text=text, path=path, subset=subset, split=split)
    if _HUB_ID.match(text) and not text.lower().endswith(TABLE_SUFFIXES):
        return Source(text=text, hub=text, subset=subset, split=split)
    raise InputError(f"benchmark file not found: {text}; give a local file or folder, or hf:OWNER/NAME for a hub "
                     "dataset")


def local_files(source: Source, suffixes: tuple[str, ...] = TABLE_SUFFIXES) -> list[Path]:
    """The file a local source names, or the data files of a folder (sorted by name)."""
    assert source.path is not None
    if source.path.is_file():
        return [source.path]
    files = sorted(p for p in source.path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise InputError(f"{source.path} holds no {'/'.join(suffixes)} file")
    return files


def describe_source(source: Source, rows: int) -> dict[str, Any]:
    """What a run's manifest records about a benchmark's source: each local file with its sha256 (so that resume
    notices a changed file and a moved one still resumes), or the hub id, subset and split."""
    if source.hub is not None:
        return {"hub": source.hub, "subset": source.subset, "split": source.split, "rows": rows}
    files = local_files(source)
    if len(files) == 1:
        return file_input(files[0], rows)
    return {"files": [file_input(f) for f in files], "rows": rows}


def read_table(path: Path) -> list[dict[str, Any]]:
    """Rows of one local file (JSONL, JSON, CSV, Parquet), with `datasteer.io`'s one-line errors."""
    return read_rows(path)


def hub_rows(source: Source, default_split: str, default_subset: str | None = None) -> list[dict[str, Any]]:
    """`datasets.load_dataset(hub, subset, split=...)` as plain rows, class labels turned into their names."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise MissingDependencyError("loading a benchmark from the hub", "pip install datasets") from None
    split = source.split or default_split
    subset = source.subset or default_subset
    try:
        data = datasets.load_dataset(source.hub, subset, split=split)
    except Exception as err:  # datasets raises many types for "offline / not found / no such config"
        offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                      for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        why = "the hub is switched off here (HF_HUB_OFFLINE)" if offline else f"{type(err).__name__}"
        raise InputError(f"could not load benchmark '{source.hub}'{f' ({subset})' if subset else ''} split "
                         f"'{split}' from the Hugging Face hub: {why}; download it where there is a network, or "
                         "give a local file in the benchmark's own format") from None
    labels = {name: feature for name, feature in data.features.items() if isinstance(feature, datasets.ClassLabel)}
    rows = []
    for row in data:
        for name, feature in labels.items():
            if isinstance(row.get(name), int) and row[name] >= 0:
                row[name] = feature.int2str(row[name])
        rows.append(row)
    return rows


def need(row: dict[str, Any], fields: tuple[str, ...], where: str, what: str) -> None:
    """A row missing one of `fields` is a one-line InputError that names the file, the row and the format."""
    missing = [f for f in fields if f not in row]
    if missing:
        raise InputError(f"{where}: no '{missing[0]}' field; {what} rows need {', '.join(fields)} (is this the right "
                         "benchmark?)")


def text_field(row: dict[str, Any], field: str, where: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: '{field}' must be a non-empty text, got {type(value).__name__}")
    return value


def unique_item_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`items` as they are when their ids are unique, else renumbered in order (ids from several files may clash)."""
    ids = [it["item_id"] for it in items]
    if len(set(ids)) != len(ids):
        return [{**it, "item_id": str(i)} for i, it in enumerate(items)]
    return items
