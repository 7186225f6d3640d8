"""Dataset Policy Gradient: targets (differentiable metrics Phi of a trained target model) and, next, rewards
and the trainer."""
