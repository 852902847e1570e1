"""Training, evaluation and run management (the ``ermoe`` command's jobs)."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, load_config
from .init_weights import LoadReport, init_from_checkpoint, load_matching, read_weights
from .lock import RunLockedError
from .run import Run
from .trainer import NonFiniteLossError, create_task, evaluate, load_run, report, task_setup, train

__all__ = ["CheckpointError", "ConfigError", "NonFiniteLossError", "Run", "RunLockedError", "TrainConfig", "create_task",
           "evaluate", "load_checkpoint", "load_config", "load_run", "report", "save_checkpoint", "task_setup", "train",
           "LoadReport", "init_from_checkpoint", "load_matching", "read_weights"]
