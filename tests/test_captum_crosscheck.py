"""Our TracInCP equals captum.influence.TracInCP (optional: skipped without captum)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

captum_influence = pytest.importorskip("captum.influence")

from forwardinf.baselines import TracIn  # noqa: E402
from forwardinf.baselines.run import TrainingRun  # noqa: E402


@pytest.mark.parametrize("layers", [None, ["2"]])
def test_tracincp_equals_captum(tmp_path, layers):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    xq, yq = torch.randn(3, 4), torch.randint(0, 3, (3,))
    lrs = {}
    paths = []
    for c, lr in enumerate([0.3, 0.2, 0.1]):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        path = str(tmp_path / f"ckpt{c}.pt")
        torch.save(model.state_dict(), path)
        lrs[path] = lr
        paths.append(path)

    def load(m: nn.Module, path: str) -> float:
        m.load_state_dict(torch.load(path, weights_only=True))
        return lrs[path]

    theirs = captum_influence.TracInCP(
        copy.deepcopy(model), TensorDataset(x, y), paths, checkpoints_load_func=load, layers=layers,
        loss_fn=nn.CrossEntropyLoss(reduction="none"), batch_size=5, sample_wise_grads_per_batch=False,
    ).influence((xq, yq))
    ours = TracIn(model, run=TrainingRun(checkpoints=paths, lrs=[lrs[p] for p in paths]),
                  params=None if layers is None else "last", batch_size=5).fit((x, y)).influence((xq, yq))
    assert ours.shape == theirs.shape == (3, 16)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-6)
