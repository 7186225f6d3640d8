"""matplotlib on the Agg backend (files only, no display), imported lazily so that the package imports
without it."""

from __future__ import annotations

from typing import Any

from datasteer.errors import optional_import


def pyplot() -> Any:
    matplotlib = optional_import("matplotlib", "plots", "pip install 'datasteer[train]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
