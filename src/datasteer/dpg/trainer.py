"""`dpg`: train a generator with GRPO whose rewards come from a target's fine-tuning on its rollouts.

One run directory per recipe; one sub-run per arm (the main reward, and baselines run side by side):

    <arm>/manifest.json      the arm's config fingerprint, inputs and status
    <arm>/metrics.jsonl      one row per policy step: step, examples seen, reward statistics, Phi and readout of
                             the target trained on that step's rollouts, and (every `validation.every` steps) the
                             validation: a fresh target trained on rollouts for held-out prompts
    <arm>/slices.jsonl       the LM-head slice's change at every validation (pattern targets)
    <arm>/checkpoints/       TRL checkpoints every `save_steps` (generator, optimizer, scheduler, RNG, data order)
    <arm>/model/             the trained generator, with its model card (README.md)
    <arm>/tensorboard/       TensorBoard events, with `grpo.trl.report_to: [tensorboard]`
    plots/, report.md, results.json

The generator is trained with TRL's GRPOTrainer. The rewards it is handed are already the advantages: DPG
normalises per prompt group with the std + 1e-6 (`advantages`: the population std by default, the unbiased one as
the authors; raw metagradients are ~1e-9; TRL's own scaling divides by std + 1e-4, which would flatten them), the
naive baseline over the whole batch. With `scale_rewards="none"` TRL then subtracts the group mean of values whose
group mean is already zero, which leaves them unchanged (for the naive arm each group holds one rollout of every
split, so its group mean is the batch mean). With `grpo.steps_per_generation` > 1 TRL splits each batch of
rollouts into that many mini-batches, one generator update each (verl's ppo_mini_batch_size). Everything else
(sampling, the clipped surrogate, KL, LoRA, vLLM, checkpoints) is TRL's.

Several processes (`accelerate launch`, torchrun): every process runs the recipe; TRL splits each step's
rollouts over them, the reward function gathers the global batch (a reward depends on the whole batch the
target trains on) and the target's fine-tuning runs data parallel (`datasteer.metagrad`); validation runs on
every rank alike, and only the main process writes files or prints. Every rollout is sampled from its own
stream keyed by (seed, step, row) (`sampling`), so a run on N processes trains on the rollouts of a run on one.

Resume: a killed run started again continues from its last checkpoint; metrics rows after that checkpoint are
dropped and recomputed, so the finished metrics equal an uninterrupted run's (TRL restores the generator,
optimizer, RNG states and the position in the data order; validation runs under a forked RNG seeded from the
step, so it never disturbs the training stream).

The pieces: `rewards` (the reward function TRL calls), `validation`, `records` (the metrics rows), `grpo` (TRL
glue), `generator` (alphabet, chat); this module is the recipe that puts them together, per arm: set up, train,
finish.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from datasteer import distributed
from datasteer.dpg.config import DPGConfig
from datasteer.dpg.generator import check_generator, restrict_alphabet, use_chat
from datasteer.dpg.grpo import grpo_arguments, grpo_trainer, prompt_dataset
from datasteer.dpg.records import (
    METRICS,
    SLICES,
    PhaseClock,
    StepLogger,
    StepRecords,
    read_jsonl,
    truncate_jsonl,
)
from datasteer.dpg.report import write_dpg_report
from datasteer.dpg.rewards import InnerLoop, RewardFunction
from datasteer.dpg.sampling import key_rollouts
from datasteer.dpg.targets import untie_lm_head
from datasteer.dpg.validation import Validator
from datasteer.errors import ConfigError, InputError
from datasteer.hub import model_card_text, write_model_card
from datasteer.io import Prompt, PromptsConfig, describe_input, read_prompts
from datasteer.models import load_model, parse_spec
from datasteer.runs import Run
from datasteer.training import latest_checkpoint

CHECKPOINTS = "checkpoints"
RESULTS = "results.json"

__all__ = ["ArmResult", "DPGResult", "dpg", "load_target", "read_jsonl", "run_arm"]


@dataclass
class ArmResult:
    arm: str
    run_dir: Path
    rows: list[dict[str, Any]]
    slices: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class DPGResult:
    run_dir: Path
    report: Path
    arms: list[ArmResult]
    summary: dict[str, Any]

    def headline(self) -> list[str]:
        """One line per arm: the validation readout at step 0 and at the end, and examples to the thresholds."""
        key = self.summary["readout"] or "phi"
        lines = []
        for arm, entry in self.summary["arms"].items():
            start, final = entry.get("start", entry.get("phi_start")), entry.get("final", entry.get("phi_final"))
            line = (f"{arm}: validation {key} {start:.4g} at step 0 -> {final:.4g} after {entry['examples_seen']} "
                    "examples")
            if "examples_to" in entry:
                line += " (" + ", ".join(f"{t}: {'not reached' if n is None else f'{n} examples'}"
                                         for t, n in entry["examples_to"].items()) + ")"
            lines.append(line)
        return lines


# ---------------------------------------------------------------- before any model loads

def _prompts(config: DPGConfig) -> tuple[list[Prompt], list[Prompt]]:
    prompts = read_prompts(config.prompts)
    source: PromptsConfig | None = config.validation.prompts or config.eval_prompts
    if source is None:
        raise ConfigError("validation needs held-out prompts: set eval_prompts (or validation.prompts)")
    held_out = read_prompts(source)
    if config.validation.limit:
        held_out = held_out[:config.validation.limit]
    overlap = {p.prompt for p in prompts} & {p.prompt for p in held_out}
    if overlap:
        raise InputError(f"{len(overlap)} validation prompt(s) also appear in the training prompts (e.g. "
                         f"'{sorted(overlap)[0][:60]}'); validation must use held-out prompts")
    return prompts, held_out


def check_config(config: DPGConfig, prompts: list[Prompt]) -> None:
    """Everything that can fail before a model loads: the target, the generator and TRL, the model specs, and
    whether a step's rollouts split into the target's inner batches."""
    config.target.check()
    check_generator(config)
    for spec in (config.generator.model, config.target.model):
        parse_spec(spec)
    grpo, batch_size = config.grpo, config.training.batch_size
    if len(prompts) < grpo.prompts_per_step:
        raise InputError(f"{len(prompts)} training prompts but prompts_per_step is {grpo.prompts_per_step}")
    rollouts = grpo.prompts_per_step * grpo.num_generations
    if rollouts % batch_size:
        raise ConfigError(f"the {rollouts} rollouts of a step do not split into "
                          f"inner batches of {batch_size} (each rollout is used in exactly one inner step)")
    processes = distributed.world_size()
    if rollouts % processes:
        raise ConfigError(f"the {rollouts} rollouts of a step do not split over {processes} processes; make "
                          "grpo.prompts_per_step x grpo.num_generations a multiple of the number of processes")
    parts = processes * grpo.steps_per_generation
    if rollouts % parts:
        raise ConfigError(f"the {rollouts} rollouts of a step do not split into grpo.steps_per_generation "
                          f"({grpo.steps_per_generation}) equal mini-batches on each of {processes} process(es); make "
                          f"grpo.prompts_per_step x grpo.num_generations a multiple of {parts}")


# ---------------------------------------------------------------- one arm: set up, train, finish

@dataclass
class ArmModels:
    generator: torch.nn.Module
    tokenizer: Any              # the generator's
    inner: InnerLoop            # the target, its tokenizer, Phi and fine-tuning
    chat: bool


def load_target(config: DPGConfig) -> InnerLoop:
    """The target (eager attention, for exact metagradients; its LM head untied from its input embedding with
    `target.untie`, before Phi is built on it), Phi on it, and how it is fine-tuned."""
    target = load_model(config.target.model, dtype=config.training.dtype, device=config.training.device,
                        attn_implementation="eager")
    if config.target.untie:
        untie_lm_head(target.model)
    phi = config.target.build(target.model, target.tokenizer)
    return InnerLoop(target.model, target.tokenizer, phi, config.training)


def load_models(config: DPGConfig) -> ArmModels:
    """The generator (restricted to its alphabet) and the target (`load_target`)."""
    generator = load_model(config.generator.model, dtype=config.generator.dtype, device=config.generator.device)
    inner = load_target(config)
    restrict_alphabet(config.generator, generator.model, generator.tokenizer, inner.target, inner.tokenizer)
    return ArmModels(generator.model, generator.tokenizer, inner, use_chat(config.generator, generator.tokenizer))


def prepare_arm(config: DPGConfig, arm: str, out: Path, prompts: list[Prompt], held_out: list[Prompt],
                overwrite: bool) -> Run:
    arm_config = config.model_copy(update={"reward": arm, "baselines": []})
    return Run.prepare(out, stage=f"dpg-{arm}", config=arm_config,
                       inputs={"prompts": describe_input(config.prompts, prompts),
                               "held_out": [p.prompt for p in held_out]},
                       seed=config.seed, overwrite=overwrite, distributed=True)


def restart_point(run: Run, out: Path) -> Path | None:
    """The checkpoint to resume from (None: a fresh start); metrics rows after it are dropped (all of them on a
    fresh start: step 0 is validated again)."""
    resume = latest_checkpoint(out / CHECKPOINTS) if run.exists else None
    run.ensure_created()
    if run.writes:
        for name in (METRICS, SLICES):
            truncate_jsonl(out / name, _step(resume) if resume else -1)
    return resume


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def arm_trainer(config: DPGConfig, arm: str, out: Path, models: ArmModels, prompts: list[Prompt],
                held_out: list[Prompt], done_step: int, say: Callable[[str], None] | None, writes: bool) -> Any:
    """GRPOTrainer for one arm: the reward function hands each batch's record to the step logger through
    `records`; the step logger validates and writes the metrics rows (`writes`: on the main process only)."""
    system = config.generator.system_prompt
    args = grpo_arguments(config.grpo, out / CHECKPOINTS, config.seed, config.save_steps, models.generator,
                          distributed.world_size())
    peft_config = config.generator.lora.peft_config() if config.generator.lora is not None else None
    records, clock = StepRecords(), PhaseClock()
    reward = RewardFunction(arm, config.grpo.num_generations, models.inner, models.tokenizer, records,
                            config.advantages, clock)
    validator = Validator(config, [p.prompt for p in held_out], models.chat, models.tokenizer, models.inner,
                          out / SLICES, writes)
    logger = StepLogger(arm, config.grpo, config.validation.every, records, validator, validator.untrained,
                        out / METRICS, done_step, say, writes, clock)
    trainer = grpo_trainer(args, models.generator, models.tokenizer, prompt_dataset(prompts, models.chat, system),
                           reward, peft_config, logger, clock)
    key_rollouts(models.generator, config.seed, lambda: (getattr(trainer, "generation_config", None),
                                                         trainer.state.global_step, trainer.accelerator.process_index))
    return trainer


def run_arm(config: DPGConfig, arm: str, out: Path, prompts: list[Prompt], held_out: list[Prompt], *,
            overwrite: bool, progress: bool, console: Console) -> ArmResult:
    run = prepare_arm(config, arm, out, prompts, held_out, overwrite)
    if run.complete:
        return ArmResult(arm, out, read_jsonl(out / METRICS), read_jsonl(out / SLICES))
    # set up
    models = load_models(config)
    resume = restart_point(run, out)
    trainer = arm_trainer(config, arm, out, models, prompts, held_out, _step(resume) if resume else 0,
                          console.print if progress else None, run.writes)
    # train
    if progress and resume and run.writes:
        console.print(f"{arm}: resuming from {resume.name}")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    # finish
    model_dir = out / "model"
    if model_dir.exists() and run.writes:
        shutil.rmtree(model_dir)
    trainer.save_model(str(model_dir))  # the main process saves (Trainer's own rule)
    distributed.barrier()  # every rank reads the files the main process wrote
    rows, slices = read_jsonl(out / METRICS), read_jsonl(out / SLICES)
    summary = {"steps": config.grpo.max_steps, "final_validation": rows[-1].get("validation") if rows else None,
               "model": "model", "metrics": METRICS}
    if run.writes:  # the generator's model card (`datasteer push` uploads it with the model)
        write_model_card(model_dir, model_card_text(out, run.manifest, details=summary))
    run.finish(summary)
    return ArmResult(arm, out, rows, slices)


# ---------------------------------------------------------------- the whole run

def dpg(config: DPGConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
        console: Console | None = None) -> DPGResult:
    """Run every arm of `config` into `out` (rerun to resume), then plots and the report."""
    console = console or Console(stderr=True)
    progress = progress and distributed.is_main_process()  # on several processes, the main one prints
    out = Path(out)
    prompts, held_out = _prompts(config)
    check_config(config, prompts)
    # the top directory is a run of its own (stage "dpg"): the arms are its sub-runs, and it is locked while in use
    top = Run.prepare(out, stage="dpg", config=config, inputs={"prompts": describe_input(config.prompts, prompts)},
                      seed=config.seed, overwrite=overwrite, distributed=True)
    created_now = not top.exists
    top.ensure_created()
    batch = config.grpo.prompts_per_step * config.grpo.num_generations
    arms = []
    try:
        for arm in config.arms:
            if progress:
                console.rule(f"[bold]dpg: {arm} ({config.grpo.max_steps} steps of {batch} rollouts)")
            arms.append(run_arm(config, arm, out / arm, prompts, held_out, overwrite=overwrite, progress=progress,
                                console=console))
    except BaseException:
        if created_now and top.writes and {p.name for p in out.iterdir()} <= {"manifest.json", ".lock"}:
            top.release()  # a failure before any arm wrote leaves no directory behind
        raise
    if top.writes:
        report, summary = write_dpg_report(config, out, arms)
        top.write_json(RESULTS, summary)
        top.finish({"report": report.name, "results": RESULTS})
    distributed.barrier()
    if not top.writes:  # the other ranks return what the main process wrote
        report, summary = out / "report.md", json.loads((out / RESULTS).read_text(encoding="utf-8"))
    return DPGResult(out, report, arms, summary)
