"""DiffusionTask (fixed noise, exact losses, vmap-safety) and the tiny UNet/DDPM helpers."""
import copy
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import forwardinf as fi  # noqa: E402
from forwardinf.core.params import fingerprint  # noqa: E402
from forwardinf.models.diffusion import (build_scheduler, build_unet, contiguous_group_norm,  # noqa: E402
                                         generate, train_denoiser)
from forwardinf.tasks.diffusion import DiffusionTask  # noqa: E402


def tiny_unet(**kw):
    return build_unet(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, **kw)


def images(n=6, seed=0, size=8):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def digits(n):
    from forwardinf.data.loaders import load_digits

    d = load_digits()
    return d.denormalize(d.x_train[:n]) * 2 - 1  # [n, 1, 8, 8] real digits in [-1, 1]


def same_state(a, b):
    return all(n1 == n2 and torch.equal(t1, t2) for (n1, t1), (n2, t2) in zip(a, b))


# -- the fixed noise ---------------------------------------------------------------------------
def test_same_model_scores_zero_bit_for_bit():
    unet, sched = tiny_unet(), build_scheduler(100)
    task = DiffusionTask(sched, timesteps=4, noise_draws=2)
    x = images()
    torch.manual_seed(1)
    with torch.no_grad():
        before = task.loss(unet, x)
    torch.manual_seed(2)  # the global RNG must not matter
    torch.randn(1000)
    with torch.no_grad():
        after = task.loss(copy.deepcopy(unet), x)
        fresh = DiffusionTask(sched, timesteps=4, noise_draws=2).loss(unet, x)  # a new task, same seed
    assert torch.equal(after - before, torch.zeros_like(before))
    assert torch.equal(fresh, before)
    # ...and the cached base losses of the estimator are these values, bit for bit.
    est = fi.ForwardINF(unet, task, score="loss", optimizer="adam", lr=1e-4, batch_size=len(x)).fit((x,))
    assert torch.equal(est.base_losses_, before)


def test_every_example_sees_the_same_noise():
    sched = build_scheduler(100)
    task = DiffusionTask(sched, timesteps=[3, 40, 90], noise_draws=2)
    x = images(4)
    batch = torch.cat([x, x.flip(0)])
    with torch.no_grad():
        losses = task.loss(tiny_unet(), batch)
    torch.testing.assert_close(losses[:4], losses[4:].flip(0), rtol=1e-6, atol=0)
    other = DiffusionTask(sched, timesteps=[3, 40, 90], noise_draws=2, seed=1)
    assert not torch.equal(other.noise((1, 8, 8)), task.noise((1, 8, 8)))
    assert task.noise((1, 8, 8)).shape == (6, 1, 8, 8)


def test_first_call_may_come_from_inside_vmap():
    """The noise is drawn without torch's RNG, which vmap refuses."""
    from torch.func import functional_call, vmap

    unet = tiny_unet()
    params = {k: v.detach().unsqueeze(0).expand(2, *v.shape) for k, v in unet.named_parameters()}
    task = DiffusionTask(build_scheduler(100), timesteps=2)
    x = images(3)
    with torch.no_grad():
        out = vmap(lambda p: task.loss(lambda *a: functional_call(unet, p, a), x))(params)
        torch.testing.assert_close(out[1], task.loss(unet, x), rtol=1e-5, atol=1e-6)


def test_plan_spreads_timesteps_over_bins():
    task = DiffusionTask(build_scheduler(1000), timesteps=4, noise_draws=3)
    assert task.plan().tolist() == [125] * 3 + [375] * 3 + [625] * 3 + [875] * 3


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_loss_matches_hand_computation(kind):
    """Stand-in models with known outputs: zeros (all types) and the identity (``sample``)."""
    sched = build_scheduler(50, prediction_type=kind)
    ts = [0, 7, 30, 49]
    task = DiffusionTask(sched, timesteps=ts, noise_draws=2, seed=3)
    x = images(3).double()
    eps = task.noise((1, 8, 8), torch.float64)  # [8, 1, 8, 8]
    abar = sched.alphas_cumprod.double()[torch.tensor(ts).repeat_interleave(2)]
    a, s = abar.sqrt().view(1, -1, 1, 1, 1), (1 - abar).sqrt().view(1, -1, 1, 1, 1)
    x0 = x[:, None]
    target = {"epsilon": eps[None].expand(3, -1, -1, -1, -1), "sample": x0.expand(-1, 8, -1, -1, -1),
              "v_prediction": a * eps[None] - s * x0}[kind]
    zeros = task.loss(lambda noisy, t: torch.zeros_like(noisy), x)
    torch.testing.assert_close(zeros, target.pow(2).mean((1, 2, 3, 4)), rtol=1e-12, atol=0)
    if kind == "sample":
        ident = task.loss(lambda noisy, t: noisy, x)
        torch.testing.assert_close(ident, (a * x0 + s * eps[None] - x0).pow(2).mean((1, 2, 3, 4)), rtol=1e-12, atol=0)


def test_bad_arguments_are_named():
    sched = build_scheduler(100)
    x = images(2)
    with pytest.raises(ValueError, match="timesteps must lie in"):
        DiffusionTask(sched, timesteps=[5, 100]).loss(tiny_unet(), x)
    with pytest.raises(ValueError, match="timesteps=0"):
        DiffusionTask(sched, timesteps=0).plan()
    with pytest.raises(ValueError, match="noise_draws"):
        DiffusionTask(sched, noise_draws=0).plan()
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiffusionTask(object()).plan()
    with pytest.raises(ValueError, match="no key 'images'"):
        DiffusionTask(sched).images({"pixels": x})
    task = DiffusionTask(sched, timesteps=2)
    with pytest.raises(ValueError, match="images must be a floating-point"):
        task.validate(tiny_unet(), torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="output has shape"):
        task.validate(lambda noisy, t: noisy[:, :, :4], x)
    with pytest.raises(ValueError, match="condition 'class_labels'"):
        DiffusionTask(sched, condition={"class_labels": 1}).validate(tiny_unet(), (x,))
    with pytest.raises(ValueError, match="NaN or inf"):
        fi.ForwardINF(tiny_unet(), task).fit((torch.full((2, 1, 8, 8), float("nan")),))


def test_class_conditioning_is_passed_to_the_model():
    cond = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4, add_attention=False,
                                 num_class_embeds=3)
    task = DiffusionTask(build_scheduler(100), timesteps=3, condition={"class_labels": 1})
    x = images(2)
    with torch.no_grad():
        a = task.loss(cond, (x, torch.tensor([0, 1])))
        b = task.loss(cond, (x, torch.tensor([2, 1])))
    assert a[1] == b[1] and a[0] != b[0]
    est = fi.ForwardINF(cond, task, score="loss", optimizer="adam", lr=1e-3).fit((x, torch.tensor([0, 1])))
    assert est.influence((x[:1], torch.tensor([0])), joint=True).shape == (2,)


# -- with the estimator ------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["cosine", "loss"])
def test_forward_inf_runs_per_query_and_joint_and_leaves_the_model_untouched(score):
    """Per-query mode vmaps the UNet over stacked parameters; cosine takes forward-mode jvps."""
    unet, sched = tiny_unet(), build_scheduler(100)
    unet.train()  # mode must come back too
    before = fingerprint(unet)
    task = DiffusionTask(sched, timesteps=3)
    x = images(5)
    est = fi.ForwardINF(unet, task, score=score, n_directions=4, optimizer="adam", lr=1e-3, steps=2).fit((x,))
    each = est.influence((x[:2],))
    joint = est.influence((x[:2],), joint=True)
    assert each.shape == (2, 5) and joint.shape == (5,)
    assert torch.isfinite(each).all() and torch.isfinite(joint).all()
    assert same_state(before, fingerprint(unet)) and unet.training


def test_own_training_image_ranks_first():
    """A tiny DDPM fitted to 8 real digits: unlearning one of them hurts that one the most."""
    x = digits(8)
    unet, sched = tiny_unet(), build_scheduler(100)
    train_denoiser(unet, sched, x, steps=150, batch_size=8, lr=3e-3, seed=0)
    task = DiffusionTask(sched, timesteps=[2, 5, 10, 20], noise_draws=2)
    est = fi.ForwardINF(unet, task, score="loss", optimizer="adam", lr=1e-4, steps=3).fit((x,))
    scores = est.influence((x,))  # [8, 8]: each training image as its own query
    top1 = (scores.argmax(1) == torch.arange(8)).float().mean().item()
    assert top1 >= 7 / 8


# -- helpers -----------------------------------------------------------------------------------
def test_builders_validate_and_seed():
    a, b = tiny_unet(seed=3), tiny_unet(seed=3)
    assert same_state(fingerprint(a), fingerprint(b))
    assert not same_state(fingerprint(a), fingerprint(tiny_unet(seed=4)))
    with pytest.raises(ValueError, match="divisible by 2"):
        build_unet(sample_size=6, block_out_channels=(8, 16, 16), norm_num_groups=4)
    with pytest.raises(ValueError, match="norm_num_groups"):
        build_unet(block_out_channels=(6, 16), norm_num_groups=4)


def test_training_lowers_the_loss_and_generation_is_seeded():
    unet, sched = tiny_unet(), build_scheduler(100)
    losses = train_denoiser(unet, sched, digits(64), steps=60, batch_size=16, lr=3e-3, seed=0)
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    assert not unet.training
    g1 = generate(unet, sched, 3, steps=5, seed=1)
    g2 = generate(unet, sched, 3, steps=5, seed=1, sampler="ddpm")
    assert g1.shape == (3, 1, 8, 8) and torch.equal(g1, generate(unet, sched, 3, steps=5, seed=1))
    assert not torch.equal(g1, g2) and g2.abs().max() <= 1
    assert sched.num_inference_steps is None  # the caller's scheduler is not touched


def test_contiguous_group_norm_lets_vmap_run_attention_unets():
    unet = tiny_unet(attention=True)
    task = DiffusionTask(build_scheduler(100), timesteps=2)
    x = images(3)
    est = fi.ForwardINF(unet, task, score="loss", optimizer="adam", lr=1e-3).fit((x,))
    with contiguous_group_norm(unet):
        scores = est.influence((x[:2],))
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()
    assert not any(m._forward_pre_hooks for m in unet.modules())
    with torch.no_grad():
        assert math.isfinite(float(task.loss(unet, x).sum()))


def test_score_loss_averages_log_losses_and_max_timestep_narrows_the_plan():
    sched = build_scheduler(1000)
    task = DiffusionTask(sched, timesteps=5, max_timestep=50)
    assert task.plan().tolist() == [5, 15, 25, 35, 45]
    with pytest.raises(ValueError, match="max_timestep"):
        DiffusionTask(sched, timesteps=5, max_timestep=2000).plan()
    x = images(3)
    unet = tiny_unet()
    with torch.no_grad():
        pairs = task.pair_losses(unet, x)  # [3, M]
        assert pairs.shape == (3, 5)
        torch.testing.assert_close(task.loss(unet, x), pairs.mean(-1))
        # Default: the log of the loss (arithmetic mean); "geometric": mean of the pairs' log losses.
        torch.testing.assert_close(task.score_loss(unet, x), task.loss(unet, x).log())
        geo = DiffusionTask(sched, timesteps=5, max_timestep=50, score_average="geometric")
        torch.testing.assert_close(geo.score_loss(unet, x), pairs.log().mean(-1))
        assert (geo.score_loss(unet, x) <= task.score_loss(unet, x) + 1e-6).all()  # AM >= GM
    with pytest.raises(ValueError, match="score_average"):
        DiffusionTask(sched, timesteps=5, score_average="median").score_loss(unet, x)


def test_geometric_score_weighs_every_timestep_by_its_relative_change():
    """Halving the error at a high-loss timestep or at a low-loss one moves the geometric score the
    same; the arithmetic one sees mostly the high-loss timestep."""
    sched = build_scheduler(1000)
    x = images(2)
    geo = DiffusionTask(sched, timesteps=[10, 400], score_average="geometric")
    ari = DiffusionTask(sched, timesteps=[10, 400])
    eps = geo.noise(tuple(x.shape[1:]))  # [2, C, H, W]: the noise of t=10 and of t=400
    err = torch.tensor([1.0, 0.1])  # error scale per timestep: losses 1 and 0.01

    def model(scale):
        def f(noisy, t):
            j = (t == 400).long()  # which pair each row is
            return eps[j] + (err * scale)[j].view(-1, 1, 1, 1) * torch.ones_like(noisy)
        return f

    with torch.no_grad():
        base = [t.score_loss(model(torch.ones(2)), x) for t in (geo, ari)]
        low = [t.score_loss(model(torch.tensor([0.5, 1.0])), x) for t in (geo, ari)]  # t=10 error halved
        high = [t.score_loss(model(torch.tensor([1.0, 0.5])), x) for t in (geo, ari)]  # t=400 error halved
    torch.testing.assert_close(low[0] - base[0], high[0] - base[0])
    assert ((high[1] - base[1]).abs() < 0.05 * (low[1] - base[1]).abs()).all()


# -- the experiment ----------------------------------------------------------------------------
def test_candidate_sets_hold_exemplars_nearest_and_random():
    from forwardinf.experiments.diffusion import candidate_sets

    g = torch.Generator().manual_seed(0)
    pool = torch.randn(200, 1, 4, 4, generator=g)
    exemplars = pool[:3] + 0.01  # the first three pool images are the nearest by construction
    sets = candidate_sets(exemplars, pool, [20, 103], torch.Generator().manual_seed(1))
    for size, idx in sets.items():
        assert len(idx) == size and len(set(idx.tolist())) == size
        assert idx[:3].tolist() == [0, 1, 2]
        n_near = (size - 3) // 2
        dist = torch.cdist(pool.flatten(1), exemplars.flatten(1)).min(1).values
        near = idx[3:3 + n_near] - 3
        assert torch.equal(dist[near].sort().values, dist.sort().values[:n_near])
        assert {0, 1, 2} <= set(near.tolist())


def test_experiment_end_to_end_tiny(tmp_path):
    """The CLI path on a toy budget: outputs, schema, the pre-training cache (not the quality)."""
    import json

    from forwardinf.cli import build_parser

    argv = ["diffusion", "--out", str(tmp_path), "--quiet", "--pretrain-steps", "3", "--finetune-steps", "2",
            "--sets", "2", "--sizes", "6,12", "--channels", "8,16", "--timesteps", "5,10", "--noise-draws", "1",
            "--sample-steps", "2", "--generated", "2", "--exemplars", "2", "--methods",
            "forward-inf-diffusion,forward-inf-diffusion-contrast,pixel-l2"]
    args = build_parser().parse_args(argv)
    results = args._module.run(args)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiment"] == "diffusion" and saved["dataset"] == "digits"
    assert set(saved["methods"]) == {f"{m}@{s}" for s in (6, 12)
                                     for m in ("forward-inf-diffusion", "forward-inf-diffusion-contrast", "pixel-l2")}
    for m in saved["methods"].values():
        assert 0 <= m["top1"] <= 1 and m["seconds"] >= 0 and 1 <= m["mean_rank"] <= m["candidates"]
    assert (tmp_path / "diffusion.png").is_file() and (tmp_path / "report.md").is_file()
    assert not results["config"]["pretrain_cached"]
    again = build_parser().parse_args(argv)
    assert again._module.run(again)["config"]["pretrain_cached"]
    # A shard (--first-set) draws the same exemplar sets as the one long run.
    shard = build_parser().parse_args(argv + ["--first-set", "1", "--sets", "1"])
    part = shard._module.run(shard)
    for key, m in part["methods"].items():
        assert m["ranks"] == results["methods"][key]["ranks"][1:]
    bad = build_parser().parse_args(argv + ["--option", "forward-inf-diffusion.score=nope"])
    with pytest.raises(ValueError, match="forward-inf"):
        bad._module.run(bad)


def test_latent_text_conditioned_path_as_documented_for_stable_diffusion():
    """The docstring's SD recipe on a tiny cross-attention UNet built from a config."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2)
    before = fingerprint(unet)
    latents, text = torch.randn(5, 4, 8, 8), torch.randn(5, 3, 8)  # [N, 4, H, W], [N, tokens, dim]
    task = DiffusionTask(diffusers.PNDMScheduler(num_train_timesteps=100), timesteps=2, max_timestep=20,
                         condition={"encoder_hidden_states": 1})
    with contiguous_group_norm(unet):
        est = fi.ForwardINF(unet, task, optimizer="adam", lr=1e-3, steps=2, score="margin", params="*attn2*",
                            batch_size=4).fit((latents, text))
        joint = est.influence((latents[:2], text[:2]), joint=True)
        each = est.influence((latents[:2], text[:2]))
    assert joint.shape == (5,) and set(joint.topk(2).indices.tolist()) == {0, 1}
    assert each.argmax(1).tolist() == [0, 1]  # each query's own duplicate ranks first
    assert same_state(before, fingerprint(unet))


def test_contrast_variant_subtracts_the_ascent_on_reference_images():
    from forwardinf.experiments.diffusion import VARIANTS, _score_all

    unet, sched = tiny_unet(), build_scheduler(100)
    task = DiffusionTask(sched, timesteps=[5, 40], noise_draws=1)
    cands, gen, ref = images(6, seed=1), images(2, seed=2), images(2, seed=3)
    variants = {m: dict(VARIANTS[m]) for m in ("forward-inf-diffusion", "forward-inf-diffusion-contrast")}
    methods = ["forward-inf-diffusion", "forward-inf-diffusion-contrast"]
    out = {m: s for m, s, _ in _score_all(unet, task, variants, methods, cands, gen, ref)}
    plain_ref = {m: s for m, s, _ in _score_all(unet, task, variants, ["forward-inf-diffusion"], cands, ref, ref)}
    plain = out["forward-inf-diffusion"] - plain_ref["forward-inf-diffusion"]
    torch.testing.assert_close(out["forward-inf-diffusion-contrast"], plain)
    # Reference = generated images: the two ascents are the same computation, the contrast is exactly 0.
    same = {m: s for m, s, _ in _score_all(unet, task, variants, methods, cands, gen, gen.clone())}
    assert torch.equal(same["forward-inf-diffusion-contrast"], torch.zeros(6))
    with pytest.raises(ValueError, match="reference"):
        _score_all(unet, task, variants, ["forward-inf-diffusion-contrast"], cands, gen)
