"""``split="auto"`` on layouts we did not build: every tail split of a CNN against retraining.

    python benchmarks/lds_layouts.py --run runs/lds-fm-flat -- --dataset fashion-mnist --n-train 1000 \
        --model flatcnn --subsets 64 --n-queries 100

Reuses the ground truth of a ``forwardinf lds`` run (``--run``, made with the lds options after
``--``; ``--score-only`` caches the scores under ``RUN/layouts.pt`` while that run still retrains) and scores the counterfactual preset with ``TailForwardINF`` at every split of the
attributed FlatCNN (top-level ``conv1, conv2, fc1, fc2``) and, with the very same weights, of the
library's SmallCNN (``features`` / ``classifier`` groups): the two are one function in two
layouts, so one ground truth serves both. Each row: LDS (held-out and all subsets, bootstrap over
queries), the split ``"auto"`` chose, CPU seconds (one thread, fit + scores), and the paired
difference to ``auto``. Writes benchmarks/results/lds_layouts.md and .json.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--whole", action="store_true", help="also the whole network (slow on a CNN)")
    p.add_argument("--name", default="lds_layouts")
    p.add_argument("--score-only", action="store_true", help="cache the scores (RUN/layouts.pt), no ground truth")
    args, rest = p.parse_known_args()
    largs = lds.apply_defaults(build_parser().parse_args(["lds", *[a for a in rest if a != "--"], "--out", str(args.run)]))
    problem = lds.load_problem(largs)
    prepared = problem.prepared
    flat = prepared.model.eval()
    shape, classes = tuple(prepared.split.input_shape), prepared.split.n_classes
    cnn = as_smallcnn(flat, shape, classes, prepared.config.get("width", 32))
    with torch.no_grad():
        same = torch.equal(cnn(problem.queries[0]), flat(problem.queries[0]))
    train = prepared.split.train()
    cache = args.run / "layouts.pt"  # scores first, the ground truth after: scoring can run beside lds
    scored = torch.load(cache, weights_only=True) if cache.is_file() else {}
    # fc1 is what auto picks on FlatCNN (its row is auto's); SmallCNN is the same function, so its
    # other splits are FlatCNN's rows under other names: only its auto row is scored
    plan = [("FlatCNN", flat, s) for s in ("auto", "conv2", "fc2")] + [("SmallCNN", cnn, "auto")]
    if args.whole:
        plan += [("FlatCNN", flat, None)]
    for layout, model, split in plan:
        key = f"{layout}/{split or 'whole'}"
        if key not in scored:
            scored[key] = scores_of(model, split, train, problem.queries)
            torch.save(scored, cache)
    if args.score_only:
        return
    masks, outputs = lds.ground_truth(largs, problem, False)
    targets, fit = lds.signed_targets(outputs), lds.n_fit(largs.subsets, largs.holdout)
    rows, per_query = [], {}
    for layout, model, split in plan:
        key = f"{layout}/{split or 'whole'}"
        s, cpu, chosen = scored[key]
        m, pq = lds.evaluate(s, masks, targets, fit, largs.bootstrap, largs.seed)
        per_query[key] = pq["lds_margin_heldout"], pq["lds_margin"]
        rows.append({"layout": layout, "split": split or "whole", "chosen": chosen, "cpu_seconds": cpu, **m})
        print(key, chosen, f"{m['lds_margin_heldout']:+.3f} {m['lds_margin']:+.3f} {cpu:.1f} s", flush=True)
    table = []
    for r in rows:
        auto = per_query["FlatCNN/auto"]
        mine = per_query[f"{r['layout']}/{r['split']}"]
        diffs = []
        for j in (0, 1):
            d = auto[j] - mine[j]
            lo, hi = M.bootstrap_interval(d, 2000)
            diffs.append(f"{np.nanmean(d):+.3f} [{lo:+.3f}, {hi:+.3f}]")
        r["auto_minus_this"] = diffs
        ci = lambda k: f"{r[k]:+.3f} [{r[k + '_ci'][0]:+.3f}, {r[k + '_ci'][1]:+.3f}]"  # noqa: E731
        table.append([r["layout"], f"`{r['split']}`", f"`{r['chosen']}`", ci("lds_margin_heldout"), ci("lds_margin"),
                      f"{r['cpu_seconds']:.1f}", diffs[0], diffs[1]])
    c = prepared.config
    text = "\n".join([
        "# `split=\"auto\"` on layouts we did not build (counterfactual preset, tail only)", "",
        f"{c['dataset']}, {c['n_train']:,} training points, FlatCNN (top-level conv1, conv2, fc1, fc2; width "
        f"{c.get('width', 32)}, test accuracy {prepared.accuracy:.3f}); the same weights in the library's SmallCNN "
        f"layout (outputs identical: {same}). Ground truth: {largs.subsets} subsets x {largs.seeds_per_subset} "
        f"run(s), {len(problem.query_index)} held-out queries; held-out = the last {largs.subsets - fit} subsets. "
        "LDS of the margin, [95% bootstrap over queries]; `auto - this`: the paired difference. CPU s: fit + "
        "scores, one thread, in one process (the machine was shared: compare the columns, not other files).", "",
        markdown_table(["layout", "split", "module chosen", "LDS margin, held-out", "LDS margin, all", "CPU s",
                        "auto - this, held-out", "auto - this, all"], table), "",
        "Command:", "", "```", "python " + " ".join(sys.argv), "```", ""])
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(text)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"config": c, "rows": rows}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
