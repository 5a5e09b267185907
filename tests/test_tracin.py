"""TracIn against closed forms: 1-D regression by hand, last-layer variant by autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forwardinf.baselines import TracIn
from forwardinf.baselines.run import TrainingRun
from forwardinf.core.params import fingerprint
from forwardinf.tasks import Task


class SquaredLoss(Task):
    def loss(self, model, batch):
        x, y = batch
        return (model(x).squeeze(-1) - y) ** 2


def _line(w: float, b: float) -> dict:
    return {"weight": torch.tensor([[w]], dtype=torch.float64), "bias": torch.tensor([b], dtype=torch.float64)}


def _by_hand(ckpts, lrs, x, y, xq, yq, normalize=False):
    """``Σ_c η_c g_c(q)·g_c(i)`` with ``g = 2 (w x + b - y) [x, 1]`` for ``ℓ = (w x + b - y)²``."""
    total = 0
    for (w, b), lr in zip(ckpts, lrs):
        g = 2 * (w * x + b - y)[:, None] * torch.stack([x, torch.ones_like(x)], 1)
        gq = 2 * (w * xq + b - yq)[:, None] * torch.stack([xq, torch.ones_like(xq)], 1)
        if normalize:
            g, gq = g / g.norm(dim=1, keepdim=True), gq / gq.norm(dim=1, keepdim=True)
        total = total + lr * gq @ g.T
    return total


def _data():
    x = torch.tensor([-1.5, -0.3, 0.2, 0.9, 2.0], dtype=torch.float64)
    y = torch.tensor([-2.0, 0.1, 0.5, 1.7, 3.5], dtype=torch.float64)
    return x, y


def test_tracincp_equals_closed_form_on_1d_regression(tmp_path):
    x, y = _data()
    xq, yq = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([1.2, -1.1], dtype=torch.float64)
    ckpts = [(0.1, 0.0), (0.8, 0.2), (1.6, 0.1)]
    lrs = [0.5, 0.2, 0.05]
    model = nn.Linear(1, 1).double()
    before = fingerprint(model)
    # one checkpoint as a state dict, one as a file in the trainer's {"state_dict": ...} layout, one raw file
    torch.save({"state_dict": _line(*ckpts[1]), "meta": {}}, tmp_path / "c1.pt")
    torch.save(_line(*ckpts[2]), tmp_path / "c2.pt")
    est = TracIn(model, SquaredLoss(), run=TrainingRun(
        checkpoints=[_line(*ckpts[0]), tmp_path / "c1.pt", str(tmp_path / "c2.pt")], lrs=lrs)).fit((x[:, None], y))
    ref = _by_hand(ckpts, lrs, x, y, xq, yq)
    torch.testing.assert_close(est.influence((xq[:, None], yq)), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(est.influence((xq[:, None], yq), joint=True), ref.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(est.self_influence(), _by_hand(ckpts, lrs, x, y, x, y).diagonal(), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before, fingerprint(model)))  # never loaded into the model


def test_grad_dot_and_grad_cos_on_the_current_model():
    x, y = _data()
    model = nn.Linear(1, 1).double()
    w, b = float(model.weight.detach()), float(model.bias.detach())
    dot = TracIn(model, SquaredLoss()).fit((x[:, None], y))
    torch.testing.assert_close(dot.influence((x[:2, None], y[:2])), _by_hand([(w, b)], [1.0], x, y, x[:2], y[:2]))
    cos = TracIn(model, SquaredLoss(), normalize=True).fit((x[:, None], y))
    scores = cos.influence((x[:2, None], y[:2]))
    torch.testing.assert_close(scores, _by_hand([(w, b)], [1.0], x, y, x[:2], y[:2], normalize=True))
    assert scores.abs().max() <= 1 + 1e-12
    torch.testing.assert_close(scores[0, 0], torch.tensor(1.0, dtype=torch.float64))  # a point with itself


def test_last_layer_variant_matches_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(12, 3), torch.randint(0, 3, (12,))
    est = TracIn(model, params="last").fit((x, y))

    def last_grad(i):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        return torch.cat([model[2].weight.grad.reshape(-1), model[2].bias.grad])

    grads = torch.stack([last_grad(i) for i in range(12)])
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(est.influence((x[:4], y[:4])), grads[:4] @ grads.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(est.self_influence(), grads.pow(2).sum(1), rtol=1e-5, atol=1e-6)


def test_streaming_equals_cached_training_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(20, 3), torch.randint(0, 3, (20,))
    cached = TracIn(model, batch_size=6).fit((x, y)).influence((x[:3], y[:3]))
    streamed = TracIn(model, batch_size=6, cache_mb=1e-6).fit((x, y)).influence((x[:3], y[:3]))
    torch.testing.assert_close(cached, streamed)


def test_bad_checkpoints_are_refused(tmp_path):
    x, y = _data()
    model = nn.Linear(1, 1).double()
    with pytest.raises(ValueError, match="does not exist"):
        TracIn(model, SquaredLoss(), run=TrainingRun(checkpoints=[tmp_path / "missing.pt"])).fit((x[:, None], y))
    with pytest.raises(ValueError, match="lacks parameters"):
        TracIn(model, SquaredLoss(), run=TrainingRun(checkpoints=[{"weight": torch.ones(1, 1, dtype=torch.float64)}])).fit((x[:, None], y))
    with pytest.raises(ValueError, match="lrs"):
        TracIn(model, SquaredLoss(), run=TrainingRun(checkpoints=[_line(1, 0)], lrs=[0.1, 0.2])).fit((x[:, None], y))
    with pytest.raises(ValueError, match="shape"):
        TracIn(model, SquaredLoss(), run=TrainingRun(checkpoints=[{"weight": torch.ones(2, 1), "bias": torch.ones(1)}])).fit((x[:, None], y))


class TiedBag(nn.Module):
    """Bag-of-words classifier whose output layer shares the input embedding (GPT-2/T5 style)."""

    def __init__(self, vocab: int = 6, dim: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # one tensor under two names

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.embed(x).mean(1))))


def _tied_data():
    torch.manual_seed(0)
    return torch.randint(0, 6, (10, 4)), torch.randint(0, 6, (10,))


def _tied_grads(model, x, y):
    """``[n, D]`` autograd gradients of the shared weight (both of its uses)."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(model.embed.weight.grad.reshape(-1).clone())
    model.zero_grad(set_to_none=True)
    return torch.stack(rows)


@pytest.mark.parametrize("params", ["head", "last", "embed.weight", ["head.weight"]])
def test_tied_weights_are_one_parameter(params):
    model = TiedBag()
    x, y = _tied_data()
    before = fingerprint(model)
    ref = _tied_grads(model, x, y)
    est = TracIn(model, params=params).fit((x, y))
    torch.testing.assert_close(est.influence((x[:3], y[:3])), ref[:3] @ ref.T, rtol=1e-5, atol=1e-6)
    # a checkpoint of a tied model holds every alias (state_dict lists both names)
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    assert "head.weight" in ckpt and "embed.weight" in ckpt
    multi = TracIn(model, params=params, run=TrainingRun(checkpoints=[ckpt, ckpt], lrs=[1.0, 0.5])).fit((x, y))
    torch.testing.assert_close(multi.influence((x[:3], y[:3])), 1.5 * ref[:3] @ ref.T, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before, fingerprint(model)))


def test_tied_checkpoint_with_one_alias_or_disagreeing_aliases():
    model = TiedBag()
    x, y = _tied_data()
    other = TiedBag()
    with torch.no_grad():
        other.embed.weight.mul_(2.0)
        other.mix.weight.add_(0.1)
    ref = _tied_grads(other, x, y)
    only_head = {k: v for k, v in other.state_dict().items() if k != "embed.weight"}  # alias under the other name
    est = TracIn(model, params="head", run=TrainingRun(checkpoints=[only_head])).fit((x, y))
    torch.testing.assert_close(est.influence((x[:2], y[:2])), ref[:2] @ ref.T, rtol=1e-5, atol=1e-6)
    bad = {**other.state_dict(), "head.weight": torch.zeros(6, 3)}
    with pytest.raises(ValueError, match="ties"):
        TracIn(model, params="head", run=TrainingRun(checkpoints=[bad])).fit((x, y))


def test_indices_score_a_subset_from_one_fit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(20, 3), torch.randint(0, 3, (20,))
    idx = [7, 2, 2, 19]
    for cache_mb in (512.0, 1e-6):  # from the cached gradients, and computed for just these points
        for normalize in (False, True):
            est = TracIn(model, normalize=normalize, batch_size=6, cache_mb=cache_mb).fit((x, y))
            full = est.influence((x[:3], y[:3]))
            torch.testing.assert_close(est.influence((x[:3], y[:3]), indices=idx), full[:, idx])
            torch.testing.assert_close(est.influence((x[:3], y[:3]), joint=True, indices=torch.tensor(idx)),
                                       est.influence((x[:3], y[:3]), joint=True)[idx])
    for bad in ([], [[1, 2]], [0.5], [20], [-1]):
        with pytest.raises(ValueError, match="indices"):
            est.influence((x[:1], y[:1]), indices=bad)


class DictTask(Task):
    """Cross-entropy of a bag-of-embeddings model on dict batches with a float padding mask."""

    def loss(self, model, batch):
        mask = batch["mask"]
        return F.cross_entropy(model(batch["ids"], mask), batch["label"], reduction="none")


class MaskedBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, ids, mask):
        h = (self.embed(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.out(h)


def test_dict_queries_may_be_padded_differently_and_dicts_are_data():
    torch.manual_seed(0)
    model = MaskedBag()
    ids, label = torch.randint(1, 8, (6, 5)), torch.randint(0, 3, (6,))
    mask = torch.ones(6, 5)
    mask[:, 3:] = 0  # the last two columns are padding
    train = {"ids": ids, "mask": mask, "label": label}
    narrow = {"ids": ids[:2, :3], "mask": mask[:2, :3], "label": label[:2]}  # same queries, less padding
    est = TracIn(model, DictTask()).fit(train)
    torch.testing.assert_close(est.influence(narrow), est.influence({k: v[:2] for k, v in train.items()}))
    with pytest.raises(ValueError, match="fields"):
        est.influence({"ids": ids[:2], "mask": mask[:2, :, None], "label": label[:2]})
    with pytest.raises(ValueError, match="different lengths"):
        TracIn(model, DictTask()).fit({"ids": ids, "mask": mask[:5], "label": label})
