"""Progress display for long work: counts, throughput and ETA (rich), or nothing when quiet."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


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
    """A small facade so the engines do not depend on rich directly."""

    def __init__(self, progress: Progress | None, task: Any):
        self._progress = progress
        self._task = task
        self.tokens = 0
        self.started = time.perf_counter()

    def advance(self, rows: int, tokens: int = 0) -> None:
        self.tokens += tokens
        if self._progress is not None:
            self._progress.update(self._task, advance=rows, tokens=self.tokens)

    def set_total(self, total: int, done: int = 0) -> None:
        """For work whose size is known only once it starts (e.g. optimizer steps of a trainer)."""
        if self._progress is not None:
            self._progress.update(self._task, total=total, completed=done)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)


@contextmanager
def track(description: str, total: int, *, done: int = 0, enabled: bool = True, unit: str = "rows",
          tokens: bool = True, console: Console | None = None) -> Iterator[Tracker]:
    """A progress bar: done/total `unit`, percent, tokens/s (if `tokens`), elapsed time and ETA."""
    if not enabled:
        yield Tracker(None, None)
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
            yield Tracker(progress, task)
        except BaseException:
            # On failure the error message is the last word: take the bar off the screen.
            progress.remove_task(task)
            progress.live.transient = True
            raise
