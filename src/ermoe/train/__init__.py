"""Training, evaluation and run management (the ``ermoe`` command's jobs)."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, load_config
from .trainer import NonFiniteLossError, evaluate, report, train

__all__ = ["CheckpointError", "ConfigError", "NonFiniteLossError", "TrainConfig", "evaluate", "load_checkpoint",
           "load_config", "report", "save_checkpoint", "train"]
