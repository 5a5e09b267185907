"""``forwardinf score``: Forward-INF on the user's own model and data, written to a score store.

- :mod:`forwardinf.scoring.loaders`: the user's model (module:callable, torch.export, TorchScript,
  state-dict checkpoint) and data (image folder, .npz, built-in dataset, module:callable);
- :mod:`forwardinf.scoring.command`: the command (arguments, estimator, store, top-k table, report);
- :mod:`forwardinf.scoring.shortlist`: its ``--shortlist K`` mode (a retrieval index, no store).
"""
from forwardinf.scoring.loaders import ImageFolder, ScriptedModule, load_data, load_model, load_object

__all__ = ["ImageFolder", "ScriptedModule", "load_data", "load_model", "load_object"]
