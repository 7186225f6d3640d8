"""Checkpoint strategies: which training states the reverse pass keeps, and how it gets the others back.

The reverse pass visits steps T-1, ..., 0 and needs the state (parameters and optimizer slots)
before each. Three ways to provide them:

- `all`: keep every state in memory: T states, T forward steps.
- `replay`: a k-ary recursive schedule in the spirit of REPLAY ("Optimizing ML Training with
  Metagradient Descent", Engstrom et al. 2025). To reverse steps [a, b) from the state at a, run
  forward once over the segment keeping the state at the start of each of k near-equal chunks,
  then reverse the chunks last to first, recursing into each. At most about (k - 1) * ceil(log_k T) + 1
  states are alive at once, for about T * ceil(log_k T) forward steps.
- `disk`: write every state to a directory during the forward pass and read them back in reverse.

Each driver is written once against abstract `step`/`back` callbacks, so `simulate` measures a
schedule's peak state count with the very code that runs it.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from datasteer.errors import ConfigError

Step = Callable[[Any, int], Any]       # (state before step t, t) -> state after
Back = Callable[[Any, int], None]      # (state before step t, t) -> reverse step t
Final = Callable[[Any], None]          # state after the last step


@dataclass
class Ledger:
    """Counts live stored states and forward steps (the numbers a memory/compute trade-off is about)."""

    live: int = 0
    peak: int = 0
    forward_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def stored(self, n: int = 1) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def released(self, n: int = 1) -> None:
        self.live -= n


def _split(a: int, b: int, k: int) -> list[int]:
    """Boundaries of min(k, b - a) near-equal chunks of [a, b)."""
    n = b - a
    parts = min(k, n)
    return [a + (n * j) // parts for j in range(parts + 1)]


def run_all(s0: Any, total: int, step: Step, final: Final, back: Back, ledger: Ledger) -> None:
    states = [s0]
    ledger.stored()
    state = s0
    for t in range(total):
        state = step(state, t)
        ledger.forward_steps += 1
        if t + 1 < total:
            states.append(state)
            ledger.stored()
    final(state)
    del state
    for t in reversed(range(total)):
        back(states.pop(), t)
        ledger.released()


def run_replay(s0: Any, total: int, k: int, step: Step, final: Final, back: Back, ledger: Ledger) -> None:
    def advance(state: Any, a: int, b: int) -> Any:
        for t in range(a, b):
            state = step(state, t)
            ledger.forward_steps += 1
        return state

    def chunk_starts(state: Any, bounds: list[int], keep_last: bool) -> tuple[list[Any], Any]:
        starts = [state]
        for j in range(len(bounds) - 1):
            state = advance(state, bounds[j], bounds[j + 1])
            if j + 2 < len(bounds) or keep_last:
                starts.append(state)
                ledger.stored()
        return starts, state

    def reverse(state: Any, a: int, b: int) -> None:
        if b - a == 1:
            back(state, a)
            return
        bounds = _split(a, b, k)
        starts, _ = chunk_starts(state, bounds[:-1], keep_last=True)
        del state
        for j in reversed(range(len(bounds) - 1)):
            reverse(starts.pop(), bounds[j], bounds[j + 1])
            if j > 0:
                ledger.released()

    ledger.stored()  # s0
    bounds = _split(0, total, k)
    starts, last = chunk_starts(s0, bounds, keep_last=False)
    del s0
    final(last)
    del last
    for j in reversed(range(len(bounds) - 1)):
        reverse(starts.pop(), bounds[j], bounds[j + 1])
        ledger.released()


def run_disk(s0: Any, total: int, step: Step, final: Final, back: Back, ledger: Ledger,
             directory: str | None) -> None:
    root = Path(tempfile.mkdtemp(prefix="metagrad-", dir=directory))
    ledger.extra.update(directory=str(root), states_on_disk=total)
    ledger.stored()  # in memory: the current state only
    try:
        state = s0
        for t in range(total):
            torch.save({"params": state.params, "slots": state.slots}, root / f"state-{t}.pt")
            state = step(state, t)
            ledger.forward_steps += 1
        final(state)
        del state
        for t in reversed(range(total)):
            path = root / f"state-{t}.pt"
            saved = type(s0)(**torch.load(path, weights_only=True))
            path.unlink()
            back(saved, t)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def simulate(total: int, k: int | None) -> Ledger:
    """Peak stored states and forward steps of a schedule (k=None: `all`), without any tensors."""
    ledger = Ledger()
    if k is None:
        run_all(0, total, lambda s, t: s + 1, lambda s: None, lambda s, t: None, ledger)
    else:
        run_replay(0, total, k, lambda s, t: s + 1, lambda s: None, lambda s, t: None, ledger)
    return ledger


@dataclass(frozen=True)
class Plan:
    strategy: str          # all | replay | disk
    k: int | None = None   # replay branching factor
    peak_states: int = 0


def plan(strategy: str, total: int, state_bytes: int, k: int | None, budget: int | None) -> Plan:
    """Resolve `auto` and a memory budget into a concrete schedule (the densest one that fits)."""
    if strategy == "disk":
        return Plan("disk", None, 1)
    if strategy == "all" or (strategy == "auto" and budget is None):
        return Plan("all", None, total)
    if strategy == "replay" and budget is None:
        k = k or 4
        return Plan("replay", k, simulate(total, k).peak)
    allowed = budget // max(state_bytes, 1)
    if strategy == "auto" and total <= allowed:
        return Plan("all", None, total)
    if k is not None:
        peak = simulate(total, k).peak
        if peak > allowed:
            raise ConfigError(f"replay_k={k} keeps {peak} training states ({peak * state_bytes / 1e6:.1f} MB) but "
                              f"memory_budget allows {allowed}; lower replay_k or raise the budget")
        return Plan("replay", k, peak)
    best: Plan | None = None
    for cand in range(2, max(total, 2) + 1):
        peak = simulate(total, cand).peak
        if peak <= allowed:
            best = Plan("replay", cand, peak)
        elif best is not None:
            break
    if best is None:
        need = simulate(total, 2).peak
        raise ConfigError(f"memory_budget fits {allowed} training states of {state_bytes / 1e6:.1f} MB, the sparsest "
                          f"replay schedule for {total} steps needs {need}; raise the budget or use checkpoint='disk'")
    return best
