"""Likelihood probes: a model scored, not sampled, on real benchmarks (passive inheritance's internal profile).

`probe(ProbeConfig(model=..., benchmarks={"bbq": "data/bbq", "openbookqa": "obqa.jsonl"}), out)` writes per-item
rows and `summary.json` keyed by benchmark name into a resumable run directory. Importing this package registers
the built-in probes: `bbq`, `stereoset`, `crows_pairs`, `mcqa` (with the aliases openbookqa, mmlu, hellaswag,
arc_easy, arc_challenge), `judge` (pairwise preferences as a judge) and `lm_eval` (lm-eval-harness,
optional).
"""

from datasteer.probes import bbq, crows_pairs, judge, lm_eval_harness, mcqa, stereoset  # noqa: F401  (registration)
from datasteer.probes.base import (
    ALIASES,
    REGISTRY,
    LogLik,
    Probe,
    ProbeOptions,
    Request,
    Source,
    build_probe,
    known_probes,
    register,
)
from datasteer.probes.calibration import expected_calibration_error, reliability_bins, softmax
from datasteer.probes.config import BenchmarkSpec, ProbeConfig, ScoringConfig, parse_benchmark
from datasteer.probes.runner import ProbeResult, probe
from datasteer.probes.scoring import Encoder, LikelihoodScorer

__all__ = [
    "ALIASES", "REGISTRY", "BenchmarkSpec", "Encoder", "LikelihoodScorer", "LogLik", "Probe", "ProbeConfig",
    "ProbeOptions", "ProbeResult", "Request", "ScoringConfig", "Source", "build_probe", "expected_calibration_error",
    "known_probes", "parse_benchmark", "probe", "register", "reliability_bins", "softmax",
]
