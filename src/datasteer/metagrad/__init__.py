"""Exact metagradients through fine-tuning: per-example data attribution, verified in float64.

    from datasteer.metagrad import TrainingConfig, metagradients, train
    result = metagradients(model, examples, metric, config, weights=None)
    result.value, result.scores        # metric after training; d value / d weights_i
    params = train(model, examples, config, weights=None)
"""

from datasteer.metagrad.config import TrainingConfig
from datasteer.metagrad.engine import MetagradResult, check_model, metagradients, train
from datasteer.metagrad.metrics import Target, TextLoss, text_loss

__all__ = ["MetagradResult", "Target", "TextLoss", "TrainingConfig", "check_model", "metagradients", "text_loss",
           "train"]
