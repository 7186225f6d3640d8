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
tokenizer and a model card, README.md: any command loads it by path; `datasteer push` uploads it),
`training.json` (loss per step, settings, counts), `tensorboard/` (with `report_to: [tensorboard]`).

Several processes (torchrun, `accelerate launch`: DDP, or FSDP2 / DeepSpeed from an accelerate config): every
process loads the student on the CPU, trains its share of each batch (TRL's per-device batch: the global batch is
per_device_train_batch_size x processes x gradient_accumulation_steps, recorded in training.json), and only the
main process writes. The order, with the barriers that keep it:
- the main process creates the run (and an --overwrite discards the old one), then picks the checkpoint to resume
  from and tells the others (a broadcast: no process reads checkpoints/ before that);
- a checkpoint is whole before it counts: every process writes its RNG state, then all wait, then the main process
  writes trainer_state.json and deletes the older checkpoint (the Trainer alone has no barrier there);
- after the last step all wait, the model is gathered (a collective under FSDP/DeepSpeed) and the main process
  writes model/, training.json and the manifest and deletes checkpoints/; the others return once model/ exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasteer.chat import tokenize_row
from datasteer.distributed import broadcast_object, launched, world_size
from datasteer.errors import ConfigError, InputError, RunMismatchError, optional_import
from datasteer.hub import CARD_FILE, model_card_text
from datasteer.inheritance.config import FinetuneConfig, FinetuneSettings
from datasteer.io import read_rows
from datasteer.models import _publish, load_model, model_shape, resolve_device
from datasteer.progress import track
from datasteer.runs import Run, file_input
from datasteer.training import (
    EXPLODED_LOSS,
    TENSORBOARD_DIR,
    TrainingDivergedError,
    check_parameters,
    check_report_to,
    check_trl_section,
    checkpoint_world_size,
    divergence_callback,
    finish_trackers,
    latest_checkpoint,
    progress_callback,
    quiet_trainer,
    tracker_folder,
    trl_arguments,
    whole_checkpoints,
)

log = logging.getLogger("datasteer.finetune")

MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
TRAINING_FILE = "training.json"
# under FSDP/DeepSpeed the Trainer gathers the final weights into this folder of checkpoints/ (removed with them)
GATHERED_DIR = "gathered"


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
             "save_strategy", "save_steps", "save_total_limit", "report_to", "disable_tqdm", "use_cpu",
             "max_length", "logging_nan_inf_filter")
# transformers' old names and the ones that replaced them: a `trl:` section may use either
RENAMED_ARGUMENTS = {"gradient_checkpointing": "activation_checkpointing",
                     "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}
# what a diverged run tells the user to lower
LR_HINT = "--lr, or learning_rate in the recipe's finetune: section"


def check_finetune(config: FinetuneSettings, section: str = "") -> None:
    """Everything about fine-tuning that can fail before a model loads: TRL (and peft) installed, the `trl:`
    pass-through, the LoRA arguments. `section` prefixes the keys in messages (`finetune.` in an inherit recipe)."""
    optional_import("trl", "fine-tuning", "pip install 'datasteer[train]'")
    check_trl_section("SFTConfig", config.trl, f"{section}trl", SFT_OWNED)
    check_report_to(config.report_to, f"{section}report_to")
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


def steps_per_epoch(examples: int, config: FinetuneSettings, processes: int = 1) -> int:
    """Optimizer steps in one epoch, as the Trainer counts them: every process gets ceil(batches / processes)
    micro-batches of per_device_train_batch_size (accelerate evens the shards out by repeating the first rows), and
    gradient_accumulation_steps of those make a step (a shorter last group is a step too)."""
    batches = math.ceil(examples / config.per_device_train_batch_size)
    return max(1, math.ceil(math.ceil(batches / processes) / config.gradient_accumulation_steps))


def sft_arguments(config: FinetuneConfig, checkpoints: Path, examples: int, on_cpu: bool, processes: int = 1) -> Any:
    """trl.SFTConfig: datasteer's fields under TRL's names (exactly SFT_OWNED), datasteer's defaults for a few others,
    then the `trl:` pass-through. `processes`: how many processes train (torchrun/accelerate), for the default
    checkpoint interval (one epoch). Creating it sets up the process group of a launched run."""
    from trl import SFTConfig

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
        save_steps=config.save_steps or steps_per_epoch(examples, config, processes),
        save_total_limit=1,
        report_to=config.report_to,  # TRL's trackers; logging_steps=1 gives them every step
        disable_tqdm=True,
        use_cpu=on_cpu,
        max_length=None,  # tokenize_rows already cut to config.max_length
        logging_nan_inf_filter=False,  # a NaN loss must reach the divergence check, not be logged as the mean
    )
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    extra = dict(config.trl)
    for old, new in RENAMED_ARGUMENTS.items():  # an old name next to a default under the new one would be ignored
        if old in extra and new in known and new not in extra:
            extra[new] = extra.pop(old)
    defaults = {
        # small models: recomputation costs more than it saves; `trl: {gradient_checkpointing: true}` turns it on
        "activation_checkpointing": False,
        "dataloader_num_workers": 0,
        # bf16 autocast when training in bfloat16; `trl: {bf16: true}` with dtype float32 is mixed precision
        # (float32 master weights, bfloat16 compute), as is an accelerate config's mixed_precision: bf16
        "bf16": config.dtype == "bfloat16",
        # a causal LM uses every trainable weight in each forward pass: DDP need not search the graph for unused ones
        "ddp_find_unused_parameters": False,
        # processes other than the main one say only errors
        "log_level_replica": "error",
        # trackers name the run after its directory (finetune-active, ...) rather than a timestamp
        "run_name": checkpoints.parent.name,
    }
    return trl_arguments(SFTConfig, owned, {**{k: v for k, v in defaults.items() if k in known}, **extra}, "trl")


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


def save_model(trained: Any, tokenizer: Any, config: FinetuneSettings, model_dir: Path,
               card: str | None = None) -> None:
    """The final model, LoRA merged into the weights, in the training dtype, with its tokenizer, generation config
    and model card (`card`, README.md): a directory any command loads by path, published atomically."""
    import torch

    if config.method == "lora":
        trained = trained.merge_and_unload()
    trained.eval()
    trained.to(torch.float32 if config.dtype == "float32" else torch.bfloat16)
    for stale in model_dir.parent.glob(f"{model_dir.name}.tmp-*"):  # a save killed earlier (the run is locked)
        shutil.rmtree(stale, ignore_errors=True)

    def save(tmp: Path) -> None:
        trained.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        trained.generation_config.save_pretrained(tmp)
        if card is not None:
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")

    _publish(model_dir, save)


def model_from_saved(saved: Path, config: FinetuneConfig) -> Any:
    """The trained model back from what `Trainer.save_model` wrote: a whole model, or (LoRA) an adapter laid on a
    fresh copy of the student, on the CPU."""
    from transformers import AutoModelForCausalLM

    if (saved / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_model(config.model, dtype=config.dtype, device="cpu").model
        return PeftModel.from_pretrained(base, str(saved))
    if not any(saved.glob("*.safetensors")) and not any(saved.glob("*.bin")):
        raise ConfigError(f"the trained weights were not gathered into {saved} (a DeepSpeed ZeRO-3 run without "
                          "zero3_save_16bit_model: true in its accelerate config, so stage3_gather_16bit_weights_on_"
                          "model_save is off); set it, and rerun the same command: training resumes from its last "
                          "checkpoint")
    import torch

    return AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32 if config.dtype == "float32"
                                                else torch.bfloat16)


def publish_model(trainer: Any, tokenizer: Any, config: FinetuneConfig, run: Run,
                  details: dict[str, Any] | None = None) -> None:
    """model/, written once by the main process, with its model card (`details`: the run's summary). DDP (and one
    process): every process holds the whole model, the main one merges and saves its copy. FSDP and DeepSpeed hold
    shards: every process takes part in `Trainer.save_model` (the gather), which the main process writes to
    checkpoints/gathered; it then builds the merged model from that folder."""
    card = model_card_text(run.path, run.manifest, details=details) if run.writes else None
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        if run.writes:
            save_model(trainer.model, tokenizer, config, run.path / MODEL_DIR, card)
        return
    gathered = run.path / CHECKPOINTS_DIR / GATHERED_DIR
    if trainer.is_fsdp_enabled:  # a sharded state dict would be saved as shards: gather the whole one instead
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(gathered))  # a collective: every process gathers, the main one writes
    trainer.accelerator.wait_for_everyone()
    if run.writes:
        save_model(model_from_saved(gathered, config), tokenizer, config, run.path / MODEL_DIR, card)
        shutil.rmtree(gathered, ignore_errors=True)


def resume_point(run: Run, checkpoints: Path, processes: int, config: FinetuneSettings) -> Path | None:
    """The checkpoint every process resumes from. The main process looks (after creating the run, so after an
    --overwrite removed the old one) and tells the others, so that no process reads checkpoints/ on its own. A
    checkpoint written by another number of processes is refused: resuming it would change the global batch."""
    decision: tuple[str | None, str | None] = (None, None)
    if run.writes:
        found = latest_checkpoint(checkpoints)
        written_by = checkpoint_world_size(found) if found else None
        if found and written_by is not None and written_by != processes:
            per_device, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
            decision = (None, f"{found} was written by {written_by} process(es) and this launch has {processes}: "
                              f"resuming it would change the global batch ({per_device} per device x {written_by} "
                              f"process(es) x {accumulation} accumulation step(s) = "
                              f"{per_device * written_by * accumulation}); relaunch with {written_by} process(es) "
                              f"to resume it, or delete {checkpoints} to start the training again")
        else:
            decision = (str(found) if found else None, None)
    path, error = broadcast_object(decision)
    if error:
        raise RunMismatchError(error)
    return Path(path) if path else None


def _warn_single_process_accelerate() -> None:
    """`accelerate launch --cpu --num_processes N` starts ONE process (its simple launcher hands N to mpirun only,
    accelerate issue #2741); it leaves MASTER_PORT set and no WORLD_SIZE. Say so instead of training alone quietly."""
    env = os.environ
    if (env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and env.get("MASTER_PORT")
            and not any(env.get(v) for v in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))):
        log.warning("accelerate launch --cpu starts a single process whatever --num_processes says (accelerate hands "
                    "CPU processes to mpirun only); this run trains in one process. For several CPU processes use "
                    "torchrun --nproc_per_node N -m datasteer finetune ..., or accelerate launch --multi_gpu "
                    "--num_processes N on a machine without GPUs")


def _batch_record(trainer: Any, config: FinetuneSettings) -> dict[str, Any]:
    """How the batch was made and the engine that trained, for training.json."""
    args = trainer.args
    processes = args.world_size
    return {"world_size": processes, "distributed_type": str(getattr(trainer.accelerator.distributed_type, "value",
                                                                      trainer.accelerator.distributed_type)),
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "global_batch_size": config.per_device_train_batch_size * processes * config.gradient_accumulation_steps,
            "mixed_precision": str(trainer.accelerator.mixed_precision), "dtype": config.dtype,
            "gradient_checkpointing": bool(args.gradient_checkpointing)}


def finetune(config: FinetuneConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
             loaded: Any = None) -> FinetuneResult:
    """Fine-tune `config.model` on `config.input` into the run directory `out` (resumable; under torchrun or
    accelerate every process trains its share of each batch and the main one writes)."""
    rows = read_rows(config.input)
    if not rows:
        raise InputError(f"{config.input} has no rows to fine-tune on")
    check_finetune(config)
    check_student(config.model, config)
    run = Run.prepare(out, stage="finetune", config=config, inputs={"rows": file_input(config.input, len(rows))},
                      seed=config.seed, overwrite=overwrite, distributed=True)
    if run.complete:  # every process reads the same finished manifest (nobody writes to a finished run)
        return FinetuneResult.load(run)
    _warn_single_process_accelerate()
    # set up
    device = resolve_device(config.device)
    if loaded is None:
        # launched: each process loads on the CPU, and the Trainer (DDP) or accelerate (FSDP, DeepSpeed) places the
        # model, or its shard, on the process's own device
        loaded = load_model(config.model, dtype=config.dtype, device="cpu" if launched() else device)
    model, tokenizer = loaded.model, loaded.tokenizer
    examples, counts = tokenize_rows(rows, tokenizer, config)
    from datasets import Dataset
    from trl import SFTTrainer

    checkpoints = run.path / CHECKPOINTS_DIR
    on_cpu = device == "cpu" if launched() else str(model.device) == "cpu"
    args = sft_arguments(config, checkpoints, len(examples), on_cpu=on_cpu, processes=world_size())
    # from here a launched run has its process group (set up by the training arguments)
    created_now = not run.exists
    run.ensure_created()
    try:
        resume = resume_point(run, checkpoints, args.world_size, config)
    except RunMismatchError:
        run.release()
        raise
    peft_config = trainable_part(config, model)
    model.train()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                         processing_class=tokenizer, peft_config=peft_config)
    quiet_trainer(trainer)
    whole_checkpoints(trainer)
    tracker_folder(trainer, run.path / TENSORBOARD_DIR)  # checkpoints/ goes when training ends; the events stay
    # train
    start = time.perf_counter()
    trainer.add_callback(divergence_callback("finetune", LR_HINT, EXPLODED_LOSS))
    try:
        with track("finetune", 1, enabled=progress and run.writes, unit="steps", tokens=False) as tracker:
            trainer.add_callback(progress_callback(tracker, "finetune"))
            try:
                trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            finally:
                finish_trackers(trainer.args)
        # the callback checks every step's trainable weights; this also covers a resumed checkpoint with no step left
        check_parameters(trainer.model.named_parameters(), "finetune", trainer.state.global_step, LR_HINT,
                         across_ranks=True)
    except TrainingDivergedError:
        # no model, no training.json, not complete; a run this call created is removed, so that the same --out
        # takes the rerun with a lower learning rate. Every process diverges at the same step (the logged loss and
        # the weight check agree across them); they wait for the cleanup before the launcher tears them down.
        if created_now and run.writes:
            shutil.rmtree(run.path, ignore_errors=True)
        trainer.accelerator.wait_for_everyone()
        raise
    seconds = time.perf_counter() - start
    trainer.accelerator.wait_for_everyone()  # every process has finished training before the model is saved
    # finish
    log_rows = [dict(entry) for entry in trainer.state.log_history if "loss" in entry]
    final_loss = log_rows[-1]["loss"] if log_rows else None
    steps = trainer.state.global_step
    run.write_json(TRAINING_FILE, {"examples": len(examples), "steps": steps, "epochs": config.num_train_epochs,
                                   "final_loss": final_loss, "seconds": seconds,
                                   "resumed_from": resume.name if resume else None, **_batch_record(trainer, config),
                                   **counts, "log": log_rows})
    publish_model(trainer, tokenizer, config, run, {"examples": len(examples), "steps": steps,
                                                    "final_loss": final_loss})
    if run.writes and not config.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    run.finish({"examples": len(examples), "steps": steps, "final_loss": final_loss, "model": MODEL_DIR,
                "training": TRAINING_FILE, **counts})
    trainer.accelerator.wait_for_everyone()  # no process returns before model/ and the manifest are there
    return FinetuneResult(run_dir=run.path, model_dir=run.path / MODEL_DIR, examples=len(examples), steps=steps,
                          final_loss=final_loss, seconds=seconds, resumed_from=resume.name if resume else None,
                          log=log_rows)
