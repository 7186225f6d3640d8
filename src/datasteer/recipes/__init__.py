"""Recipes: the one mechanism that turns a YAML file (or a built-in name) plus `--set key=value` overrides
into a validated config, for every command.

    recipe_config(InheritConfig, "demo-inherit", ["finetune.num_train_epochs=1"])

A `--set` value is read by the type of the field it sets: a text field keeps the text as typed (`glyph=42`
is the string "42", `system_prompt=# be brief` keeps its hash), other fields read it as YAML (numbers,
booleans, lists such as `objectives=[mtld:max]`). The built-in recipes ship in this package (the
repository's `recipes/` folder points here).
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from datasteer.config import M, build, child_annotation, deep_merge, unwrap
from datasteer.errors import ConfigError, InputError

RECIPES_DIR = Path(__file__).resolve().parent
# which command a recipe of each config model is for (recipes of the other stages have no sections to tell)
COMMANDS = {"GenerateConfig": "generate", "InheritConfig": "inherit", "DPGConfig": "dpg", "PassiveConfig": "passive",
            "ProfileConfig": "profile"}


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: `1e-3` and `5e-5` are numbers (YAML 1.1 reads them as text), here and in
    every nested section that is passed through to TRL or peft."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_path(name: str) -> Path:
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise InputError(f"no built-in recipe '{name}'; available: {', '.join(builtin_recipes())}")
    return path


def describe(path: Path) -> tuple[str, str]:
    """(command, one-line description) of a recipe: `datasteer dpg` or `inherit` etc., and its summary."""
    data = load_recipe(path)
    kind = command_of(data) or "generate"
    comment = next((line.lstrip("# ").strip() for line in path.read_text(encoding="utf-8").splitlines()
                    if line.startswith("#")), "")
    text = " ".join(str(data.get("description") or comment).split())
    first = text.split(". ")[0].split("; ")[0].rstrip(".")
    if len(first) > 110:
        first = first[:107].rsplit(" ", 1)[0] + "..."
    return str(kind), first


def command_of(data: dict[str, Any]) -> str | None:
    """The command a recipe is for, from its sections (None: a stage recipe, e.g. for score or select)."""
    if "generator" in data:
        return "dpg"
    if "selection" in data:
        return "inherit"
    if "student" in data:
        return "passive"  # teachers and a student, nobody selects
    if data.get("toxicity") is True or "probes" in data:
        return "profile"
    return "generate" if "teachers" in data else None


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe (a file, or a built-in name) into a plain dict (validated by the caller's model)."""
    path = Path(path)
    if not path.is_file():
        if len(path.parts) == 1 and path.suffix in ("", ".yaml"):
            builtin = RECIPES_DIR / f"{path.stem}.yaml"
            if builtin.is_file():
                return load_recipe(builtin)
        raise InputError(f"recipe not found: {path} (a file path, or a built-in name: "
                         f"{', '.join(builtin_recipes())})")
    try:
        data = _yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"recipe {path} is not valid YAML{where}; fix the file and rerun") from None
    if not isinstance(data, dict):
        raise InputError(f"recipe {path} must be a YAML mapping of settings")
    data.pop("command", None)
    return data


# ---------------------------------------------------------------- --set, typed by the field it sets



def _accepts(annotation: Any) -> set[str]:
    kinds = set()
    for alt in unwrap(annotation):
        if alt is str or (typing.get_origin(alt) is typing.Literal and
                          any(isinstance(v, str) for v in typing.get_args(alt))):
            kinds.add("text")
        elif alt is type(None):
            kinds.add("none")
        elif typing.get_origin(alt) in (list, tuple) or alt in (list, tuple):
            kinds.add("list")
        elif typing.get_origin(alt) is dict or alt is dict or (isinstance(alt, type) and issubclass(alt, BaseModel)):
            kinds.add("mapping")
        else:
            kinds.add("other")
    return kinds


def _text_items(annotation: Any) -> bool:
    """Whether the field is a list of text (its items must stay text: `[6, 7, no]` is three strings)."""
    return any(typing.get_origin(alt) in (list, tuple) and typing.get_args(alt)[:1] == (str,)
               for alt in unwrap(annotation))


def parse_value(raw: str, annotation: Any) -> Any:
    """`raw` as the field's type expects it: text stays text; anything else is read as YAML."""
    kinds = _accepts(annotation) if annotation is not None else {"other"}
    try:
        parsed = _yaml(raw)
        if isinstance(parsed, list) and annotation is not None and _text_items(annotation):
            parsed = yaml.load(raw, Loader=yaml.BaseLoader)  # every scalar item as the text it was typed
    except yaml.YAMLError:
        parsed = raw
    if "text" not in kinds:
        return parsed
    if parsed is None and "none" in kinds and raw.strip() in ("null", "~", ""):
        return None
    if isinstance(parsed, list) and "list" in kinds or isinstance(parsed, dict) and "mapping" in kinds:
        return parsed
    return raw


def _model_fields(annotation: Any) -> set[str]:
    return {name for alt in unwrap(annotation) if isinstance(alt, type) and issubclass(alt, BaseModel)
            for name in alt.model_fields}


def apply_override(model: type[BaseModel], data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` to `data` (the recipe as a dict), the value typed by `model`'s field."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (for example seed=1), got '{assignment}'")
    parts = key.strip().split(".")
    annotation: Any = model
    node: Any = data
    for i, part in enumerate(parts):
        annotation = child_annotation(annotation, part) if annotation is not None else None
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: '{part}' is not an index of that list (0..{len(node) - 1})")
            if last:
                node[int(part)] = parse_value(raw, annotation)
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{parts[i - 1]}' is not a section of the recipe")
        if last:
            node[part] = parse_value(raw, annotation)
        else:
            if node.get(part) is None:
                node[part] = {}
            elif isinstance(node[part], str) and "path" in _model_fields(annotation):
                node[part] = {"path": node[part]}  # the `prompts: file.jsonl` shorthand, opened up
            node = node[part]


def recipe_config(model: type[M], recipe: str | Path | None, overrides: list[str] = (),  # type: ignore[assignment]
                  base: dict[str, Any] | None = None) -> M:
    """The config of `model` from a recipe (or none), `base` values (flags) over it, then `--set` overrides."""
    data = deep_merge(load_recipe(recipe) if recipe is not None else {}, base or {})
    for assignment in overrides:
        apply_override(model, data, assignment)
    try:
        return build(model, data, f"recipe {recipe}" if recipe is not None else "flags")
    except ConfigError:
        kind, expected = command_of(data), COMMANDS.get(model.__name__)
        if recipe is not None and kind is not None and expected is not None and kind != expected:
            raise ConfigError(f"{recipe} is a recipe for `datasteer {kind}`, not `datasteer {expected}`; run "
                              f"datasteer {kind} {recipe}") from None
        raise
