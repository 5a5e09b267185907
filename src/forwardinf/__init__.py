"""forwardinf: training-data attribution with Forward-INF and the classic estimators."""
from forwardinf.estimators.base import Estimator, NotFittedError, TopK
from forwardinf.estimators.forward_inf import PRESETS, ForwardINF
from forwardinf.tasks import ClassificationTask, Task

__version__ = "0.1.0"

__all__ = ["ClassificationTask", "Estimator", "ForwardINF", "NotFittedError", "PRESETS", "Task", "TopK", "__version__"]
