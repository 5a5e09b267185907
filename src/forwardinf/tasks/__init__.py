from forwardinf.tasks.base import Task
from forwardinf.tasks.classification import ClassificationTask

__all__ = ["Task", "ClassificationTask"]
