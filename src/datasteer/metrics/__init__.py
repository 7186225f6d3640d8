"""Metrics: the scorers that active inheritance optimises.

`build_scorers(["mtld", "length", "toxicity"])` gives Scorer objects; `score(config, out)` adds
one column per metric to every row of a file in a resumable run directory. Importing this
package registers the built-in scorers: length, lexical (MTLD, TTR, MATTR, HD-D), readability,
toxicity (profanity / detoxify / perspective), judge, and custom `package.module:function`.
"""

from datasteer.metrics import custom, judge, length, lexical, readability, toxicity  # noqa: F401  (registration)
from datasteer.metrics.base import (
    GROUPS,
    REGISTRY,
    BaseScorer,
    MetricSpec,
    Scorer,
    build_scorers,
    parse_metric,
    parse_metrics,
    register,
)
from datasteer.metrics.judge import parse_rating
from datasteer.metrics.lexical import lexical_measures, mtld, mtld_batch
from datasteer.metrics.runner import ScoreResult, score
from datasteer.metrics.toxicity import toxicity_summary

__all__ = [
    "GROUPS", "REGISTRY", "BaseScorer", "MetricSpec", "ScoreResult", "Scorer", "build_scorers", "lexical_measures",
    "mtld", "mtld_batch", "parse_metric", "parse_metrics", "parse_rating", "register", "score", "toxicity_summary",
]
