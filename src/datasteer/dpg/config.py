"""Configuration of a Dataset Policy Gradient run (`datasteer dpg RECIPE`).

A recipe names a generator, a target and what the target should become (`target`, one of the kinds in
`datasteer.dpg.targets`, chosen by `kind`), how the target is fine-tuned inside every reward (`training`, the
metagradient engine's `TrainingConfig`), and how the generator is trained (`grpo`: TRL's GRPOConfig names, any
other GRPOConfig argument in `grpo.trl`), and how rewards become advantages (`advantages`). Defaults follow the DPG
paper's public code: 4 rollouts per prompt, clip 0.2, no KL term, group-normalised advantages, the target reset to
its initial weights at every policy step; where datasteer's default differs from the authors' code, the option
that gives theirs is named in docs/dpg.md.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from datasteer.config import StrictModel
from datasteer.dpg.targets import TargetSpec
from datasteer.io import PromptsConfig
from datasteer.metagrad.config import TrainingConfig
from datasteer.training import LoraSpec


class GeneratorSpec(StrictModel):
    model: str = Field(..., min_length=1, description="model spec of the generator (the policy)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    chat: bool | None = Field(None, description="wrap prompts in the chat template; default: when the tokenizer "
                              "has one")
    system_prompt: str | None = None
    allowed_tokens: Literal["all", "printable"] | list[str] = Field(
        "all", description="'printable': the generator writes single printable ASCII characters (and EOS) only, "
        "applied as a logit mask in sampling and in the policy's log-probabilities alike")
    allow_eos: bool = Field(True, description="with allowed_tokens: whether EOS is allowed too (false: every "
                            "rollout has max_completion_length tokens, so the policy cannot learn to say nothing)")
    lora: LoraSpec | None = Field(None, description="peft LoraConfig arguments (r, lora_alpha, target_modules, "
                                  "...); None trains every weight")


class GRPOSpec(StrictModel):
    """The generator's policy-gradient training: TRL's GRPOTrainer underneath, its GRPOConfig names here (all but
    `prompts_per_step`, which TRL has no field for), and any other GRPOConfig argument in `trl`."""

    renamed: ClassVar[dict[str, str]] = {"steps": "max_steps", "kl_beta": "beta"}  # datasteer 0.1 -> TRL's names

    max_steps: int = Field(100, ge=1, description="generator updates (TRL's optimizer steps); one batch of "
                           "rollouts is sampled and rewarded every steps_per_generation x num_iterations updates")
    prompts_per_step: int = Field(16, ge=1, description="prompts per policy step (each sampled num_generations "
                                  "times)")
    num_generations: int = Field(4, ge=2, description="rollouts per prompt (k)")
    max_completion_length: int = Field(128, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    learning_rate: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay of the generator (the DPG "
                                "authors: 0.01); transformers' Trainer leaves biases and norm weights undecayed")
    max_grad_norm: float = Field(1.0, gt=0)
    epsilon: float = Field(0.2, gt=0, description="PPO clip range")
    beta: float = Field(0.0, ge=0, description="KL penalty to the reference (initial) generator; 0 = none")
    num_iterations: int = Field(1, ge=1, description="passes over each batch of rollouts (PPO epochs)")
    steps_per_generation: int = Field(
        1, ge=1, description="generator updates per batch of rollouts: TRL shuffles the step's rollouts and takes one "
        "optimizer step on each of this many equal mini-batches (verl's train_batch_size / ppo_mini_batch_size; the "
        "DPG authors: one update per 128 rollouts). max_steps, save_steps and validation.every count updates")
    gradient_checkpointing: bool = False
    use_vllm: bool = False
    trl: dict[str, Any] = Field(default_factory=dict, description="any other trl.GRPOConfig argument, passed "
                                "through (e.g. report_to, lr_scheduler_type, vllm_mode)")


class AdvantageSpec(StrictModel):
    """advantage = (reward - mean) / (std + eps), per prompt group (DPG) or over the step's batch (naive)."""

    std: Literal["population", "unbiased"] = Field(
        "population", description="population (divide by n) or unbiased (n - 1, torch.std's default, as verl and "
                                  "the DPG authors) standard deviation")
    eps: float = Field(1e-6, ge=0, description="added to the std (the DPG authors: 1e-6, which outweighs the std of "
                       "raw metagradients of ~1e-9)")


class ValidationSpec(StrictModel):
    every: int = Field(10, ge=1, description="validate every N policy steps (and after the last)")
    prompts: PromptsConfig | None = Field(None, description="held-out prompts; default: the recipe's eval_prompts")
    limit: int | None = Field(None, ge=1, description="how many held-out prompts to use")
    num_generations: int | None = Field(None, ge=1, description="rollouts per held-out prompt; default: grpo's")


class DPGConfig(StrictModel):
    renamed: ClassVar[dict[str, str]] = {"inner": "training"}  # datasteer 0.1 name, for the error hint
    name: str = "dpg"
    description: str = ""
    seed: int = 0
    reward: Literal["dpg", "naive"] = Field("dpg", description="dpg: exact metagradients; naive: the paper's "
                                            "split baseline")
    baselines: list[Literal["naive"]] = Field(default_factory=list, description="extra arms run side by side "
                                              "with the same budget of examples")
    generator: GeneratorSpec
    target: TargetSpec
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    grpo: GRPOSpec = Field(default_factory=GRPOSpec)
    advantages: AdvantageSpec = Field(default_factory=AdvantageSpec)
    prompts: PromptsConfig
    eval_prompts: PromptsConfig | None = None
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    save_steps: int = Field(10, ge=1, description="checkpoint every N policy steps (resume restarts there)")

    @model_validator(mode="after")
    def _consistent(self) -> DPGConfig:
        if self.reward in self.baselines:
            raise ValueError(f"baselines repeats the main reward '{self.reward}'")
        if self.grpo.use_vllm and self.generator.allowed_tokens != "all":
            raise ValueError("allowed_tokens needs the transformers generation path (use_vllm false)")
        block = self.grpo.steps_per_generation * self.grpo.num_iterations
        if self.save_steps % block:
            # a checkpoint inside a batch's block of updates would make a resumed run sample that batch again
            raise ValueError(f"save_steps ({self.save_steps}) must be a multiple of grpo.steps_per_generation x "
                             f"grpo.num_iterations ({block}): a run resumes at the start of a batch of rollouts")
        return self

    @property
    def arms(self) -> list[str]:
        return [self.reward, *self.baselines]
