"""The Scorer protocol, the registry of scorers by name, and metric specs.

A scorer turns a batch of texts (and, for scorers that need them, their prompts) into one float
per text; NaN means "no value" (an unparseable judge answer, HD-D of a text that is too short, a
user function that returned NaN) and becomes a missing value (JSON null) in the scored rows.

The built-in scorers register themselves when `datasteer.metrics` is imported, which Python does before
it runs this module (a package's `__init__` runs before its submodules).

A metric spec names a registered scorer with optional parameters in brackets, and optionally the
column it writes:

    mtld                                  lexical diversity, column "mtld"
    length                                a group: length_chars, length_words, length_tokens, length_sentences
    toxicity[backend=detoxify,checkpoint=/ckpt/original.ckpt]
    judge[model=embedded:smollm2]
    mypkg.metrics:politeness              a custom function (module:function)
    custom[fn=mypkg.metrics:politeness,column=polite]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from datasteer.errors import ConfigError


@runtime_checkable
class Scorer(Protocol):
    name: str  # the column it writes
    higher_is_better: bool | None  # None: neither direction is "better" (a neutral statistic)
    batched: bool  # True: one call on many texts is much cheaper than many calls on one text
    batch_size: int  # texts per call (the runner cuts inputs into chunks of this size)
    needs_prompts: bool
    description: str  # what the column measures, recorded in the run summary

    def score(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> list[float]: ...

    def summarize(self, values: Sequence[float | None], groups: Sequence[str] | None) -> dict[str, Any]:
        """What the run summary adds for this column beyond count/mean/std/quantiles (e.g. toxicity's EMT);
        `groups[i]` is row i's prompt id (None when the rows have none)."""
        ...


@dataclasses.dataclass
class BaseScorer:
    """Convenience base with the protocol's attributes; subclasses implement `score`."""

    name: str
    higher_is_better: bool | None = True
    batched: bool = True
    batch_size: int = 256
    needs_prompts: bool = False
    description: str = ""

    def score(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> list[float]:
        raise NotImplementedError

    def summarize(self, values: Sequence[float | None], groups: Sequence[str] | None) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Free models or connections (the runner calls it when a metric is done)."""


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    column: str | None = None

    def __str__(self) -> str:
        params = dict(self.params)
        if self.column:
            params["column"] = self.column
        inner = ",".join(f"{k}={v}" for k, v in params.items())
        return f"{self.name}[{inner}]" if inner else self.name


Factory = Callable[..., "Scorer | list[Scorer]"]


@dataclasses.dataclass(frozen=True)
class Registered:
    factory: Factory
    help: str
    params: tuple[str, ...]  # accepted parameters (besides `column`)
    columns: Callable[[dict[str, str]], list[str]]  # the columns it writes, from its parameters, without building


REGISTRY: dict[str, Registered] = {}
GROUPS: dict[str, tuple[str, ...]] = {}


def register(name: str, help: str, params: Sequence[str] = (),
             columns: Callable[[dict[str, str]], list[str]] | None = None) -> Callable[[Factory], Factory]:
    """Decorator: make `factory(**params) -> Scorer` available under `name`. `columns(params)` declares the
    column(s) it writes (default: one column named `name`), so that a pipeline knows them before any model
    loads."""

    def wrap(factory: Factory) -> Factory:
        REGISTRY[name] = Registered(factory=factory, help=help, params=tuple(params),
                                    columns=columns or (lambda _params: [name]))
        return factory

    return wrap


def register_group(name: str, members: Sequence[str]) -> None:
    GROUPS[name] = tuple(members)


_SPEC = re.compile(r"^\s*([A-Za-z_][\w.]*(?::[A-Za-z_]\w*)?)\s*(?:\[(.*)\])?\s*$", re.S)


def parse_metric(text: str) -> MetricSpec:
    """'toxicity[backend=detoxify]' -> MetricSpec('toxicity', {'backend': 'detoxify'})."""
    match = _SPEC.match(text)
    if not match:
        raise ConfigError(f"cannot read metric '{text}'; write NAME, NAME[key=value,...] or package.module:function")
    name, inner = match.group(1), match.group(2)
    params: dict[str, str] = {}
    for item in _split_top(inner or "", ","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"metric '{text}': parameter '{item}' is not key=value")
        params[key.strip()] = value.strip()
    column = params.pop("column", None)
    if ":" in name:  # package.module:function
        params = {"fn": name, **params}
        name = "custom"
    return MetricSpec(name=name, params=params, column=column)


def parse_metrics(text: str | Sequence[str]) -> list[MetricSpec]:
    """A comma-separated list (commas inside [...] belong to the parameters), or a list of specs."""
    items = _split_top(text, ",") if isinstance(text, str) else list(text)
    specs = [parse_metric(item) for item in items if item.strip()]
    if not specs:
        raise ConfigError("no metrics given; for example --metrics mtld,length,readability")
    return specs


def _split_top(text: str, sep: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def build_scorers(specs: Sequence[MetricSpec | str]) -> list[Scorer]:
    """Scorers for the specs, groups expanded; unknown names and parameters fail here, before any work."""
    scorers: list[Scorer] = []
    for spec in specs:
        spec = parse_metric(spec) if isinstance(spec, str) else spec
        if spec.name in GROUPS:
            if spec.column:
                raise ConfigError(f"metric group '{spec.name}' writes several columns; it cannot take column=")
            members = GROUPS[spec.name]
            unused = set(spec.params) - {p for m in members for p in REGISTRY[m].params}
            if unused:
                raise ConfigError(f"metric group '{spec.name}' ({', '.join(members)}) takes no parameter(s) "
                                  f"{sorted(unused)}")
            for member in members:  # each member gets the parameters it knows
                params = {k: v for k, v in spec.params.items() if k in REGISTRY[member].params}
                scorers.extend(_build_one(MetricSpec(member, params)))
            continue
        scorers.extend(_build_one(spec))
    names = [s.name for s in scorers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"metric column(s) {duplicates} requested twice; drop one or give it column=NEW_NAME")
    return scorers


def metric_columns(specs: Sequence[MetricSpec | str]) -> list[str]:
    """The columns the specs write, as declared at registration (no scorer is built, no model loads)."""
    columns: list[str] = []
    for spec in specs:
        spec = parse_metric(spec) if isinstance(spec, str) else spec
        if spec.name in GROUPS:
            for member in GROUPS[spec.name]:
                params = {k: v for k, v in spec.params.items() if k in REGISTRY[member].params}
                columns.extend(REGISTRY[member].columns(params))
        elif spec.name in REGISTRY:
            declared = REGISTRY[spec.name].columns(spec.params)
            columns.extend([spec.column] if spec.column and len(declared) == 1 else declared)
        else:
            _build_one(spec)  # the one-line error for an unknown metric
    return columns


def _build_one(spec: MetricSpec) -> list[Scorer]:
    entry = REGISTRY.get(spec.name)
    if entry is None:
        known = sorted(REGISTRY) + sorted(GROUPS)
        raise ConfigError(f"unknown metric '{spec.name}'; known: {', '.join(known)}, or package.module:function")
    unknown = set(spec.params) - set(entry.params)
    if unknown:
        allowed = ", ".join(entry.params) or "none"
        raise ConfigError(f"metric '{spec.name}' has no parameter(s) {sorted(unknown)}; it takes: {allowed}")
    built = entry.factory(**spec.params)
    scorers = built if isinstance(built, list) else [built]
    if spec.column:
        if len(scorers) != 1:
            raise ConfigError(f"metric '{spec.name}' writes several columns; it cannot take column=")
        scorers[0].name = spec.column
    return scorers


def as_float(value: Any, where: str) -> float:
    """A parameter value as a float, or a one-line ConfigError."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number, got '{value}'") from None


def as_int(value: Any, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be an integer, got '{value}'") from None
