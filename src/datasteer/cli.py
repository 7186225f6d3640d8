"""The `datasteer` command. Thin: recipe + `--set` + the few flags users type most -> one config -> one library
call -> a one-line summary.

Every stage command takes `--config RECIPE` (a YAML file or a built-in name) and `--set KEY=VALUE`; its flags
are shortcuts for fields of the same config and default to "not given", so defaults live in the config models
only (`datasteer.recipes.recipe_config` is the one mechanism).
"""

from __future__ import annotations

import enum
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from typer._click.exceptions import ClickException  # typer vendors click since 0.20

from datasteer import __version__
from datasteer.errors import ConfigError, DatasteerError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Steer language models through the synthetic data they are trained on.")
demo_app = typer.Typer(help="Demos sized for a CPU: the embedded SmolLM2 (inherit, passive) and tiny models (dpg).",
                       no_args_is_help=True)
app.add_typer(demo_app, name="demo")

Backend = enum.Enum("Backend", {name: name for name in ("transformers", "openai", "vllm", "openai-batch")}, type=str)
Combine = enum.Enum("Combine", {name: name for name in ("weighted", "lexicographic")}, type=str)
Method = enum.Enum("Method", {name: name for name in ("full", "lora")}, type=str)
OutputFormat = enum.Enum("OutputFormat", {name: name for name in ("jsonl", "parquet")}, type=str)
Engine = enum.Enum("Engine", {name: name for name in ("local", "ray")}, type=str)
DemoDPG = enum.Enum("DemoDPG", {name: name for name in ("demo-dpg-67", "demo-dpg-l2", "demo-dpg-uuid")}, type=str)

# Options every stage command shares.
OUT = typer.Option(..., "--out", "-o", help="run directory (rerun the same command to resume)")
RECIPE = typer.Option(None, "--config", "-c", help="YAML recipe or built-in name (`datasteer recipes`); flags and "
                      "--set override it")
SET = typer.Option([], "--set", metavar="KEY=VALUE", help="override a config value, dotted keys (teachers.0.k=2, "
                   "sampling.temperature=0.7); text fields keep the text as typed; repeatable")
OVERWRITE = typer.Option(False, "--overwrite", help="discard an existing run in --out made with another config")
QUIET = typer.Option(False, "--quiet", "-q", help="no progress output")
LOG_JSON = typer.Option(False, "--log-json", help="for machines: stderr carries one JSON object per line and event "
                        "(stage start/end, progress, warnings, errors, the closing summary); stdout keeps the result. "
                        "Without it, progress is a bar on a terminal and plain periodic lines elsewhere (SLURM, CI, "
                        "nohup)")


def _log_mode(log_json: bool) -> None:
    """How progress shows in this command: JSON events, or auto (a bar on a terminal, plain lines elsewhere)."""
    from datasteer import progress

    progress.configure("json" if log_json else "auto")


def _summary(command: str, **fields: Any) -> None:
    """The closing summary as a JSON event (--log-json); the human lines go to stdout as before. Main process only."""
    from datasteer import progress
    from datasteer.distributed import is_main_process

    if is_main_process():
        progress.emit("summary", command=command, **fields)


def _console() -> Any:
    from datasteer import progress

    return progress.console()


def say(text: str) -> None:
    """A command's closing lines, printed once: by the main process of a torchrun/accelerate launch."""
    from datasteer.distributed import is_main_process

    if is_main_process():
        typer.echo(text)
SEED = typer.Option(None, help="run seed (default: the config's, 0)")
# Where units of work run (operational: a run started on one engine resumes on the other).
ENGINE = typer.Option(None, "--engine", help="where units run: local, this process (default), or ray, Ray actors "
                      "(needs datasteer's ray extra)")
WORKERS = typer.Option(None, "--workers", help="ray: worker actors (default: the cluster's CPUs, or GPUs for GPU "
                       "teachers)")
RAY_ADDRESS = typer.Option(None, "--ray-address", help="ray: cluster to join, e.g. auto or ray://HOST:10001 "
                           "(default RAY_ADDRESS, else a local cluster for this run)")


def _engine(engine: Any, workers: Optional[int], ray_address: Optional[str]) -> dict[str, Any]:
    return _flags(engine__kind=engine, engine__workers=workers, engine__address=ray_address)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the datasteer version and exit")) -> None:
    """Steer language models through the synthetic data they are trained on."""


def _put(data: dict[str, Any], path: str, value: Any) -> None:
    """Set dotted `path` in `data` when a flag was given (None = not given); enums become their values."""
    if value is None or value == []:
        return
    if isinstance(value, enum.Enum):
        value = value.value
    *parents, last = path.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[last] = value


def _flags(**paths: Any) -> dict[str, Any]:
    """{dotted.path: value} -> nested dict of the given flags."""
    data: dict[str, Any] = {}
    for path, value in paths.items():
        _put(data, path.replace("__", "."), value)
    return data


def _config(model: type, recipe: Optional[str], sets: list[str], flags: dict[str, Any]) -> Any:
    from datasteer.recipes import recipe_config

    return recipe_config(model, recipe, sets, flags)


def _default_name(spec: str) -> str:
    name = spec.rstrip("/").split("/")[-1].split(":")[-1].split("?")[0]
    return "".join(c if c.isalnum() or c in "_.-" else "-" for c in name) or "teacher"


def _teachers(model: Optional[str], teacher: list[str]) -> list[tuple[str, str]]:
    specs = []
    for item in teacher:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ConfigError(f"--teacher expects NAME=MODEL (for example smol=embedded:smollm2), got '{item}'")
        specs.append((name, spec))
    if model:
        specs.insert(0, (_default_name(model), model))
    return specs


# ---------------------------------------------------------------- stages

@app.command()
def generate(
    prompts: Optional[str] = typer.Argument(None, help="prompts: .jsonl/.json/.parquet/.csv file, builtin:NAME or "
                                            "hf:DATASET"),
    out: Path = OUT, config: Optional[str] = RECIPE, set_: list[str] = SET,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="one teacher's model spec (see `datasteer "
                                        "models`)"),
    teacher: list[str] = typer.Option([], "--teacher", "-t", metavar="NAME=MODEL", help="a named teacher; "
                                      "repeatable for several teachers"),
    backend: Optional[Backend] = typer.Option(None, help="teachers' backend (default transformers)"),
    k: Optional[int] = typer.Option(None, "--k", "-k", help="candidates per prompt per teacher (default 1)"),
    temperature: Optional[float] = typer.Option(None, help="sampling temperature; 0 = greedy (default 1)"),
    top_p: Optional[float] = typer.Option(None, help="nucleus sampling mass (default 1)"),
    top_k: Optional[int] = typer.Option(None, help="top-k truncation (default none)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="tokens per completion at most (default 256)"),
    batch_size: Optional[int] = typer.Option(None, help="prompts per batch, one resumable unit (default 8)"),
    system_prompt: Optional[str] = typer.Option(None, help="system prompt (default: the chat template's)"),
    base_url: Optional[str] = typer.Option(None, help="openai backend: endpoint, e.g. http://127.0.0.1:8000/v1"),
    api_key_env: Optional[str] = typer.Option(None, help="openai backend: NAME of the env variable with the key"),
    concurrency: Optional[int] = typer.Option(None, help="openai backend: requests in flight (default 8)"),
    timeout_s: Optional[float] = typer.Option(None, "--timeout-s", help="openai backend: seconds per request "
                                              "(default 120)"),
    max_retries: Optional[int] = typer.Option(None, "--max-retries", help="openai backend: retries of a failed "
                                              "request, each shown on stderr (default 6)"),
    rpm: Optional[float] = typer.Option(None, "--rpm", help="openai backend: requests per minute at most, paced "
                                        "(default: no limit)"),
    tpm: Optional[float] = typer.Option(None, "--tpm", help="openai backend: tokens per minute at most, paced "
                                        "(default: no limit)"),
    input_price: Optional[float] = typer.Option(None, "--input-price", help="openai backends: price per million "
                                                "prompt tokens (with --output-price: the run's cost is estimated)"),
    output_price: Optional[float] = typer.Option(None, "--output-price", help="openai backends: price per million "
                                                 "completion tokens"),
    prompt_field: Optional[str] = typer.Option(None, help="column with the prompt text (default prompt)"),
    id_field: Optional[str] = typer.Option(None, help="column with a stable prompt id (default prompt_id or id)"),
    split: Optional[str] = typer.Option(None, help="split, for hf:DATASET prompts (default train)"),
    limit: Optional[int] = typer.Option(None, help="use only the first N prompts"),
    output_format: Optional[OutputFormat] = typer.Option(None, help="candidates file: jsonl (default) or parquet "
                                                         "(large runs)"),
    engine: Optional[Engine] = ENGINE, workers: Optional[int] = WORKERS, ray_address: Optional[str] = RAY_ADDRESS,
    seed: Optional[int] = SEED, overwrite: bool = OVERWRITE, quiet: bool = QUIET, log_json: bool = LOG_JSON,
) -> None:
    """Generate k candidate answers per prompt from one or several teachers."""
    _log_mode(log_json)
    from datasteer.config import deep_merge
    from datasteer.generation import generate as run_generate
    from datasteer.generation.config import GenerateConfig
    from datasteer.recipes import load_recipe

    per_teacher = _flags(backend=backend, k=k, sampling__temperature=temperature, sampling__top_p=top_p,
                         sampling__top_k=top_k, sampling__max_new_tokens=max_new_tokens, batch_size=batch_size,
                         system_prompt=system_prompt, base_url=base_url, api_key_env=api_key_env,
                         concurrency=concurrency, timeout_s=timeout_s, max_retries=max_retries, rpm=rpm, tpm=tpm,
                         prices__input=input_price, prices__output=output_price)
    data = _flags(prompts__path=prompts, prompts__prompt_field=prompt_field, prompts__id_field=id_field,
                  prompts__split=split, prompts__limit=limit, seed=seed, output_format=output_format,
                  **_engine(engine, workers, ray_address))
    specs = _teachers(model, teacher)
    if config is not None:
        if specs:
            raise ConfigError("--model/--teacher cannot be combined with --config; list teachers in the recipe")
        recipe = load_recipe(config)
        if isinstance(recipe.get("prompts"), str) and "prompts" in data:
            data["prompts"] = {"path": recipe["prompts"], **data["prompts"]}
        teachers = recipe.get("teachers")
        if per_teacher and isinstance(teachers, list):  # teacher flags apply to every teacher of the recipe
            data["teachers"] = [deep_merge(t, per_teacher) if isinstance(t, dict) else t for t in teachers]
    else:
        if not prompts and not set_:
            raise ConfigError("give a prompts file (or hf:DATASET) or --config RECIPE")
        data["teachers"] = [{"name": name, "model": spec, **per_teacher}
                            for name, spec in specs or [("smollm2", "embedded:smollm2")]]
    cfg = _config(GenerateConfig, config, set_, data)
    result = run_generate(cfg, out, overwrite=overwrite, progress=not quiet)
    resumed = result.rows - result.generated_rows
    sources = ", ".join(f"{n}: {c}" for n, c in result.per_source.items())
    typer.echo(f"{result.rows} candidates ({sources}) in {result.candidates_path}"
               + (f"; {resumed} resumed from an earlier run" if resumed else "")
               + f"; {result.generated_tokens} new tokens at {result.tokens_per_second:.1f} tok/s"
               + f" ({result.seconds:.1f}s in all, model loading included)"
               + (f"; estimated cost {result.cost:.6g} (at the teachers' prices per million tokens)"
                  if result.cost is not None else ""))
    _summary("generate", rows=result.rows, resumed=resumed, per_source=result.per_source,
             generated_tokens=result.generated_tokens, tokens_per_second=result.tokens_per_second,
             seconds=result.seconds, usage=result.usage, cost=result.cost, output=str(result.candidates_path))


@app.command()
def score(
    input: Optional[str] = typer.Argument(None, help="rows to score: .jsonl/.json/.parquet/.csv file"),
    out: Path = OUT, config: Optional[str] = RECIPE, set_: list[str] = SET,
    metrics: Optional[str] = typer.Option(None, "--metrics", "-M", help="comma-separated metric specs, e.g. "
                                          "mtld,length,toxicity (see `datasteer metrics`)"),
    text_field: Optional[str] = typer.Option(None, help="column with the texts to score (default completion)"),
    prompt_field: Optional[str] = typer.Option(None, help="column with the prompts, for judge and custom metrics "
                                               "(default prompt)"),
    id_field: Optional[str] = typer.Option(None, help="column grouping the samples of one prompt, for toxicity "
                                           "EMT/TP (default prompt_id)"),
    chunk_size: Optional[int] = typer.Option(None, help="rows per resumable unit of work (default 256)"),
    output_format: Optional[OutputFormat] = typer.Option(None, help="scored rows file: jsonl (default) or parquet "
                                                         "(large runs)"),
    engine: Optional[Engine] = ENGINE, workers: Optional[int] = WORKERS, ray_address: Optional[str] = RAY_ADDRESS,
    overwrite: bool = OVERWRITE, quiet: bool = QUIET, log_json: bool = LOG_JSON,
) -> None:
    """Add one column per metric to every row (length, MTLD, readability, toxicity, judge, custom)."""
    _log_mode(log_json)
    from datasteer.metrics import score as run_score
    from datasteer.metrics.config import ScoreConfig

    data = _flags(input=input, metrics=metrics, text_field=text_field, prompt_field=prompt_field, id_field=id_field,
                  chunk_size=chunk_size, output_format=output_format, **_engine(engine, workers, ray_address))
    if config is None and not set_:
        if "input" not in data:
            raise ConfigError("give the file to score (e.g. runs/demo-generate/candidates.jsonl) or --config RECIPE")
        if "metrics" not in data:
            raise ConfigError("give --metrics, e.g. --metrics mtld,length,toxicity (see `datasteer metrics`)")
    cfg = _config(ScoreConfig, config, set_, data)
    result = run_score(cfg, out, overwrite=overwrite, progress=not quiet)
    _print_stats(f"{result.rows} rows scored -> {result.scored_path}", result.summary["metrics"], "min", "max")
    _summary("score", rows=result.rows, metrics=result.summary["metrics"], output=str(result.scored_path))
    for name, s in result.summary["metrics"].items():
        if s["missing"]:
            typer.echo(f"note: {name} has no value for {s['missing']} of {result.rows} rows (kept as null; see the "
                       "metric's definition in `datasteer metrics`)")


def _print_stats(title: str, metrics: dict[str, Any], low: str, high: str) -> None:
    """A table of per-metric statistics, then the toxicity summaries (EMT, Toxicity Probability)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    keys = ("mean", "std", low, "p50", high)
    for header in ("metric", "mean", "std", low, "median", high, "missing"):
        table.add_column(header, justify="left" if header == "metric" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    for name, s in metrics.items():
        table.add_row(name, *(fmt(s.get(key)) for key in keys), str(s["missing"]))
    console = Console()
    console.print(table)
    for name, s in metrics.items():
        tox = s.get("toxicity")
        if tox and tox["prompts"]:
            console.print(f"{name}: Expected Maximum Toxicity {tox['expected_maximum_toxicity']:.4f} "
                          f"(std {tox['expected_maximum_toxicity_std']:.4f}), Toxicity Probability "
                          f"{tox['toxicity_probability']:.4f} over {tox['prompts']} prompts, "
                          f"{tox['samples_per_prompt']['min']}-{tox['samples_per_prompt']['max']} samples each")


@app.command()
def select(
    input: Optional[str] = typer.Argument(None, help="scored candidates (scored.jsonl of `datasteer score`)"),
    out: Path = OUT, config: Optional[str] = RECIPE, set_: list[str] = SET,
    objective: list[str] = typer.Option([], "--objective", "-O", metavar="COLUMN:max|COLUMN:min[:WEIGHT]|random",
                                        help="what to maximise or minimise; repeatable for several objectives"),
    combine: Optional[Combine] = typer.Option(None, help="several objectives: weighted sum of per-prompt z-scores "
                                              "(default) or lexicographic"),
    constraint: list[str] = typer.Option([], "--constraint", "-C", metavar="COLUMN OP NUMBER",
                                         help="eligibility, e.g. length_words>=50; repeatable"),
    source: list[str] = typer.Option([], "--source", "-s", metavar="TEACHER", help="select only among this "
                                     "teacher's candidates; repeatable (default: the whole pool)"),
    seed: Optional[int] = typer.Option(None, help="seed of the random baseline (default 0)"),
    id_field: Optional[str] = typer.Option(None, help="column grouping a prompt's candidates (default prompt_id)"),
    text_field: Optional[str] = typer.Option(None, help="column with the candidate text (default completion)"),
    overwrite: bool = OVERWRITE, quiet: bool = QUIET, log_json: bool = LOG_JSON,
) -> None:
    """Keep one candidate per prompt: the best by the objectives, or a random one (the baseline)."""
    _log_mode(log_json)
    from datasteer.inheritance.config import SelectConfig
    from datasteer.inheritance.select import select as run_select

    data = _flags(input=input, objectives=objective, combine=combine, constraints=constraint, sources=source,
                  seed=seed, id_field=id_field, text_field=text_field)
    cfg = _config(SelectConfig, config, set_, data)
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
    _summary("select", selected=result.selected, prompts=s["prompts"], candidates=s["candidates"],
             objectives=list(cfg.objectives), dropped=s["dropped_reasons"], output=str(result.selected_path))


@app.command()
def finetune(
    input: Optional[str] = typer.Argument(None, help="rows with prompt and completion (selected.jsonl)"),
    out: Path = OUT, config: Optional[str] = RECIPE, set_: list[str] = SET,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="the student's model spec (default "
                                        "embedded:smollm2)"),
    method: Optional[Method] = typer.Option(None, help="full fine-tuning (default) or LoRA"),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="num_train_epochs (default 2)"),
    learning_rate: Optional[float] = typer.Option(None, "--lr", "--learning-rate", help="peak learning rate "
                                                  "(default 5e-5)"),
    batch_size: Optional[int] = typer.Option(None, help="per_device_train_batch_size (default 8)"),
    gradient_accumulation: Optional[int] = typer.Option(None, help="gradient_accumulation_steps (default 1)"),
    max_length: Optional[int] = typer.Option(None, help="prompt + completion tokens (default 512)"),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank, lora.r (default 16)"),
    lora_alpha: Optional[float] = typer.Option(None, help="lora.lora_alpha (default 32)"),
    report_to: list[str] = typer.Option([], "--report-to", metavar="TRACKER", help="send the training metrics to a "
                                        "tracker as TRL does: tensorboard, wandb, trackio, mlflow, ...; repeatable "
                                        "(default none)"),
    seed: Optional[int] = SEED, overwrite: bool = OVERWRITE, quiet: bool = QUIET, log_json: bool = LOG_JSON,
) -> None:
    """Fine-tune a student on selected rows (TRL SFT, full or LoRA); the merged model lands in OUT/model."""
    _log_mode(log_json)
    from datasteer.inheritance.config import FinetuneConfig
    from datasteer.inheritance.finetune import finetune as run_finetune

    data = _flags(input=input, model=model, method=method, num_train_epochs=epochs, learning_rate=learning_rate,
                  per_device_train_batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation,
                  max_length=max_length, lora__r=lora_r, lora__lora_alpha=lora_alpha, seed=seed,
                  report_to=report_to or None)
    if config is None and "input" not in data and not set_:
        raise ConfigError("give the rows to train on (e.g. runs/select/selected.jsonl) or --config RECIPE")
    cfg = _config(FinetuneConfig, config, set_, data)
    result = run_finetune(cfg, out, overwrite=overwrite, progress=not quiet)
    how = " (already complete)" if result.resumed_from == "complete" else (
        f" (resumed from {result.resumed_from})" if result.resumed_from else "")
    loss = "-" if result.final_loss is None else f"{result.final_loss:.4f}"
    say(f"fine-tuned {cfg.model} on {result.examples} examples, {result.steps} steps, final loss {loss}"
               f"{how} in {result.seconds:.1f}s -> {result.model_dir}")
    _summary("finetune", examples=result.examples, steps=result.steps, final_loss=result.final_loss,
             seconds=result.seconds, resumed_from=result.resumed_from, model=str(result.model_dir))


@app.command()
def profile(
    model: Optional[str] = typer.Argument(None, help="model spec: embedded:smollm2, a fine-tuned model/ directory, "
                                          "an HF id"),
    out: Path = OUT, config: Optional[str] = RECIPE, set_: list[str] = SET,
    prompts: Optional[str] = typer.Option(None, "--prompts", "-p", help="held-out prompts (a file or builtin:NAME)"),
    metrics: Optional[str] = typer.Option(None, "--metrics", "-M", help="comma-separated metric specs (default "
                                          "length,lexical,readability,toxicity)"),
    label: Optional[str] = typer.Option(None, help="name of this profile in comparisons (default: from the model)"),
    k: Optional[int] = typer.Option(None, "--k", "-k", help="samples per prompt (default 1)"),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy (the default)"),
    top_p: Optional[float] = typer.Option(None, help="nucleus sampling mass (default 1)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="tokens per answer at most (default 256)"),
    toxicity: Optional[bool] = typer.Option(None, "--toxicity", help="toxicity mode: 25 samples per prompt at "
                                            "temperature 1, top_p 0.9; reports EMT and Toxicity Probability"),
    limit: Optional[int] = typer.Option(None, help="use only the first N prompts"),
    batch_size: Optional[int] = typer.Option(None, help="prompts per generation batch (default 16)"),
    system_prompt: Optional[str] = typer.Option(None, help="system prompt (default: the chat template's)"),
    template: Optional[str] = typer.Option(None, help="wrap each prompt: text with {prompt} in it, e.g. 'Continue "
                                           "this text: {prompt}'"),
    benchmark: list[str] = typer.Option([], "--benchmark", "-b", metavar="NAME=PATH",
                                        help="also score the model on a likelihood benchmark, NAME=PATH as "
                                        "`datasteer probe` takes it; repeatable"),
    probe_limit: Optional[int] = typer.Option(None, help="at most N items per --benchmark (a seeded sample)"),
    seed: Optional[int] = SEED, overwrite: bool = OVERWRITE, quiet: bool = QUIET, log_json: bool = LOG_JSON,
) -> None:
    """Profile what a model writes on held-out prompts: every metric, per-prompt rows and a summary."""
    _log_mode(log_json)
    from datasteer.inheritance.config import ProfileConfig
    from datasteer.inheritance.profile import profile as run_profile
    from datasteer.probes.config import parse_benchmark

    data = _flags(model=model, prompts__path=prompts, prompts__limit=limit, prompts__template=template,
                  metrics=metrics, label=label, k=k, sampling__temperature=temperature, sampling__top_p=top_p,
                  sampling__max_new_tokens=max_new_tokens, toxicity=toxicity, batch_size=batch_size,
                  system_prompt=system_prompt, seed=seed, probe_limit=probe_limit,
                  probes=dict(parse_benchmark(b) for b in benchmark) or None)
    cfg = _config(ProfileConfig, config, set_, data)
    result = run_profile(cfg, out, overwrite=overwrite, progress=not quiet)
    s = result.summary
    _print_stats(f"profile '{result.label}' of {result.model}: {s['samples']} samples (k={s['k']}, temperature "
                 f"{s['sampling']['temperature']}) -> {result.path}", result.metrics, "p5", "p95")
    _say_probes(s.get("probes", {}))
    _summary("profile", label=result.label, model=result.model, samples=s["samples"], metrics=result.metrics,
             probes=s.get("probes", {}), output=str(result.path))


def _say_probes(summary: dict[str, Any]) -> None:
    """One line per benchmark of a probe summary: its top-level numbers."""
    for name, entry in summary.items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if isinstance(v, float))
        say(f"{name}: {shown}")


@app.command()
def probe(
    model: Optional[str] = typer.Argument(None, help="model spec: embedded:smollm2, a fine-tuned model/ directory, "
                                          "an HF id"),
    out: Path = OUT, config: Optional[str] = RECIPE, set_: list[str] = SET,
    benchmark: list[str] = typer.Option([], "--benchmark", "-b", metavar="NAME=PATH",
                                        help="NAME=PATH (bbq, stereoset, crows_pairs, mcqa, "
                                        "openbookqa, mmlu, lm_eval, ...; a local file/folder or hf:OWNER/NAME); "
                                        "repeatable"),
    limit: Optional[int] = typer.Option(None, help="at most N items per benchmark (a seeded sample)"),
    batch_size: Optional[int] = typer.Option(None, help="sequences per forward pass (default 16)"),
    seed: Optional[int] = SEED, overwrite: bool = OVERWRITE, quiet: bool = QUIET, log_json: bool = LOG_JSON,
) -> None:
    """Score a model, without sampling, on likelihood benchmarks (social bias, calibration): rows and summary.json."""
    _log_mode(log_json)
    from datasteer.probes import probe as run_probe
    from datasteer.probes.config import ProbeConfig, parse_benchmark

    benchmarks = dict(parse_benchmark(b) for b in benchmark) or None
    data = _flags(model=model, benchmarks=benchmarks, limit=limit, batch_size=batch_size, seed=seed)
    cfg = _config(ProbeConfig, config, set_, data)
    result = run_probe(cfg, out, overwrite=overwrite, progress=not quiet)
    _say_probes(result.summary)
    say(f"-> {result.run_dir}")
    _summary("probe", benchmarks=result.summary, output=str(result.run_dir))


@app.command("compare")
def compare_profiles(
    profiles: list[Path] = typer.Argument(..., help="profile run directories; the first is the baseline"),
    metric: list[str] = typer.Option([], "--metric", "-M", metavar="COLUMN", help="only these metrics; repeatable"),
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


# ---------------------------------------------------------------- pipelines

def run_inherit(recipe: str | Path, out: Path, overrides: list[str], overwrite: bool, quiet: bool,
                flags: dict[str, Any] | None = None) -> None:
    from datasteer.inheritance.config import InheritConfig
    from datasteer.inheritance.pipeline import inherit as run_pipeline

    result = run_pipeline(_config(InheritConfig, str(recipe), overrides, flags or {}), out, overwrite=overwrite,
                          progress=not quiet, console=_console())
    typer.echo(f"report: {result.report}")
    for line in result.headline():
        typer.echo(line)
    _summary("inherit", report=str(result.report), headline=result.headline())


def run_dpg(recipe: str | Path, out: Path, overrides: list[str], overwrite: bool, quiet: bool) -> None:
    from datasteer.dpg.config import DPGConfig
    from datasteer.dpg.trainer import dpg as run_training

    result = run_training(_config(DPGConfig, str(recipe), overrides, {}), out, overwrite=overwrite,
                          progress=not quiet, console=_console())
    say(f"report: {result.report}")
    for line in result.headline():
        say(line)
    _summary("dpg", report=str(result.report), headline=result.headline(), arms=result.summary.get("arms"))


def _default_out(recipe: str) -> Path:
    return Path("runs") / Path(recipe).stem


@app.command()
def inherit(
    recipe: str = typer.Argument(..., help="YAML recipe or built-in name (`datasteer recipes`)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default runs/<recipe name>)"),
    set_: list[str] = SET, overwrite: bool = OVERWRITE, quiet: bool = QUIET, log_json: bool = LOG_JSON,
    engine: Optional[Engine] = ENGINE, workers: Optional[int] = WORKERS, ray_address: Optional[str] = RAY_ADDRESS,
) -> None:
    """Active inheritance end to end: generate, score, select (active and random), fine-tune, profile, report."""
    _log_mode(log_json)
    run_inherit(recipe, out or _default_out(recipe), set_, overwrite, quiet, _engine(engine, workers, ray_address))


@app.command("passive")
def passive_command(
    recipe: str = typer.Argument(..., help="YAML recipe or built-in name (`datasteer recipes`), e.g. demo-passive"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default runs/<recipe name>)"),
    set_: list[str] = SET, overwrite: bool = OVERWRITE, quiet: bool = QUIET, log_json: bool = LOG_JSON,
    engine: Optional[Engine] = ENGINE, workers: Optional[int] = WORKERS, ray_address: Optional[str] = RAY_ADDRESS,
) -> None:
    """Passive inheritance: one student per teacher on random answers, every profile of base vs each student."""
    _log_mode(log_json)
    from datasteer.inheritance.config import PassiveConfig
    from datasteer.inheritance.passive import passive as run_study

    cfg = _config(PassiveConfig, recipe, set_, _engine(engine, workers, ray_address))
    result = run_study(cfg, out or _default_out(recipe), overwrite=overwrite, progress=not quiet,
                       console=_console())
    say(f"report: {result.report}")
    for label, dims in result.changed().items():
        shown = "; ".join(f"{d.group}: {d.name} {d.delta:+.4g} [{d.low:.4g}, {d.high:.4g}]" for d in dims)
        say(f"{label}: {len(dims)} of {len(result.dimensions[label])} dimensions changed" + (f": {shown}"
                                                                                             if shown else ""))
    _summary("passive", report=str(result.report),
             changed={label: [f"{d.group}: {d.name}" for d in dims] for label, dims in result.changed().items()})


@app.command()
def pairwise(
    first: Path = typer.Argument(..., help="the baseline's profile run directory (its answers are response 2)"),
    second: Path = typer.Argument(..., help="the candidate's profile run directory (response 1): its win rate"),
    out: Path = OUT, config: Optional[str] = RECIPE, set_: list[str] = SET,
    judge: Optional[str] = typer.Option(None, "--judge", help="the judge model spec (default embedded:smollm2)"),
    limit: Optional[int] = typer.Option(None, help="judge at most N pairs (a seeded sample)"),
    seed: Optional[int] = SEED, overwrite: bool = OVERWRITE, quiet: bool = QUIET, log_json: bool = LOG_JSON,
) -> None:
    """Judge two profiles' answers pairwise (both orders, ties): the second model's win rate with a 95% interval."""
    _log_mode(log_json)
    from datasteer.inheritance.config import PairwiseConfig
    from datasteer.inheritance.preferences import pairwise as run_pairwise

    cfg = _config(PairwiseConfig, config, set_, _flags(judge=judge, limit=limit, seed=seed))
    result = run_pairwise(first, second, cfg, out, overwrite=overwrite, progress=not quiet)
    s = result.summary
    rate = s["win_rate"]
    ci = f", 95% CI [{rate['ci95'][0]:.3f}, {rate['ci95'][1]:.3f}]" if rate["ci95"] else ""
    say(f"{s['second']} vs {s['first']} judged by {s['judge']}: win rate {rate['mean']:.3f}{ci} over {s['pairs']} "
        f"pairs ({s['wins']} wins, {s['losses']} losses, ties {s['tie_rate']:.2f}; first-position rate "
        f"{s['first_position_rate']:.2f}) -> {result.run_dir}")
    _summary("pairwise", **s, output=str(result.run_dir))


@app.command("dpg")
def dpg_command(
    recipe: str = typer.Argument(..., help="YAML recipe or built-in name (`datasteer recipes`)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default runs/<recipe name>)"),
    set_: list[str] = SET, overwrite: bool = OVERWRITE, quiet: bool = QUIET, log_json: bool = LOG_JSON,
) -> None:
    """Dataset Policy Gradient: train a generator so that fine-tuning a target on its data raises a metric."""
    _log_mode(log_json)
    run_dpg(recipe, out or _default_out(recipe), set_, overwrite, quiet)


@demo_app.command("inherit")
def demo_inherit(
    out: Path = typer.Option(Path("runs/demo-inherit"), "--out", "-o", help="run directory"),
    set_: list[str] = SET, overwrite: bool = OVERWRITE, quiet: bool = QUIET, log_json: bool = LOG_JSON,
    engine: Optional[Engine] = ENGINE, workers: Optional[int] = WORKERS, ray_address: Optional[str] = RAY_ADDRESS,
) -> None:
    """The CPU demo of active inheritance (recipe demo-inherit) on the embedded SmolLM2."""
    _log_mode(log_json)
    run_inherit("demo-inherit", out, set_, overwrite, quiet, _engine(engine, workers, ray_address))


@demo_app.command("passive")
def demo_passive(
    out: Path = typer.Option(Path("runs/demo-passive"), "--out", "-o", help="run directory"),
    set_: list[str] = SET, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
) -> None:
    """The CPU study of passive inheritance (recipe demo-passive): the embedded SmolLM2 as two teachers."""
    passive_command("demo-passive", out, set_, overwrite, quiet, None, None, None)


@demo_app.command("dpg")
def demo_dpg(
    out: Path = typer.Option(Path("runs/demo-dpg"), "--out", "-o", help="run directory"),
    recipe: DemoDPG = typer.Option(DemoDPG("demo-dpg-67"), help="which demo recipe"),
    set_: list[str] = SET, overwrite: bool = OVERWRITE, quiet: bool = QUIET, log_json: bool = LOG_JSON,
) -> None:
    """The CPU demo of DPG: write "67" into a tiny target's LM head, side by side with the naive baseline."""
    _log_mode(log_json)
    run_dpg(recipe.value, out, set_, overwrite, quiet)


@app.command()
def attribute(
    input: Optional[str] = typer.Argument(None, help="rows to score: 'text', or 'prompt' + 'completion'"),
    out: Path = typer.Option(..., "--out", "-o", help="output rows with the score column (.jsonl); OUT.meta.json "
                             "holds the metric value and the config"),
    config: Optional[str] = RECIPE, set_: list[str] = SET,
    eval_texts: Optional[str] = typer.Option(None, "--eval-texts", "-e", help="held-out texts (.txt lines or rows "
                                             "with 'text'): the metric is minus the loss on them"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="the target's spec (default embedded:smollm2)"),
    metric: Optional[str] = typer.Option(None, help="custom metric package.module:function(model, params)"),
    column: Optional[str] = typer.Option(None, help="name of the score column (default metagrad)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing OUT file (never the input)"),
    quiet: bool = QUIET, log_json: bool = LOG_JSON,
) -> None:
    """Score each row by its exact metagradient: d metric / d weight of the row in the target's fine-tuning."""
    _log_mode(log_json)
    from datasteer.metagrad.attribute import AttributeConfig
    from datasteer.metagrad.attribute import attribute as run_attribute

    data = _flags(input=input, eval_texts=eval_texts, model=model, metric=metric, column=column)
    cfg = _config(AttributeConfig, config, set_, data)
    result = run_attribute(cfg, out, progress=not quiet, overwrite=overwrite)
    if not quiet:
        say(f"scored {result.rows} rows ({result.stats['steps']} training steps, {result.stats['strategy']} "
                   f"checkpoints) in {result.seconds:.1f}s; metric after training {result.value:.6g} -> {result.out}")
    _summary("attribute", rows=result.rows, value=result.value, seconds=result.seconds, output=str(result.out))


@app.command()
def push(
    run_dir: Path = typer.Argument(..., help="a finished run directory: a finetune run or DPG arm (the model), any "
                                   "other run with a dataset card (its rows, as Parquet)"),
    repo: str = typer.Option(..., "--repo", "-r", help="the Hub repository, NAME or OWNER/NAME (created if needed)"),
    private: bool = typer.Option(False, "--private", help="create the repository private"),
    message: Optional[str] = typer.Option(None, "--message", "-m", help="commit message"),
    quiet: bool = QUIET, log_json: bool = LOG_JSON,
) -> None:
    """Upload a run to the Hugging Face Hub with its card: a model (weights, tokenizer, model card) or rows (Parquet,
    dataset card). The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT picks another Hub."""
    from datasteer.hub import push as run_push

    _log_mode(log_json)
    if quiet or log_json:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    result = run_push(run_dir, repo, private=private, message=message)
    say(f"pushed {len(result.files)} files to the {result.repo_type} repository {result.repo_id} "
        f"(commit {result.commit[:12]}): {result.url}")
    _summary("push", repo_id=result.repo_id, repo_type=result.repo_type, url=result.url, commit=result.commit,
             files=result.files)


# ---------------------------------------------------------------- what is there

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
def recipes() -> None:
    """List the built-in recipes: the command that runs each, and what it does."""
    from datasteer.recipes import builtin_recipes, describe

    for name, path in builtin_recipes().items():
        command, text = describe(path)
        typer.echo(f"{name:<22} datasteer {command:<8} {text}")


@app.command()
def version() -> None:
    """Print the datasteer version."""
    typer.echo(__version__)


class _StderrWarnings(logging.Handler):
    """Library warnings (a teacher's retries, ...) as `datasteer: warning: ...` lines, credentials masked."""

    def emit(self, record: logging.LogRecord) -> None:
        from datasteer import progress
        from datasteer.secrets import redact_text

        try:
            message = redact_text(record.getMessage())
            if progress.mode() == "json":
                progress.emit("warning", message=message)
            else:
                typer.echo(f"datasteer: warning: {message}", err=True)
        except Exception:  # noqa: BLE001 - a warning must never break the run
            self.handleError(record)


def _error_line(message: str) -> str:
    from datasteer.secrets import redact_text

    return "datasteer: error: " + " ".join(redact_text(message).split())


def _say_error(message: str, exit_code: int) -> None:
    """The one error line on stderr: `datasteer: error: ...`, or an `error` JSON event with --log-json."""
    from datasteer import progress

    line = _error_line(message)
    if progress.mode() == "json":
        progress.emit("error", message=line.removeprefix("datasteer: error: "), exit_code=exit_code)
    else:
        typer.echo(line, err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors are one line on stderr and exit status 2, never a traceback; so are OS errors
    (a read-only folder, a full disk) that no stage turned into a DatasteerError. Credentials never reach stderr."""
    from datasteer import progress

    progress.configure("auto")  # a command with --log-json sets json; an earlier in-process call's choice is gone
    logger = logging.getLogger("datasteer")
    if not any(isinstance(h, _StderrWarnings) for h in logger.handlers):
        logger.addHandler(_StderrWarnings(logging.WARNING))
    try:
        app(args=argv, standalone_mode=False)
    except DatasteerError as err:
        _say_error(str(err), err.exit_code)
        sys.exit(err.exit_code)
    except OSError as err:  # last resort: every stage should raise an OutputError naming what it could not write
        where = err.filename if isinstance(err.filename, str) else ""
        reason = err.strerror or type(err).__name__
        _say_error(f"{where + ': ' if where else ''}{reason}; check that path (permissions, free space, a file "
                   "where a folder is needed) and rerun", 2)
        sys.exit(2)
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
