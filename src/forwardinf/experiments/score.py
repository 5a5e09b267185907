"""Moved to :mod:`forwardinf.scoring` (``forwardinf score`` is the user's command, not an experiment);
this name stays so that older imports (``from forwardinf.experiments.score import load_object``) work."""
from forwardinf.scoring.command import add_arguments, build_estimator, check_arguments, run
from forwardinf.scoring.loaders import (IMAGE_EXTENSIONS, ImageFolder, ScriptedModule, check_runs, integer_labels,
                                        load_data, load_exported, load_model, load_object)

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "ScriptedModule", "add_arguments", "build_estimator", "check_arguments",
           "check_runs", "integer_labels", "load_data", "load_exported", "load_model", "load_object", "run"]
