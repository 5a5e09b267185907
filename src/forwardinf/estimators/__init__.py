"""Estimators: the contract (base), Forward-INF, its tail and shift-invariant forms."""
