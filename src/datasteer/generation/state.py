"""A teacher's own corner of the run directory, for what must outlive the process besides the shards.

A teacher whose work is not done the moment it returns (a provider batch: submitted now, collected hours later)
keeps its bookkeeping here, at `<run>/teachers/<name>/`, with the same guarantees as the shards: writes are
atomic, and the first write creates the run directory (manifest and lock) as a shard would. `generate` hands it to
a teacher's `generate_units(tasks, state)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from datasteer.runs import Run, atomic_write_bytes, json_text

TEACHERS = "teachers"


class TeacherState:
    def __init__(self, run: Run | None, name: str, note: Callable[[str], None] | None = None,
                 folder: str | Path | None = None):
        """`run`: the run directory (None with `folder`: a plain folder, for tests and tools). `note(text)` shows
        the teacher's state (a batch's status) beside the progress bar."""
        self.run = run
        self.name = name
        self._note = note
        self._folder = Path(folder) if folder is not None else None

    @property
    def path(self) -> Path:
        if self._folder is not None:
            return self._folder
        assert self.run is not None
        return self.run.path / TEACHERS / self.name

    def _relative(self, file: str) -> str:
        return f"{TEACHERS}/{self.name}/{file}"

    def read_json(self, file: str) -> Any:
        """The JSON in `file`, or None when there is no such file."""
        data = self.read_bytes(file)
        return None if data is None else json.loads(data)

    def read_bytes(self, file: str) -> bytes | None:
        if self.run is not None and not self.run.exists:
            return None
        path = self.path / file
        return path.read_bytes() if path.is_file() else None

    def write_json(self, file: str, obj: Any) -> Path:
        return self.write_bytes(file, (json_text(obj, indent=2) + "\n").encode("utf-8"))

    def write_bytes(self, file: str, data: bytes) -> Path:
        """Atomically (temp, fsync, rename); the run directory is created first if it does not exist yet."""
        if self.run is not None:
            return self.run.write_output(self._relative(file), data)
        path = self.path / file
        atomic_write_bytes(path, data)
        return path

    def note(self, text: str) -> None:
        if self._note is not None:
            self._note(text)
