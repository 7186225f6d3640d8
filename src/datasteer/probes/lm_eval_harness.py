"""Utility through lm-eval-harness (optional): `lm_eval.simple_evaluate` on the datasteer-loaded model.

The benchmark's source is a comma-separated list of lm-eval task names (`hellaswag,arc_easy,openbookqa`); each
task is one resumable unit. The model datasteer loaded (any model spec, `embedded:smollm2` included) is handed to
lm-eval's `HFLM` as it is. `limit` is lm-eval's own (the first N documents of each task), and the options pass
lm-eval's settings through: `include_path` (a folder of task YAMLs, e.g. tasks over local files, which is how
lm-eval runs offline), `num_fewshot`, `add_bos_token`, `apply_chat_template`, and `simple_evaluate` for any other
keyword of `simple_evaluate`.

Rows: one per document: task, doc_id, target, the options' log-likelihoods (loglikelihood tasks) and each of the
task's per-document metrics. Summary per task: each metric's mean over documents and its standard error
(sample std / sqrt(n)), which is what lm-eval reports for metrics aggregated by the mean (acc, acc_norm,
exact_match); a metric that lm-eval aggregates otherwise (corpus BLEU, F1) is left to lm-eval itself.

Not installed by default: `pip install lm-eval`; without it this probe is a one-line error before any work.
Offline, a task whose data lives on the hub fails with lm-eval's own message, turned into one line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from datasteer.config import StrictModel
from datasteer.errors import InputError, MissingDependencyError
from datasteer.probes.base import Source, register

INSTALL = "pip install lm-eval"

_MCQA_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""


def write_mcqa_task(items: Sequence[dict[str, Any]], folder: str | Path, name: str) -> Path:
    """Multiple-choice items (`question`, `options`, `label`, as the `mcqa` probe loads them) as an lm-eval task over a
    local file: `folder/name.jsonl` and `folder/name.yaml` (context = the question, continuations = the options).
    Point `include_path` at `folder` and run task `name`, offline. Returns the YAML's path."""
    folder = Path(folder)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": it["question"], "choices": it["options"], "label": it["label"]})
                            + "\n" for it in items), encoding="utf-8")
    task = folder / f"{name}.yaml"
    task.write_text(_MCQA_TASK.format(name=name, path=data), encoding="utf-8")
    return task


class LMEvalOptions(StrictModel):
    include_path: str | None = Field(None, description="a folder of lm-eval task YAMLs (tasks over local files)")
    include_defaults: bool = Field(True, description="index lm-eval's own tasks too (false: only include_path's, "
                                   "which is faster)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples (lm-eval's default when unset)")
    add_bos_token: bool | None = Field(None, description="HFLM's add_bos_token (lm-eval's default when unset)")
    apply_chat_template: bool = Field(False, description="render prompts with the model's chat template")
    simple_evaluate: dict[str, Any] = Field(default_factory=dict, description="other simple_evaluate keywords")


def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise MissingDependencyError("the lm_eval probe (lm-eval-harness tasks)", INSTALL) from None
    return lm_eval


@register("lm_eval", help="lm-eval-harness tasks (simple_evaluate) on the datasteer-loaded model; optional: "
          "pip install lm-eval", options=LMEvalOptions)
class LMEvalProbe:
    name = "lm_eval"
    description = "lm-eval-harness tasks through simple_evaluate"
    score = "sum"
    takes_limit = True  # `limit` goes to lm-eval (first N documents per task), not to datasteer's item sampling

    def __init__(self, options: LMEvalOptions):
        self.options = options
        self._manager: Any = None

    def resolve(self, text: str, subset: str | None, split: str | None) -> Source:
        require_lm_eval()
        return Source(text=text)

    def load(self, source: Source) -> list[dict[str, Any]]:
        tasks = [t.strip() for t in source.text.split(",") if t.strip()]
        if not tasks:
            raise InputError("the lm_eval benchmark names no task; give task names, e.g. hellaswag,arc_easy")
        manager = self._task_manager()
        known = set(manager.all_tasks)
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise InputError(f"lm-eval knows no task {unknown[0]!r}" + (f" (include_path {self.options.include_path})"
                             if self.options.include_path else "") + "; see `lm_eval ls tasks`")
        return [{"item_id": t, "task": t} for t in tasks]

    def describe(self, source: Source, items: int) -> dict[str, Any]:
        return {"tasks": source.text, "include_path": self.options.include_path}

    def _task_manager(self) -> Any:
        """lm-eval's task index (built once: it reads every task YAML lm-eval ships)."""
        if self._manager is None:
            require_lm_eval()
            from lm_eval.tasks import TaskManager

            self._manager = TaskManager(include_path=self.options.include_path,
                                        include_defaults=self.options.include_defaults)
        return self._manager

    def evaluate(self, items: Sequence[dict[str, Any]], loaded: Any, *, batch_size: int, limit: int | None,
                 seed: int, device: str) -> list[dict[str, Any]]:
        lm_eval = require_lm_eval()
        from lm_eval.models.huggingface import HFLM

        kwargs: dict[str, Any] = {}
        if self.options.add_bos_token is not None:
            kwargs["add_bos_token"] = self.options.add_bos_token
        model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, device=device,
                     **kwargs)
        rows: list[dict[str, Any]] = []
        for item in items:
            task = item["task"]
            try:
                out = lm_eval.simple_evaluate(
                    model=model, tasks=[task], limit=limit, num_fewshot=self.options.num_fewshot,
                    apply_chat_template=self.options.apply_chat_template, task_manager=self._task_manager(),
                    log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                    fewshot_random_seed=seed, **self.options.simple_evaluate)
            except (OSError, ConnectionError, ValueError, FileNotFoundError) as err:
                raise InputError(f"lm-eval task {task!r} could not run ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:160] if str(err) else ''}); offline, a task needs its "
                                 "data in a local file (include_path)") from None
            for sample in (out or {}).get("samples", {}).get(task, []):
                rows.append(sample_row(task, sample))
        return rows

    def summarize(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        tasks: dict[str, Any] = {}
        for task in sorted({r["task"] for r in rows}):
            part = [r for r in rows if r["task"] == task]
            metrics = {}
            for name in sorted({k for r in part for k in r.get("metrics", {})}):
                values = [float(r["metrics"][name]) for r in part if isinstance(r["metrics"].get(name), (int, float))]
                if not values:
                    continue
                mean = sum(values) / len(values)
                std = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                       if len(values) > 1 else 0.0)
                metrics[name] = {"mean": mean, "stderr": std / math.sqrt(len(values))}
            tasks[task] = {"documents": len(part), "metrics": metrics}
        return {"items": len(rows), "tasks": tasks}


def sample_row(task: str, sample: dict[str, Any]) -> dict[str, Any]:
    """One lm-eval logged sample as a row: ids, target, log-likelihoods and the per-document metrics."""
    metrics = {name: float(sample[name]) for name in sample.get("metrics", [])
               if isinstance(sample.get(name), (int, float)) and not isinstance(sample.get(name), bool)}
    lls = []
    for resp in sample.get("filtered_resps") or []:
        value = resp[0] if isinstance(resp, (list, tuple)) and resp else resp
        lls.append(float(value) if isinstance(value, (int, float)) else None)
    return {"item_id": f"{task}-{sample.get('doc_id')}", "task": task, "doc_id": sample.get("doc_id"),
            "target": str(sample.get("target")), "loglikelihoods": lls, "metrics": metrics}
