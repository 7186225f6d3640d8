"""Custom metrics: any importable `package.module:function`.

The function takes a list of texts, or (texts, prompts), and returns one number per text:

    def politeness(texts: list[str]) -> list[float]: ...
    def relevance(texts: list[str], prompts: list[str]) -> list[float]: ...

Use it as `--metrics mypkg.metrics:politeness` or `custom[fn=mypkg.metrics:politeness,column=polite]`.
NaN, inf and None are missing values (kept as null in the row, counted in the run summary);
anything else that is not a number, or a list of the wrong length, stops the run with a
one-line error naming the function.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence
from typing import Any

from datasteer.errors import ConfigError, DatasteerError
from datasteer.metrics.base import BaseScorer, as_int, register
from datasteer.plugins import load_function




def _takes_prompts(fn: Any) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


class CustomScorer(BaseScorer):
    def __init__(self, fn: str, higher_is_better: bool | None = True, batch_size: int = 256):
        self.ref = fn
        self._fn = load_function(fn)
        name = fn.partition(":")[2]
        super().__init__(name=name, higher_is_better=higher_is_better, batched=True, batch_size=batch_size,
                         needs_prompts=_takes_prompts(self._fn), description=f"custom metric {fn}")

    def score(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> list[float]:
        try:
            result = self._fn(list(texts), list(prompts or [])) if self.needs_prompts else self._fn(list(texts))
        except DatasteerError:
            raise
        except Exception as err:
            raise DatasteerError(f"custom metric {self.ref} raised {type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:160] if str(err) else ''}") from None
        values = list(result) if not isinstance(result, (str, bytes)) and hasattr(result, "__iter__") else None
        if values is None or len(values) != len(texts):
            got = f"{len(values)} values" if values is not None else type(result).__name__
            raise DatasteerError(f"custom metric {self.ref} must return one number per text: "
                                 f"got {got} for {len(texts)} texts")
        out = []
        for i, v in enumerate(values):
            if v is None:
                out.append(math.nan)
            elif isinstance(v, numbers.Real) and not isinstance(v, bool):
                out.append(float(v) if math.isfinite(float(v)) else math.nan)
            else:
                raise DatasteerError(f"custom metric {self.ref} returned {type(v).__name__} for text {i}; "
                                     "return numbers (NaN or None for no value)")
        return out


@register("custom", "a package.module:function of (texts) or (texts, prompts)",
          params=("fn", "higher_is_better", "batch_size"),
          columns=lambda params: [params.get("fn", "").partition(":")[2] or "custom"])
def _custom(fn: str = "", higher_is_better: str = "true", batch_size: str = "256") -> CustomScorer:
    if not fn:
        raise ConfigError("custom metric needs fn=package.module:function")
    flag = higher_is_better.strip().lower()
    if flag not in ("true", "false", "none"):
        raise ConfigError(f"custom higher_is_better must be true, false or none, got '{higher_is_better}'")
    return CustomScorer(fn, higher_is_better={"true": True, "false": False, "none": None}[flag],
                        batch_size=as_int(batch_size, "custom batch_size"))
