"""forwardinf: training-data attribution with Forward-INF and the classic estimators it is measured against."""
from forwardinf._version import __version__
from forwardinf.baselines.hydra import HyDRA, HyDRAConfig, TrajectoryRecorder
from forwardinf.baselines.influence_function import InfluenceFunction, InfluenceFunctionConfig
from forwardinf.baselines.methods import make_estimator
from forwardinf.baselines.representer import RepresenterPoint, RepresenterPointConfig
from forwardinf.baselines.retraining import (Downsampling, DownsamplingConfig, LeaveGroupOut, LeaveOneOut,
                                             LeaveOneOutConfig, TestToTrain, TestToTrainConfig)
from forwardinf.baselines.run import TrainingRun
from forwardinf.baselines.shapley import KNNShapley, KNNShapleyConfig, LastLayerTrainer, TMCShapley, TMCShapleyConfig
from forwardinf.baselines.tracin import TracIn, TracInConfig
from forwardinf.estimators.base import Capabilities, Estimator, EstimatorConfig, NotFittedError, StaleFitError, TopK
from forwardinf.estimators.forward_inf import PRESETS, ForwardINF, ForwardINFConfig
from forwardinf.estimators.validation import DivergedError
from forwardinf.estimators.tail import ReducedPrecisionTask, TailForwardINF, TailForwardINFConfig
from forwardinf.tasks import ClassificationTask, Task
from forwardinf.tasks.diffusion import DiffusionTask
from forwardinf.tasks.language_model import LanguageModelTask

__all__ = [
    "ClassificationTask", "DiffusionTask", "DivergedError", "Downsampling", "Estimator", "ForwardINF", "HyDRA", "InfluenceFunction",
    "KNNShapley", "LanguageModelTask", "LastLayerTrainer", "LeaveGroupOut", "LeaveOneOut", "NotFittedError", "PRESETS",
    "ReducedPrecisionTask", "RepresenterPoint", "StaleFitError", "TMCShapley", "TailForwardINF", "Task", "TestToTrain", "TopK", "TracIn", "TrajectoryRecorder",
    "TrainingRun", "make_estimator", "__version__",
    # configurations and capabilities
    "Capabilities", "EstimatorConfig", "ForwardINFConfig", "HyDRAConfig", "InfluenceFunctionConfig", "KNNShapleyConfig",
    "RepresenterPointConfig", "TailForwardINFConfig", "TracInConfig", "DownsamplingConfig", "LeaveOneOutConfig",
    "TestToTrainConfig", "TMCShapleyConfig",
]
