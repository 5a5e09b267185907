"""The classic estimators Forward-INF is measured against, under the same contract."""
from forwardinf.baselines.influence_function import InfluenceFunction
from forwardinf.baselines.methods import METHODS, TABLE, make_estimator
from forwardinf.baselines.representer import RepresenterPoint
from forwardinf.baselines.run import TrainingRun
from forwardinf.baselines.tracin import TracIn

__all__ = ["InfluenceFunction", "TracIn", "RepresenterPoint", "TrainingRun", "make_estimator", "METHODS", "TABLE"]
