"""`passive`: the passive-inheritance study. What does a student pick up from a teacher when nobody selects?

One student per teacher is fine-tuned on that teacher's answers chosen at random (one per prompt, as the
paper's passive arm), then the base and every student are profiled along every dimension the paper profiles,
and each student is compared with the base, with a 95% interval and a verdict per dimension.

    generate/              k candidates per prompt from every teacher
    score/                 every metric on every candidate (what each teacher's data looks like)
    select-<teacher>/      a random candidate of that teacher per prompt
    finetune-<teacher>/    the student fine-tuned on it (model/ inside)
    profile-<label>/       text profile on held-out prompts, with the likelihood probes in probes/ (BBQ,
                           StereoSet, CrowS-Pairs, calibration, ... as `profile.probes` lists them)
    toxicity-<label>/      toxicity profile: RealToxicityPrompts-style prefixes, k samples at T 1, top_p 0.9
    judge-pairs.jsonl      pairs of teacher candidates (one prompt each) with their metrics
    judge-<label>/         the model as a judge of those pairs (a probe run of the `judge` probe)
    versus-<label>/        the student's held-out answers against the base's, judged pairwise
    report.md, results.json, plots/

Labels are `base` and each teacher's name. Every stage is its own run directory and resumes by itself.
On a CPU the teachers can be the embedded model under different system prompts and sampling settings (recipe
`demo-passive`); any model spec works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from datasteer.engines import open_executor
from datasteer.generation.runner import generate
from datasteer.inheritance import plots
from datasteer.inheritance.config import PairwiseConfig, PassiveConfig
from datasteer.inheritance.dimensions import (
    Dimension,
    markdown_table,
    probe_dimensions,
    text_dimensions,
    toxicity_dimensions,
    win_rate_dimension,
)
from datasteer.inheritance.finetune import check_finetune, finetune
from datasteer.inheritance.pipeline import Stages, check_held_out, check_student_fits
from datasteer.inheritance.preferences import candidate_pairs, judge_config, pairwise
from datasteer.inheritance.profile import PROBES, Profile, profile
from datasteer.inheritance.select import select
from datasteer.io import describe_input, read_prompts, read_rows
from datasteer.metrics.base import build_scorers, parse_metrics
from datasteer.metrics.config import ScoreConfig
from datasteer.metrics.runner import score
from datasteer.models import parse_spec
from datasteer.probes.config import BenchmarkSpec
from datasteer.probes.runner import check_benchmarks, probe
from datasteer.rows import dump_rows
from datasteer.runs import Run, atomic_write_text

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PAIRS_FILE = "judge-pairs.jsonl"
PLOTS_DIR = "plots"


@dataclass
class PassiveResult:
    run_dir: Path
    report: Path
    dimensions: dict[str, list[Dimension]]  # student label -> its changes against the base
    profiles: list[Profile]
    seconds: dict[str, float] = field(default_factory=dict)

    def changed(self) -> dict[str, list[Dimension]]:
        """Per student, the dimensions whose interval leaves 0."""
        return {label: [d for d in dims if d.verdict not in ("no change", "n/a")]
                for label, dims in self.dimensions.items()}


def _validate(config: PassiveConfig) -> tuple[list, list]:
    """What can be checked before any model loads: prompts, metrics and extras, model specs, benchmark files."""
    prompts, eval_prompts = read_prompts(config.prompts), read_prompts(config.eval_prompts)
    check_held_out(prompts, eval_prompts)
    build_scorers([str(s) for s in parse_metrics(config.metrics)])
    for spec in [t.model for t in config.teachers if t.backend != "openai"] + [config.student]:
        parse_spec(spec)
    check_finetune(config.finetune, "finetune.")
    open_executor(config.engine)
    check_student_fits(config, eval_prompts)
    probes = config.profile_config(config.student, "base").probe_config()
    if probes is not None:
        check_benchmarks(probes)
    if config.toxicity is not None:
        read_prompts(config.toxicity.prompts)
        build_scorers([config.toxicity.metric])
    if config.judge is not None:
        parse_spec(config.judge.judge)
    return prompts, eval_prompts


def passive(config: PassiveConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
            console: Console | None = None) -> PassiveResult:
    """Run the passive-inheritance study of `config` into `out` (rerun to resume)."""
    console = console or Console(stderr=True)
    out = Path(out)
    prompts, eval_prompts = _validate(config)
    run = Run.prepare(out, stage="passive", config=config, seed=config.seed, overwrite=overwrite,
                      inputs={"prompts": describe_input(config.prompts, prompts),
                              "eval_prompts": describe_input(config.eval_prompts, eval_prompts)})
    run.ensure_created()
    per_model = 1 + (config.toxicity is not None) + (config.judge is not None)
    students = [t.name for t in config.teachers]
    steps = 2 + 2 * len(students) + per_model * len(config.labels) + \
        (len(students) if config.judge and config.judge.versus_base else 0) + 1
    stage = Stages("passive", steps, console, progress)

    with stage("generate"):
        gen = generate(config.generate_config(), out / "generate", overwrite=overwrite, progress=progress)
    with stage("score"):
        scored = score(ScoreConfig(input=str(gen.candidates_path), metrics=list(config.metrics),
                                   engine=config.engine), out / "score", overwrite=overwrite, progress=progress)
    models = {"base": config.student}
    for name in students:
        with stage(f"select + finetune ({name})"):
            sel = select(config.select_config(str(scored.scored_path), name), out / f"select-{name}",
                         overwrite=overwrite)
            ft = finetune(config.finetune_config(str(sel.selected_path)), out / f"finetune-{name}",
                          overwrite=overwrite, progress=progress)
            models[name] = str(ft.model_dir)
    pairs_path = None
    if config.judge is not None:
        pairs = candidate_pairs(read_rows(scored.scored_path), config.judge.pairs, config.seed,
                                config.judge.attributes)
        pairs_path = run.write_output(PAIRS_FILE, dump_rows(pairs))
    profiles: dict[str, Profile] = {}
    toxicity: dict[str, Profile] = {}
    for label in config.labels:
        with stage(f"profile ({label})"):
            profiles[label] = profile(config.profile_config(models[label], label), out / f"profile-{label}",
                                      overwrite=overwrite, progress=progress)
        if config.toxicity is not None:
            with stage(f"toxicity ({label})"):
                toxicity[label] = profile(config.toxicity_config(models[label], label), out / f"toxicity-{label}",
                                          overwrite=overwrite, progress=progress)
        if config.judge is not None and pairs_path is not None:
            with stage(f"judge ({label})"):
                own = PairwiseConfig(**{**config.judge.model_dump(include=set(PairwiseConfig.model_fields)),
                                        "judge": models[label]})
                probe(judge_config(own, pairs_path), out / f"judge-{label}", overwrite=overwrite, progress=progress)
    versus: dict[str, dict[str, Any]] = {}
    if config.judge is not None and config.judge.versus_base:
        judge_settings = PairwiseConfig(**config.judge.model_dump(include=set(PairwiseConfig.model_fields)))
        for name in students:
            with stage(f"versus base ({name})"):
                versus[name] = pairwise(profiles["base"], profiles[name], judge_settings, out / f"versus-{name}",
                                        overwrite=overwrite, progress=progress).summary
    with stage("report"):
        dimensions = {name: _dimensions(config, out, name, profiles, toxicity, versus) for name in students}
        report = _write_report(config, out, profiles, toxicity, dimensions)
        run.write_json(RESULTS_FILE, {"labels": config.labels, "models": models,
                                      "dimensions": {k: [d.to_json() for d in v] for k, v in dimensions.items()},
                                      "seconds_this_call": stage.seconds})
    run.finish({"report": REPORT_FILE, "results": RESULTS_FILE, "seconds_this_call": stage.seconds})
    return PassiveResult(run_dir=out, report=report, dimensions=dimensions, profiles=list(profiles.values()),
                         seconds=stage.seconds)


def _dimensions(config: PassiveConfig, out: Path, name: str, profiles: dict[str, Profile],
                toxicity: dict[str, Profile], versus: dict[str, dict[str, Any]]) -> list[Dimension]:
    dims = text_dimensions(profiles["base"], profiles[name])
    if toxicity:
        dims += toxicity_dimensions(toxicity["base"], toxicity[name])
    if config.profile.probes:
        dims += probe_dimensions(out / "profile-base" / PROBES, out / f"profile-{name}" / PROBES,
                                 config.profile.probes, config.resamples, config.seed)
    if config.judge is not None:
        spec = {"judge": BenchmarkSpec(source=PAIRS_FILE, probe="judge", options=config.judge.options)}
        dims += probe_dimensions(out / "judge-base", out / f"judge-{name}", spec, config.resamples, config.seed,
                                 group="as a judge")
    if name in versus:
        dims.append(win_rate_dimension(versus[name]))
    return dims


def _write_report(config: PassiveConfig, out: Path, profiles: dict[str, Profile], toxicity: dict[str, Profile],
                  dimensions: dict[str, list[Dimension]]) -> Path:
    students = list(dimensions)
    plot_dir = out / PLOTS_DIR
    plot_dir.mkdir(exist_ok=True)
    figures = [("Each student minus the base, per dimension (95% intervals)",
                plots.forest(dimensions, plot_dir / "forest.png"))]
    shown = [r for r in profiles["base"].metrics if all(r in p.metrics for p in profiles.values())][:6]
    if shown:
        figures.append(("Text profiles: distributions", plots.metric_distributions(
            list(profiles.values()), shown, plot_dir / "distributions.png")))
    if toxicity:
        column = next(m for m, e in toxicity["base"].metrics.items() if "toxicity" in e)
        figures.append(("Toxicity profile: sample toxicity", plots.metric_distributions(
            list(toxicity.values()), [column], plot_dir / "toxicity.png")))
    teachers = {t.name: t for t in config.teachers}
    lines = [f"# Passive inheritance: {config.name}", ""]
    if config.description:
        lines += [config.description.strip(), ""]
    lines += ["## Set-up", ""]
    for name in students:
        t = teachers[name]
        lines.append(f"- teacher `{name}`: `{t.model}`, k={t.k}, temperature {t.sampling.temperature}, top_p "
                     f"{t.sampling.top_p}, system prompt: {json.dumps(t.system_prompt) if t.system_prompt else '-'}"
                     f"; student `{name}` = `{config.student}` fine-tuned on one random answer of it per prompt")
    lines += [f"- held-out text profile: {len(profiles['base'].rows)} samples per model"]
    if toxicity:
        tc = config.toxicity
        lines.append(f"- toxicity profile: {len({r['prompt_id'] for r in toxicity['base'].rows})} prompts x "
                     f"{tc.k} samples, temperature {tc.sampling.temperature}, top_p {tc.sampling.top_p}, "
                     f"{tc.sampling.max_new_tokens} new tokens, metric `{tc.metric}`")
    if config.profile.probes:
        limit = f" (a sample of at most {config.profile.probe_limit} items each)" if config.profile.probe_limit else ""
        lines.append(f"- likelihood probes: {', '.join(config.profile.probes)}{limit}")
    if config.judge is not None:
        lines.append(f"- as a judge: every model judges {config.judge.pairs} pairs of teacher candidates, both "
                     f"orders; student vs base answers judged by `{config.judge.judge}`")
    lines += ["", "## What each student inherited", "",
              "Each cell: the student's value (Δ against the base, 95% interval): verdict. Intervals are paired: over "
              "prompts for text and toxicity, a paired bootstrap over items for the probes, over pairs for the win "
              "rate; 'no change' = the interval contains 0.", ""]
    lines += markdown_table(dimensions)
    lines += ["", "## Plots", ""]
    lines += [f"![{title}]({PLOTS_DIR}/{path.name})\n" for title, path in figures]
    lines += ["## Reproduce", "", "Every stage is a run directory with its own `manifest.json`; rerunning the same "
              "command resumes and redoes nothing that finished.", ""]
    path = out / REPORT_FILE
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
