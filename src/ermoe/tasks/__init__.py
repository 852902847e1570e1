"""Applications as plug-ins of the one training loop: a :class:`Task` owns the data and its batches, the loss, the
evaluation metrics and the report. Image classification, brain-age regression and image-text retrieval are
registered here."""

from .base import Batch, Objective, Task, TaskSetup, build_task, list_tasks, register_task, task_class
from .brain_age import BrainAge
from .classification import ImageClassification
from .retrieval import Retrieval

__all__ = ["Batch", "BrainAge", "ImageClassification", "Objective", "Retrieval", "Task", "TaskSetup", "build_task",
           "list_tasks", "register_task", "task_class"]
