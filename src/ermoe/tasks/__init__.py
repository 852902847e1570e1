"""Applications as plug-ins of the one training loop: a :class:`Task` owns the data and its batches, the loss, the
evaluation metrics and the report. Image classification is registered here; brain-age regression and image-text
retrieval register the same way."""

from .base import Batch, Task, create_task, list_tasks, register_task, task_class
from .classification import ImageClassification

__all__ = ["Batch", "ImageClassification", "Task", "create_task", "list_tasks", "register_task", "task_class"]
