"""Token usage per teacher, and what it cost where the teacher's prices are given.

The totals are computed from the rows (each row carries its request's `prompt_tokens` and `completion_tokens`,
from the server's `usage` for the HTTP backends), so a resumed run reports the same totals as an uninterrupted
one: the tokens of the rows the run holds. Requests that failed, or whose unit was cut short by a crash and
asked again, are not in them (a provider bills those too; docs/openai.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from datasteer.generation.base import TeacherBase

REMOTE_BACKENDS = ("openai", "openai-batch")


def usage_summary(rows: Iterable[dict[str, Any]], teachers: Iterable[TeacherBase]) -> dict[str, Any]:
    """{teacher: {rows, prompt_tokens, completion_tokens, total_tokens[, rows_without_usage][, cost]}}; `cost`
    ({input, output, total}) for a teacher with prices."""
    by_name = {t.name: t for t in teachers}
    totals: dict[str, dict[str, Any]] = {name: {"rows": 0, "prompt_tokens": 0, "completion_tokens": 0}
                                         for name in by_name}
    missing: dict[str, int] = {name: 0 for name in by_name}
    for row in rows:
        name = row["source"]
        entry = totals.setdefault(name, {"rows": 0, "prompt_tokens": 0, "completion_tokens": 0})
        entry["rows"] += 1
        entry["prompt_tokens"] += int(row.get("prompt_tokens") or 0)
        entry["completion_tokens"] += int(row.get("completion_tokens") or 0)
        if row.get("backend") in REMOTE_BACKENDS and not row.get("prompt_tokens"):
            missing[name] = missing.get(name, 0) + 1  # a server that sends no usage: the cost is a lower bound
    out: dict[str, Any] = {}
    for name, entry in totals.items():
        entry["total_tokens"] = entry["prompt_tokens"] + entry["completion_tokens"]
        if missing.get(name):
            entry["rows_without_usage"] = missing[name]
        prices = getattr(by_name.get(name), "prices", None)
        if prices is not None:
            cost = cost_of(entry["prompt_tokens"], entry["completion_tokens"], prices.input, prices.output)
            entry["cost"] = cost
        out[name] = entry
    return out


def total_cost(usage: dict[str, Any]) -> float | None:
    """The estimated cost over every priced teacher; None when no teacher has prices."""
    costs = [entry["cost"]["total"] for entry in usage.values() if "cost" in entry]
    return round(sum(costs), 6) if costs else None


def cost_of(prompt_tokens: int, completion_tokens: int, input_price: float, output_price: float) -> dict[str, float]:
    """Cost of the tokens at prices per million tokens (input, output, total; rounded to 1e-6)."""
    cost_in = prompt_tokens * input_price / 1e6
    cost_out = completion_tokens * output_price / 1e6
    return {"input": round(cost_in, 6), "output": round(cost_out, 6), "total": round(cost_in + cost_out, 6)}
