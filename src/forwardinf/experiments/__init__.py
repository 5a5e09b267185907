"""One module per paper experiment. Each exposes ``add_arguments(parser)`` and ``run(args) -> dict``.

``run`` returns the ``results.json`` object and writes its outputs with
:func:`forwardinf.experiments.report.write_outputs`.
"""

EXPERIMENTS = ("leakage", "mislabel", "memorization", "hypothesis", "diffusion", "trace", "lds")
