"""Old home of the method table, kept so that ``forwardinf.baselines.registry`` imports still work:
everything lives in :mod:`forwardinf.baselines.methods`."""
from forwardinf.baselines.methods import (EXACT_ALL, FORWARD_INF, LARGE_MODEL, METHODS, PEER_METHODS,  # noqa: F401
                                          REFERENCE_METHODS, TABLE, Method, Variant, forward_inf_names,
                                          make_estimator, requirements)
