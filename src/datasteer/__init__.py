"""datasteer: steer language models through the synthetic data they are trained on.

The Python API (each stage takes a config object, a dict, a recipe or keyword arguments, plus `out=`):

    import datasteer

    gen = datasteer.generate(prompts="prompts.jsonl", teachers=[{"name": "smol", "model": "embedded:smollm2"}],
                             out="runs/gen")
    gen.dataset()      # the candidates as a datasets.Dataset

Stages: `generate`, `score`, `select`, `finetune`, `profile`, `inherit`, `run_dpg`, `attribute`; the metagradient
engine `metagradients`; their configs; `load_rows` for any rows file a run writes. The names load on first use
(PEP 562), so `import datasteer` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from datasteer.errors import DatasteerError  # noqa: E402

# name -> module that defines it; imported on first access.
_LAZY: dict[str, str] = {
    "generate": "datasteer.api",
    "score": "datasteer.api",
    "select": "datasteer.api",
    "finetune": "datasteer.api",
    "profile": "datasteer.api",
    "inherit": "datasteer.api",
    "run_dpg": "datasteer.api",  # `datasteer.dpg` is the DPG package, so its stage function has a verb
    "attribute": "datasteer.api",
    "probe": "datasteer.api",
    "passive": "datasteer.api",
    "pairwise": "datasteer.api",
    "metagradients": "datasteer.metagrad.engine",
    "load_rows": "datasteer.rows",
    "GenerateConfig": "datasteer.generation.config",
    "ScoreConfig": "datasteer.metrics.config",
    "SelectConfig": "datasteer.inheritance.config",
    "FinetuneConfig": "datasteer.inheritance.config",
    "ProfileConfig": "datasteer.inheritance.config",
    "InheritConfig": "datasteer.inheritance.config",
    "PassiveConfig": "datasteer.inheritance.config",
    "PairwiseConfig": "datasteer.inheritance.config",
    "ProbeConfig": "datasteer.probes.config",
    "DPGConfig": "datasteer.dpg.config",
    "TrainingConfig": "datasteer.metagrad.config",
    "AttributeConfig": "datasteer.metagrad.attribute",
}

__all__ = ["DatasteerError", "__version__", *_LAZY]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from datasteer.api import (  # noqa: F401
        attribute,
        finetune,
        generate,
        inherit,
        pairwise,
        passive,
        probe,
        profile,
        run_dpg,
        score,
        select,
    )
    from datasteer.dpg.config import DPGConfig  # noqa: F401
    from datasteer.generation.config import GenerateConfig  # noqa: F401
    from datasteer.inheritance.config import (  # noqa: F401
        FinetuneConfig,
        InheritConfig,
        PairwiseConfig,
        PassiveConfig,
        ProfileConfig,
        SelectConfig,
    )
    from datasteer.metagrad.attribute import AttributeConfig  # noqa: F401
    from datasteer.metagrad.config import TrainingConfig  # noqa: F401
    from datasteer.metagrad.engine import metagradients  # noqa: F401
    from datasteer.metrics.config import ScoreConfig  # noqa: F401
    from datasteer.probes.config import ProbeConfig  # noqa: F401
    from datasteer.rows import load_rows  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'datasteer' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
