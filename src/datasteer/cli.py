"""The `datasteer` command. Thin: build a config, call one library function, print a summary."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer
from typer._click.exceptions import ClickException  # typer vendors click since 0.20

from datasteer.errors import ConfigError, DatasteerError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Steer language models through the synthetic data they are trained on.")


def _teacher_specs(model: Optional[str], teacher: list[str]) -> list[tuple[str, str]]:
    specs = []
    for item in teacher:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ConfigError(f"--teacher expects NAME=MODEL (for example smol=embedded:smollm2), got '{item}'")
        specs.append((name, spec))
    if model:
        specs.insert(0, (_default_name(model), model))
    if not specs:
        specs.append(("smollm2", "embedded:smollm2"))
    return specs


def _typed(ctx: typer.Context, name: str) -> bool:
    """Whether the user typed flag `name` (rather than leaving its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _overlay(ctx: typer.Context, data: dict[str, Any], has_recipe: bool, **flags: Any) -> dict[str, Any]:
    """Flags over a recipe: every flag without a recipe, only the typed ones with one (None = not given)."""
    for name, value in flags.items():
        if value is not None and (not has_recipe or _typed(ctx, name)):
            data[name] = value
    return data


def _default_name(spec: str) -> str:
    name = spec.rstrip("/").split("/")[-1].split(":")[-1].split("?")[0]
    return "".join(c if c.isalnum() or c in "_.-" else "-" for c in name) or "teacher"


@app.command()
def generate(
    ctx: typer.Context,
    prompts: Optional[str] = typer.Argument(None, help="prompts: .jsonl/.json/.parquet/.csv file or hf:DATASET"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory (rerun the same command to resume)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML recipe (flags below override it)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="one teacher's model spec"),
    teacher: list[str] = typer.Option([], "--teacher", "-t", help="NAME=MODEL, repeatable: several teachers"),
    backend: str = typer.Option("transformers", help="transformers | openai | vllm"),
    k: int = typer.Option(4, "--k", "-k", help="candidates per prompt per teacher"),
    temperature: float = typer.Option(1.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    top_k: Optional[int] = typer.Option(None),
    max_new_tokens: int = typer.Option(256),
    batch_size: int = typer.Option(8, help="prompts per batch (one resumable unit)"),
    system_prompt: Optional[str] = typer.Option(None),
    base_url: Optional[str] = typer.Option(None, help="openai backend: endpoint, e.g. http://127.0.0.1:8000/v1"),
    api_key_env: Optional[str] = typer.Option(None, help="openai backend: NAME of the env variable with the key"),
    concurrency: int = typer.Option(8, help="openai backend: requests in flight"),
    prompt_field: str = typer.Option("prompt"),
    id_field: Optional[str] = typer.Option(None),
    split: str = typer.Option("train", help="split, for hf:DATASET prompts"),
    limit: Optional[int] = typer.Option(None, help="use only the first N prompts"),
    seed: Optional[int] = typer.Option(None, help="run seed (default 0, or the recipe's)"),
    overwrite: bool = typer.Option(False, help="discard an existing run in --out made with another config"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Generate k candidate answers per prompt from one or several teachers."""
    from datasteer.config import GenerateConfig, build, load_recipe
    from datasteer.generation import generate as run_generate

    if config is not None:
        data: dict[str, Any] = load_recipe(config)
        data.setdefault("prompts", {})
        if isinstance(data["prompts"], str):
            data["prompts"] = {"path": data["prompts"]}
        if prompts:
            data["prompts"]["path"] = prompts
        for name, value in (("prompt_field", prompt_field), ("id_field", id_field), ("split", split),
                            ("limit", limit)):
            if _typed(ctx, name):
                data["prompts"][name] = value
        if seed is not None:
            data["seed"] = seed
        if model or teacher:
            raise ConfigError("--model/--teacher cannot be combined with --config; list teachers in the recipe")
        source = f"recipe {config}"
    else:
        if not prompts:
            raise ConfigError("give a prompts file (or hf:DATASET) or --config RECIPE")
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens}
        data = {
            "prompts": {"path": prompts, "prompt_field": prompt_field, "id_field": id_field, "split": split,
                        "limit": limit},
            "teachers": [
                {"name": name, "model": spec, "backend": backend, "k": k, "sampling": sampling,
                 "system_prompt": system_prompt, "batch_size": batch_size, "base_url": base_url,
                 "api_key_env": api_key_env, "concurrency": concurrency}
                for name, spec in _teacher_specs(model, teacher)
            ],
            "seed": 0 if seed is None else seed,
        }
        source = "flags"
    cfg = build(GenerateConfig, data, source)
    result = run_generate(cfg, out, overwrite=overwrite, progress=not quiet)
    resumed = result.rows - result.generated_rows
    sources = ", ".join(f"{n}: {c}" for n, c in result.per_source.items())
    typer.echo(f"{result.rows} candidates ({sources}) in {result.candidates_path}"
               + (f"; {resumed} resumed from an earlier run" if resumed else "")
               + f"; {result.generated_tokens} new tokens at {result.tokens_per_second:.1f} tok/s"
               + f" ({result.seconds:.1f}s in all, model loading included)")


@app.command()
def score(
    ctx: typer.Context,
    input: Optional[str] = typer.Argument(None, help="rows to score: .jsonl/.json/.parquet/.csv file"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory (rerun the same command to resume)"),
    metrics: Optional[str] = typer.Option(None, "--metrics", "-M",
                                          help="comma-separated metric specs, e.g. mtld,length,toxicity "
                                               "(see `datasteer metrics`)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML recipe (flags below override it)"),
    text_field: str = typer.Option("completion", help="column with the texts to score"),
    prompt_field: str = typer.Option("prompt", help="column with the prompts (judge and custom metrics)"),
    id_field: str = typer.Option("prompt_id", help="column grouping the samples of one prompt (toxicity EMT/TP)"),
    chunk_size: int = typer.Option(256, help="rows per resumable unit of work"),
    overwrite: bool = typer.Option(False, help="discard an existing run in --out made with another config"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Add one column per metric to every row (length, MTLD, readability, toxicity, judge, custom)."""
    from datasteer.config import ScoreConfig, build, load_recipe
    from datasteer.metrics import score as run_score

    data: dict[str, Any] = load_recipe(config) if config is not None else {}
    _overlay(ctx, data, config is not None, text_field=text_field, prompt_field=prompt_field, id_field=id_field,
             chunk_size=chunk_size)
    if input:
        data["input"] = input
    if metrics:
        data["metrics"] = metrics
    if "input" not in data:
        raise ConfigError("give the file to score (e.g. runs/demo-generate/candidates.jsonl) or --config RECIPE")
    if "metrics" not in data:
        raise ConfigError("give --metrics, e.g. --metrics mtld,length,toxicity (see `datasteer metrics`)")
    cfg = build(ScoreConfig, data, f"recipe {config}" if config else "flags")
    result = run_score(cfg, out, overwrite=overwrite, progress=not quiet)
    _print_score_summary(result)


def _print_score_summary(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result.rows} rows scored -> {result.scored_path}", title_justify="left")
    for header in ("metric", "mean", "std", "min", "median", "max", "missing"):
        table.add_column(header, justify="left" if header == "metric" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    for name, s in result.summary["metrics"].items():
        table.add_row(name, fmt(s.get("mean")), fmt(s.get("std")), fmt(s.get("min")), fmt(s.get("p50")),
                      fmt(s.get("max")), str(s["missing"]))
    console = Console()
    console.print(table)
    for name, s in result.summary["metrics"].items():
        tox = s.get("toxicity")
        if tox and tox["prompts"]:
            console.print(f"{name}: expected maximum toxicity {tox['expected_maximum_toxicity']:.4f} "
                          f"(std {tox['expected_maximum_toxicity_std']:.4f}), toxicity probability "
                          f"{tox['toxicity_probability']:.4f} over {tox['prompts']} prompts, "
                          f"{tox['samples_per_prompt']['min']}-{tox['samples_per_prompt']['max']} samples each")
        if s["missing"]:
            console.print(f"[yellow]note:[/yellow] {name} has no value for {s['missing']} of {result.rows} rows "
                          "(kept as null; see the metric's definition in `datasteer metrics`)")


@app.command()
def select(
    ctx: typer.Context,
    input: str = typer.Argument(..., help="scored candidates (scored.jsonl of `datasteer score`)"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory"),
    objective: list[str] = typer.Option(..., "--objective", "-O",
                                        help="COLUMN:max | COLUMN:min | COLUMN:max:WEIGHT (repeatable), or random"),
    combine: str = typer.Option("weighted", help="several objectives: weighted (sum of per-prompt z-scores) "
                                                 "or lexicographic"),
    constraint: list[str] = typer.Option([], "--constraint", "-C", help="COLUMN OP NUMBER, e.g. length>=50 "
                                                                        "(repeatable)"),
    source: list[str] = typer.Option([], "--source", "-s", help="select only among this teacher's candidates "
                                                                "(repeatable; default: the whole pool)"),
    seed: int = typer.Option(0, help="seed of the random baseline"),
    id_field: str = typer.Option("prompt_id"),
    text_field: str = typer.Option("completion"),
    overwrite: bool = typer.Option(False, help="discard an existing run in --out made with another config"),
) -> None:
    """Keep one candidate per prompt: the best by the objectives, or a random one (the baseline)."""
    from datasteer.config import SelectConfig, build
    from datasteer.inheritance.select import select as run_select

    cfg = build(SelectConfig, {"input": input, "objectives": objective, "combine": combine,
                               "constraints": constraint, "sources": source or None, "seed": seed,
                               "id_field": id_field, "text_field": text_field}, "flags")
    result = run_select(cfg, out, overwrite=overwrite)
    s = result.summary
    typer.echo(f"selected {result.selected} of {s['prompts']} prompts ({s['candidates']} candidates) by "
               f"{', '.join(cfg.objectives)} -> {result.selected_path}")
    for reason, n in s["dropped_reasons"].items():
        typer.echo(f"dropped {n} prompt(s): {reason} (listed in {result.run_dir / 'dropped.jsonl'})")
    for column, shift in s["columns"].items():
        a, b = shift["candidates"], shift["selected"]
        if a.get("mean") is not None and b.get("mean") is not None:
            typer.echo(f"{column}: candidates mean {a['mean']:.4g} -> selected mean {b['mean']:.4g}")


@app.command()
def finetune(
    ctx: typer.Context,
    input: Optional[str] = typer.Argument(None, help="rows with prompt and completion (selected.jsonl)"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory (rerun the same command to resume)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML recipe (flags below override it)"),
    model: str = typer.Option("embedded:smollm2", "--model", "-m", help="the student's model spec"),
    method: str = typer.Option("full", help="full | lora"),
    epochs: float = typer.Option(2.0),
    learning_rate: float = typer.Option(5e-5, "--lr", "--learning-rate"),
    batch_size: int = typer.Option(8),
    gradient_accumulation: int = typer.Option(1),
    max_length: int = typer.Option(512),
    lora_r: int = typer.Option(16),
    lora_alpha: float = typer.Option(32.0),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, help="discard an existing run in --out made with another config"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Fine-tune a student on selected rows (TRL SFT, full or LoRA); the merged model lands in OUT/model."""
    from datasteer.config import FinetuneConfig, build, load_recipe
    from datasteer.inheritance.finetune import finetune as run_finetune

    data: dict[str, Any] = load_recipe(config) if config is not None else {}
    if input:
        data["input"] = input
    _overlay(ctx, data, config is not None, model=model, method=method, epochs=epochs, learning_rate=learning_rate,
             batch_size=batch_size, gradient_accumulation=gradient_accumulation, max_length=max_length,
             lora_r=lora_r, lora_alpha=lora_alpha, seed=seed)
    if "input" not in data:
        raise ConfigError("give the rows to train on (e.g. runs/select/selected.jsonl) or --config RECIPE")
    cfg = build(FinetuneConfig, data, f"recipe {config}" if config else "flags")
    result = run_finetune(cfg, out, overwrite=overwrite, progress=not quiet)
    how = " (already complete)" if result.resumed_from == "complete" else (
        f" (resumed from {result.resumed_from})" if result.resumed_from else "")
    loss = "-" if result.final_loss is None else f"{result.final_loss:.4f}"
    typer.echo(f"fine-tuned {cfg.model} on {result.examples} examples, {result.steps} steps, final loss {loss}"
               f"{how} in {result.seconds:.1f}s -> {result.model_dir}")


@app.command()
def profile(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="model spec: embedded:smollm2, a fine-tuned model/ directory, an HF id"),
    prompts: str = typer.Option("builtin:instructions-heldout", "--prompts", "-p",
                                help="held-out prompts: a file, hf:DATASET or builtin:NAME"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory (rerun the same command to resume)"),
    metrics: Optional[str] = typer.Option(None, "--metrics", "-M", help="comma-separated metric specs "
                                          "(default: length,lexical,readability,toxicity)"),
    label: Optional[str] = typer.Option(None, help="name of this profile in comparisons"),
    k: int = typer.Option(1, "--k", "-k", help="samples per prompt"),
    temperature: float = typer.Option(0.0, help="0 = greedy (the default)"),
    top_p: float = typer.Option(1.0),
    max_new_tokens: int = typer.Option(256),
    toxicity: bool = typer.Option(False, "--toxicity", help="toxicity mode: 25 samples per prompt at temperature "
                                                              "1, top_p 0.9; reports EMT and Toxicity Probability"),
    limit: Optional[int] = typer.Option(None, help="use only the first N prompts"),
    batch_size: int = typer.Option(16),
    system_prompt: Optional[str] = typer.Option(None),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, help="discard an existing run in --out made with another config"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Profile what a model writes on held-out prompts: every metric, per-prompt rows and a summary."""
    from datasteer.config import ProfileConfig, build
    from datasteer.inheritance.profile import profile as run_profile

    data: dict[str, Any] = {"model": model, "prompts": {"path": prompts, "limit": limit}, "label": label, "k": k,
                            "toxicity": toxicity, "batch_size": batch_size, "system_prompt": system_prompt,
                            "seed": seed}
    if metrics:
        data["metrics"] = metrics
    if not toxicity or any(_typed(ctx, n) for n in ("temperature", "top_p")):
        data["sampling"] = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    if toxicity and not _typed(ctx, "k"):
        del data["k"]
    cfg = build(ProfileConfig, data, "flags")
    result = run_profile(cfg, out, overwrite=overwrite, progress=not quiet)
    _print_profile(result)


def _print_profile(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result.summary
    table = Table(title=f"profile '{result.label}' of {result.model}: {s['samples']} samples "
                        f"(k={s['k']}, temperature {s['sampling']['temperature']}) -> {result.path}",
                  title_justify="left")
    for header in ("metric", "mean", "std", "p5", "median", "p95", "missing"):
        table.add_column(header, justify="left" if header == "metric" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    for name, m in result.metrics.items():
        table.add_row(name, fmt(m.get("mean")), fmt(m.get("std")), fmt(m.get("p5")), fmt(m.get("p50")),
                      fmt(m.get("p95")), str(m["missing"]))
    console = Console()
    console.print(table)
    for name, m in result.metrics.items():
        tox = m.get("toxicity")
        if tox and tox["prompts"]:
            console.print(f"{name}: Expected Maximum Toxicity {tox['expected_maximum_toxicity']:.4f}, "
                          f"Toxicity Probability {tox['toxicity_probability']:.4f} over {tox['prompts']} prompts")


@app.command("compare")
def compare_profiles(
    profiles: list[Path] = typer.Argument(..., help="profile run directories; the first is the baseline"),
    metric: list[str] = typer.Option([], "--metric", "-M", help="only these metrics (repeatable)"),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="also write the table as Markdown here"),
) -> None:
    """Compare profiles: means, deltas in percent against the first, paired 95% intervals."""
    from rich.console import Console
    from rich.table import Table

    from datasteer.inheritance.compare import compare
    from datasteer.inheritance.profile import load_profile
    from datasteer.runs import atomic_write_text

    result = compare([load_profile(p) for p in profiles], metric or None)
    table = Table(title=f"baseline: {result.labels[0]} (paired over prompts; 'noise' = 95% CI contains 0)",
                  title_justify="left")
    head, rows = result.table()
    for i, header in enumerate(head):
        table.add_column(header, justify="left" if i == 0 else "right")
    for cells in rows:
        table.add_row(*cells)
    Console().print(table)
    if markdown is not None:
        atomic_write_text(markdown, result.to_markdown())


def _set_value(data: dict[str, Any], assignment: str) -> None:
    """--set a.b=value: value parsed as YAML (numbers, lists, booleans), path split on dots."""
    import yaml

    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (for example finetune.epochs=1), got '{assignment}'")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section of the recipe")
        node = node.setdefault(part, {})
    if isinstance(node, list) and parts[-1].isdigit() and int(parts[-1]) < len(node):
        node[int(parts[-1])] = value
    elif isinstance(node, dict):
        node[parts[-1]] = value
    else:
        raise ConfigError(f"--set {key}: the parent is not a section of the recipe")


def _recipe_config(model: Any, recipe: Path, overrides: list[str]) -> Any:
    """A recipe (file or built-in name) with --set overrides, validated into `model`."""
    from datasteer.config import build, load_recipe

    data = load_recipe(recipe)
    for item in overrides:
        _set_value(data, item)
    return build(model, data, f"recipe {recipe}")


def run_inherit(recipe: Path, out: Path, overrides: list[str], overwrite: bool, quiet: bool) -> None:
    from datasteer.config import InheritConfig
    from datasteer.inheritance.pipeline import inherit as run_pipeline

    cfg = _recipe_config(InheritConfig, recipe, overrides)
    result = run_pipeline(cfg, out, overwrite=overwrite, progress=not quiet)
    typer.echo(f"report: {result.report}")
    for line in result.headline():
        typer.echo(line)


@app.command()
def inherit(
    recipe: Path = typer.Argument(..., help="YAML recipe (see recipes/)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default runs/<recipe name>)"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe value: KEY=VALUE, dotted keys "
                                                     "(e.g. finetune.epochs=1, teachers.0.k=2); repeatable"),
    overwrite: bool = typer.Option(False, help="discard an existing run in --out made with another config"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Active inheritance end to end: generate, score, select (active and random), fine-tune, profile, report."""
    run_inherit(recipe, out or Path("runs") / recipe.stem, set_, overwrite, quiet)


demo_app = typer.Typer(help="Demos sized for a CPU: the embedded SmolLM2 (inherit) and tiny models (dpg).",
                       no_args_is_help=True)
app.add_typer(demo_app, name="demo")


@demo_app.command("inherit")
def demo_inherit(
    out: Path = typer.Option(Path("runs/demo-inherit"), "--out", "-o", help="run directory"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe value: KEY=VALUE (repeatable)"),
    overwrite: bool = typer.Option(False, help="discard an existing run in --out made with another config"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """The CPU demo of active inheritance (recipes/demo-inherit.yaml) on the embedded SmolLM2."""
    from datasteer.recipes import recipe_path

    run_inherit(recipe_path("demo-inherit"), out, set_, overwrite, quiet)


def run_dpg(recipe: Path, out: Path, overrides: list[str], overwrite: bool, quiet: bool) -> None:
    from datasteer.dpg.config import DPGConfig
    from datasteer.dpg.trainer import dpg as run_training

    cfg = _recipe_config(DPGConfig, recipe, overrides)
    result = run_training(cfg, out, overwrite=overwrite, progress=not quiet)
    typer.echo(f"report: {result.report}")
    key = result.summary["readout"] or "phi"
    for arm, entry in result.summary["arms"].items():
        start, final = entry.get("start", entry.get("phi_start")), entry.get("final", entry.get("phi_final"))
        line = f"{arm}: validation {key} {start:.4g} at step 0 -> {final:.4g} after {entry['examples_seen']} examples"
        if "examples_to" in entry:
            reach = ", ".join(f"{t}: {'not reached' if n is None else f'{n} examples'}"
                              for t, n in entry["examples_to"].items())
            line += f" ({reach})"
        typer.echo(line)


@app.command("dpg")
def dpg_command(
    recipe: Path = typer.Argument(..., help="YAML recipe or a built-in name (see recipes/)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default runs/<recipe name>)"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe value: KEY=VALUE, dotted keys "
                                                     "(e.g. grpo.steps=50, inner.learning_rate=1e-3); repeatable"),
    overwrite: bool = typer.Option(False, help="discard an existing run in --out made with another config"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines"),
) -> None:
    """Dataset Policy Gradient: train a generator so that fine-tuning a target on its data raises a metric."""
    run_dpg(recipe, out or Path("runs") / recipe.stem, set_, overwrite, quiet)


@demo_app.command("dpg")
def demo_dpg(
    out: Path = typer.Option(Path("runs/demo-dpg"), "--out", "-o", help="run directory"),
    recipe: str = typer.Option("demo-dpg-67", help="demo-dpg-67, demo-dpg-l2 or demo-dpg-uuid"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe value: KEY=VALUE (repeatable)"),
    overwrite: bool = typer.Option(False, help="discard an existing run in --out made with another config"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines"),
) -> None:
    """The CPU demo of DPG: write "67" into a tiny target's LM head, side by side with the naive baseline."""
    from datasteer.recipes import recipe_path

    run_dpg(recipe_path(recipe), out, set_, overwrite, quiet)


@app.command()
def attribute(
    ctx: typer.Context,
    input: str = typer.Argument(..., help="rows to score: 'text', or 'prompt' + 'completion' (.jsonl/.parquet/...)"),
    out: Path = typer.Option(..., "--out", "-o", help="output rows with the score column (.jsonl); OUT.meta.json "
                                                      "holds the metric value and the config"),
    eval: Optional[str] = typer.Option(None, "--eval", "-e", help="held-out texts (.txt lines or rows with 'text'): "
                                                                  "the metric is minus the loss on them"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="the target's spec (default embedded:smollm2)"),
    metric: Optional[str] = typer.Option(None, help="custom metric package.module:function(model, params)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with the fields of `attribute` and a "
                                                                       "`training:` section (SFTConfig)"),
    set_: list[str] = typer.Option([], "--set", help="KEY=VALUE over the config, e.g. training.learning_rate=1e-4"),
    column: str = typer.Option("metagrad", help="name of the score column"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Score each row by its exact metagradient: d metric / d weight of the row in the target's fine-tuning."""
    from datasteer.config import build, load_recipe
    from datasteer.metagrad.attribute import AttributeConfig, attribute as run_attribute

    data: dict[str, Any] = load_recipe(config) if config is not None else {}
    data["input"] = input
    _overlay(ctx, data, config is not None, model=model, eval=eval, metric=metric, column=column)
    for assignment in set_:
        _set_value(data, assignment)
    cfg = build(AttributeConfig, data, f"config {config}" if config else "flags")
    result = run_attribute(cfg, out, progress=not quiet)
    if not quiet:
        typer.echo(f"scored {result.rows} rows ({result.stats['steps']} training steps, {result.stats['strategy']} "
                   f"checkpoints) in {result.seconds:.1f}s; metric after training {result.value:.6g} -> {result.out}")


@app.command("metrics")
def list_metrics() -> None:
    """List the metrics `score` understands, with their parameters."""
    from datasteer.metrics import GROUPS, REGISTRY

    for name, entry in sorted(REGISTRY.items()):
        params = f" [{', '.join(entry.params)}]" if entry.params else ""
        typer.echo(f"{name}{params}: {entry.help}")
    for name, members in sorted(GROUPS.items()):
        typer.echo(f"{name} (group): {', '.join(members)}")
    typer.echo("package.module:function: a custom metric (see `custom`)")


@app.command()
def models() -> None:
    """List the model specs datasteer understands."""
    from datasteer.models import EMBEDDED_MODELS, TINY_ARCHS

    for name, info in EMBEDDED_MODELS.items():
        typer.echo(f"embedded:{name:<12} {info['description']}")
    for arch in TINY_ARCHS:
        typer.echo(f"tiny:{arch:<16} tiny random {arch} with the embedded tokenizer (tests, demos)")
    typer.echo("<local dir>            a save_pretrained directory")
    typer.echo("<org/name>             a Hugging Face hub id (needs a network or a warm cache)")


@app.command()
def version() -> None:
    """Print the datasteer version."""
    from datasteer import __version__

    typer.echo(__version__)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and exit status 2, never a traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except DatasteerError as err:
        typer.echo(f"datasteer: error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.echo("datasteer: interrupted; finished batches are saved, rerun the same command to resume", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except ClickException as err:  # usage errors: unknown flag, bad value
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
