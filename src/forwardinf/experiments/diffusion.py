"""Diffusion attribution: which training images taught a fine-tuned DDPM a new concept?

Pre-trains a small DDPM (``UNet2DModel`` + ``DDPMScheduler``, built from a config) on a real
dataset with some classes held out, then, for each exemplar set: fine-tunes a copy on a few
exemplars of a held-out class (the ground truth), generates images of the new concept, updates
the fine-tuned model by gradient ascent on the generated images (Forward-INF, joint mode) and
ranks a candidate set: the exemplars + the pre-training images nearest to them in pixel space
+ random pre-training images. Top-1: the top-ranked candidate is an exemplar. Paper: section 4.1,
Figure 3, Table 8 (top-1 1.0 for candidate sets of 100 to 20K).

The loss is :class:`forwardinf.DiffusionTask` over fixed timesteps ``10, 50, 100, 200, 400`` (of
1000) x 2 noise draws, the same for every candidate and both models; the score is the change of
the log loss (``score="margin"``). Stable Diffusion (latent space, text-conditioned UNet, a
candidate set built from caption overlap) is the same recipe: see the module docstring of
:mod:`forwardinf.tasks.diffusion`. Results: ``benchmarks/results/diffusion.md``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from forwardinf.experiments.common import markdown_table, results_object, seed_everything, timer, write_outputs

# Per dataset: the held-out concepts (class indices) and the recipe.
DATASETS: dict[str, dict[str, Any]] = {
    "digits": dict(concepts=(0, 7)),
    "fashion-mnist": dict(concepts=(1, 8)),  # Trouser, Bag
    "mnist": dict(concepts=(0, 7)),
}
IMAGE_SIZE = 16

# Forward-INF variants (ascent on the generated images, joint mode). "forward-inf" is the
# recommended one and takes the --optimizer/--lr/--steps/--score flags; the others are fixed.
VARIANTS: dict[str, dict[str, Any]] = {
    "forward-inf": dict(score="margin", optimizer="adam", lr=3e-4, steps=3),
    # The paper's diffusion recipe: Adam lr 1e-5, 3 iterations, raw loss change.
    "forward-inf-paper": dict(score="loss", optimizer="adam", lr=1e-5, steps=3),
    "forward-inf-loss": dict(score="loss", optimizer="adam", lr=3e-4, steps=3),
    "forward-inf-abs": dict(score="abs", optimizer="adam", lr=3e-4, steps=3),
    "forward-inf-nsgd": dict(score="margin", optimizer="nsgd", lr=1e-3, steps=3),
    "forward-inf-cosine": dict(score="cosine", optimizer="adam", lr=3e-4, steps=3, n_directions=16),
}
# The fixed timesteps of the loss (of T = 1000). Low timesteps alone (2..50) were fooled by
# pre-training images that look like an exemplar; adding 100..400 made the ranking robust over a
# 10x range of ascent lr (benchmarks/results/diffusion.md, "why the timesteps changed").
TIMESTEPS = (10, 50, 100, 200, 400)
BASELINES = ("pixel-l2",)  # nearest candidate to any generated image in pixel space (model-free)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concepts", default=None,
                   help="comma-separated class indices held out of pre-training, one concept per exemplar set in turn "
                        "(default: digits/mnist 0,7; fashion-mnist 1,8)")
    p.add_argument("--sets", type=int, default=6, help="exemplar sets (default: 6; the paper's table uses 20)")
    p.add_argument("--first-set", type=int, default=0,
                   help="index of the first exemplar set (default: 0); sets first..first+sets-1 are run, so a long "
                        "run can be split into shards that draw the same sets as one run")
    p.add_argument("--sizes", default="100,1000", help="candidate set sizes (default: 100,1000)")
    p.add_argument("--exemplars", type=int, default=4, help="fine-tuning exemplars per set (default: 4)")
    p.add_argument("--generated", type=int, default=4, help="generated images per set, the query set (default: 4)")
    p.add_argument("--channels", default="16,32,32", help="UNet block widths (default: 16,32,32)")
    p.add_argument("--pretrain-steps", type=int, default=1500, help="pre-training steps, batch 64 (default: 1500)")
    p.add_argument("--pretrain-lr", type=float, default=2e-3, help="pre-training AdamW lr (default: 2e-3)")
    p.add_argument("--finetune-steps", type=int, default=100, help="fine-tuning steps on the exemplars (default: 100)")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="fine-tuning AdamW lr (default: 1e-3)")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps per generated image (default: 50)")
    p.add_argument("--methods", default="forward-inf,pixel-l2",
                   help="comma-separated: " + ", ".join([*VARIANTS, *BASELINES]) + " (default: forward-inf,pixel-l2)")
    p.add_argument("--optimizer", default=None, help="forward-inf's update: adam, sgd or nsgd (default: adam)")
    p.add_argument("--lr", type=float, default=None, help="forward-inf's ascent lr (default: 3e-4)")
    p.add_argument("--steps", type=int, default=None, help="forward-inf's ascent iterations (default: 3, the paper's)")
    p.add_argument("--score", default=None,
                   help="forward-inf's score: margin (change of the log loss), loss (the paper's raw change), abs, "
                        "cosine (default: margin)")
    p.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)),
                   help="the fixed diffusion timesteps of the loss (default: "
                        + ",".join(map(str, TIMESTEPS)) + " of 1000)")
    p.add_argument("--noise-draws", type=int, default=2, help="fixed noise draws per timestep (default: 2)")
    p.add_argument("--k", type=int, default=7, help="top candidates shown per set in the figure (default: 7)")


# -- data ------------------------------------------------------------------------------------
def concept_images(name: str, root: str | None = None) -> tuple[Tensor, Tensor, list[str]]:
    """All images of a dataset (train + test) at 16x16 in [-1, 1]: ``([N, C, 16, 16], [N], classes)``."""
    from forwardinf.data.loaders import load_dataset

    split = load_dataset(name, root)
    x = split.denormalize(torch.cat([split.x_train, split.x_test]))
    y = torch.cat([split.y_train, split.y_test])
    if x.shape[-1] != IMAGE_SIZE:
        # Bilinear up-sampling (8x8 digits); anti-aliased down-sampling (28x28 MNIST-style).
        x = F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False, antialias=x.shape[-1] > IMAGE_SIZE)
    return (x.clamp(0, 1) * 2 - 1).contiguous(), y, split.classes


def candidate_sets(exemplars: Tensor, pool: Tensor, sizes: list[int], gen: torch.Generator) -> dict[int, Tensor]:
    """Per size, indices into ``cat([exemplars, pool])``: the exemplars first, then half nearest, half random.

    Nearest: smallest L2 pixel distance to any exemplar. Random: uniform over the remaining pool.
    """
    n_ex = len(exemplars)
    dist = torch.cdist(pool.flatten(1), exemplars.flatten(1)).min(1).values  # [P]
    nearest = dist.argsort()
    perm = torch.randperm(len(pool), generator=gen)
    out = {}
    for size in sizes:
        n_near = (size - n_ex) // 2
        n_rand = size - n_ex - n_near
        near = nearest[:n_near]
        taken = torch.zeros(len(pool), dtype=torch.bool)
        taken[near] = True
        rand = perm[~taken[perm]][:n_rand]
        out[size] = torch.cat([torch.arange(n_ex), n_ex + near, n_ex + rand])
    return out


# -- the experiment ----------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    from forwardinf.models.diffusion import build_scheduler, build_unet, generate, require_diffusers, train_denoiser
    from forwardinf.tasks.diffusion import DiffusionTask

    require_diffusers()
    seed_everything(args.seed)
    progress = not args.quiet and sys.stderr.isatty()
    name = (args.dataset or "digits").lower()
    if name not in DATASETS:
        raise ValueError(f"--dataset {name!r}: the diffusion experiment supports {sorted(DATASETS)}")
    x, y, classes = concept_images(name, args.data_root)
    concepts = _ints(args.concepts, "--concepts") if args.concepts else list(DATASETS[name]["concepts"])
    sizes = sorted(_ints(args.sizes, "--sizes"))
    timesteps = _ints(args.timesteps, "--timesteps")
    channels = _ints(args.channels, "--channels")
    if any(c < 0 or c >= len(classes) for c in concepts):
        raise ValueError(f"--concepts must be class indices in 0..{len(classes) - 1}, got {concepts}")
    held = torch.isin(y, torch.tensor(concepts))
    pool = x[~held]  # the pre-training set
    if args.sets < 1 or args.exemplars < 1 or args.generated < 1:
        raise ValueError("--sets, --exemplars and --generated must be positive")
    if args.first_set < 0:
        raise ValueError(f"--first-set must be >= 0, got {args.first_set}")
    smallest = min(int((y == c).sum()) for c in concepts)
    if args.exemplars > smallest:
        raise ValueError(f"--exemplars {args.exemplars}: a held-out concept has only {smallest} images")
    if sizes[0] <= args.exemplars or sizes[-1] > args.exemplars + len(pool):
        raise ValueError(f"--sizes must lie in {args.exemplars + 1}..{args.exemplars + len(pool)} "
                         f"(exemplars + {len(pool)} pre-training images), got {sizes}")

    scheduler = build_scheduler(1000)
    methods_wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods_wanted if m not in VARIANTS and m not in BASELINES]
    if unknown or not methods_wanted:
        raise ValueError(f"--methods: unknown {unknown}; choose from {[*VARIANTS, *BASELINES]}")
    variants = {m: dict(VARIANTS[m]) for m in methods_wanted if m in VARIANTS}
    if "forward-inf" in variants:
        flags = {"optimizer": args.optimizer, "lr": args.lr, "steps": args.steps, "score": args.score}
        variants["forward-inf"].update({k: v for k, v in flags.items() if v is not None})
    task = DiffusionTask(scheduler, timesteps=timesteps, noise_draws=args.noise_draws, seed=args.seed)
    unet = build_unet(sample_size=IMAGE_SIZE, channels=x.shape[1], block_out_channels=channels)
    _check_variants(unet, task, variants, pool)  # before the long work
    recipe = dict(channels=channels, steps=args.pretrain_steps, lr=args.pretrain_lr, batch_size=64, seed=args.seed,
                  concepts=concepts)
    out_dir = Path(args.out)
    pretrained, pretrain_time, cached = _pretrain(pool, recipe, scheduler, out_dir, name, progress)
    print(f"diffusion: {name}, {len(pool)} pre-training images at {IMAGE_SIZE}x{IMAGE_SIZE}, held-out concepts "
          f"{[classes[c] for c in concepts]}; UNet {channels} "
          f"({sum(p.numel() for p in pretrained.parameters()):,} parameters), pre-trained "
          + ("(cached)" if cached else f"in {pretrain_time['seconds']:.0f}s"))

    stats = {(m, s): {"hits": 0, "seconds": 0.0, "cpu_seconds": 0.0, "ranks": []} for m in methods_wanted for s in sizes}
    shown, finetune_seconds, finetune_cpu = [], 0.0, 0.0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for k in tqdm(range(args.first_set, args.first_set + args.sets), desc="exemplar sets", disable=not progress):
        concept = concepts[k % len(concepts)]
        gen = torch.Generator().manual_seed(args.seed * 100_003 + k)
        members = (y == concept).nonzero().squeeze(1)
        exemplars = x[members[torch.randperm(len(members), generator=gen)[:args.exemplars]]]
        with timer() as t:
            model = copy.deepcopy(pretrained)
            train_denoiser(model, scheduler, exemplars, steps=args.finetune_steps, batch_size=len(exemplars),
                           lr=args.finetune_lr, seed=args.seed + k)
            generated = generate(model, scheduler, args.generated, steps=args.sample_steps, seed=args.seed + k)
        finetune_seconds += t["seconds"]
        finetune_cpu += t["cpu_seconds"]
        everything = torch.cat([exemplars, pool])
        sets = candidate_sets(exemplars, pool, sizes, gen)
        for size in sizes:
            cands = everything[sets[size]]
            for method, scores, clock in _score_all(model, task, variants, methods_wanted, cands, generated):
                order = scores.argsort(descending=True)
                is_ex = order < len(exemplars)
                st = stats[method, size]
                st["hits"] += int(is_ex[0])
                st["seconds"] += clock["seconds"]
                st["cpu_seconds"] += clock["cpu_seconds"]
                st["ranks"].append(int(is_ex.nonzero()[0]) + 1)
                if method == methods_wanted[0] and size == sizes[-1] and len(shown) < 4:
                    shown.append((classes[concept], exemplars[0], generated[0], cands[order[:args.k]],
                                  scores[order[:args.k]], is_ex[:args.k]))
        if not progress and not args.quiet:
            print(f"  set {k + 1}/{args.first_set + args.sets} ({classes[concept]}), rank of the best exemplar: "
                  + "; ".join(f"{m} " + ", ".join(f"{stats[m, s]['ranks'][-1]}/{s}" for s in sizes)
                              for m in methods_wanted), flush=True)

    sets_seconds, sets_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    methods, rows = {}, []
    for method in methods_wanted:
        for size in sizes:
            st = stats[method, size]
            ranks = torch.tensor(st["ranks"], dtype=torch.float)
            methods[f"{method}@{size}"] = {
                "top1": st["hits"] / args.sets, "seconds": st["seconds"], "seconds_per_set": st["seconds"] / args.sets,
                "cpu_seconds_per_set": st["cpu_seconds"] / args.sets,
                "candidates": size, "sets": args.sets, "mean_rank": float(ranks.mean()), "max_rank": int(ranks.max()),
                "ranks": st["ranks"],
                **({"settings": variants[method]} if method in variants else {})}
            rows.append([method, size, st["hits"] / args.sets, round(st["seconds"] / args.sets, 2),
                         round(st["cpu_seconds"] / args.sets, 2), float(ranks.mean()), int(ranks.max())])
    table = markdown_table(["method", "candidates", "top-1", "seconds per set", "CPU seconds per set",
                            "mean rank of best exemplar", "worst rank"], rows)
    print(table)
    config = {"dataset": name, "concepts": concepts, "sets": args.sets, "first_set": args.first_set,
              "sizes": sizes, "exemplars": args.exemplars,
              "generated": args.generated, "unet_channels": channels, "pretrain_steps": args.pretrain_steps,
              "pretrain_lr": args.pretrain_lr, "pretrain_images": len(pool), "finetune_steps": args.finetune_steps,
              "finetune_lr": args.finetune_lr, "sample_steps": args.sample_steps, "methods": methods_wanted,
              "variants": variants, "timesteps": timesteps, "noise_draws": args.noise_draws, "seed": args.seed,
              "threads": torch.get_num_threads(), "pretrain_cached": cached,
              "pretrain_seconds": pretrain_time["seconds"], "pretrain_cpu_seconds": pretrain_time["cpu_seconds"],
              "finetune_and_sample_seconds": finetune_seconds, "finetune_and_sample_cpu_seconds": finetune_cpu,
              "sets_seconds": sets_seconds, "sets_cpu_seconds": sets_cpu}
    results = results_object("diffusion", name, config, methods)
    report = (f"# Diffusion attribution ({name})\n\n"
              f"{len(pool)} pre-training images ({IMAGE_SIZE}x{IMAGE_SIZE}), held-out concepts "
              f"{[classes[c] for c in concepts]}, {args.sets} exemplar sets of {args.exemplars} exemplars, "
              f"{args.generated} generated images each. Forward-INF variants: {variants}; loss over timesteps "
              f"{timesteps} x {args.noise_draws} noise draws. Seconds per set: the method alone (fit + influence; "
              f"not pre-training or fine-tuning), wall clock and CPU time of this process.\n\n{table}\n")
    out = write_outputs(out_dir, results, report)
    _figure(out / "diffusion.png", shown)
    print(f"wrote {out}/results.json, report.md, diffusion.png")
    return results


def _score_all(model: torch.nn.Module, task: Any, variants: dict, methods: list[str], cands: Tensor,
               generated: Tensor) -> list[tuple[str, Tensor, float]]:
    """``(method, scores [n_cand], {"seconds", "cpu_seconds"})`` per method.

    The Forward-INF variants share one fitted estimator (its settings are switched between
    calls, as ``ForwardINF.tune`` does), so each kind of base loss is swept once. Seconds are
    per method as if run alone: its influence call plus the base sweep it needs.
    """
    from forwardinf.estimators.forward_inf import ForwardINF

    out, est, fit, kinds = [], None, {"seconds": 0.0, "cpu_seconds": 0.0}, set()
    for method in methods:
        if method == "pixel-l2":
            with timer() as t:
                scores = -torch.cdist(cands.flatten(1), generated.flatten(1)).min(1).values
            out.append((method, scores, t))
            continue
        kw = variants[method]
        kind = "loss" if kw["score"] in ("loss", "abs") else "log loss"
        base = {"seconds": 0.0, "cpu_seconds": 0.0}
        if est is None:
            with timer() as t:
                est = ForwardINF(model, task, batch_size=256, **kw).fit((cands,))
            fit = base = t
        else:
            for key, value in {"n_directions": 16, **kw}.items():
                setattr(est, key, value)
            if kind in kinds:  # swept before: count the sweep this method would have paid alone
                base = fit
        kinds.add(kind)
        with timer() as t:
            scores = est.influence((generated,), joint=True)  # a new kind's base sweep happens in here
        out.append((method, scores, {k: base[k] + t[k] for k in t}))
    return out


def _check_variants(model: torch.nn.Module, task: Any, variants: dict, x: Tensor) -> None:
    """Refuse bad settings before any long work: fit each variant on one image."""
    from forwardinf.estimators.forward_inf import ForwardINF

    for name, kw in variants.items():
        try:
            ForwardINF(model, task, **{**kw, "n_directions": 1}).fit((x[:1],))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None


def _pretrain(pool: Tensor, recipe: dict, scheduler: Any, out_dir: Path, name: str,
              progress: bool) -> tuple[torch.nn.Module, dict, bool]:
    """The pre-trained UNet, loaded from ``out_dir`` when the recipe and the data match."""
    from forwardinf.models.diffusion import build_unet, train_denoiser

    h = hashlib.sha256(repr(sorted(recipe.items())).encode())
    h.update(pool.numpy().tobytes())
    path = out_dir / f"pretrained-{name}-{h.hexdigest()[:12]}.pt"
    unet = build_unet(sample_size=IMAGE_SIZE, channels=pool.shape[1], block_out_channels=recipe["channels"],
                      seed=recipe["seed"])
    if path.is_file():
        try:
            unet.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return unet.eval(), {"seconds": 0.0, "cpu_seconds": 0.0}, True
        except Exception:  # a stale or foreign file is replaced
            pass
    with timer() as t:
        train_denoiser(unet, scheduler, pool, steps=recipe["steps"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                       seed=recipe["seed"], warmup=min(100, recipe["steps"] // 10), progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(unet.state_dict(), path)
    return unet.eval(), t, False


def _figure(path: Path, shown: list) -> None:
    """Figure 3 of the paper: per set an exemplar, a generated image, the top-k candidates with scores."""
    if not shown:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(shown[0][3])
    fig, axes = plt.subplots(len(shown), k + 2, figsize=(1.2 * (k + 2), 1.45 * len(shown)), squeeze=False)
    for row, (concept, ex, genimg, top, scores, hit) in zip(axes, shown):
        panels = [(ex, f"exemplar\n({concept})", None), (genimg, "generated", None)]
        panels += [(img, f"#{i + 1} {float(s):.3g}", bool(h)) for i, (img, s, h) in enumerate(zip(top, scores, hit))]
        for ax, (img, title, good) in zip(row, panels):
            ax.imshow(((img + 1) / 2).clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if good is not None:
                for side in ax.spines.values():
                    side.set_edgecolor("tab:green" if good else "tab:red")
                    side.set_linewidth(2.5 if good else 0.8)
    fig.suptitle("Forward-INF on a fine-tuned DDPM: top candidates (green = a fine-tuning exemplar)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values
