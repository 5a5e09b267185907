"""BM25 (Okapi) lexical retrieval, and retrieve-then-rerank.

``score(q, d) = Σ_{t in q} idf(t) · tf(t, d)(k1 + 1) / (tf(t, d) + k1 (1 - b + b |d| / avgdl))`` with
``idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5))`` (always positive). Documents and queries are
lists of tokens (:func:`tokenize`: lower-cased words).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import torch
from torch import Tensor

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25:
    """Okapi BM25 over a fixed corpus. ``fit(docs)`` indexes; ``scores(query) -> [N]``."""

    def __init__(self, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1 = k1
        self.b = b

    def fit(self, docs: Sequence[Sequence[str]]) -> "BM25":
        if not docs:
            raise ValueError("BM25: empty corpus")
        self.tf_ = [Counter(d) for d in docs]
        self.len_ = torch.tensor([len(d) for d in docs], dtype=torch.float64)
        df = Counter(t for c in self.tf_ for t in c)
        n = len(docs)
        self.idf_ = {t: math.log(1.0 + (n - m + 0.5) / (m + 0.5)) for t, m in df.items()}
        return self

    def scores(self, query: Sequence[str], indices: Sequence[int] | None = None) -> Tensor:
        """``[N]`` (or ``[len(indices)]``) float64 scores of the documents for ``query``."""
        idx = range(len(self.tf_)) if indices is None else indices
        avg = float(self.len_.mean())
        out = torch.zeros(len(idx), dtype=torch.float64)
        for j, i in enumerate(idx):
            tf, norm = self.tf_[i], self.k1 * (1 - self.b + self.b * float(self.len_[i]) / avg)
            out[j] = sum(self.idf_[t] * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in query if t in tf)
        return out


def rerank(first: Tensor, second: Tensor, top: Tensor, weight: float) -> Tensor:
    """Scores ``[N]`` of retrieve-then-rerank: the ``top [k]`` positions of ``first`` rank above all
    others, ordered among themselves by ``z(first) + weight · z(second)`` (z-scores within the
    top-k; ``second [k]`` holds the reranker's scores of ``top``); the rest keep ``first``'s order."""
    def z(x: Tensor) -> Tensor:
        x = x.double()
        return (x - x.mean()) / x.std().clamp_min(1e-12) if len(x) > 1 else x * 0
    out = first.double().clone()
    low = out.min() - out.max()  # below every shortlisted score
    rest = torch.ones(len(out), dtype=torch.bool)
    rest[top] = False
    out[rest] += low - 1.0
    combined = z(first[top]) + weight * z(second)
    out[top] = combined - combined.min() + first.max().double() + 1.0
    return out
