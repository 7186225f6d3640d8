"""Recipes shipped with the package (the repository's recipes/ folder points here)."""

from __future__ import annotations

from pathlib import Path

from datasteer.errors import InputError

RECIPES_DIR = Path(__file__).resolve().parent


def recipe_path(name: str) -> Path:
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise InputError(f"no built-in recipe '{name}'; available: {available}")
    return path
