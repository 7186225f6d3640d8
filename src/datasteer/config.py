"""The ground floor of every config: a strict pydantic base, validation into one-line errors, fingerprints.

Each feature package owns its config models beside its code (`generation/config.py`, `metrics/config.py`,
`inheritance/config.py`, `metagrad/config.py`, `dpg/config.py`); the Python API, YAML recipes
(`datasteer.recipes`) and CLI flags all fill those models, and defaults live in them only.

A config's *fingerprint* (everything that changes what a run produces) is what a run directory's manifest
records and what resume compares; operational knobs (concurrency, timeouts, retries, device) are left out
of it, so they can change between a crashed run and its resumption.
"""

from __future__ import annotations

import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from datasteer.errors import ConfigError

# Fields that change how fast or where work runs, never what it produces.
# where and how fast work runs, never what it produces: left out of fingerprints (a run resumes with other values)
# fields that never change what a run produces: a run may resume with other values (rate limits and prices of
# HTTP teachers pace and price requests; a batch's poll interval only changes when results are looked for; a
# tracker only watches)
OPERATIONAL_FIELDS = frozenset({"concurrency", "timeout_s", "max_retries", "device", "engine", "rpm", "tpm",
                                "prices", "poll_interval_s", "report_to"})

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo in a recipe never passes silently); assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def fingerprint(config: BaseModel) -> dict[str, Any]:
    """The part of a config that determines a run's output (operational fields removed)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in OPERATIONAL_FIELDS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(config.model_dump(mode="json"))


def unwrap(annotation: Any) -> list[Any]:
    """The alternatives of an annotation: Annotated and Optional/Union unpacked."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [alt for arg in typing.get_args(annotation) for alt in unwrap(arg)]
    return [annotation]


def child_annotation(annotation: Any, part: str) -> Any:
    """The annotation one step down `part` (a field name, a list index, a dict key); None when unknown."""
    for alt in unwrap(annotation):
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            field = alt.model_fields.get(part)
            if field is not None:
                return field.annotation
        origin = typing.get_origin(alt)
        if origin in (list, tuple) and part.isdigit():
            return typing.get_args(alt)[0]
        if origin is dict:
            return typing.get_args(alt)[1]
    return None


def _tagged_member(annotation: Any, tag: str) -> Any:
    """The member of a discriminated union whose literal discriminator field holds `tag` (None: not a tag)."""
    for alt in unwrap(annotation):
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            for field in alt.model_fields.values():
                kind = field.annotation
                if typing.get_origin(kind) is typing.Literal and typing.get_args(kind) == (tag,):
                    return alt
    return None


def _field_path(model: Any, loc: tuple[Any, ...]) -> tuple[str, Any]:
    """pydantic's error location as the user's dotted key (the tags of discriminated unions, a teacher's backend
    or a target's kind, are dropped: they are not keys the user wrote), and the annotation holding its last key."""
    parts, annotation, parent = [], model, None
    for item in loc:
        parent = annotation
        part = str(item)
        below = child_annotation(annotation, part) if annotation is not None else None
        if below is None and annotation is not None:
            member = _tagged_member(annotation, part)
            if member is not None:  # a discriminated union's tag: go on inside that member
                annotation = member
                continue
            if len(unwrap(annotation)) > 1 and not part.isdigit():
                continue  # pydantic's label of a plain union's member (e.g. "literal['all','printable']")
        parts.append(part)
        annotation = below
    return ".".join(parts), parent


def describe_validation_error(err: ValidationError, model: Any = None) -> str:
    first = err.errors()[0]
    loc = first["loc"]
    where, parent = _field_path(model, loc) if model is not None else (".".join(map(str, loc)), None)
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
    if first["type"] == "extra_forbidden" and first["loc"]:
        for alt in unwrap(parent):
            new = getattr(alt, "renamed", {}).get(str(first["loc"][-1])) if isinstance(alt, type) else None
            if new:
                message += f" (renamed: use {new})"
                break
    return f"{where or 'config'}: {message}{more}"


def build(model: type[M], data: dict[str, Any], source: str = "config") -> M:
    """Validate `data` into `model`, turning pydantic's report into a one-line ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid {source}: {describe_validation_error(err, model)}") from None


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid on `base`: sections (dicts) merge key by key, anything else (lists included) is replaced."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def coerce(model: type[M], config: M | dict[str, Any] | None, fields: dict[str, Any]) -> M:
    """The Python API's config argument: a config object, a dict or keyword arguments (or a mix: keyword
    arguments are laid over the config, sections merged key by key: `grpo={"max_steps": 5}` keeps the rest of
    the recipe's `grpo`)."""
    if isinstance(config, model) and not fields:
        return config
    data = config.model_dump(exclude_unset=True) if isinstance(config, BaseModel) else dict(config or {})
    return build(model, deep_merge(data, fields), f"{model.__name__} arguments")


def split_list(value: Any) -> Any:
    """'a,b' (a flag or a recipe string) -> ['a', 'b']."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value
