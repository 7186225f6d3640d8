"""`datasteer attribute`: score every row of a dataset by its exact metagradient.

Row i's score is d metric / d w_i: how much up-weighting that row in the target's fine-tuning
would raise the metric of the trained target. The default metric is minus the target's mean loss
on a file of held-out texts, so a positive score means "training on this row helps on those texts".
Rows are `text` (trained on every token) or `prompt` + `completion` (the chat template applied as
in `datasteer finetune`, loss on the completion only).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from datasteer import distributed
from datasteer.chat import tokenize_row
from datasteer.errors import ConfigError, InputError
from datasteer.io import read_rows, read_texts
from datasteer.metagrad.config import TrainingConfig
from datasteer.metagrad.engine import Metric, metagradients
from datasteer.metagrad.metrics import TextLoss
from datasteer.models import load_model
from datasteer.plugins import load_function
from datasteer.progress import track
from datasteer.runs import OutputError, atomic_write_bytes, atomic_write_json, dump_rows


class AttributeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    renamed: ClassVar[dict[str, str]] = {"eval": "eval_texts"}  # datasteer 0.1 name, for the error hint

    input: str
    model: str = "embedded:smollm2"
    eval_texts: str | None = Field(None, description="held-out texts: .txt (one per line) or rows with a text "
                                                      "field")
    metric: str | None = Field(None, description="package.module:function(model, params) -> 0-d tensor; default: "
                                                 "minus the held-out loss on `eval_texts`")
    column: str = "metagrad"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    system_prompt: str | None = None
    device: str = "auto"
    training: TrainingConfig = Field(default_factory=TrainingConfig)


@dataclass
class AttributeResult:
    rows: int
    value: float
    out: Path
    seconds: float
    stats: dict[str, Any]


def rows_to_examples(rows: list[dict[str, Any]], tokenizer: Any, config: AttributeConfig,
                     source: str) -> list[dict[str, list[int]]]:
    max_length = config.training.max_length
    examples = []
    for i, row in enumerate(rows, 1):
        text = row.get(config.text_field)
        if isinstance(text, str):
            if not text.strip():
                raise InputError(f"{source}: row {i} has an empty '{config.text_field}'; drop it first")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
            if len(ids) < 2:  # said here, in the rows' own numbering (the engine counts examples from 0)
                raise InputError(f"{source}: row {i}'s '{config.text_field}' is a single token; a loss needs two "
                                 "(drop the row or give it more text)")
            examples.append({"input_ids": ids, "labels": list(ids)})
            continue
        prompt, completion = row.get(config.prompt_field), row.get(config.completion_field)
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise InputError(f"{source}: row {i} has neither a '{config.text_field}' text nor '{config.prompt_field}' "
                             f"and '{config.completion_field}' texts; name the columns with --set text_field=... "
                             "(or prompt_field / completion_field)")
        if not completion.strip():
            raise InputError(f"{source}: row {i} has an empty '{config.completion_field}'; drop it first")
        example, _ = tokenize_row(prompt, completion, row.get("finish_reason") != "length", tokenizer,
                                  config.system_prompt, max_length)
        if example is None:
            raise InputError(f"{source}: row {i}'s prompt fills max_length={max_length} tokens; raise "
                             f"training.max_length")
        examples.append(example)
    return examples




def heldout_loss_metric(texts: list[str], tokenizer: Any, max_length: int, device: torch.device) -> Metric:
    """Minus the mean (over texts) of each text's mean next-token loss: DPG's `text_loss` target, without BOS."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    return TextLoss([{"input_ids": x} for x in ids], device)


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def check_output(config: AttributeConfig, out: Path, rows: list[dict[str, Any]], overwrite: bool) -> None:
    """Before any model loads: never write over the input or an existing column; an existing output only with
    `overwrite`; the output must be a file path in a folder that can be written."""
    source = Path(config.input)
    for target in (out, meta_path(out)):
        if source.exists() and target.exists() and target.resolve() == source.resolve():
            raise ConfigError(f"--out {target} is the input file; write the scores to another file")
    if out.is_dir():
        raise OutputError(f"cannot write {out}: it is a directory; give a .jsonl file path as --out")
    taken = sorted({config.column} & {key for row in rows for key in row})
    if taken:
        raise ConfigError(f"{config.input} already has a column '{taken[0]}'; name the score column with --column "
                          "(e.g. --column metagrad_2)")
    existing = [p for p in (out, meta_path(out)) if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} already exists; choose another --out, or pass --overwrite to replace it")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {out}: {folder} is not a directory; choose another --out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: {folder} is not writable; choose another --out")


def attribute(config: AttributeConfig, out: str | Path, progress: bool = True,
              overwrite: bool = False) -> AttributeResult:
    """Score every row of `config.input` into the rows file `out` (plus `out`.meta.json). Refuses to write over its
    input, over an existing column, or (without `overwrite`) over an existing file.

    Under torchrun or `accelerate launch` every rank joins the launcher's process group (gloo on CPU, NCCL on
    CUDA, one GPU per rank), the metagradients run data parallel, and the main process alone writes."""
    out = Path(out)
    rows = read_rows(config.input)
    if not rows:
        raise InputError(f"{config.input}: no rows")
    check_output(config, out, rows, overwrite)
    if config.metric is None and config.eval_texts is None:
        raise InputError("give held-out texts with --eval-texts FILE (the default metric is minus the loss on them) "
                         "or a custom --metric package.module:function")
    metric_fn = load_function(config.metric, "attribution metric") if config.metric else None
    texts = read_texts(config.eval_texts, config.text_field) if config.eval_texts else None
    device = distributed.init_from_launcher(config.device)
    progress = progress and distributed.is_main_process()
    loaded = load_model(config.model, dtype=config.training.dtype, device=device, attn_implementation="eager")
    examples = rows_to_examples(rows, loaded.tokenizer, config, config.input)
    device = next(loaded.model.parameters()).device
    metric = metric_fn if metric_fn is not None else heldout_loss_metric(texts or [], loaded.tokenizer,
                                                                        config.training.max_length, device)
    start = time.perf_counter()
    with track("metagradients", 1, enabled=progress, unit="steps", tokens=False) as tracker:
        def report(done: int, total: int) -> None:
            if done == 1:
                tracker.set_total(total)
            tracker.advance(1)

        result = metagradients(loaded.model, examples, metric, config.training, progress=report)
    seconds = time.perf_counter() - start
    scored = [{**row, config.column: float(score)} for row, score in zip(rows, result.scores.tolist())]
    if distributed.is_main_process():
        atomic_write_json(meta_path(out), {
            "value": result.value, "metric": config.metric or f"-heldout_loss({config.eval_texts})",
            "column": config.column, "rows": len(rows), "seconds": seconds, "stats": result.stats,
            "train_losses": result.losses, "config": json.loads(config.model_dump_json())})
        atomic_write_bytes(out, dump_rows(scored))
    distributed.barrier()
    return AttributeResult(len(rows), result.value, out, seconds, result.stats)
