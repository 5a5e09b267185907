"""Diffusion attribution benchmark: ``forwardinf diffusion`` runs -> ``benchmarks/results/diffusion.md``.

    python benchmarks/diffusion_bench.py                    # every run below (hours on a shared 2-core box)
    python benchmarks/diffusion_bench.py --runs main        # just one
    python benchmarks/diffusion_bench.py --collect          # only rebuild the markdown from finished runs

Each run is the CLI command shown in the markdown, with its output folder under ``--out``; a run
whose ``results.json`` exists is not repeated (pre-trained models are cached in the folders too).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    # The recorded benchmark: 20 exemplar sets, candidate sets of 100 and 1K, every variant.
    "main": ["--sets", "20", "--methods",
             "forward-inf,forward-inf-paper,forward-inf-loss,pixel-l2"],
    # The other variants on the small candidate sets (cosine needs 3 x 16 forward-mode sweeps).
    "variants": ["--sets", "6", "--sizes", "100", "--methods",
                 "forward-inf,forward-inf-abs,forward-inf-nsgd,forward-inf-cosine,pixel-l2"],
    # Fashion-MNIST (apt-get install -y dataset-fashion-mnist): room for 10K candidates.
    "fashion": ["--dataset", "fashion-mnist", "--sets", "6", "--sizes", "100,1000,10000", "--methods", "forward-inf,pixel-l2"],
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
        cmd = command(name, out)
        print("$", shlex.join(cmd), flush=True)
        exe = Path(sys.executable).with_name("forwardinf")
        subprocess.run([str(exe), *cmd[1:]], check=True)
    write_markdown(out, names, Path(args.results))
    return 0


def write_markdown(out: Path, names: list[str], path: Path) -> None:
    parts = ["# Diffusion attribution (`forwardinf diffusion`)", "",
             "Paper (section 4.1, Table 8): Stable Diffusion fine-tuned on a few exemplars of a new concept; "
             "top-1 = 1.0 for candidate sets of 100, 1K, 10K and 20K. Here: a 263K-parameter DDPM "
             "(`UNet2DModel` + `DDPMScheduler`, built from a config) pre-trained on real images with two classes "
             "held out, fine-tuned per exemplar set on 4 exemplars of a held-out class, 4 generated images as the "
             "query set (joint ascent), candidates = the 4 exemplars + the pre-training images nearest to them in "
             "pixel space (half) + random pre-training images (half). Top-1: an exemplar ranks first. "
             "`seconds per set`: the method alone (fit + influence) for one exemplar set; wall-clock on a "
             "2-core machine shared with other jobs (load average 10-20 during these runs), so times are "
             "inflated several-fold and only comparable within a table.", ""]
    collected = {}
    for name in names:
        f = out / name / "results.json"
        if not f.is_file():
            parts += [f"## {name}", "", "(not run)", ""]
            continue
        res = json.loads(f.read_text())
        collected[name] = res
        cfg = res["config"]
        parts += [f"## {name}: {res['dataset']}, {cfg['sets']} exemplar sets", "",
                  "```", shlex.join(command(name, Path("runs/diffusion-bench"))), "```", ""]
        parts += ["| method | candidates | top-1 | seconds per set | mean rank of best exemplar | worst rank | settings |",
                  "|---|---|---|---|---|---|---|"]
        for key, m in res["methods"].items():
            method = key.split("@")[0]
            settings = ", ".join(f"{k}={v}" for k, v in m.get("settings", {}).items()) or "model-free"
            parts.append(f"| {method} | {m['candidates']} | {m['top1']:.2f} | {m['seconds_per_set']:.1f} | "
                         f"{m['mean_rank']:.2f} | {m['max_rank']} | {settings} |")
        parts += ["", f"Pre-training: {cfg['pretrain_images']} images, {cfg['pretrain_steps']} steps "
                      f"({'cached' if cfg['pretrain_cached'] else f'{cfg['pretrain_seconds']:.0f}s'}); fine-tuning "
                      f"{cfg['finetune_steps']} steps at lr {cfg['finetune_lr']}; loss timesteps {cfg['timesteps']} x "
                      f"{cfg['noise_draws']} noise draws.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.is_file() else ""
    notes = existing.split("<!-- notes -->", 1)[1] if "<!-- notes -->" in existing else "\n"
    path.write_text("\n".join(parts).rstrip() + "\n\n<!-- notes -->" + notes)
    path.with_suffix(".json").write_text(json.dumps(collected, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
