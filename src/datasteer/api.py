"""The Python API: one function per stage, the same stages as the CLI, configured the same three ways.

    import datasteer

    gen = datasteer.generate(prompts="prompts.jsonl", teachers=[{"name": "smol", "model": "embedded:smollm2", "k": 4}],
                             out="runs/gen")
    scored = datasteer.score({"input": str(gen.candidates_path), "metrics": ["mtld", "length"]}, out="runs/score")
    chosen = datasteer.select(datasteer.SelectConfig(input=str(scored.scored_path), objectives=["mtld:max"]),
                              out="runs/select")
    chosen.dataset()                                  # a datasets.Dataset with explicit features

Each function takes its stage's config as a config object, a dict, a recipe (a YAML file or a built-in name), or
keyword arguments (keyword arguments override the fields of the first three: `datasteer.config.coerce`), plus
`out=` (the run directory) and the stage's own options (`overwrite`, `progress`, ...). It writes the run
directory, resumes a run that was stopped, and returns the stage's result. Validation errors are `ConfigError`s
with one-line messages, as on the command line.

This module is the top floor beside `cli`: it may import every feature package, and nothing but
`datasteer/__init__.py` imports it. Feature packages are imported inside the functions so that importing the API
stays cheap (torch, TRL and the rest load when a stage runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from datasteer.config import coerce
from datasteer.recipes import recipe_config
from datasteer.rows import load_rows

if TYPE_CHECKING:
    from rich.console import Console

    from datasteer.dpg.trainer import DPGResult
    from datasteer.generation.base import Teacher
    from datasteer.generation.runner import GenerateResult
    from datasteer.inheritance.finetune import FinetuneResult
    from datasteer.inheritance.passive import PassiveResult
    from datasteer.inheritance.pipeline import InheritResult
    from datasteer.inheritance.preferences import PairwiseResult
    from datasteer.inheritance.profile import Profile
    from datasteer.inheritance.select import SelectResult
    from datasteer.metagrad.attribute import AttributeResult
    from datasteer.metrics.base import Scorer
    from datasteer.metrics.runner import ScoreResult
    from datasteer.probes.runner import ProbeResult

M = TypeVar("M", bound=BaseModel)
ConfigArg = Any  # a config object, a dict, a recipe path or built-in recipe name, or None (keyword arguments only)

__all__ = ["attribute", "finetune", "generate", "inherit", "load_rows", "pairwise", "passive", "probe", "profile",
           "run_dpg", "score", "select"]


def _config(model: type[M], config: ConfigArg, fields: dict[str, Any]) -> M:
    """The stage's config from the API's arguments: a recipe goes through the CLI's own mechanism
    (`recipes.recipe_config`), a config object or a dict through `config.coerce`; keyword arguments merge over
    either."""
    if isinstance(config, (str, Path)):
        return recipe_config(model, config, (), fields)
    return coerce(model, config, fields)


def generate(config: ConfigArg = None, /, *, out: str | Path, overwrite: bool = False, progress: bool = True,
             backends: dict[str, Teacher] | None = None, **fields: Any) -> GenerateResult:
    """k candidates per prompt from every teacher (`GenerateConfig`) into the run directory `out`.

    `backends` passes ready teachers (already loaded models) by teacher name.
    """
    from datasteer.generation.config import GenerateConfig
    from datasteer.generation.runner import generate as run

    return run(_config(GenerateConfig, config, fields), out, overwrite=overwrite, progress=progress,
               teachers=backends)


def score(config: ConfigArg = None, /, *, out: str | Path, overwrite: bool = False, progress: bool = True,
          scorers: list[Scorer] | None = None, **fields: Any) -> ScoreResult:
    """One column per metric on every row of `input` (`ScoreConfig`) into the run directory `out`.

    `scorers` passes ready scorer objects instead of building them from the metric specs.
    """
    from datasteer.metrics.config import ScoreConfig
    from datasteer.metrics.runner import score as run

    return run(_config(ScoreConfig, config, fields), out, overwrite=overwrite, progress=progress, scorers=scorers)


def select(config: ConfigArg = None, /, *, out: str | Path, overwrite: bool = False, **fields: Any) -> SelectResult:
    """One row per prompt, by objectives over scored columns or at random (`SelectConfig`), into `out`."""
    from datasteer.inheritance.config import SelectConfig
    from datasteer.inheritance.select import select as run

    return run(_config(SelectConfig, config, fields), out, overwrite=overwrite)


def finetune(config: ConfigArg = None, /, *, out: str | Path, overwrite: bool = False, progress: bool = True,
             loaded: Any = None, **fields: Any) -> FinetuneResult:
    """Supervised fine-tuning of a student on selected rows (`FinetuneConfig`, TRL's SFT); the model lands in
    `out/model`. `loaded` passes an already loaded `datasteer.models.LoadedModel`."""
    from datasteer.inheritance.config import FinetuneConfig
    from datasteer.inheritance.finetune import finetune as run

    return run(_config(FinetuneConfig, config, fields), out, overwrite=overwrite, progress=progress, loaded=loaded)


def profile(config: ConfigArg = None, /, *, out: str | Path, overwrite: bool = False, progress: bool = True,
            loaded: Any = None, **fields: Any) -> Profile:
    """What a model writes on held-out prompts, measured by every metric (`ProfileConfig`), into `out`."""
    from datasteer.inheritance.config import ProfileConfig
    from datasteer.inheritance.profile import profile as run

    return run(_config(ProfileConfig, config, fields), out, overwrite=overwrite, progress=progress, loaded=loaded)


def probe(config: ConfigArg = None, /, *, out: str | Path, overwrite: bool = False, progress: bool = True,
          loaded: Any = None, **fields: Any) -> ProbeResult:
    """Score a model, without sampling, on likelihood benchmarks (`ProbeConfig`: BBQ, StereoSet, CrowS-Pairs,
    calibration, the pairwise judge, lm-eval), into `out`."""
    from datasteer.probes.config import ProbeConfig
    from datasteer.probes.runner import probe as run

    return run(_config(ProbeConfig, config, fields), out, overwrite=overwrite, progress=progress, loaded=loaded)


def pairwise(first: str | Path | Profile, second: str | Path | Profile, config: ConfigArg = None, /, *,
             out: str | Path, overwrite: bool = False, progress: bool = True, **fields: Any) -> PairwiseResult:
    """Judge `second`'s answers against `first`'s (two profiles of the same prompts) in both orders
    (`PairwiseConfig`): the second model's win rate with a 95% interval, into `out`."""
    from datasteer.inheritance.config import PairwiseConfig
    from datasteer.inheritance.preferences import pairwise as run

    return run(first, second, _config(PairwiseConfig, config, fields), out, overwrite=overwrite, progress=progress)


def passive(config: ConfigArg = None, /, *, out: str | Path, overwrite: bool = False, progress: bool = True,
            console: Console | None = None, **fields: Any) -> PassiveResult:
    """The passive-inheritance study (`PassiveConfig`): one student per teacher on random answers, every profile
    of base vs each student with intervals and verdicts, into `out`."""
    from datasteer.inheritance.config import PassiveConfig
    from datasteer.inheritance.passive import passive as run

    return run(_config(PassiveConfig, config, fields), out, overwrite=overwrite, progress=progress, console=console)


def inherit(config: ConfigArg = None, /, *, out: str | Path, overwrite: bool = False, progress: bool = True,
            console: Console | None = None, **fields: Any) -> InheritResult:
    """Active inheritance end to end (`InheritConfig`): generate, score, select (active and random), fine-tune,
    profile and report, into `out`."""
    from datasteer.inheritance.config import InheritConfig
    from datasteer.inheritance.pipeline import inherit as run

    return run(_config(InheritConfig, config, fields), out, overwrite=overwrite, progress=progress, console=console)


def run_dpg(config: ConfigArg = None, /, *, out: str | Path, overwrite: bool = False, progress: bool = True,
            console: Console | None = None, **fields: Any) -> DPGResult:
    """Dataset Policy Gradient (`DPGConfig`): train a generator so that fine-tuning a target on its data raises a
    metric of the target, into `out`."""
    from datasteer.dpg.config import DPGConfig
    from datasteer.dpg.trainer import dpg as run

    return run(_config(DPGConfig, config, fields), out, overwrite=overwrite, progress=progress, console=console)


def attribute(config: ConfigArg = None, /, *, out: str | Path, progress: bool = True,
              **fields: Any) -> AttributeResult:
    """Score every row of `input` by its exact metagradient (`AttributeConfig`); rows with the score column are
    written to the file `out`, the metric and the config to `out.meta.json`."""
    from datasteer.metagrad.attribute import AttributeConfig
    from datasteer.metagrad.attribute import attribute as run

    return run(_config(AttributeConfig, config, fields), out, progress=progress)

