"""Applications as plug-ins of the one training loop: a :class:`Task` owns the data and its batches, the loss, the
evaluation metrics and the report. Image classification and brain-age regression are registered here; image-text
retrieval registers the same way."""

from .base import Batch, Task, create_task, list_tasks, register_task, task_class
from .brain_age import BrainAge
from .classification import ImageClassification

__all__ = ["Batch", "BrainAge", "ImageClassification", "Task", "create_task", "list_tasks", "register_task", "task_class"]
