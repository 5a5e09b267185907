"""Model-free references on ``forwardinf trace``'s candidate sets (issue 23): string match (the candidate
holds the query's subject and answer), BM25 and random, per seed, on exactly the queries and candidates a
``trace`` run with the same options draws. No model is trained: seconds per seed.

    python benchmarks/trace_lexical.py --seeds 0 1 2 7 --queries 200 --tune-queries 20 --candidates 20 --out runs/lexical.json
"""
import argparse
import json

import numpy as np

from forwardinf.experiments.trace import load_facts, make_splits, run_bm25
from forwardinf.experiments.tracing import random_scores, reciprocal_ranks, string_match_scores


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 7])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--tune-queries", type=int, default=20)
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--n-cities", type=int, default=300)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    out = {}
    for seed in a.seeds:
        args = argparse.Namespace(dataset="geo", data_root=None, n_cities=a.n_cities, seed=seed, queries=a.queries,
                                  tune_queries=a.tune_queries, candidates=a.candidates)
        facts, _ = load_facts(args)
        _, (_, eval_q, _, eval_c, _, eval_r) = make_splits(facts, args)
        para = {p["paraphrase_of"]: p for p in reversed(facts.paraphrases)}  # the first paraphrase, as trace uses
        rng = np.random.default_rng(seed)
        row = {}
        for variant, qs in (("original", eval_q), ("paraphrased", [para[q["uuid"]] for q in eval_q])):
            sm = [string_match_scores(facts.abstracts, q, c) for q, c in zip(qs, eval_c)]
            n_hits = [float(s.sum()) for s in sm]
            # Ties broken at random, in expectation (200 draws), beside the project's policy (ties against the method).
            tie_random = np.mean([reciprocal_ranks([s + 0.5 * random_scores(len(s), rng) / len(s) for s in sm],
                                                   eval_r).mean() for _ in range(200)])
            row[variant] = {"string-match": float(reciprocal_ranks(sm, eval_r).mean()),
                            "string-match-random-ties": float(tie_random),
                            "bm25": float(reciprocal_ranks(run_bm25(facts, qs, eval_c).scores, eval_r).mean()),
                            "random": float(reciprocal_ranks([random_scores(len(c), rng) for c in eval_c], eval_r).mean())}
            row["string_matches_per_query"] = float(np.mean(n_hits))
        row["proponents_per_query"] = float(np.mean([len(r) for r in eval_r]))
        distractors = [(s.sum().item() - len(r)) / (len(c) - len(r)) for s, r, c in zip(sm, eval_r, eval_c)]
        row["distractors_matching"] = float(np.mean(distractors))
        out[seed] = row
        print(seed, json.dumps(row))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
