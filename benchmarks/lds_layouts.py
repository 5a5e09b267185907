"""``split="auto"`` on layouts we did not build: every tail split of a CNN against retraining.

    python benchmarks/lds_layouts.py --run runs/lds-fm-flat -- --dataset fashion-mnist --n-train 1000 \
        --model flatcnn --subsets 64 --n-queries 100

Reuses the ground truth of a ``forwardinf lds`` run (``--run``, made with the lds options after
``--``; ``--score-only`` caches the scores under ``RUN/layouts.pt`` while that run still retrains) and scores the counterfactual preset with ``TailForwardINF`` at every split of the
attributed FlatCNN (top-level ``conv1, conv2, fc1, fc2``) and, with the very same weights, of the
library's SmallCNN (``features`` / ``classifier`` groups): the two are one function in two
layouts, so one ground truth serves both. Each row: LDS (held-out and all subsets, bootstrap over
queries), the split ``"auto"`` chose, CPU seconds (one thread, fit + scores), and the paired
difference to ``auto``. Writes benchmarks/results/<--name>.md and .json.

Several seeds: ``--seeds 0 1 --run 'runs/fm2k-s{seed}'`` (one lds run per seed, made with the lds
options plus ``--seed S``) gives a table per seed and the paired differences pooled over the
seeds' queries.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import forwardinf as fi
from forwardinf import metrics as M
from forwardinf.experiments import lds
from forwardinf.experiments.report import markdown_table
from forwardinf.cli import build_parser
from forwardinf.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"
SMALLCNN_NAMES = {"conv1": "features.0", "conv2": "features.3", "fc1": "classifier.0", "fc2": "classifier.2"}


def as_smallcnn(flat: torch.nn.Module, input_shape, n_classes: int, width: int) -> torch.nn.Module:
    """The library's SmallCNN holding ``flat``'s weights (its layers under SmallCNN's names)."""
    net = build_model("cnn", input_shape, n_classes, width=width)
    state = {f"{SMALLCNN_NAMES[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in flat.state_dict().items()}
    net.load_state_dict(state)
    return net.eval()


def scores_of(model, split: str | None, train, queries) -> tuple[torch.Tensor, float, str]:
    cfg = fi.ForwardINFConfig.preset("counterfactual")
    torch.set_num_threads(1)
    t = time.process_time()
    if split is None:
        est = fi.ForwardINF(model, config=cfg).fit(train)
        chosen = "(whole network)"
    else:
        est = fi.TailForwardINF(model, split=split, config=cfg).fit(train)
        chosen = est.split_name_
    s = est.influence(queries)
    return s, time.process_time() - t, chosen


def seed_rows(run: Path, options: list[str], score_only: bool, whole: bool) -> dict | None:
    """Score every split on one ``forwardinf lds`` run folder (cached in ``RUN/layouts.pt``), then its LDS.

    Returns ``None`` with ``score_only``, else ``{"rows", "per_query", "largs", "problem", "fit", "same"}``;
    ``per_query[key]`` is ``(held-out [Q], all [Q])`` LDS of the margin.
    """
    largs = lds.apply_defaults(build_parser().parse_args(["lds", *options, "--out", str(run)]))
    problem = lds.load_problem(largs)
    prepared = problem.prepared
    flat = prepared.model.eval()
    shape, classes = tuple(prepared.split.input_shape), prepared.split.n_classes
    cnn = as_smallcnn(flat, shape, classes, prepared.config.get("width", 32))
    with torch.no_grad():
        same = torch.equal(cnn(problem.queries[0]), flat(problem.queries[0]))
    train = prepared.split.train()
    cache = run / "layouts.pt"  # scores first, the ground truth after: scoring can run beside lds
    scored = torch.load(cache, weights_only=True) if cache.is_file() else {}
    plan = layout_plan(flat, cnn, whole)
    for layout, model, split in plan:
        key = f"{layout}/{split or 'whole'}"
        if key not in scored:
            scored[key] = scores_of(model, split, train, problem.queries)
            torch.save(scored, cache)
    if score_only:
        return None
    masks, outputs = lds.ground_truth(largs, problem, False)
    targets, fit = lds.signed_targets(outputs), lds.n_fit(largs.subsets, largs.holdout)
    rows, per_query = [], {}
    for layout, model, split in plan:
        key = f"{layout}/{split or 'whole'}"
        s, cpu, chosen = scored[key]
        m, pq = lds.evaluate(s, masks, targets, fit, largs.bootstrap, largs.seed)
        per_query[key] = pq["lds_margin_heldout"], pq["lds_margin"]
        rows.append({"layout": layout, "split": split or "whole", "chosen": chosen, "cpu_seconds": cpu, **m})
        print(f"seed {largs.seed}", key, chosen, f"{m['lds_margin_heldout']:+.3f} {m['lds_margin']:+.3f} {cpu:.1f} s",
              flush=True)
    return {"rows": rows, "per_query": per_query, "largs": largs, "problem": problem, "fit": fit, "same": same}


def layout_plan(flat: torch.nn.Module, cnn: torch.nn.Module, whole: bool) -> list[tuple]:
    """``(layout, model, split)`` rows. fc1 is what auto picks on FlatCNN (its row is auto's);
    SmallCNN is the same function, so its other splits are FlatCNN's rows under other names: only
    its auto row is scored."""
    plan = [("FlatCNN", flat, s) for s in ("auto", "conv2", "fc2")] + [("SmallCNN", cnn, "auto")]
    return plan + ([("FlatCNN", flat, None)] if whole else [])


def paired(auto: list[np.ndarray], mine: list[np.ndarray]) -> str:
    """Mean of ``auto - mine`` over the queries of every seed, with its 95% bootstrap interval."""
    d = np.concatenate([a - b for a, b in zip(auto, mine)])
    lo, hi = M.bootstrap_interval(d, 2000)
    return f"{np.nanmean(d):+.3f} [{lo:+.3f}, {hi:+.3f}]"


def seed_table(res: dict) -> list[list[str]]:
    table = []
    for r in res["rows"]:
        auto, mine = res["per_query"]["FlatCNN/auto"], res["per_query"][f"{r['layout']}/{r['split']}"]
        r["auto_minus_this"] = [paired([auto[j]], [mine[j]]) for j in (0, 1)]
        ci = lambda k: f"{r[k]:+.3f} [{r[k + '_ci'][0]:+.3f}, {r[k + '_ci'][1]:+.3f}]"  # noqa: E731
        table.append([r["layout"], f"`{r['split']}`", f"`{r['chosen']}`", ci("lds_margin_heldout"), ci("lds_margin"),
                      f"{r['cpu_seconds']:.1f}", *r["auto_minus_this"]])
    return table


def pooled_table(per_seed: list[dict]) -> list[list[str]]:
    """``auto - split`` over every seed's queries together (each query paired within its seed)."""
    table = []
    for r in per_seed[0]["rows"]:
        key = f"{r['layout']}/{r['split']}"
        cols = [paired([res["per_query"]["FlatCNN/auto"][j] for res in per_seed],
                       [res["per_query"][key][j] for res in per_seed]) for j in (0, 1)]
        means = [np.mean([next(x for x in res["rows"] if x["layout"] == r["layout"] and x["split"] == r["split"])[k]
                          for res in per_seed]) for k in ("lds_margin_heldout", "lds_margin")]
        table.append([r["layout"], f"`{r['split']}`", f"{means[0]:+.3f}", f"{means[1]:+.3f}", *cols])
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="the lds run folder; with --seeds, a pattern holding {seed}")
    p.add_argument("--seeds", type=int, nargs="+", help="one run per seed (adds --seed S to the lds options)")
    p.add_argument("--whole", action="store_true", help="also the whole network (slow on a CNN)")
    p.add_argument("--name", default="lds_layouts")
    p.add_argument("--score-only", action="store_true", help="cache the scores (RUN/layouts.pt), no ground truth")
    args, rest = p.parse_known_args()
    options = [a for a in rest if a != "--"]
    runs = ([(Path(args.run.format(seed=s)), [*options, "--seed", str(s)]) for s in args.seeds] if args.seeds
            else [(Path(args.run), options)])
    per_seed = [seed_rows(run, opts, args.score_only, args.whole) for run, opts in runs]
    if args.score_only:
        return
    head = ["layout", "split", "module chosen", "LDS margin, held-out", "LDS margin, all", "CPU s",
            "auto - this, held-out", "auto - this, all"]
    first = per_seed[0]
    c, largs = first["problem"].prepared.config, first["largs"]
    sections = []
    for res in per_seed:
        sections += ([f"### seed {res['largs'].seed} (test accuracy {res['problem'].prepared.accuracy:.3f}; "
                      f"outputs of the two layouts identical: {res['same']})", ""] if len(per_seed) > 1 else [])
        sections += [markdown_table(head, seed_table(res)), ""]
    if len(per_seed) > 1:
        sections += ["### Pooled over the seeds", "",
                     "Mean LDS over the seeds; `auto - this`: paired per query within its seed, bootstrap over "
                     "all the seeds' queries together.", "",
                     markdown_table(["layout", "split", "mean LDS, held-out", "mean LDS, all", "auto - this, held-out",
                                     "auto - this, all"], pooled_table(per_seed)), ""]
    seeds = ", ".join(str(r["largs"].seed) for r in per_seed)
    text = "\n".join([
        "# `split=\"auto\"` on layouts we did not build (counterfactual preset, tail only)", "",
        f"{c['dataset']}, {c['n_train']:,} training points, FlatCNN (top-level conv1, conv2, fc1, fc2; width "
        f"{c.get('width', 32)}, test accuracy {first['problem'].prepared.accuracy:.3f}"
        f"{' on the first seed' if len(per_seed) > 1 else ''}); the same weights in the library's SmallCNN "
        f"layout (outputs identical: {all(r['same'] for r in per_seed)}). Seed(s) {seeds}. Ground truth: "
        f"{largs.subsets} subsets x {largs.seeds_per_subset} run(s), {len(first['problem'].query_index)} held-out "
        f"queries; held-out = the last {largs.subsets - first['fit']} subsets. "
        "LDS of the margin, [95% bootstrap over queries]; `auto - this`: the paired difference. CPU s: fit + "
        "scores, one thread, in one process (the machine was shared: compare the columns, not other files).", "",
        *sections,
        "Command:", "", "```", "python " + " ".join(sys.argv), "```", ""])
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text)
    dump = {"config": c, "rows": first["rows"]} if len(per_seed) == 1 else {
        "config": c, "seeds": {str(r["largs"].seed): r["rows"] for r in per_seed}}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(dump, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
