"""split="auto": the tail starts after the last feature-extracting call, on layouts we did not build."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import forwardinf as fi
from forwardinf.estimators.split import auto_split, candidates
from forwardinf.estimators.tail import split_model
from forwardinf.models import build_model


class Flat(nn.Module):  # a user's CNN: flat top-level layers, functional pooling, no grouping
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 2 * 2, 16), nn.Linear(16, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class NormHead(nn.Module):  # a head with a LayerNorm K-FAC does not cover
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc1, self.norm, self.fc2 = nn.Linear(2 * 6 * 6, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(torch.flatten(self.conv(x), 1))))


@pytest.mark.parametrize("model,expected", [
    (Flat(), "fc1"),
    (build_model("flatcnn", (1, 8, 8), 10, width=4), "fc1"),
    (build_model("cnn", (1, 8, 8), 10, width=4), "classifier.0"),
    (build_model("resnet18", (3, 8, 8), 10, width=4), "fc"),
    (build_model("mlp", (1, 8, 8), 10, hidden=(16, 16)), "1"),  # no extractor: the whole MLP
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 5),
                   nn.ReLU(), nn.Linear(5, 3)), "4"),
])
def test_auto_split_picks_the_dense_head(model, expected):
    example = torch.randn(2, *((3, 8, 8) if isinstance(model, fi.models.ResNet) else (1, 8, 8)))
    name, split = auto_split(model.eval(), example, split_model, kfac=True)
    assert name == expected
    with torch.no_grad():
        torch.testing.assert_close(split.tail(split.features(example)), model(example))


def test_kfac_moves_the_start_past_uncovered_layers():
    assert candidates(NormHead()) == ["fc1", "norm", "fc2"]
    assert candidates(NormHead(), kfac=True) == ["fc2"]


def test_untraceable_model_gets_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent: fx cannot trace it

    with pytest.raises(ValueError, match="split='auto'"):
        auto_split(Branchy(), torch.randn(2, 4), split_model)


def test_auto_tail_scores_equal_the_full_engine_on_the_head():
    torch.manual_seed(0)
    model, task = Flat().eval(), fi.ClassificationTask()
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 3, (40,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    est = fi.TailForwardINF(model, task, split="auto", config=fi.ForwardINFConfig.preset("counterfactual")).fit((x, y))
    assert est.split_name_ == "fc1"
    full = fi.ForwardINF.preset("counterfactual", model, task, params=["fc1.*", "fc2.*"]).fit((x, y))
    torch.testing.assert_close(est.influence((x[:3], y[:3])), full.influence((x[:3], y[:3])), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
