"""Glue to TRL's GRPOTrainer: its arguments, the prompt dataset, the trainer, and the callback through which an
arm sees each policy step.

The `grpo:` section carries GRPOConfig's own names, so its fields pass through as they are; `grpo.trl` carries
any other GRPOConfig argument. Datasteer sets a few arguments itself (`SET_BY_DATASTEER`: the batch is one
step's rollouts, rewards arrive already normalised, checkpoints are what resume needs) and chooses defaults for
some others (`DEFAULTS`) that `grpo.trl` may change.

Trackers: `grpo.trl.report_to` (TRL's own: tensorboard, wandb, trackio, mlflow, ...) turns on TRL's logging every
step (unless `grpo.trl` sets `logging_strategy`/`logging_steps`), and the step callback hands every metrics row
(Phi, readout, raw rewards, validation; `records.tracker_scalars`) to the trainer's logger at its step, so each
tracker shows them beside TRL's loss, KL and completion lengths. TensorBoard writes into the arm's `tensorboard/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from datasteer.chat import chat_messages, plain_prompt
from datasteer.dpg.config import GRPOSpec
from datasteer.dpg.records import PhaseClock, tracker_scalars
from datasteer.errors import ConfigError
from datasteer.io import Prompt
from datasteer.training import (
    TENSORBOARD_DIR,
    check_loss,
    check_parameters,
    check_report_to,
    check_trl_section,
    finish_trackers,
    quiet_trainer,
    tracker_folder,
    trackers,
    trl_arguments,
    whole_checkpoints,
)

SET_BY_DATASTEER = (
    "output_dir", "per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size",
    "scale_rewards", "save_strategy", "save_steps", "save_only_model", "seed", "data_seed", "use_cpu", "bf16", "fp16",
    "remove_unused_columns", "logging_nan_inf_filter",
)
DEFAULTS: dict[str, Any] = {
    "lr_scheduler_type": "constant", "warmup_steps": 0, "loss_type": "grpo", "save_total_limit": 2,
    "logging_strategy": "no", "report_to": [], "disable_tqdm": True, "log_completions": False,
}
OWN_FIELDS = ("prompts_per_step", "trl")  # GRPOSpec fields that are not GRPOConfig arguments


def check_grpo_section(grpo: GRPOSpec) -> None:
    """Before any model loads: `grpo.trl` holds GRPOConfig arguments that datasteer does not set itself."""
    check_trl_section("GRPOConfig", grpo.trl, "grpo.trl")
    check_report_to(grpo.trl.get("report_to"), "grpo.trl.report_to")
    owned = set(SET_BY_DATASTEER) | (set(GRPOSpec.model_fields) - set(OWN_FIELDS))
    for key in grpo.trl:
        if key in owned:
            raise ConfigError(f"grpo.trl.{key} is set by datasteer; set it in its own field instead")


def grpo_arguments(grpo: GRPOSpec, output_dir: Path, seed: int, save_steps: int, generator: torch.nn.Module,
                   processes: int = 1) -> Any:
    """trl.GRPOConfig: a batch of `prompts_per_step` x `num_generations` rollouts sampled and rewarded at once
    (TRL's generation batch), then `steps_per_generation` optimizer steps on as many mini-batches of it (TRL's own
    mechanism: per_device_train_batch_size is the mini-batch, no gradient accumulation), rewards taken as they
    come (`scale_rewards="none"`: they are already advantages), full checkpoints for resume. On several processes
    each generates and trains on its 1/`processes` of that batch (the global batch stays the recipe's)."""
    from trl import GRPOConfig

    param = next(generator.parameters())
    owned = dict(
        **grpo.model_dump(exclude=set(OWN_FIELDS)),
        output_dir=str(output_dir),
        per_device_train_batch_size=grpo.prompts_per_step * grpo.num_generations // processes
        // grpo.steps_per_generation,
        gradient_accumulation_steps=1, scale_rewards="none",
        save_strategy="steps", save_steps=save_steps, save_only_model=False, seed=seed, data_seed=seed,
        use_cpu=param.device.type == "cpu", bf16=param.dtype == torch.bfloat16, fp16=param.dtype == torch.float16,
        remove_unused_columns=False,
        logging_nan_inf_filter=False,  # a logged NaN loss must reach the divergence check, not be averaged away
    )
    defaults = dict(DEFAULTS, run_name=f"{output_dir.parent.parent.name}/{output_dir.parent.name}")
    if trackers(grpo.trl.get("report_to")):  # a tracker gets TRL's metrics every policy step
        defaults.update(logging_strategy="steps", logging_steps=1)
    return trl_arguments(GRPOConfig, owned, {**defaults, **grpo.trl}, "grpo.trl")


def prompt_value(text: str, chat: bool, system: str | None) -> Any:
    """A dataset prompt for TRL: messages (its chat path) or plain text, as `encode_prompts` renders them."""
    return chat_messages(text, system) if chat else plain_prompt(text, system)


def prompt_dataset(prompts: list[Prompt], chat: bool, system: str | None) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [prompt_value(p.prompt, chat, system) for p in prompts]})


class StepHooks(Protocol):
    """What an arm does when training begins and after every policy step (see `records.StepLogger`); the rows they
    return (None: nothing to log) go to the trainer's logger."""

    def on_train_begin(self, model: torch.nn.Module) -> dict[str, Any] | None: ...

    def on_step_end(self, step: int, model: torch.nn.Module) -> dict[str, Any] | None: ...


# what a diverged policy step tells the user to lower
POLICY_HINT = "grpo.learning_rate"


def trainer_logger(trainer: Any) -> Callable[[dict[str, float]], None]:
    """Log values through the trainer's callbacks (every tracker of `report_to`, and `state.log_history`) at the
    current step. `transformers.Trainer.log`, not GRPOTrainer's override: that one averages and empties TRL's own
    metric window, which must keep its cadence (`logging_steps`)."""
    from transformers import Trainer

    def log(values: dict[str, float]) -> None:
        # the callback handler's on_log clears control.should_log; called from on_step_end, that would cancel the
        # Trainer's own log of this step (loss, grad_norm and TRL's metrics), so the flag is put back
        should_log = trainer.control.should_log
        Trainer.log(trainer, dict(values))
        trainer.control.should_log = should_log

    return log


def step_callback(hooks: StepHooks) -> Any:
    """A transformers TrainerCallback that hands the trainer's model (and the step) to `hooks`, after checking
    that the policy step left the generator's trainable weights finite (and, when TRL logs, its loss): a diverged
    generator stops the arm with a TrainingDivergedError before its metrics row, checkpoint or model is written.
    The rows the hooks return go to `log` (set by `grpo_trainer`: the trainer's logger) as tracker scalars."""
    from transformers import TrainerCallback

    class StepCallback(TrainerCallback):
        log: Callable[[dict[str, float]], None] | None = None

        def _log(self, row: dict[str, Any] | None) -> None:
            if row is not None and self.log is not None:
                self.log(tracker_scalars(row))

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._log(hooks.on_train_begin(kwargs["model"]))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = kwargs["model"]
            check_parameters(((n, p) for n, p in model.named_parameters() if p.requires_grad),
                             "the generator's policy update", state.global_step, POLICY_HINT)
            self._log(hooks.on_step_end(state.global_step, model))

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            check_loss((logs or {}).get("loss"), "the generator's policy update", state.global_step, POLICY_HINT)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            finish_trackers(args)  # each arm is a tracker run of its own

    return StepCallback()


# TRL's methods whose time is each phase of a policy step (`records.PhaseClock`)
TIMED_METHODS = {"_generate": "sampling", "_get_per_token_logps_and_entropies": "policy_logprobs",
                 "training_step": "training_step"}


def time_phases(trainer: Any, clock: PhaseClock) -> None:
    """Time the trainer's sampling, policy log-probabilities and whole training step into `clock` (the instance's
    methods wrapped; TRL calls them through `self`)."""
    for name, phase in TIMED_METHODS.items():
        setattr(trainer, name, clock.timed(phase, getattr(trainer, name)))


def grpo_trainer(args: Any, generator: torch.nn.Module, tokenizer: Any, dataset: Any, reward: Any,
                 peft_config: Any, hooks: StepHooks, clock: PhaseClock | None = None) -> Any:
    """trl.GRPOTrainer with one reward function (returning advantages) and the arm's step hooks, its phases timed
    into `clock`; transformers' printer callback is dropped, since the arm prints its own progress lines."""
    from trl import GRPOTrainer

    steps = step_callback(hooks)
    trainer = GRPOTrainer(model=generator, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[steps])
    steps.log = trainer_logger(trainer)
    if clock is not None:
        time_phases(trainer, clock)
    quiet_trainer(trainer)
    whole_checkpoints(trainer)  # on several processes a checkpoint counts once every rank saved its part
    tracker_folder(trainer, Path(args.output_dir).parent / TENSORBOARD_DIR)
    return trainer
