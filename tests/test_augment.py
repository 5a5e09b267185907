"""Near-duplicate augmentations: shape, reproducibility, and each kind does what it says."""
from __future__ import annotations

import pytest
import torch

from forwardinf.data.augment import (ALL_KINDS, KINDS, _dct_matrix, assign_kinds, flip_is_sensible,
                                     near_duplicates)
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
    if kind in ("noise", "mix", "shift", "crop"):
        assert not torch.equal(a, near_duplicates(x, kind, seed=4))


def test_every_image_changes_but_stays_close(digits):
    x = digits
    other = x.roll(1, dims=0)  # a different training image, for scale
    for kind in ("shift", "crop", "noise", "jpeg", "mix"):
        a = near_duplicates(x, kind, seed=0)
        d_self = (a - x).flatten(1).norm(dim=1)
        d_other = (other - x).flatten(1).norm(dim=1)
        assert (d_self > 1e-6).all(), kind  # a near duplicate, never an exact one
        if kind in ("noise", "jpeg"):
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
    a = near_duplicates(x, "noise", seed=0, strength=0.2)
    ratio = (a - x).flatten(1).std(dim=1) / x.flatten(1).std(dim=1)
    assert abs(ratio.mean().item() - 0.2) < 0.01


def test_jpeg_properties():
    d = _dct_matrix(8)
    assert torch.allclose(d @ d.T, torch.eye(8, dtype=torch.float64), atol=1e-12)  # orthonormal
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    mild = (near_duplicates(x, "jpeg", strength=0.2) - x).norm()
    coarse = (near_duplicates(x, "jpeg", strength=4.0) - x).norm()
    assert 0 < mild < coarse  # larger strength = coarser quantisation
    smooth = torch.linspace(0, 1, 32).reshape(1, 1, 1, 32).expand(1, 1, 32, 32).contiguous()
    # Smooth images keep most of their energy in low frequencies: little loss at quality ~50.
    assert (near_duplicates(smooth, "jpeg") - smooth).abs().max() < 0.05


def test_mix_assignment_and_flip_policy():
    kinds = assign_kinds(500, seed=0)
    assert "flip" not in kinds and set(kinds) == set(KINDS) - {"flip"}
    assert set(assign_kinds(500, seed=0, allow_flip=True)) == set(KINDS)
    assert assign_kinds(50, seed=1) == assign_kinds(50, seed=1)
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a = near_duplicates(x, "mix", seed=2)
    for i, k in enumerate(assign_kinds(40, seed=2)):
        if k == "jpeg":  # deterministic kind: matches applying it alone
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
    with pytest.raises(ValueError, match="crop strength"):
        near_duplicates(x, "crop", strength=1.5)
    with pytest.raises(ValueError, match="floating"):
        near_duplicates(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    assert near_duplicates(torch.zeros(0, 1, 8, 8)).shape == (0, 1, 8, 8)
