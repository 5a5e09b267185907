"""Diffusion attribution benchmark: ``forwardinf diffusion`` runs -> ``benchmarks/results/diffusion.md``.

    python benchmarks/diffusion_bench.py                    # every run below, one after another
    python benchmarks/diffusion_bench.py --runs main-1      # just one (the recorded shards ran side by side,
                                                            # one process each, after the UNet was cached)
    python benchmarks/diffusion_bench.py --collect          # only rebuild the markdown from finished runs

Each run is the CLI command shown in the markdown, with its output folder under ``--out``; a run
whose ``results.json`` exists is not repeated. The pre-trained UNet is cached in the run folders
and copied from one run folder into the next (same recipe and data -> same file name).
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEO = ["--score-average", "geometric"]  # the geometric mean over timesteps (Fashion diagnostic; not the default)
FI = "forward-inf-diffusion"  # the experiment's Forward-INF (registry name); its variants are FI-<x>
PLAIN = f"{FI},pixel-l2"
CONTRAST = f"{FI},{FI}-contrast,pixel-l2"
RUNS = {
    # Pre-training from scratch into an empty folder (the runs after it reuse its UNet): its seconds.
    "pretrain": ["--sets", "2", "--sizes", "100", "--methods", PLAIN],
    # The recorded benchmark: 20 exemplar sets, candidate sets of 100 and 1K, in three shards run
    # side by side (the same sets as one run of --sets 20; merged into "main" in the markdown).
    "main-1": ["--first-set", "0", "--sets", "7", "--methods", PLAIN],
    "main-2": ["--first-set", "7", "--sets", "7", "--methods", PLAIN],
    "main-3": ["--first-set", "14", "--sets", "6", "--methods", PLAIN],
    # The other variants on 6 sets of the small candidate sets (the paper's recipe among them).
    "variants": ["--sets", "6", "--sizes", "100", "--methods",
                 f"{FI},{FI}-paper,{FI}-loss,{FI}-abs,{FI}-nsgd,pixel-l2"],
    # The old default loss (low timesteps only), for the "why the timesteps changed" note.
    "low-timesteps": ["--sets", "6", "--timesteps", "2,5,10,20,35,50", "--methods", PLAIN],
    # Fashion-MNIST (apt-get install -y dataset-fashion-mnist), held out: Trouser, Bag. Its 56K
    # pre-training images leave room for 10K candidates (add 10000 to --sizes: ~140 s CPU per set).
    "fashion": ["--dataset", "fashion-mnist", "--sets", "4", "--sizes", "100,1000", "--methods", PLAIN],
    # The scores that normalise by each candidate's own sensitivity (cosine) on the same Fashion sets.
    "fashion-variants": ["--dataset", "fashion-mnist", "--sets", "4", "--sizes", "100", "--methods",
                         f"{FI},{FI}-cosine,{FI}-loss,pixel-l2"],
    # The Fashion diagnostic (see the notes): the geometric mean over timesteps (plain and with the
    # contrast variant) beside the default on sets that played no part in finding them: Trouser/Bag
    # sets 4-11, a second pre-trained UNet with Dress and Sandal held out; then digits sets 0-5 and
    # the 4 Fashion sets the two were found on.
    "fashion-heldout": ["--dataset", "fashion-mnist", "--first-set", "4", "--sets", "8", "--sizes", "100,1000",
                        "--methods", PLAIN],
    "fashion-heldout-geometric": ["--dataset", "fashion-mnist", "--first-set", "4", "--sets", "8", "--sizes",
                                  "100,1000", "--methods", CONTRAST, *GEO],
    "fashion-dress-sandal": ["--dataset", "fashion-mnist", "--concepts", "3,5", "--sets", "6", "--sizes", "100,1000",
                             "--methods", PLAIN],
    "fashion-dress-sandal-geometric": ["--dataset", "fashion-mnist", "--concepts", "3,5", "--sets", "6", "--sizes",
                                       "100,1000", "--methods", CONTRAST, *GEO],
    "digits-geometric": ["--sets", "6", "--sizes", "100,1000", "--methods", CONTRAST, *GEO],
    "fashion-geometric": ["--dataset", "fashion-mnist", "--sets", "4", "--sizes", "100,1000", "--methods",
                          CONTRAST, *GEO],
}


def command(name: str, out: Path) -> list[str]:
    return ["forwardinf", "diffusion", "--out", str(out / name), "--quiet", *RUNS[name]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "diffusion-bench"), help="folder for the runs")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {list(RUNS)}")
    p.add_argument("--collect", action="store_true", help="do not run anything; rebuild the markdown")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "diffusion.md"))
    args = p.parse_args()
    out = Path(args.out)
    names = [n for n in args.runs.split(",") if n]
    for name in names:
        if name not in RUNS:
            p.error(f"unknown run {name!r}; choose from {list(RUNS)}")
        if args.collect or (out / name / "results.json").is_file():
            continue
        if name != "pretrain":  # that one times the pre-training itself
            _share_pretrained(out, name)
        cmd = command(name, out)
        print("$", shlex.join(cmd), flush=True)
        exe = Path(sys.executable).with_name("forwardinf")
        subprocess.run([str(exe), *cmd[1:]], check=True)
    write_markdown(out, names, Path(args.results))
    return 0


PAPER_TABLE8 = {100: 1.0, 1000: 1.0, 10000: 1.0, 20000: 1.0}  # Stable Diffusion, top-1, 20 objects
TUNED_SETS = 4  # exemplar sets 0..3 were used to choose the loss timesteps (see the notes)


def write_markdown(out: Path, names: list[str], path: Path) -> None:
    """``path`` (markdown) and ``path.json`` from the finished runs; text after ``<!-- notes -->`` is kept."""
    parts = ["# Diffusion attribution (`forwardinf diffusion`)", "",
             "Paper (section 4.1, Table 8): Stable Diffusion fine-tuned on a few exemplars of a new concept; "
             "top-1 = 1.0 for candidate sets of 100, 1K, 10K and 20K. Here: a 263K-parameter DDPM "
             "(`UNet2DModel` + `DDPMScheduler`, built from a config) pre-trained on real images with two classes "
             "held out, fine-tuned per exemplar set on 4 exemplars of a held-out class, 4 generated images as the "
             "query set (joint ascent), candidates = the 4 exemplars + the pre-training images nearest to them in "
             "pixel space (half) + random pre-training images (half). Top-1: an exemplar ranks first. "
             "`seconds per set`: the method alone (fit + influence) for one exemplar set, wall clock and CPU time "
             "of the process (`time.process_time`). The machine has 2 cores shared with 10-15 other jobs (load "
             "average 12-14 during these runs; the three `main` shards ran side by side), so wall seconds are "
             "12-15x the CPU seconds; CPU seconds are the fairer measure of cost.", ""]
    collected = {name: json.loads((out / name / "results.json").read_text())
                 for name in names if (out / name / "results.json").is_file()}
    shards = [n for n in names if n.startswith("main-")]
    if shards and all(n in collected for n in shards):
        collected = {"main": merge([collected.pop(n) for n in shards]), **collected}
        names = ["main", *[n for n in names if n not in shards]]
    if "main" in collected:
        m = collected["main"]["methods"]
        sizes = sorted({v["candidates"] for v in m.values()})
        parts += ["## Summary: top-1 over 20 exemplar sets, beside the paper's Table 8", "",
                  "| candidates | paper (Stable Diffusion) | Forward-INF (ours) | Forward-INF, sets "
                  f"{TUNED_SETS}-19 only | pixel-L2 to the generated images | "
                  "Forward-INF seconds per set (wall / CPU) |", "|---|---|---|---|---|---|"]
        for size in sizes:
            f, px = m.get(f"{FI}@{size}"), m.get(f"pixel-l2@{size}")
            fresh = f["ranks"][TUNED_SETS:]
            parts.append(f"| {size} | {PAPER_TABLE8.get(size, float('nan')):.3f} | "
                         f"{f['top1']:.2f} | {sum(r == 1 for r in fresh) / max(1, len(fresh)):.2f} | "
                         f"{px['top1'] if px else float('nan'):.2f} | "
                         f"{f['seconds_per_set']:.1f} / {f.get('cpu_seconds_per_set', float('nan')):.1f} |")
        parts.append("")
    for name in names:
        if name not in collected:
            parts += [f"## {name}", "", "(not run)", ""]
            continue
        res = collected[name]
        cfg = res["config"]
        runs = shards if name == "main" else [name]
        parts += [f"## {name}: {res['dataset']}, {cfg['sets']} exemplar sets", "",
                  "```", *[shlex.join(command(r, Path("runs/diffusion-bench"))) for r in runs], "```", ""]
        parts += ["| method | candidates | top-1 | seconds per set (wall) | CPU seconds per set | "
                  "mean rank of best exemplar | worst rank | settings |", "|---|---|---|---|---|---|---|---|"]
        for key, r in res["methods"].items():
            method = key.split("@")[0]
            settings = ", ".join(f"{k}={v}" for k, v in r.get("settings", {}).items()) or "model-free"
            parts.append(f"| {method} | {r['candidates']} | {r['top1']:.2f} | {r['seconds_per_set']:.2f} | "
                         f"{r.get('cpu_seconds_per_set', float('nan')):.2f} | {r['mean_rank']:.2f} | "
                         f"{r['max_rank']} | {settings} |")
        parts += ["", f"Pre-training: {cfg['pretrain_images']} images, {cfg['pretrain_steps']} steps "
                      f"({_pretrain_note(cfg)}); fine-tuning {cfg['finetune_steps']} steps at lr "
                      f"{cfg['finetune_lr']} + sampling {cfg['sample_steps']} DDIM steps: "
                      f"{cfg['finetune_and_sample_seconds'] / cfg['sets']:.1f} s wall / "
                      f"{cfg.get('finetune_and_sample_cpu_seconds', float('nan')) / cfg['sets']:.1f} s CPU per set; "
                      f"loss timesteps {cfg['timesteps']} x {cfg['noise_draws']} noise draws, "
                      f"{cfg.get('score_average', 'arithmetic')} mean of their log losses; whole loop over the "
                      f"sets {cfg.get('sets_seconds', float('nan')):.0f} s wall / "
                      f"{cfg.get('sets_cpu_seconds', float('nan')):.0f} s CPU.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.is_file() else ""
    notes = existing.split("<!-- notes -->", 1)[1] if "<!-- notes -->" in existing else "\n"
    path.write_text("\n".join(parts).rstrip() + "\n\n<!-- notes -->" + notes)
    path.with_suffix(".json").write_text(json.dumps(collected, indent=2) + "\n")
    print(f"wrote {path}")


def _share_pretrained(out: Path, name: str) -> None:
    """Copy UNets pre-trained by earlier runs into ``out/name`` (the experiment reuses one only when
    its file name, a hash of the recipe and the data, matches; otherwise it pre-trains)."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(out.glob("*/pretrained-*.pt")):
        if not (folder / f.name).exists():
            shutil.copyfile(f, folder / f.name)


def merge(shards: list[dict]) -> dict:
    """One results object from shards that ran consecutive exemplar sets (``--first-set``)."""
    shards = sorted(shards, key=lambda r: r["config"]["first_set"])
    cfg = dict(shards[0]["config"])
    cfg["sets"] = sum(r["config"]["sets"] for r in shards)
    cfg["shards"] = [f"{r['config']['first_set']}..{r['config']['first_set'] + r['config']['sets'] - 1}" for r in shards]
    for key in ("finetune_and_sample_seconds", "finetune_and_sample_cpu_seconds", "sets_seconds", "sets_cpu_seconds"):
        cfg[key] = sum(r["config"][key] for r in shards)
    methods = {}
    for key in shards[0]["methods"]:
        parts = [r["methods"][key] for r in shards]
        ranks = [x for p in parts for x in p["ranks"]]
        n = len(ranks)
        merged = dict(parts[0])
        merged.update(sets=n, ranks=ranks, top1=sum(x == 1 for x in ranks) / n, mean_rank=sum(ranks) / n,
                      max_rank=max(ranks), seconds=sum(p["seconds"] for p in parts))
        merged["seconds_per_set"] = merged["seconds"] / n
        merged["cpu_seconds_per_set"] = sum(p["cpu_seconds_per_set"] * p["sets"] for p in parts) / n
        methods[key] = merged
    return {**shards[0], "config": cfg, "methods": methods}


def _pretrain_note(cfg: dict) -> str:
    if cfg["pretrain_cached"]:
        return "cached: pre-trained once with this recipe, see the notes"
    return f"{cfg['pretrain_seconds']:.0f} s wall / {cfg.get('pretrain_cpu_seconds', float('nan')):.0f} s CPU"


if __name__ == "__main__":
    sys.exit(main())
