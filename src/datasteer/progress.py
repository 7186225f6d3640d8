"""Progress of long work, in the form that suits where it is read:

- `bar`: a rich progress bar (counts, percent, tokens/s, elapsed, ETA), redrawn in place, on a terminal;
- `lines`: plain periodic lines (`generate: 120/480 rows (25%), 3.2 rows/s, 45.1 tok/s, elapsed 0:37, ETA 1:52`)
  when stderr is not a terminal (SLURM and Ray logs, CI, `nohup`, a pipe): a redrawn bar there is either nothing
  until the end or a screenful of control codes per refresh;
- `json`: one JSON object per line and per event (`start`, `progress`, `end` of each tracked stage, `stage`
  banners, `message`, `warning`, `error` and the command's closing `summary`), for machines (`--log-json`).

`auto` (the default) is `bar` on a terminal and `lines` elsewhere. The mode is process-wide (`configure`, set once
by the CLI); a stage only says `track(...)` and `emit(...)`. Periodic lines and JSON progress come at most every
`interval_s` seconds (default 10; the environment variable DATASTEER_PROGRESS_INTERVAL overrides it), on the
first and last update always. Everything goes to stderr; stdout keeps the command's result.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

Mode = Literal["auto", "bar", "lines", "json"]
MODES: tuple[str, ...] = ("auto", "bar", "lines", "json")
DEFAULT_INTERVAL_S = 10.0
INTERVAL_ENV = "DATASTEER_PROGRESS_INTERVAL"

_settings: dict[str, Any] = {"mode": "auto", "interval_s": None}


class _JsonStderr(io.TextIOBase):
    """sys.stderr in json mode: what other code writes there (a library's log handler, a Python warning, a
    print) becomes `message` events line by line, so that every line of stderr stays one JSON object."""

    def __init__(self, stream: Any):
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            line = line.split("\r")[-1]  # a redrawn line (a library's progress bar): its last state
            if line.strip():
                _write(self.stream, {"event": "message", "time": round(time.time(), 3), "text": line.rstrip()})
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                  line: Any = None) -> None:
    emit("warning", message=f"{category.__name__}: {message}", source=f"{filename}:{lineno}")


def configure(mode: str = "auto", interval_s: float | None = None) -> None:
    """Set how progress is shown in this process (`auto`, `bar`, `lines`, `json`). Json mode also turns what
    other code writes to stderr, and Python warnings, into events; leaving it puts stderr back."""
    if mode not in MODES:
        raise ValueError(f"unknown progress mode '{mode}'; use one of {', '.join(MODES)}")
    _settings.update(mode=mode, interval_s=interval_s)
    if mode == "json":
        if not isinstance(sys.stderr, _JsonStderr):
            _settings["showwarning"] = warnings.showwarning
            sys.stderr = _JsonStderr(sys.stderr)
            warnings.showwarning = _show_warning
    elif isinstance(sys.stderr, _JsonStderr):
        sys.stderr = sys.stderr.stream
        warnings.showwarning = _settings.pop("showwarning", warnings.showwarning)


def _stream() -> Any:
    """The real stderr (beneath json mode's wrapper)."""
    return sys.stderr.stream if isinstance(sys.stderr, _JsonStderr) else sys.stderr


def _write(stream: Any, event: dict[str, Any]) -> None:
    stream.write(json.dumps(_clean(event), ensure_ascii=False) + "\n")
    stream.flush()


def mode() -> str:
    """The mode in effect now: `auto` resolved by whether stderr is a terminal."""
    chosen = _settings["mode"]
    if chosen != "auto":
        return chosen
    isatty = getattr(sys.stderr, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def interval_s() -> float:
    if _settings["interval_s"] is not None:
        return float(_settings["interval_s"])
    try:
        return float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (strict JSON, as every file datasteer writes)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def emit(event: str, **fields: Any) -> None:
    """One JSON line `{"event": ..., "time": ..., **fields}` on stderr, in json mode only (else nothing)."""
    if mode() != "json":
        return
    _write(_stream(), {"event": event, "time": round(time.time(), 3), **fields})


def clock(seconds: float | None) -> str:
    """`m:ss` (or `h:mm:ss`); `-:--` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--"
    minutes, secs = divmod(int(math.ceil(max(seconds, 0.0))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class JsonConsole(Console):
    """A rich Console for stages that print banners and lines themselves (pipelines, DPG): in json mode each
    `rule` is a `stage` event and each `print` a `message` event, markup removed."""

    def rule(self, title: Any = "", *args: Any, **kwargs: Any) -> None:
        emit("stage", title=_plain(title))

    def print(self, *objects: Any, **kwargs: Any) -> None:
        emit("message", text=" ".join(_plain(o) for o in objects))

    def log(self, *objects: Any, **kwargs: Any) -> None:
        self.print(*objects)


def _plain(value: Any) -> str:
    if isinstance(value, Text):
        return value.plain
    if isinstance(value, str):
        try:
            return Text.from_markup(value).plain
        except Exception:  # noqa: BLE001 - text that is not valid markup is shown as it is
            return value
    return str(value)


def console() -> Console:
    """The console a stage should print its own lines on: stderr; lines never wrapped off a terminal (a log line
    cut at 80 columns reads badly); json events in json mode."""
    current = mode()
    if current == "json":
        return JsonConsole(stderr=True)
    return Console(stderr=True, soft_wrap=current != "bar")


class TokensPerSecondColumn(ProgressColumn):
    """Tokens per second over the work done in this process (resumed work is not counted)."""

    def render(self, task: Any) -> Text:
        tokens = task.fields.get("tokens", 0)
        started = task.fields.get("started")
        if not tokens or started is None:
            return Text("-- tok/s", style="progress.data.speed")
        rate = tokens / max(time.perf_counter() - started, 1e-9)
        return Text(f"{rate:,.1f} tok/s", style="progress.data.speed")


class Tracker:
    """What a stage holds while it works: `advance`, `set_total`, `describe`. This one shows nothing (quiet, or a
    process other than the main one); the subclasses draw a bar, print lines or emit JSON."""

    def __init__(self, description: str = "", total: int = 0, done: int = 0, unit: str = "rows",
                 tokens: bool = True):
        self.label, self.description, self.total, self.done = description, description, total, done
        self.unit, self.show_tokens = unit, tokens
        self.tokens = 0
        self.started = time.perf_counter()
        self.done_at_start = done

    def advance(self, rows: int, tokens: int = 0) -> None:
        self.tokens += tokens
        self.done += rows
        self._update()

    def set_total(self, total: int, done: int = 0) -> None:
        """For work whose size is known only once it starts (e.g. optimizer steps of a trainer)."""
        self.total, self.done, self.done_at_start = total, done, done
        self._update()

    def describe(self, text: str) -> None:
        self.description = text
        self._update(force=False)

    # the numbers every form shows
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def rate(self) -> float | None:
        """Units per second over the work done in this process."""
        elapsed, new = self.elapsed(), self.done - self.done_at_start
        return new / elapsed if new > 0 and elapsed > 0 else None

    def eta(self) -> float | None:
        rate = self.rate()
        if self.total and self.done >= self.total:
            return 0.0
        return (self.total - self.done) / rate if rate and self.total else None

    def tokens_per_second(self) -> float | None:
        return self.tokens / self.elapsed() if self.tokens and self.elapsed() > 0 else None

    def _update(self, force: bool = False) -> None:
        pass

    def close(self, failed: bool) -> None:
        pass


class _Bar(Tracker):
    def __init__(self, progress: Progress, task: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self._progress, self._task = progress, task

    def _update(self, force: bool = False) -> None:
        self._progress.update(self._task, total=self.total, completed=self.done, tokens=self.tokens,
                              description=self.description)


class _Periodic(Tracker):
    """Shows a line (or JSON event) on the first update, then at most every `interval_s`, and when closing."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.interval = interval_s()
        self.last_shown: float | None = None
        self.shown: tuple[int, int, str] | None = None  # (done, total, description) last shown
        self.open()

    def _update(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.last_shown is None or now - self.last_shown >= self.interval:
            self.last_shown = now
            self.shown = (self.done, self.total, self.description)
            self.show()

    def changed(self) -> bool:
        return self.shown != (self.done, self.total, self.description)

    def open(self) -> None: ...

    def show(self) -> None: ...


class _Lines(_Periodic):
    """Plain lines from the first unit of work done on: a stage that fails before any (a model that does not load)
    leaves the error as the only line on stderr, as on a terminal where the bar is taken away."""

    def _update(self, force: bool = False) -> None:
        if self.done > self.done_at_start:
            super()._update(force)

    def line(self) -> str:
        total = self.total or "?"
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        rate = self.rate()
        parts = [f"{self.description}: {self.done}/{total} {self.unit}{percent}",
                 f"{rate:,.2f} {self.unit}/s" if rate else f"-- {self.unit}/s"]
        if self.show_tokens:
            tps = self.tokens_per_second()
            parts.append(f"{tps:,.1f} tok/s" if tps else "-- tok/s")
        parts += [f"elapsed {clock(self.elapsed())}", f"ETA {clock(self.eta())}"]
        return ", ".join(parts)

    def show(self) -> None:
        sys.stderr.write(self.line() + "\n")
        sys.stderr.flush()

    def close(self, failed: bool) -> None:
        if not failed and self.changed():
            self.show()  # the closing numbers, whatever the interval


class _Json(_Periodic):
    def numbers(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"stage": self.label, "done": self.done, "total": self.total, "unit": self.unit,
                                  "rate": self.rate(), "elapsed_s": round(self.elapsed(), 3), "eta_s": self.eta()}
        if self.show_tokens:
            fields.update(tokens=self.tokens, tokens_per_s=self.tokens_per_second())
        if self.description != self.label:
            fields["description"] = self.description
        return fields

    def open(self) -> None:
        emit("start", stage=self.label, total=self.total, done=self.done, unit=self.unit)

    def show(self) -> None:
        emit("progress", **self.numbers())

    def close(self, failed: bool) -> None:
        emit("end", status="failed" if failed else "done", **self.numbers())


@contextmanager
def track(description: str, total: int, *, done: int = 0, enabled: bool = True, unit: str = "rows",
          tokens: bool = True, console: Console | None = None) -> Iterator[Tracker]:
    """Progress of `total` `unit`s (`done` of them finished earlier): a bar, periodic lines or JSON events by the
    process's mode (`mode()`), nothing when not `enabled`."""
    fields = dict(description=description, total=total, done=done, unit=unit, tokens=tokens)
    if not enabled:
        yield Tracker(**fields)
        return
    current = mode()
    if current in ("lines", "json"):
        tracker: Tracker = _Lines(**fields) if current == "lines" else _Json(**fields)
        try:
            yield tracker
        except BaseException:
            tracker.close(failed=True)
            raise
        tracker.close(failed=False)
        return
    columns: list[ProgressColumn] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn(unit), TaskProgressColumn()]
    if tokens:
        columns.append(TokensPerSecondColumn())
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    progress = Progress(
        *columns, console=console or Console(stderr=True), transient=False,
        refresh_per_second=4,  # redraws compete with torch for the GIL on small machines
    )
    with progress:
        task = progress.add_task(description, total=total, completed=done, tokens=0, started=time.perf_counter())
        try:
            yield _Bar(progress, task, **fields)
        except BaseException:
            # On failure the error message is the last word: take the bar off the screen.
            progress.remove_task(task)
            progress.live.transient = True
            raise
