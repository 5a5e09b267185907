"""Near-duplicate augmentations: shape, reproducibility, and each kind does what it says."""
from __future__ import annotations

import pytest
import torch

from forwardinf.data.augment import (ALL_KINDS, FLIP_KINDS, KINDS, assign_kinds, crop_flip, default_pad,
                                     flip_is_sensible, near_duplicates, views)
from forwardinf.data.loaders import load_digits


@pytest.fixture(scope="module")
def digits():
    return load_digits().x_train[:64]


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (4, 3, 32, 32), (3, 1, 28, 28), (2, 3, 10, 13)])
def test_shape_dtype_reproducible(kind, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    before = x.clone()
    a = near_duplicates(x, kind, seed=3)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(x, before)  # input untouched
    assert torch.equal(a, near_duplicates(x, kind, seed=3))
    assert torch.isfinite(a).all()
    # Range preserved: every pixel inside its source channel's [min, max].
    assert (a >= x.amin(dim=(2, 3), keepdim=True) - 1e-5).all() and (a <= x.amax(dim=(2, 3), keepdim=True) + 1e-5).all()
    if kind in ("noise", "mix", "shift", "crop", "jitter", "shift+flip"):
        assert not torch.equal(a, near_duplicates(x, kind, seed=4))


def test_every_image_changes_but_stays_close(digits):
    x = digits
    other = x.roll(1, dims=0)  # a different training image, for scale
    for kind in ("shift", "crop", "noise", "jpeg", "jitter", "mix"):
        a = near_duplicates(x, kind, seed=0)
        d_self = (a - x).flatten(1).norm(dim=1)
        d_other = (other - x).flatten(1).norm(dim=1)
        assert (d_self > 1e-6).all(), kind  # a near duplicate, never an exact one
        if kind in ("noise", "jpeg", "jitter"):
            # Pixel-wise close: nearer its source than a random other digit is, for most images.
            # (A 1-pixel shift of an 8x8 digit is not pixel-wise close: that is what makes it hard.)
            assert (d_self < d_other).float().mean() > 0.9, kind


def test_flip_and_shift_exact():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    assert torch.equal(near_duplicates(x, "flip"), x.flip(-1))
    a = near_duplicates(x, "shift", seed=0, strength=1)
    for i in range(2):
        # Some non-zero offset in [-1, 1]^2 with replicated edges reproduces the output exactly.
        padded = torch.nn.functional.pad(x[i:i + 1], (1, 1, 1, 1), mode="replicate")[0]
        hits = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                if torch.equal(padded[:, 1 - dy:5 - dy, 1 - dx:5 - dx], a[i])]
        assert hits and (0, 0) not in hits


def test_noise_level_relative():
    x = 5.0 * torch.randn(200, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    # seed 1: seed 0 would draw the very noise that made x (the clamp at its extremes then bites)
    a = near_duplicates(x, "noise", seed=1, strength=0.2)
    ratio = (a - x).flatten(1).std(dim=1) / x.flatten(1).std(dim=1)
    assert abs(ratio.mean().item() - 0.2) < 0.01


def test_jpeg_is_a_real_pillow_round_trip():
    io = pytest.importorskip("io")
    Image = pytest.importorskip("PIL.Image")
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
    pixels[:, :, 0, 0], pixels[:, :, 0, 1] = 0, 255  # full range per channel: the 0..255 mapping is exact
    x = (pixels.double() / 255).float() * 2.0 - 0.5  # any affine space, e.g. normalised inputs
    a = near_duplicates(x, "jpeg", strength=40)
    for i in range(2):
        buf = io.BytesIO()
        Image.fromarray(pixels[i].permute(1, 2, 0).numpy(), mode="RGB").save(buf, format="JPEG", quality=40)
        decoded = torch.from_numpy(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).copy())
        expect = (decoded.permute(2, 0, 1).double() / 255).float() * 2.0 - 0.5
        assert torch.allclose(a[i], expect, atol=1e-5)
    assert not torch.allclose(a, x, atol=1e-3)  # lossy
    grey = torch.rand(4, 1, 32, 32, generator=g)
    mild = (near_duplicates(grey, "jpeg", strength=90) - grey).norm()
    coarse = (near_duplicates(grey, "jpeg", strength=10) - grey).norm()
    assert 0 < mild < coarse  # lower quality = coarser
    smooth = torch.linspace(0, 1, 32).reshape(1, 1, 1, 32).expand(1, 1, 32, 32).contiguous()
    assert (near_duplicates(smooth, "jpeg") - smooth).abs().max() < 0.05  # smooth images survive JPEG


def test_shift_flip_and_jitter_do_what_they_say():
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sf = near_duplicates(x, "shift+flip", seed=5)
    assert torch.equal(sf, near_duplicates(x, "shift", seed=5).flip(-1))
    j = near_duplicates(x, "jitter", seed=1)
    # Colour jitter keeps the picture: strongly correlated with its source, never equal to it.
    corr = torch.nn.functional.cosine_similarity((j - j.mean((1, 2, 3), keepdim=True)).flatten(1),
                                                 (x - x.mean((1, 2, 3), keepdim=True)).flatten(1))
    assert (corr > 0.8).all() and not torch.equal(j, x)


def test_labels_unchanged_and_same_points_for_every_kind():
    from forwardinf.experiments.leakage import leaked_queries

    split = load_digits()
    idx0, x0, y0 = leaked_queries(split, 16, seed=2, near="exact")
    for kind in ALL_KINDS:
        idx, x, y = leaked_queries(split, 16, seed=2, near=kind)
        assert torch.equal(idx, idx0) and torch.equal(y, split.y_train[idx]) and x.shape == x0.shape


def test_crop_flip_training_augmentation():
    x = torch.arange(4 * 1 * 6 * 6, dtype=torch.float32).reshape(4, 1, 6, 6) + 1  # no zeros inside
    a = crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(a, crop_flip(x, torch.Generator().manual_seed(0), pad=2)) and a.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(4):  # each output is some zero-padded crop, possibly mirrored
        crops = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(a[i], c) or torch.equal(a[i], c.flip(-1)) for c in crops)
    assert default_pad(32) == 4 and default_pad(28) == 4 and default_pad(8) == 1


def test_views_cover_shifts_and_mirrors():
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    v = views(x, shift=1, flip=True)
    assert v.shape == (3, 18, 2, 8, 8)
    assert torch.equal(v[:, 0], x) and torch.equal(v[:, 9], x.flip(-1))
    shifted = near_duplicates(x, "shift+flip", seed=0, strength=1)
    # The source's views contain the shifted, mirrored copy up to its replicated border.
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    for i in range(3):
        assert any(torch.equal(v[i, j][inner[1:]], shifted[i][inner[1:]]) for j in range(18))
    assert views(x, shift=0, flip=False).shape == (3, 1, 2, 8, 8)


def test_mix_assignment_and_flip_policy():
    kinds = assign_kinds(500, seed=0)
    assert set(kinds) == set(KINDS) - set(FLIP_KINDS)
    assert set(assign_kinds(500, seed=0, allow_flip=True)) == set(KINDS)
    assert assign_kinds(50, seed=1) == assign_kinds(50, seed=1)
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a = near_duplicates(x, "mix", seed=2)
    for i, k in enumerate(assign_kinds(40, seed=2)):
        if k in ("jpeg", "flip"):  # deterministic kinds: matches applying it alone
            assert torch.allclose(a[i], near_duplicates(x[i:i + 1], "jpeg")[0])
    assert not flip_is_sensible("digits") and not flip_is_sensible("MNIST")
    assert flip_is_sensible("cifar10") and flip_is_sensible("fashion-mnist")


def test_bad_input():
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="kind"):
        near_duplicates(x, "rotate")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        near_duplicates(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="strength"):
        near_duplicates(x, "noise", strength=-1)
    with pytest.raises(ValueError, match="JPEG quality"):
        near_duplicates(x, "jpeg", strength=200)
    with pytest.raises(ValueError, match="crop strength"):
        near_duplicates(x, "crop", strength=1.5)
    with pytest.raises(ValueError, match="floating"):
        near_duplicates(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    assert near_duplicates(torch.zeros(0, 1, 8, 8)).shape == (0, 1, 8, 8)
