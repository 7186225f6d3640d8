"""An arm's metrics files, and the rows that go into them.

- `metrics.jsonl`: one row per policy step (`StepLogger`): step, examples seen, the record of that step's
  rewards (`StepRecords`, filled by the reward function), every `validation.every` steps the validation, and the
  seconds each phase of the step took (`PhaseClock`: sampling, reward, policy log-probabilities, TRL's whole
  training step, validation, wall); step 0 holds the untrained target's readout and the untrained generator's
  validation.
- `slices.jsonl`: the LM-head slice's change at every validation (pattern targets; written by the validator).

Each row also reaches the trainer's own logger (`tracker_scalars`, logged by `grpo.step_callback`), so TensorBoard,
wandb and every other tracker in `grpo.trl.report_to` see Phi, the readout, the raw rewards and the validation
beside TRL's own metrics, at the same step.

Rows are appended with fsync; a line cut by a crash ends the file as read, and a resumed run truncates both
files to the checkpoint it restarts from.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from datasteer import progress
from datasteer.dpg.config import GRPOSpec
from datasteer.runs import atomic_write_text

METRICS = "metrics.jsonl"
SLICES = "slices.jsonl"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash: it and anything after it are recomputed
    return rows


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep rows up to `last_step` (the checkpoint a resumed run restarts from)."""
    rows = [r for r in read_jsonl(path) if r["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class StepRecords:
    """The hand-off from the reward function to the step logger: each reward call appends the record of its
    batch of rollouts; an update's row takes the latest (with steps_per_generation or num_iterations > 1 TRL takes
    several optimizer steps on one batch, so consecutive rows share it)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def latest(self) -> dict[str, Any]:
        return self.records[-1] if self.records else {}


class PhaseClock:
    """Wall seconds per phase of a policy step, summed until a metrics row takes them: sampling (the generator's
    rollouts), reward (the target's fine-tuning: metagradients or the naive splits), policy_logprobs (the policy's
    forward passes for log-probabilities), training_step (TRL's whole step: the phases above, the loss and its
    backward pass), validation; `wall` is the time since the previous row (with the optimizer step, callbacks,
    checkpoints)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.last = time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def timed(self, phase: str, call: Callable[..., Any]) -> Callable[..., Any]:
        """`call`, its time added to `phase`."""
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - start)
        return timed_call

    def take(self) -> dict[str, float]:
        now = time.perf_counter()
        out = {k: round(v, 3) for k, v in self.phases.items()}
        out["wall"] = round(now - self.last, 3)
        self.phases, self.last = {}, now
        return out


class StepLogger:
    """Writes an arm's metrics rows: step 0 when training begins on a fresh run, then one row per generator update
    (TRL's optimizer step), validated every `every` steps and after the last; prints a progress line per step when
    `say` is given."""

    def __init__(self, arm: str, grpo: GRPOSpec, every: int, records: StepRecords,
                 validate: Callable[[int, torch.nn.Module], dict[str, Any]], untrained: Callable[[], dict[str, float]],
                 path: Path, done_step: int, say: Callable[[str], None] | None, writes: bool = True,
                 clock: PhaseClock | None = None):
        self.arm, self.grpo, self.every, self.records = arm, grpo, every, records
        self.clock = clock or PhaseClock()
        # on several processes every rank validates (the target's fine-tuning is data parallel) and only the main
        # process writes and prints
        self.writes = writes
        say = say if writes else None
        self.validate, self.untrained, self.path, self.done_step, self.say = validate, untrained, path, done_step, say
        self.batch = grpo.prompts_per_step * grpo.num_generations
        self.updates_per_batch = grpo.steps_per_generation * grpo.num_iterations
        self.started = time.perf_counter()

    def on_train_begin(self, model: torch.nn.Module) -> dict[str, Any] | None:
        """Step 0's row on a fresh run (None when resuming), for the trackers too."""
        if self.done_step == 0:  # the untrained generator: the baseline every curve starts from
            row = {"step": 0, "examples_seen": 0, "untrained": self.untrained()}
            row["validation"] = self.clock.timed("validation", self.validate)(0, model)
            row["seconds"] = self.clock.take()
            if self.writes:
                append_jsonl(self.path, row)
            return row
        return None

    def on_step_end(self, step: int, model: torch.nn.Module) -> dict[str, Any]:
        """The step's row: written to metrics.jsonl, shown as progress, returned for the trackers."""
        # TRL takes steps_per_generation x num_iterations optimizer steps on each batch of rollouts
        batches = -(-step // self.updates_per_batch)
        row = {"step": step, "examples_seen": batches * self.batch, **self.records.latest()}
        if step % self.every == 0 or step == self.grpo.max_steps:
            row["validation"] = self.clock.timed("validation", self.validate)(step, model)
        row["seconds"] = self.clock.take()
        if self.writes:
            append_jsonl(self.path, row)
        if self.say is not None:
            elapsed = time.perf_counter() - self.started
            eta = elapsed / max(step - self.done_step, 1) * (self.grpo.max_steps - step)
            if progress.mode() == "json":
                progress.emit("progress", stage=f"dpg-{self.arm}", done=step, total=self.grpo.max_steps,
                              unit="steps", elapsed_s=round(elapsed, 3), eta_s=eta,
                              metrics=tracker_scalars(row, prefix=""))
            else:
                self.say(progress_line(self.arm, step, self.grpo.max_steps, row, eta))
        return row


# keys of a metrics row that are not measurements: the x axis, and text
NOT_SCALARS = frozenset({"step", "sample"})


def tracker_scalars(row: dict[str, Any], prefix: str = "dpg/") -> dict[str, float]:
    """A metrics row as flat `name: number` pairs for a tracker: nested records joined by '/' (`dpg/phi`,
    `dpg/readout/accuracy`, `dpg/reward/mean`, `dpg/validation/phi`, `dpg/untrained/...`); text, flags and missing
    values left out (trackers take numbers only)."""
    out: dict[str, float] = {}

    def walk(value: Any, name: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key not in NOT_SCALARS:
                    walk(item, f"{name}/{key}" if name else str(key))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + name] = float(value)

    walk(row, "")
    return out


def progress_line(arm: str, step: int, total: int, row: dict[str, Any], eta: float) -> str:
    readout = row.get("readout") or {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in readout.items())
    line = f"{arm} step {step}/{total} ({row['examples_seen']} examples): {shown}"
    if "validation" in row:
        val = {k: v for k, v in row["validation"].items() if isinstance(v, float)}
        line += " | validation " + ", ".join(f"{k} {v:.4g}" for k, v in val.items())
    minutes, seconds = divmod(int(math.ceil(eta)), 60)
    return line + f" | ETA {minutes}:{seconds:02d}"
