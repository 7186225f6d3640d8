"""`generate`: run every teacher over the prompt set into a resumable run directory.

Work is cut into units (one teacher, `batch_size` consecutive prompts, all k samples). Each
unit is seeded from (run seed, teacher name, unit index) and written as one atomic shard, so
a run killed at any point and started again produces exactly the rows of an uninterrupted
run: finished units are skipped, unfinished ones are redone from their own seed. Units of a local model run
through an executor (`datasteer.engines`: this process, or Ray actors with `engine: ray`, each loading the teacher
once). A teacher that takes a whole list of units at once (`generate_units`: the HTTP backends, which keep
`concurrency` requests in flight across units, or submit them as one provider batch) runs in this process
whatever the engine, so that its limits (concurrency, rpm, tpm) hold for the run and not per worker. Either way
this process writes every shard as its unit finishes, so the rows and resume are the same.

The summary counts tokens per teacher (`usage`) and, for teachers with prices, the estimated `cost`.

The merged rows land in `candidates.jsonl` (or `candidates.parquet`, `output_format: parquet`) beside a
dataset card, `README.md`, that gives their explicit schema to `datasets.load_dataset(RUN_DIR)`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasteer.engines import Group, open_executor
from datasteer.generation.base import Completion, Teacher, TeacherBase
from datasteer.generation.config import GenerateConfig
from datasteer.generation.state import TeacherState
from datasteer.generation.usage import total_cost, usage_summary
from datasteer.io import Prompt, describe_input, read_prompts
from datasteer.progress import track
from datasteer.rows import load_rows, rows_file, write_card, write_rows
from datasteer.runs import Run, derive_seed, redact_url

CANDIDATES = "candidates"
CANDIDATES_FILE = rows_file(CANDIDATES, "jsonl")  # candidates.parquet with output_format: parquet


def make_teacher(config: TeacherBase) -> Teacher:
    """Build (not load) the backend for a teacher; fails fast on a bad spec or a missing optional dependency."""
    return config.build()


@dataclass(frozen=True)
class Unit:
    teacher: TeacherBase
    index: int
    prompts: list[Prompt]

    @property
    def name(self) -> str:
        return f"{self.index:06d}"

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.teacher.k


def plan_units(config: GenerateConfig, prompts: list[Prompt]) -> list[Unit]:
    """All units, teacher by teacher, in the order their rows appear in candidates.jsonl."""
    units = []
    for teacher in config.teachers:
        size = teacher.batch_size
        for index, start in enumerate(range(0, len(prompts), size)):
            units.append(Unit(teacher=teacher, index=index, prompts=prompts[start:start + size]))
    return units


def candidate_rows(unit: Unit, completions: list[list[Completion]]) -> list[dict[str, Any]]:
    t = unit.teacher
    if len(completions) != len(unit.prompts) or any(len(c) != t.k for c in completions):
        raise RuntimeError(f"teacher '{t.name}' returned a wrong number of completions for unit {unit.name}")
    sampling = t.sampling.model_dump()
    rows = []
    for prompt, samples in zip(unit.prompts, completions):
        for sample_index, c in enumerate(samples):
            rows.append({
                "prompt_id": prompt.prompt_id,
                "prompt": prompt.prompt,
                "completion": c.text,
                "source": t.name,
                "sample_index": sample_index,
                "model": t.model,
                "backend": t.backend,
                "base_url": redact_url(getattr(t, "base_url", None)),
                "system_prompt": t.system_prompt,
                "sampling": sampling,
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "finish_reason": c.finish_reason,
                "seed": c.seed,
            })
    return rows


class TeacherWorker:
    """Runs units on one loaded teacher: the worker of a teacher's group, in this process or on a Ray actor."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher

    def run(self, task: tuple[Unit, int]) -> tuple[list[dict[str, Any]], float]:
        unit, seed = task
        began = time.perf_counter()
        completions = self.teacher.generate(unit.prompts, seed=seed)
        took = time.perf_counter() - began
        return candidate_rows(unit, completions), took

    def close(self) -> None:
        self.teacher.close()  # free one teacher's memory before the next loads


@dataclass(frozen=True)
class TeacherSetup:
    """Loads the teacher (once per worker). On Ray it travels pickled: a teacher built and checked here
    (`check_prompts`) but not loaded, so each actor loads its own copy of the model."""

    teacher: Teacher

    def __call__(self) -> TeacherWorker:
        self.teacher.load()
        return TeacherWorker(self.teacher)


def gpus_per_worker(config: TeacherBase) -> float | None:
    """GPUs each Ray actor of this teacher needs: vllm's tensor_parallel_size; a transformers teacher on `auto` one
    GPU when the cluster has any (None), on `cuda...` one, on `cpu` none; an HTTP teacher none."""
    if config.backend == "vllm":
        return float(getattr(config, "tensor_parallel_size", 1))
    if config.backend == "transformers":
        device = str(getattr(config, "device", "auto"))
        return None if device == "auto" else (1.0 if device.startswith("cuda") else 0.0)
    return 0.0


def run_units(teacher: Teacher, tasks: list[tuple[Unit, int]], state: TeacherState,
              on_result: Callable[[int, tuple[list[dict[str, Any]], float]], None]) -> None:
    """A teacher with `generate_units` over all its pending units at once, in this process; `on_result(position,
    (rows, seconds))` as each unit completes (seconds 0: units overlap, the caller times the whole)."""
    teacher.load()
    try:
        stream = teacher.generate_units([(unit.prompts, seed) for unit, seed in tasks], state)  # type: ignore
        for position, completions in stream:
            on_result(position, (candidate_rows(tasks[position][0], completions), 0.0))
    finally:
        teacher.close()


def teacher_group(config: TeacherBase, teacher: Teacher, todo: list[Unit], seed: int) -> Group:
    """A teacher's pending units as one group of work: each unit with its own seed, from (run seed, teacher, unit)."""
    return Group(key=f"teacher/{config.name}", label=f"teacher '{config.name}'", setup=TeacherSetup(teacher),
                 units=[(u, derive_seed(seed, config.name, u.name)) for u in todo], names=[u.name for u in todo],
                 num_gpus=gpus_per_worker(config))


@dataclass
class GenerateResult:
    run_dir: Path
    candidates_path: Path
    rows: int
    generated_rows: int  # rows made by this call (the rest were resumed from shards)
    generated_tokens: int
    seconds: float  # wall time of the call, model loading included
    generation_seconds: float  # time spent generating (summed over workers on the ray engine)
    per_source: dict[str, int] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)  # per teacher: rows, tokens and, with prices, cost
    cost: float | None = None  # estimated over the teachers with prices; None when none has prices

    @classmethod
    def load(cls, run: Run) -> GenerateResult:
        """The result of a finished generate run, read back from its manifest (nothing generated now)."""
        s = run.manifest["summary"]
        return cls(run_dir=run.path, candidates_path=run.path / s.get("output", CANDIDATES_FILE), rows=s["rows"],
                   generated_rows=0, generated_tokens=0, seconds=0.0, generation_seconds=0.0,
                   per_source=dict(s["per_source"]), usage=dict(s.get("usage") or {}), cost=s.get("cost"))

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generation_seconds if self.generation_seconds > 0 else 0.0

    def dataset(self, **load_kwargs: Any) -> Any:
        """The candidates as a `datasets.Dataset` with their explicit features (`datasteer.rows.load_rows`)."""
        return load_rows(self.candidates_path, **load_kwargs)


def generate(config: GenerateConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
             teachers: dict[str, Teacher] | None = None) -> GenerateResult:
    """Generate `k` candidates per prompt from every teacher into the run directory `out`.

    Rerunning with the same config and `out` resumes; a different config is refused unless
    `overwrite`. `teachers` lets a caller pass ready backends (already loaded models) by name.
    """
    prompts = read_prompts(config.prompts)
    executor = open_executor(config.engine)  # the ray engine without ray installed fails here, before anything
    run = Run.prepare(out, stage="generate", config=config,
                      inputs={"prompts": describe_input(config.prompts, prompts)}, seed=config.seed,
                      overwrite=overwrite)
    if run.complete:
        return GenerateResult.load(run)
    teachers = dict(teachers or {})
    for t in config.teachers:
        if t.name not in teachers:
            teachers[t.name] = make_teacher(t)

    # before any unit runs (and any directory exists): prompts too long for a teacher's context are refused, or
    # counted when the teacher truncates them
    truncated: dict[str, int] = {}
    for t in config.teachers:
        check = getattr(teachers[t.name], "check_prompts", None)
        if check is not None:
            truncated[t.name] = int(check(prompts))

    units = plan_units(config, prompts)
    pending = [u for u in units if not run.has_shard(u.teacher.name, u.name)]
    total_rows = sum(u.rows for u in units)
    done_rows = total_rows - sum(u.rows for u in pending)
    start = time.perf_counter()
    generated_rows = generated_tokens = 0
    generation_seconds = 0.0  # time inside teacher.generate (model loading excluded), summed over workers
    with executor, track("generate", total_rows, done=done_rows, enabled=progress) as tracker:
        for teacher_config in config.teachers:
            todo = [u for u in pending if u.teacher.name == teacher_config.name]
            if not todo:
                continue
            tracker.describe(f"generate [{teacher_config.name}]")

            def finished(position: int, result: tuple[list[dict[str, Any]], float], todo: list[Unit] = todo) -> None:
                nonlocal generated_rows, generated_tokens, generation_seconds
                rows, took = result
                unit = todo[position]
                run.write_shard(unit.teacher.name, unit.name, rows)  # this process is the only writer
                tokens = sum(r["completion_tokens"] for r in rows)
                generation_seconds += took
                generated_rows += len(rows)
                generated_tokens += tokens
                tracker.advance(len(rows), tokens)

            teacher = teachers[teacher_config.name]
            if hasattr(teacher, "generate_units"):
                state = TeacherState(run, teacher_config.name,
                                     note=lambda text, name=teacher_config.name: tracker.describe(
                                         f"generate [{name}] {text}"))
                began = time.perf_counter()
                try:
                    run_units(teacher, [(u, derive_seed(config.seed, teacher_config.name, u.name)) for u in todo],
                              state, finished)
                finally:
                    generation_seconds += time.perf_counter() - began
            else:
                executor.run(teacher_group(teacher_config, teacher, todo, config.seed), finished)
    seconds = time.perf_counter() - start

    rows = [json.loads(line) for u in units
            for line in run.shard_path(u.teacher.name, u.name).read_bytes().splitlines()]
    written = write_rows(run, CANDIDATES, rows, format=config.output_format)
    write_card(run, [written], title="datasteer generate: candidates")
    candidates = run.path / written.file
    per_source = dict(Counter(r["source"] for r in rows))
    finish = Counter(r["finish_reason"] for r in rows)
    usage = usage_summary(rows, config.teachers)
    cost = total_cost(usage)
    run.finish({
        "rows": len(rows),
        "prompts": len(prompts),
        "per_source": per_source,
        "finish_reasons": dict(finish),
        "mean_completion_tokens": sum(r["completion_tokens"] for r in rows) / len(rows),
        **({"truncated_prompts": truncated} if any(truncated.values()) else {}),  # per teacher, too_long: truncate
        "usage": usage,
        **({"cost": cost} if cost is not None else {}),
        "output": written.file,
    })
    return GenerateResult(run_dir=run.path, candidates_path=candidates, rows=len(rows), generated_rows=generated_rows,
                          generated_tokens=generated_tokens, seconds=seconds, generation_seconds=generation_seconds,
                          per_source=per_source, usage=usage, cost=cost)
