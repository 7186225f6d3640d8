"""`finetune`: supervised fine-tuning of a student on selected rows, with TRL's SFTTrainer.

Each row becomes one training sequence, tokenised here rather than by TRL so that it matches
generation exactly:

    chat_template(system?, user=prompt, add_generation_prompt=True)  -> labels -100 (no loss)
    completion tokens [+ end-of-turn]                                -> trained on

The prompt is rendered by the same `encode_prompts` path that generated the candidates, so the
student is trained on the context it will see at inference. The end-of-turn token is appended
only to completions that ended by themselves: a candidate cut at `max_new_tokens`
(`finish_reason == "length"`) or by `max_length` here gets none, so the student is not taught to
stop in the middle of a sentence.

Run directory: `checkpoints/` (Trainer checkpoints: weights, optimizer, scheduler, RNG; a rerun
resumes from the newest), `model/` (the final model, LoRA merged into the weights, with its
tokenizer: any command loads it by path), `training.json` (loss per step, settings, counts).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasteer.chat import tokenize_row
from datasteer.errors import ConfigError, InputError, optional_import
from datasteer.inheritance.config import FinetuneConfig, FinetuneSettings
from datasteer.io import read_rows
from datasteer.models import _publish, load_model, model_shape
from datasteer.progress import track
from datasteer.runs import Run, file_input
from datasteer.training import (
    EXPLODED_LOSS,
    TrainingDivergedError,
    check_parameters,
    check_trl_section,
    divergence_callback,
    latest_checkpoint,
    progress_callback,
    quiet_trainer,
    trl_arguments,
)

MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
TRAINING_FILE = "training.json"


@dataclass
class FinetuneResult:
    run_dir: Path
    model_dir: Path
    examples: int
    steps: int
    final_loss: float | None
    seconds: float
    resumed_from: str | None
    log: list[dict[str, Any]]

    @classmethod
    def load(cls, run: Run) -> FinetuneResult:
        """The result of a finished fine-tuning run, read back from its directory."""
        info = json.loads((run.path / TRAINING_FILE).read_text(encoding="utf-8"))
        return cls(run_dir=run.path, model_dir=run.path / MODEL_DIR, examples=info["examples"], steps=info["steps"],
                   final_loss=info["final_loss"], seconds=0.0, resumed_from="complete", log=info["log"])


def tokenize_rows(rows: list[dict[str, Any]], tokenizer: Any, config: FinetuneConfig) -> tuple[list[dict], dict]:
    """(examples with input_ids/labels, counts): prompt tokens masked, EOS only on finished completions."""
    examples: list[dict[str, list[int]]] = []
    counts = {"rows": len(rows), "cut_at_generation": 0, "cut_at_max_length": 0, "prompt_too_long": 0,
              "trained_tokens": 0}
    for i, row in enumerate(rows, 1):
        prompt, completion = row.get(config.prompt_field), row.get(config.completion_field)
        for name, value in ((config.prompt_field, prompt), (config.completion_field, completion)):
            if not isinstance(value, str):
                what = "has no" if name not in row else "has a non-text"
                raise InputError(f"{config.input}: row {i} {what} '{name}' field; name the columns with "
                                 "--set prompt_field=... / --set completion_field=...")
        if not completion.strip():
            raise InputError(f"{config.input}: row {i} has an empty completion; drop it before fine-tuning")
        finished = row.get("finish_reason") != "length"
        counts["cut_at_generation"] += not finished
        example, cut = tokenize_row(prompt, completion, finished, tokenizer, config.system_prompt, config.max_length)
        if example is None:
            counts["prompt_too_long"] += 1
            continue
        counts["cut_at_max_length"] += cut
        examples.append(example)
        counts["trained_tokens"] += sum(label != -100 for label in example["labels"])
    if not examples:
        raise InputError(f"{config.input}: no row fits in max_length={config.max_length} tokens; raise --max-length")
    return examples, counts


def _layer_stack(model: Any) -> tuple[str, Any]:
    """(dotted name, ModuleList) of the model's transformer blocks (model.layers, transformer.h, ...)."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, module
    raise InputError(f"cannot find the transformer layers of {type(model).__name__}; leave train_layers unset")


def restrict_to_last_layers(model: Any, n: int) -> list[int]:
    """Freeze everything but the last n transformer blocks (and the final norm); returns their indices."""
    name, layers = _layer_stack(model)
    if n > len(layers):
        raise InputError(f"train_layers={n} but the model has {len(layers)} layers")
    keep = list(range(len(layers) - n, len(layers)))
    prefixes = tuple(f"{name}.{i}." for i in keep)
    for pname, param in model.named_parameters():
        module = pname.rsplit(".", 1)[0].split(".")[-1]
        final_norm = not pname.startswith(name + ".") and ("norm" in module or module == "ln_f")
        param.requires_grad = pname.startswith(prefixes) or final_norm
    return keep


# trl.SFTConfig arguments that datasteer sets from its own fields (see `finetune`): not for the `trl:` section
SFT_OWNED = ("output_dir", "num_train_epochs", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
             "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed", "logging_steps",
             "save_strategy", "save_steps", "save_total_limit", "report_to", "disable_tqdm", "use_cpu", "bf16",
             "max_length", "logging_nan_inf_filter")
# what a diverged run tells the user to lower
LR_HINT = "--lr, or learning_rate in the recipe's finetune: section"


def check_finetune(config: FinetuneSettings, section: str = "") -> None:
    """Everything about fine-tuning that can fail before a model loads: TRL (and peft) installed, the `trl:`
    pass-through, the LoRA arguments. `section` prefixes the keys in messages (`finetune.` in an inherit recipe)."""
    optional_import("trl", "fine-tuning", "pip install 'datasteer[train]'")
    check_trl_section("SFTConfig", config.trl, f"{section}trl", SFT_OWNED)
    if config.method == "lora":
        optional_import("peft", "LoRA fine-tuning", "pip install 'datasteer[train]'")
        try:
            config.lora.peft_config()
        except ConfigError as err:
            raise ConfigError(f"{section}{err}") from None


def check_student(model: str, config: FinetuneSettings, section: str = "") -> None:
    """What can be checked of the student without loading its weights: its spec (ModelNotFoundError) and, from its
    config, that `train_layers` is not more than the layers it has."""
    shape = model_shape(model)
    if config.train_layers is not None and shape.layers is not None and config.train_layers > shape.layers:
        raise ConfigError(f"{section}train_layers={config.train_layers} but the student {model} has {shape.layers} "
                          f"layers; set {section}train_layers to at most {shape.layers}, or leave it unset")


def sft_arguments(config: FinetuneConfig, checkpoints: Path, examples: int, on_cpu: bool) -> Any:
    """trl.SFTConfig: datasteer's fields under TRL's names (exactly SFT_OWNED), then the `trl:` pass-through."""
    from trl import SFTConfig

    steps_per_epoch = math.ceil(examples / (config.per_device_train_batch_size * config.gradient_accumulation_steps))
    owned = dict(
        output_dir=str(checkpoints),
        num_train_epochs=config.num_train_epochs,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_steps or steps_per_epoch,
        save_total_limit=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=on_cpu,
        bf16=config.dtype == "bfloat16",
        max_length=None,  # tokenize_rows already cut to config.max_length
        logging_nan_inf_filter=False,  # a NaN loss must reach the divergence check, not be logged as the mean
    )
    # small models: recomputation costs more than it saves; trl: may turn it on
    defaults = {"activation_checkpointing": False, "dataloader_num_workers": 0}
    return trl_arguments(SFTConfig, owned, {**defaults, **config.trl}, "trl")


def trainable_part(config: FinetuneSettings, model: Any) -> Any:
    """What trains: LoRA adapters (the peft config; on the last `train_layers` blocks only, if set), or the whole
    model or its last `train_layers` blocks (frozen here; returns None)."""
    import torch

    if config.method != "lora":
        if config.train_layers is not None:
            restrict_to_last_layers(model, config.train_layers)
        return None
    targets: Any = config.lora.target_modules
    layers = None
    if config.train_layers is not None:
        _, stack = _layer_stack(model)
        layers = list(range(len(stack) - config.train_layers, len(stack)))
        if isinstance(targets, str):  # peft needs explicit module names to restrict layers
            targets = sorted({n.split(".")[-1] for n, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head"})
    return config.lora.peft_config(target_modules=targets, layers_to_transform=layers)


def save_model(trained: Any, tokenizer: Any, config: FinetuneSettings, model_dir: Path) -> None:
    """The final model, LoRA merged into the weights, in the training dtype, with its tokenizer and generation
    config: a directory any command loads by path, published atomically."""
    import torch

    if config.method == "lora":
        trained = trained.merge_and_unload()
    trained.eval()
    trained.to(torch.float32 if config.dtype == "float32" else torch.bfloat16)

    def save(tmp: Path) -> None:
        trained.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        trained.generation_config.save_pretrained(tmp)

    _publish(model_dir, save)


def finetune(config: FinetuneConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
             loaded: Any = None) -> FinetuneResult:
    """Fine-tune `config.model` on `config.input` into the run directory `out` (resumable; under torchrun or
    accelerate every process trains and the main one writes)."""
    rows = read_rows(config.input)
    if not rows:
        raise InputError(f"{config.input} has no rows to fine-tune on")
    check_finetune(config)
    check_student(config.model, config)
    run = Run.prepare(out, stage="finetune", config=config, inputs={"rows": file_input(config.input, len(rows))},
                      seed=config.seed, overwrite=overwrite, distributed=True)
    if run.complete:
        return FinetuneResult.load(run)
    # set up
    if loaded is None:
        loaded = load_model(config.model, dtype=config.dtype, device=config.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    examples, counts = tokenize_rows(rows, tokenizer, config)
    from datasets import Dataset
    from trl import SFTTrainer

    created_now = not run.exists
    run.ensure_created()
    checkpoints = run.path / CHECKPOINTS_DIR
    args = sft_arguments(config, checkpoints, len(examples), on_cpu=str(model.device) == "cpu")
    peft_config = trainable_part(config, model)
    model.train()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                         processing_class=tokenizer, peft_config=peft_config)
    quiet_trainer(trainer)
    # train
    resume = latest_checkpoint(checkpoints)
    start = time.perf_counter()
    trainer.add_callback(divergence_callback("finetune", LR_HINT, EXPLODED_LOSS))
    try:
        with track("finetune", 1, enabled=progress, unit="steps", tokens=False) as tracker:
            trainer.add_callback(progress_callback(tracker, "finetune"))
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        # the callback checks every step's trainable weights; this also covers a resumed checkpoint with no step left
        check_parameters(trainer.model.named_parameters(), "finetune", trainer.state.global_step, LR_HINT)
    except TrainingDivergedError:
        # no model, no training.json, not complete; a run this call created is removed, so that the same --out
        # takes the rerun with a lower learning rate
        if created_now and run.writes:
            shutil.rmtree(run.path, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    # finish
    log = [dict(entry) for entry in trainer.state.log_history if "loss" in entry]
    final_loss = log[-1]["loss"] if log else None
    steps = trainer.state.global_step
    run.write_json(TRAINING_FILE, {"examples": len(examples), "steps": steps, "epochs": config.num_train_epochs,
                                   "final_loss": final_loss, "seconds": seconds,
                                   "resumed_from": resume.name if resume else None, **counts, "log": log})
    if run.writes:  # under torchrun/accelerate only the main process saves
        save_model(trainer.model, tokenizer, config, run.path / MODEL_DIR)
        if not config.keep_checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
    run.finish({"examples": len(examples), "steps": steps, "final_loss": final_loss, "model": MODEL_DIR,
                "training": TRAINING_FILE, **counts})
    return FinetuneResult(run_dir=run.path, model_dir=run.path / MODEL_DIR, examples=len(examples), steps=steps,
                          final_loss=final_loss, seconds=seconds, resumed_from=resume.name if resume else None,
                          log=log)
