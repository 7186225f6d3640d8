"""Dataset Policy Gradient: train a generator by GRPO so that fine-tuning a target on its data raises a
differentiable metric Phi of the target (`datasteer dpg RECIPE`).

- `config`: `DPGConfig` (a recipe: generator, target, inner `training`, `grpo` under TRL's names, validation);
- `targets/`: one module per target kind (its recipe section, the readout it declares, its Phi), `TARGETS`;
- `glyphs`: +-1 patterns (glyphs, QR codes, files) for LM-head targets;
- `generator`: checks before the generator loads, chat or plain prompts, its alphabet;
- `rewards`: DPG and naive rewards, advantages, and the reward function TRL calls;
- `validation`: a fresh target trained on rollouts for held-out prompts;
- `records`: the metrics rows of every policy step and their files;
- `grpo`: glue to TRL's GRPOConfig and GRPOTrainer;
- `trainer`: `dpg(config, out)`, per arm: set up, train, finish; then `report`.
"""
