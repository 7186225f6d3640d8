"""`inherit`: the whole active-inheritance experiment in one resumable run directory.

    generate/          k candidates per prompt from every teacher
    score/             every metric on every candidate
    select-active/     the best candidate per prompt by the recipe's objectives
    select-random/     a random candidate per prompt (passive inheritance: nobody steers)
    finetune-active/   the student fine-tuned on select-active (model/ inside)
    finetune-random/   the student fine-tuned on select-random
    profile-base/      the untouched student on held-out prompts
    profile-random/    ...after training on the random selection
    profile-active/    ...after training on the active selection
    report.md, results.json, plots/

Every stage is its own run directory and resumes by itself, so a killed pipeline started again
redoes nothing that finished. The comparison is paired over the held-out prompts: active against
random is the effect of *selecting*, random against base the effect of training on the teacher at
all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from datasteer.engines import open_executor
from datasteer.errors import ConfigError, InputError
from datasteer.generation.base import fit_to_context, prompt_lengths
from datasteer.generation.runner import generate
from datasteer.inheritance.compare import Comparison, compare
from datasteer.inheritance.config import InheritConfig, parse_constraint, parse_objective
from datasteer.inheritance.finetune import check_finetune, check_student, finetune
from datasteer.inheritance.profile import Profile, profile, teacher_config
from datasteer.inheritance.report import headline_lines, objective_columns, write_inherit_report
from datasteer.inheritance.select import did_you_mean, select
from datasteer.io import describe_input, read_prompts
from datasteer.metrics.base import metric_columns, parse_metrics
from datasteer.metrics.config import ScoreConfig
from datasteer.metrics.runner import score
from datasteer.models import load_tokenizer, model_shape, parse_spec
from datasteer.rows import gather_cards, write_card
from datasteer.runs import Run

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


@dataclass
class InheritResult:
    run_dir: Path
    report: Path
    comparison: Comparison
    profiles: list[Profile]
    objectives: list[str]
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage in this call

    def headline(self) -> list[str]:
        """One line per objective column: base, random, active means and the paired effect of selecting."""
        return headline_lines(self.comparison, objective_columns(self.objectives))


def inherit(config: InheritConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
            console: Console | None = None) -> InheritResult:
    """Run the active-inheritance pipeline of `config` into `out` (rerun to resume)."""
    console = console or Console(stderr=True)
    out = Path(out)
    # Validate what can be validated before any model loads: prompts, metrics, optional extras.
    prompts = read_prompts(config.prompts)
    eval_prompts = read_prompts(config.eval_prompts)
    check_held_out(prompts, eval_prompts)
    specs = [str(s) for s in parse_metrics(config.metrics)]
    _check_selection_columns(config, metric_columns(specs))
    for spec in [t.model for t in config.teachers if t.backend != "openai"] + [config.student]:
        parse_spec(spec)  # unknown embedded/tiny names and missing local directories fail here
    check_finetune(config.finetune, "finetune.")  # the trl: pass-through and LoRA arguments, before any stage
    open_executor(config.engine)  # the ray engine without ray installed: one line before any stage
    check_student_fits(config, eval_prompts)
    run = Run.prepare(out, stage="inherit", config=config,
                      inputs={"prompts": describe_input(config.prompts, prompts),
                              "eval_prompts": describe_input(config.eval_prompts, eval_prompts)},
                      seed=config.seed, overwrite=overwrite)
    created_now = not run.exists
    run.ensure_created()
    try:
        return _run_stages(config, out, run, specs, overwrite, progress, console)
    except BaseException:
        # A failure before any stage wrote anything (e.g. a hub model that cannot be loaded) leaves no
        # directory behind; once a stage has output, the directory stays so that a rerun resumes.
        if created_now and {p.name for p in out.iterdir()} <= {"manifest.json", ".lock"}:
            run.release()  # removes the manifest-only directory it created
        raise


def _run_stages(config: InheritConfig, out: Path, run: Run, specs: list[str], overwrite: bool, progress: bool,
                console: Console) -> InheritResult:
    arms = ["active"] + (["random"] if config.random_baseline else [])
    steps = 2 + 2 * len(arms) + (1 + len(arms)) + 1  # generate, score, select+finetune per arm, profiles, report
    stage = Stages("inherit", steps, console, progress)
    seconds = stage.seconds

    with stage("generate"):
        gen = generate(config.generate_config(), out / "generate", overwrite=overwrite, progress=progress)
    with stage("score"):
        scored = score(ScoreConfig(input=str(gen.candidates_path), metrics=specs, output_format=config.output_format,
                                   engine=config.engine),
                       out / "score", overwrite=overwrite, progress=progress)
    selected: dict[str, Path] = {}
    for arm in arms:
        with stage(f"select ({arm})"):
            sel = select(config.select_config(str(scored.scored_path), arm, list(scored.columns)),
                         out / f"select-{arm}", overwrite=overwrite)
            selected[arm] = sel.selected_path
            if progress:
                console.print(f"{arm}: {sel.selected} prompts selected, {sel.dropped} dropped")
    models: dict[str, str] = {"base": config.student}
    for arm in arms:
        with stage(f"finetune ({arm})"):
            ft = finetune(config.finetune_config(str(selected[arm])), out / f"finetune-{arm}", overwrite=overwrite,
                          progress=progress)
            models[arm] = str(ft.model_dir)
    profiles: list[Profile] = []
    for label in ["base", *arms[::-1]]:  # base, random, active: the table reads left to right
        with stage(f"profile ({label})"):
            profiles.append(profile(config.profile_config(models[label], label), out / f"profile-{label}",
                                    overwrite=overwrite, progress=progress))
    with stage("report"):
        comparison = compare(profiles)
        report = write_inherit_report(config, out, profiles, comparison)
        run.write_json(RESULTS_FILE, {"comparison": comparison.to_json(), "objectives": config.selection.objectives,
                                      "seconds_this_call": seconds})
        parts = ["generate", "score", *(f"select-{arm}" for arm in arms), *(f"profile-{p.label}" for p in profiles)]
        write_card(run, gather_cards(out, parts), default="select-active", title=f"datasteer inherit: {config.name}",
                   description=config.description or None)
    run.finish({"report": REPORT_FILE, "results": RESULTS_FILE, "seconds_this_call": seconds})
    return InheritResult(run_dir=out, report=report, comparison=comparison, profiles=profiles,
                         objectives=list(config.selection.objectives), seconds=seconds)


def check_held_out(prompts: list, eval_prompts: list) -> None:
    """Held-out prompts must not be training prompts."""
    overlap = {p.prompt for p in prompts} & {p.prompt for p in eval_prompts}
    if overlap:
        raise InputError(f"{len(overlap)} held-out prompt(s) also appear in the training prompts (e.g. "
                         f"'{sorted(overlap)[0][:60]}'); profiles must use prompts the student was not trained on")


class Stages:
    """Numbered stage banners on the console and each stage's wall time (`seconds`)."""

    def __init__(self, name: str, steps: int, console: Console, progress: bool):
        self.name, self.steps, self.console, self.progress = name, steps, console, progress
        self.seconds: dict[str, float] = {}
        self._count = 0

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._count += 1
        if self.progress:  # quiet: nothing on stderr but a possible error line
            self.console.rule(f"[bold]{self.name} {self._count}/{self.steps}: {stage}")
        start = time.perf_counter()
        yield
        self.seconds[stage] = round(time.perf_counter() - start, 2)


def check_student_fits(config: InheritConfig | Any, eval_prompts: list) -> None:
    """Everything about the student that its spec, config and tokenizer tell without its weights, before any
    stage: `finetune.train_layers` within its layers, and every held-out prompt within its context (the profiles
    come last: a prompt too long for the student must not fail after generate, score, select and finetune)."""
    check_student(config.student, config.finetune, "finetune.")
    context = model_shape(config.student).context
    if context:
        base = teacher_config(config.profile_config(config.student, "base"))
        lengths = prompt_lengths(load_tokenizer(config.student), eval_prompts, base.system_prompt)
        fit_to_context(base, eval_prompts, lengths, context, who="the student's profiles",
                       remedy="shorten the held-out prompt or lower profile.sampling.max_new_tokens")


# numeric columns every candidate row has before scoring
CANDIDATE_NUMBERS = ("prompt_tokens", "completion_tokens", "sample_index", "seed")


def _check_selection_columns(config: InheritConfig, metric_columns: list[str]) -> None:
    """Objectives and constraints must name columns that scoring will produce: fail before any model loads."""
    known = [*metric_columns, *CANDIDATE_NUMBERS]
    wanted = [parse_objective(o).column for o in config.selection.objectives]
    wanted += [parse_constraint(c).column for c in config.selection.constraints]
    for column in wanted:
        if column not in known:
            raise ConfigError(f"selection names column '{column}', which the recipe's metrics do not produce; "
                              f"{did_you_mean(column, known)}columns: {', '.join(known)} (add its metric to 'metrics')")
