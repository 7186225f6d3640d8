"""`dpg`: train a generator with GRPO whose rewards come from a target's fine-tuning on its rollouts.

One run directory per recipe; one sub-run per arm (the main reward, and baselines run side by side):

    <arm>/manifest.json      the arm's config fingerprint, inputs and status
    <arm>/metrics.jsonl      one row per policy step: step, examples seen, reward statistics, Phi and readout of
                             the target trained on that step's rollouts, and (every `validation.every` steps) the
                             validation: a fresh target trained on rollouts for held-out prompts
    <arm>/slices.jsonl       the LM-head slice's change at every validation (pattern targets)
    <arm>/checkpoints/       TRL checkpoints every `save_steps` (generator, optimizer, scheduler, RNG, data order)
    <arm>/model/             the trained generator
    plots/, report.md, results.json

The generator is trained with TRL's GRPOTrainer. The rewards it is handed are already the advantages: DPG
normalises per prompt group with the population std + 1e-6 (raw metagradients are ~1e-9; TRL's own scaling
divides by std + 1e-4, which would flatten them), the naive baseline over the whole batch. With
`scale_rewards="none"` TRL then subtracts the group mean of values whose group mean is already zero, which
leaves them unchanged (for the naive arm each group holds one rollout of every split, so its group mean is the
batch mean). Everything else (sampling, the clipped surrogate, KL, LoRA, vLLM, checkpoints) is TRL's.

Resume: a killed run started again continues from its last checkpoint; metrics rows after that checkpoint are
dropped and recomputed, so the finished metrics equal an uninterrupted run's (TRL restores the generator,
optimizer, RNG states and the position in the data order; validation runs under a forked RNG seeded from the
step, so it never disturbs the training stream).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from datasteer.config import fingerprint
from datasteer.io import PromptsConfig
from datasteer.dpg.build import (allowed_token_ids, build_target, check_generator, check_target,
                                 restrict_vocabulary)
from datasteer.dpg.config import DPGConfig
from datasteer.dpg.report import write_dpg_report
from datasteer.dpg.rewards import (Rewards, batch_advantages, dpg_rewards, group_advantages, naive_rewards,
                                   target_examples)
from datasteer.dpg.targets import LMHeadPattern, Target
from datasteer.errors import ConfigError, InputError
from datasteer.chat import chat_messages, encode_prompts, plain_prompt
from datasteer.io import Prompt, describe_input, read_prompts
from datasteer.metagrad import train
from datasteer.models import load_model, parse_spec
from datasteer.runs import Run, atomic_write_json, atomic_write_text, derive_seed

METRICS = "metrics.jsonl"
SLICES = "slices.jsonl"
CHECKPOINTS = "checkpoints"


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


# ---------------------------------------------------------------- inputs

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


def _chat(config: DPGConfig, tokenizer: Any) -> bool:
    if config.generator.chat is not None:
        if config.generator.chat and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("generator.chat is true but the generator's tokenizer has no chat template")
        return config.generator.chat
    return bool(getattr(tokenizer, "chat_template", None))


def _prompt_value(text: str, chat: bool, system: str | None) -> Any:
    """A dataset prompt for TRL: messages (its chat path) or plain text, as `encode_prompts` renders them."""
    return chat_messages(text, system) if chat else plain_prompt(text, system)


# ---------------------------------------------------------------- the reward function TRL calls

class RewardFunction:
    """Called by GRPOTrainer with the whole generation batch; returns normalised advantages as rewards."""

    def __init__(self, arm: str, config: DPGConfig, target_model: torch.nn.Module, tokenizer: Any,
                 target_tokenizer: Any, target: Target):
        self.arm = arm
        self.__name__ = f"{arm}_reward"
        self.config = config
        self.target_model = target_model
        self.tokenizer = tokenizer                  # the generator's: decodes rollouts
        self.target_tokenizer = target_tokenizer    # the target's: re-tokenises them
        self.target = target
        self.last: dict[str, Any] | None = None

    def texts(self, completion_ids: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]

    def __call__(self, prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
                 **kwargs: Any) -> list[float]:
        start = time.perf_counter()
        k = self.config.grpo.num_generations
        texts = self.texts(completion_ids)
        groups = [i // k for i in range(len(texts))]  # TRL's sampler repeats each prompt k times in a row
        if self.arm == "dpg":
            result = dpg_rewards(self.target_model, self.target_tokenizer, texts, self.target, self.config.training)
            advantages = group_advantages(result.rewards, groups)
        else:
            result = naive_rewards(self.target_model, self.target_tokenizer, texts, [i % k for i in range(len(texts))],
                                   self.target, self.config.training)
            advantages = batch_advantages(result.rewards)
        self.last = _step_record(result, texts, completion_ids, time.perf_counter() - start)
        return advantages.tolist()


def _step_record(result: Rewards, texts: list[str], completion_ids: list[list[int]], seconds: float) -> dict:
    r = result.rewards
    lengths = [len(ids) for ids in completion_ids]
    return {
        "rollouts": len(texts),
        "reward": {"mean": float(r.mean()), "std": float(r.std(unbiased=False)), "min": float(r.min()),
                   "max": float(r.max())},
        "untrainable": sum(not t for t in result.trained),
        "completion_tokens_mean": sum(lengths) / max(len(lengths), 1),
        "phi": result.phi,
        "readout": result.readout,
        "reward_seconds": round(seconds, 3),
        "sample": texts[0][:200],
    }


# ---------------------------------------------------------------- validation

def sample_rollouts(model: torch.nn.Module, tokenizer: Any, prompts: list[str], n: int, config: DPGConfig,
                    chat: bool, seed: int) -> list[str]:
    """n sampled completions per prompt with the generator's current weights, under a forked RNG.

    Prompts are encoded by generation's `encode_prompts` (chat template, or plain text with the tokenizer's
    special tokens), which renders them as TRL does for training.
    """
    grpo = config.grpo
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts: list[str] = []
    pad_side = tokenizer.padding_side
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(prompts), 16):
                enc = encode_prompts(tokenizer, prompts[start:start + 16], config.generator.system_prompt,
                                     chat).to(device)
                out = model.generate(**enc, do_sample=True, temperature=grpo.temperature, top_p=grpo.top_p,
                                     top_k=0, max_new_tokens=grpo.max_completion_length, num_return_sequences=n,
                                     pad_token_id=tokenizer.pad_token_id)
                for row in out[:, enc["input_ids"].shape[1]:]:
                    texts.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = pad_side
        model.train(was_training)
    return texts


def validate(model: torch.nn.Module, tokenizer: Any, prompts: list[str], chat: bool, config: DPGConfig,
             target_model: torch.nn.Module, target_tokenizer: Any, target: Target,
             step: int) -> tuple[dict[str, Any], list | None]:
    """A fresh target (its initial weights) fine-tuned on rollouts for held-out prompts: Phi and readout."""
    n = config.validation.num_generations or config.grpo.num_generations
    texts = sample_rollouts(model, tokenizer, prompts, n, config, chat,
                            derive_seed(config.seed, "validation", step))
    examples, _ = target_examples(texts, target_tokenizer, config.training.max_length)
    if not examples:
        return {"rollouts": len(texts), "trained": 0, "phi": None}, None
    params = train(target_model, examples, config.training)
    readout = target.readout(target_model, params)
    record = {"rollouts": len(texts), "trained": len(examples), **readout, "sample": texts[0][:200]}
    delta = None
    if isinstance(target, LMHeadPattern):
        with torch.no_grad():
            delta = (target.slice(params) - target.initial.to(params[target.param])).cpu().tolist()
    return record, delta


# ---------------------------------------------------------------- metrics file

def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash: it and anything after it are recomputed
    return rows


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep rows up to `last_step` (the checkpoint a resumed run restarts from)."""
    rows = [r for r in read_jsonl(path) if r["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def last_checkpoint(directory: Path) -> Path | None:
    found = [(int(p.name.split("-")[1]), p) for p in directory.glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


# ---------------------------------------------------------------- one arm

def run_arm(config: DPGConfig, arm: str, out: Path, prompts: list[Prompt], held_out: list[Prompt], *,
            overwrite: bool, progress: bool, console: Console) -> ArmResult:
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    arm_config = config.model_copy(update={"reward": arm, "baselines": []})
    run = Run.prepare(out, stage=f"dpg-{arm}", config=fingerprint(arm_config),
                      inputs={"prompts": describe_input(config.prompts, prompts),
                              "held_out": [p.prompt for p in held_out]},
                      seed=config.seed, overwrite=overwrite)
    if run.exists and run.manifest.get("status") == "complete":
        return ArmResult(arm, out, read_jsonl(out / METRICS), read_jsonl(out / SLICES))

    generator = load_model(config.generator.model, dtype=config.generator.dtype, device=config.generator.device)
    target_loaded = load_model(config.target.model, dtype=config.training.dtype, device=config.training.device,
                               attn_implementation="eager")
    tokenizer, target_tokenizer = generator.tokenizer, target_loaded.tokenizer
    target_model = target_loaded.model
    target = build_target(config.target, target_model, target_tokenizer)
    allowed = allowed_token_ids(config.generator.allowed_tokens, tokenizer, config.generator.allow_eos)
    if allowed is not None:
        restrict_vocabulary(generator.model, allowed)
        if isinstance(target, LMHeadPattern):
            writable = {tokenizer.decode([i]) for i in allowed}
            missing = [t for t in (target_tokenizer.decode([i]) for i in target.token_ids) if t not in writable]
            if missing:
                raise ConfigError(f"the pattern's token rows {missing} are not among the generator's allowed tokens")

    chat = _chat(config, tokenizer)
    dataset = Dataset.from_dict({"prompt": [_prompt_value(p.prompt, chat, config.generator.system_prompt)
                                            for p in prompts]})
    held_texts = [p.prompt for p in held_out]
    grpo = config.grpo
    batch = config.grpo.prompts_per_step * grpo.num_generations
    on_cpu = next(generator.model.parameters()).device.type == "cpu"
    dtype = next(generator.model.parameters()).dtype
    args = GRPOConfig(
        output_dir=str(out / CHECKPOINTS), max_steps=grpo.steps, per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_length, temperature=grpo.temperature, top_p=grpo.top_p,
        learning_rate=grpo.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=grpo.weight_decay, max_grad_norm=grpo.max_grad_norm, epsilon=grpo.epsilon, beta=grpo.kl_beta,
        num_iterations=grpo.num_iterations, loss_type="grpo", scale_rewards="none",
        gradient_checkpointing=grpo.gradient_checkpointing, use_vllm=grpo.use_vllm,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=2, save_only_model=False,
        logging_strategy="no", report_to=[], disable_tqdm=True, seed=config.seed, data_seed=config.seed,
        use_cpu=on_cpu, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        remove_unused_columns=False, log_completions=False,
    )
    peft_config = None
    if config.generator.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **config.generator.lora)
    reward = RewardFunction(arm, config, target_model, tokenizer, target_tokenizer, target)
    metrics_path, slices_path = out / METRICS, out / SLICES
    resume = last_checkpoint(out / CHECKPOINTS) if run.exists else None
    done_step = int(resume.name.split("-")[1]) if resume else 0
    run.ensure_created()
    for path in (metrics_path, slices_path):
        truncate_jsonl(path, done_step if resume else -1)  # step 0 is validated again on a fresh start
    every = config.validation.every
    started = time.perf_counter()

    def validation(row: dict[str, Any], model: torch.nn.Module) -> None:
        step = row["step"]
        record, delta = validate(model, tokenizer, held_texts, chat, config, target_model, target_tokenizer,
                                 target, step)
        row["validation"] = record
        if delta is not None:
            append_jsonl(slices_path, {"step": step, "delta": delta})

    class Callback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if done_step == 0:  # the untrained generator: the baseline every curve starts from
                params = {name: p.detach() for name, p in target_model.named_parameters()}
                row = {"step": 0, "examples_seen": 0, "untrained": target.readout(target_model, params)}
                validation(row, kwargs["model"])
                append_jsonl(metrics_path, row)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step = state.global_step
            # with num_iterations > 1, TRL takes that many optimizer steps on each batch of rollouts
            batches = -(-step // grpo.num_iterations)
            row = {"step": step, "examples_seen": batches * batch, **(reward.last or {})}
            if step % every == 0 or step == grpo.steps:
                validation(row, kwargs["model"])
            append_jsonl(metrics_path, row)
            if progress:
                elapsed = time.perf_counter() - started
                rate = elapsed / max(step - done_step, 1)
                eta = rate * (grpo.steps - step)
                console.print(_progress_line(arm, step, grpo.steps, row, eta))

    trainer = GRPOTrainer(model=generator.model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[Callback()])
    trainer.remove_callback(PrinterCallback)  # our progress lines replace its dict dumps
    if progress and resume:
        console.print(f"{arm}: resuming from {resume.name}")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    trainer.save_model(str(model_dir))
    rows, slices = read_jsonl(metrics_path), read_jsonl(slices_path)
    run.finish({"steps": grpo.steps, "final_validation": rows[-1].get("validation") if rows else None})
    return ArmResult(arm, out, rows, slices)


def _progress_line(arm: str, step: int, total: int, row: dict[str, Any], eta: float) -> str:
    readout = row.get("readout") or {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in readout.items())
    line = f"{arm} step {step}/{total} ({row['examples_seen']} examples): {shown}"
    if "validation" in row:
        val = {k: v for k, v in row["validation"].items() if isinstance(v, float)}
        line += " | validation " + ", ".join(f"{k} {v:.4g}" for k, v in val.items())
    minutes, seconds = divmod(int(math.ceil(eta)), 60)
    return line + f" | ETA {minutes}:{seconds:02d}"


# ---------------------------------------------------------------- the whole run

def dpg(config: DPGConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True,
        console: Console | None = None) -> DPGResult:
    """Run every arm of `config` into `out` (rerun to resume), then plots and the report."""
    console = console or Console(stderr=True)
    out = Path(out)
    prompts, held_out = _prompts(config)
    check_target(config.target)
    check_generator(config)
    for spec in (config.generator.model, config.target.model):
        parse_spec(spec)
    batch = config.grpo.prompts_per_step * config.grpo.num_generations
    if len(prompts) < config.grpo.prompts_per_step:
        raise InputError(f"{len(prompts)} training prompts but prompts_per_step is {config.grpo.prompts_per_step}")
    if batch % config.training.batch_size:
        raise ConfigError(f"the {batch} rollouts of a step do not split into inner batches of "
                          f"{config.training.batch_size} (each rollout is used in exactly one inner step)")
    arms = []
    for arm in config.arms:
        if progress:
            console.rule(f"[bold]dpg: {arm} ({config.grpo.steps} steps of {batch} rollouts)")
        arms.append(run_arm(config, arm, out / arm, prompts, held_out, overwrite=overwrite, progress=progress,
                            console=console))
    report, summary = write_dpg_report(config, out, arms)
    atomic_write_json(out / "results.json", summary)
    return DPGResult(out, report, arms, summary)
