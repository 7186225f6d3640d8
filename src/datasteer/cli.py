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

    def given(name: str) -> bool:  # a flag the user typed (not its default)
        source = ctx.get_parameter_source(name)
        return source is not None and source.name == "COMMANDLINE"

    if config is not None:
        data: dict[str, Any] = load_recipe(config)
        data.setdefault("prompts", {})
        if isinstance(data["prompts"], str):
            data["prompts"] = {"path": data["prompts"]}
        if prompts:
            data["prompts"]["path"] = prompts
        for name, value in (("prompt_field", prompt_field), ("id_field", id_field), ("split", split),
                            ("limit", limit)):
            if given(name):
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
    for name, value in (("text_field", text_field), ("prompt_field", prompt_field), ("id_field", id_field),
                        ("chunk_size", chunk_size)):
        source = ctx.get_parameter_source(name)
        if config is None or (source is not None and source.name == "COMMANDLINE"):
            data[name] = value
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
