"""Glue to TRL's GRPOTrainer: its arguments, the prompt dataset, the trainer, and the callback through which an
arm sees each policy step.

The `grpo:` section carries GRPOConfig's own names, so its fields pass through as they are; `grpo.trl` carries
any other GRPOConfig argument. Datasteer sets a few arguments itself (`SET_BY_DATASTEER`: the batch is one
step's rollouts, rewards arrive already normalised, checkpoints are what resume needs) and chooses defaults for
some others (`DEFAULTS`) that `grpo.trl` may change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from datasteer.chat import chat_messages, plain_prompt
from datasteer.dpg.config import GRPOSpec
from datasteer.errors import ConfigError
from datasteer.io import Prompt
from datasteer.training import (
    check_loss,
    check_parameters,
    check_trl_section,
    quiet_trainer,
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
    return trl_arguments(GRPOConfig, owned, {**DEFAULTS, **grpo.trl}, "grpo.trl")


def prompt_value(text: str, chat: bool, system: str | None) -> Any:
    """A dataset prompt for TRL: messages (its chat path) or plain text, as `encode_prompts` renders them."""
    return chat_messages(text, system) if chat else plain_prompt(text, system)


def prompt_dataset(prompts: list[Prompt], chat: bool, system: str | None) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [prompt_value(p.prompt, chat, system) for p in prompts]})


class StepHooks(Protocol):
    """What an arm does when training begins and after every policy step (see `records.StepLogger`)."""

    def on_train_begin(self, model: torch.nn.Module) -> None: ...

    def on_step_end(self, step: int, model: torch.nn.Module) -> None: ...


# what a diverged policy step tells the user to lower
POLICY_HINT = "grpo.learning_rate"


def step_callback(hooks: StepHooks) -> Any:
    """A transformers TrainerCallback that hands the trainer's model (and the step) to `hooks`, after checking
    that the policy step left the generator's trainable weights finite (and, when TRL logs, its loss): a diverged
    generator stops the arm with a TrainingDivergedError before its metrics row, checkpoint or model is written."""
    from transformers import TrainerCallback

    class StepCallback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            hooks.on_train_begin(kwargs["model"])

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = kwargs["model"]
            check_parameters(((n, p) for n, p in model.named_parameters() if p.requires_grad),
                             "the generator's policy update", state.global_step, POLICY_HINT)
            hooks.on_step_end(state.global_step, model)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            check_loss((logs or {}).get("loss"), "the generator's policy update", state.global_step, POLICY_HINT)

    return StepCallback()


def grpo_trainer(args: Any, generator: torch.nn.Module, tokenizer: Any, dataset: Any, reward: Any,
                 peft_config: Any, hooks: StepHooks) -> Any:
    """trl.GRPOTrainer with one reward function (returning advantages) and the arm's step hooks; transformers'
    printer callback is dropped, since the arm prints its own progress lines."""
    from trl import GRPOTrainer

    trainer = GRPOTrainer(model=generator, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[step_callback(hooks)])
    quiet_trainer(trainer)
    whole_checkpoints(trainer)  # on several processes a checkpoint counts once every rank saved its part
    return trainer
