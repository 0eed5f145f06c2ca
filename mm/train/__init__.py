"""Staged training with DeepSpeed: a stage = trainable globs + data + loss; one loop for every stage."""
from mm.train.config import (
    LoRAConfig,
    StageConfig,
    TrainConfig,
    TrainableGroup,
    TrainerConfig,
    validate,
)

__all__ = ["TrainConfig", "StageConfig", "TrainerConfig", "TrainableGroup", "LoRAConfig", "validate",
           "train"]


def train(config, batches=None, progress=True):
    from mm.train.loop import train as _train

    return _train(config, batches, progress)
