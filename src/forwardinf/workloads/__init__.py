"""Experiment material: what the paper's experiments run on, usable on its own.

- :mod:`forwardinf.workloads.classifier`: per-dataset classifier recipes; a classifier trained (or
  loaded from a cache or a user's checkpoint) with the checkpoints and trajectory the baselines need.
- :mod:`forwardinf.workloads.diffusion`: a dataset's images at 16x16, and a small DDPM pre-trained on
  them (cached).
- :mod:`forwardinf.workloads.convex`: L2-regularised multinomial logistic regression solved exactly,
  and its exact influence (the hypothesis experiment's near-noiseless setting).
- :mod:`forwardinf.workloads.trainers`: the retraining experiments' training functions
  ``(data, seed) -> model`` (lds and memorization's subset recipe, the hypothesis study's CNN).
"""
