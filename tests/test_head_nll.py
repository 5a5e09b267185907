"""frozen_head_nll: the NLL under a frozen output layer with a closed-form derivative, against
log_softmax(F.linear(h, W)) differentiated by autograd, in both modes and under vmap."""
import pytest
import torch
from torch.func import grad, jvp, vmap
from torch.nn import functional as F

from forwardinf.models.head_nll import frozen_head_nll
from forwardinf.tasks.language_model import IGNORE


def plain_nll(h, w, ids):
    logp = torch.log_softmax(F.linear(h, w).float(), dim=-1)
    is_t = ids != IGNORE
    return -logp.gather(-1, torch.where(is_t, ids, 0).unsqueeze(-1)).squeeze(-1) * is_t


def problem():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 4, 8, generator=gen, dtype=torch.float64)  # [B, A, H]
    w = torch.randn(50, 8, generator=gen, dtype=torch.float64)  # [V, H], frozen
    ids = torch.randint(0, 50, (3, 4), generator=gen)
    ids[0, 3] = ids[2, 1] = IGNORE
    tangents = torch.randn(5, 3, 4, 8, generator=gen, dtype=torch.float64)  # [Q, B, A, H]
    return h, w, ids, tangents


TOL = dict(rtol=1e-4, atol=1e-5)  # the NLL is taken in float32 (as TailTask's), the two derivatives round differently


def test_values_and_both_derivatives_match_autograd():
    h, w, ids, t = problem()
    assert torch.equal(frozen_head_nll(h, w, ids), plain_nll(h, w, ids))  # the same ops: identical values
    assert (frozen_head_nll(h, w, ids)[ids == IGNORE] == 0).all()

    def total(f):
        return lambda x: (f(x, w, ids) * torch.arange(1.0, 5.0, dtype=x.dtype)).sum()

    torch.testing.assert_close(grad(total(frozen_head_nll))(h), grad(total(plain_nll))(h), **TOL)
    per_example = vmap(grad(lambda x, y: frozen_head_nll(x, w, y).sum()))(h, ids)
    torch.testing.assert_close(per_example, vmap(grad(lambda x, y: plain_nll(x, w, y).sum()))(h, ids), **TOL)
    fwd = vmap(lambda v: jvp(lambda x: frozen_head_nll(x, w, ids), (h,), (v,))[1])(t)  # [Q, B, A]
    ref = vmap(lambda v: jvp(lambda x: plain_nll(x, w, ids), (h,), (v,))[1])(t)
    torch.testing.assert_close(fwd, ref, **TOL)
    assert fwd.shape == (5, 3, 4) and (fwd[:, ids == IGNORE] == 0).all()


def test_a_trainable_head_is_refused():
    h, w, ids, _ = problem()
    with pytest.raises(ValueError, match="frozen"):
        frozen_head_nll(h, w.requires_grad_(), ids)
