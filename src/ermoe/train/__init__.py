"""Training, evaluation and run management (the ``ermoe`` command's jobs)."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, load_config
from .lock import RunLockedError
from .run import Run
from .trainer import NonFiniteLossError, evaluate, load_run, report, train

__all__ = ["CheckpointError", "ConfigError", "NonFiniteLossError", "Run", "RunLockedError", "TrainConfig", "evaluate",
           "load_checkpoint", "load_config", "load_run", "report", "save_checkpoint", "train"]
