"""The Probe protocol, the registry of probes by name, and what a probe asks the model.

A probe scores a model on one benchmark without sampling: it loads the benchmark's items from their original
format (`load`), says which texts to score for each item (`requests`: a context and a continuation whose
log-likelihood is wanted), turns an item's scores into one row (`row`) and the rows into the benchmark's summary
(`summarize`). The stage (`datasteer.probes.runner.probe`) does the rest: batching on the model, resumable units,
the rows files and `summary.json`. A probe that evaluates the model itself (the lm-eval-harness backend) defines
`evaluate(items, loaded, *, batch_size, limit, seed, device) -> rows` instead of `requests`/`row` (each of its items
is then a unit of its own), and may define `resolve(text, subset, split)` and `describe(source, items)` when its
source is not a file or hub dataset. Optional: `plots(benchmark, summary) -> {file name: PNG bytes}`, and
`bind(tokenizer)`, called before `requests` when the prompts depend on the tokenizer (a chat template).

Built-in probes register themselves when `datasteer.probes` is imported:

    bbq           BBQ: accuracy on ambiguous and disambiguated contexts, bias scores, per category
    stereoset     StereoSet intrasentence and intersentence: SS, LM score, ICAT, per domain
    crows_pairs   CrowS-Pairs: % of pairs whose more-stereotyping sentence is more likely, per bias type
    mcqa          multiple-choice sets (OpenBookQA, MMLU, HellaSwag, ARC, ...): accuracy, ECE, reliability diagram
    judge         pairwise preferences as a judge: both orders, ties, win rate, position bias, attribute preferences
    lm_eval       lm-eval-harness tasks through `simple_evaluate` on the datasteer-loaded model (optional extra)

`package.module:ClassName` names a user probe (a class taking its options model, with the methods below).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field

from datasteer.config import StrictModel, build
from datasteer.errors import ConfigError

Score = Literal["mean", "sum"]


@dataclasses.dataclass(frozen=True)
class Request:
    """Score `continuation` after `context`. An empty context scores a whole sentence (from the model's BOS).

    Whitespace that ends the context belongs to the continuation ("Answer: " + "Paris" is scored as "Answer:" and
    " Paris", as lm-eval-harness does), so a BPE tokenizer sees the space-prefixed word it was trained on; unless
    `move_space` is False: a chat template's prompt ends in the newline the model always sees before it answers."""

    context: str
    continuation: str
    move_space: bool = True  # False: the context keeps its trailing whitespace (a chat template's "assistant\n")


@dataclasses.dataclass(frozen=True)
class LogLik:
    """The log-likelihood of a continuation: the sum of its tokens' natural-log probabilities, and its token
    count (the model's BOS is never one of them)."""

    logprob: float
    tokens: int

    def value(self, how: Score) -> float:
        """`mean`: the mean token log-likelihood (the log of the geometric mean of token probabilities);
        `sum`: the continuation's log-probability."""
        return self.logprob / self.tokens if how == "mean" else self.logprob


class ProbeOptions(StrictModel):
    """Options every likelihood probe has; each probe's options model extends it."""

    score: Score | None = Field(None, description="how an option or sentence is scored: mean (mean token "
                                "log-likelihood) or sum (its log-probability); default: the probe's own")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a benchmark's rows come from: a local file or folder (`path`), or a hub dataset (`hub`, with its
    config `subset` and `split`)."""

    text: str
    path: Path | None = None
    hub: str | None = None
    subset: str | None = None
    split: str | None = None


@runtime_checkable
class Probe(Protocol):
    name: str  # the registry name
    description: str
    score: Score  # the scoring in force (options.score or the probe's default)

    def load(self, source: Source) -> list[dict[str, Any]]:
        """The benchmark's items as plain dicts, each with a unique `item_id`; a file in the wrong format is an
        `InputError` naming the file, the row and what is missing."""
        ...

    def requests(self, item: dict[str, Any]) -> list[Request]: ...

    def row(self, item: dict[str, Any], scores: Sequence[LogLik]) -> dict[str, Any]: ...

    def summarize(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class Registered:
    factory: Callable[[Any], Any]
    help: str
    options: type[StrictModel]
    aliases: tuple[str, ...] = ()


REGISTRY: dict[str, Registered] = {}
ALIASES: dict[str, str] = {}  # benchmark names that imply a probe: openbookqa -> mcqa


def register(name: str, help: str, options: type[StrictModel] = ProbeOptions,
             aliases: Sequence[str] = ()) -> Callable[[Any], Any]:
    """Class decorator: make `cls(options)` available under `name`; `aliases` are benchmark names that mean this
    probe when a benchmark names none (`openbookqa` is an `mcqa` benchmark)."""

    def wrap(cls: Any) -> Any:
        REGISTRY[name] = Registered(factory=cls, help=help, options=options, aliases=tuple(aliases))
        for alias in aliases:
            ALIASES[alias] = name
        return cls

    return wrap


def probe_name(benchmark: str, probe: str | None) -> str:
    """The probe a benchmark uses: the one it names, else its own name or the probe that name is an alias of."""
    if probe:
        return probe
    if benchmark in REGISTRY or benchmark in ALIASES:
        return ALIASES.get(benchmark, benchmark)
    raise ConfigError(f"benchmark '{benchmark}' names no probe and is not a probe's name; name it after one "
                      f"({', '.join(known_probes())}) or give probe: NAME")


def known_probes() -> list[str]:
    return sorted(REGISTRY) + sorted(ALIASES)


def build_probe(name: str, options: dict[str, Any] | None = None, where: str = "probe") -> Any:
    """A probe instance for `name` (a registered probe or `package.module:Class`) with its options validated:
    unknown names and options are one-line ConfigErrors."""
    options = dict(options or {})
    if ":" in name:
        from datasteer.plugins import load_function

        cls = load_function(name, "custom probe")
        model = getattr(cls, "options_model", ProbeOptions)
        return cls(build(model, options, f"{where} options"))
    entry = REGISTRY.get(ALIASES.get(name, name))
    if entry is None:
        raise ConfigError(f"unknown probe '{name}'; known: {', '.join(known_probes())}, or package.module:Class")
    return entry.factory(build(entry.options, options, f"{where} options"))
