"""forwardinf: training-data attribution with Forward-INF and the classic estimators it is measured against."""
from forwardinf._version import __version__
from forwardinf.baselines.hydra import HyDRA, TrajectoryRecorder
from forwardinf.baselines.influence_function import InfluenceFunction
from forwardinf.baselines.representer import RepresenterPoint
from forwardinf.baselines.retraining import Downsampling, LeaveGroupOut, LeaveOneOut, TestToTrain
from forwardinf.baselines.shapley import KNNShapley, LastLayerTrainer, TMCShapley
from forwardinf.baselines.tracin import TracIn
from forwardinf.estimators.base import Estimator, NotFittedError, TopK
from forwardinf.estimators.forward_inf import PRESETS, ForwardINF
from forwardinf.estimators.tail import ReducedPrecisionTask, TailForwardINF
from forwardinf.tasks import ClassificationTask, Task
from forwardinf.tasks.diffusion import DiffusionTask
from forwardinf.tasks.language_model import LanguageModelTask

__all__ = [
    "ClassificationTask", "DiffusionTask", "Downsampling", "Estimator", "ForwardINF", "HyDRA", "InfluenceFunction",
    "KNNShapley", "LanguageModelTask", "LastLayerTrainer", "LeaveGroupOut", "LeaveOneOut", "NotFittedError", "PRESETS",
    "ReducedPrecisionTask", "RepresenterPoint", "TMCShapley", "TailForwardINF", "Task", "TestToTrain", "TopK", "TracIn", "TrajectoryRecorder",
    "__version__",
]
