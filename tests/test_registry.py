"""The method table: one definition per name, read the same way by every experiment."""
from __future__ import annotations

import pytest
import torch

import forwardinf as fi
from forwardinf.baselines.methods import FORWARD_INF, forward_inf_names, make_estimator, requirements
from forwardinf.models import build_model


def _mlp() -> torch.nn.Module:
    return build_model("mlp", (1, 8, 8), 10, seed=0).eval()


@pytest.mark.parametrize("name", forward_inf_names("classification", "image", checkpoints=True))
def test_every_classifier_variant_builds_with_its_keywords(name):
    est = make_estimator(name, _mlp(), fi.ClassificationTask())
    variant = FORWARD_INF[name]
    assert type(est) is variant.estimator and est.config == variant.config
    for key, value in variant.kw.items():
        assert getattr(est, key) == value, (name, key)
    assert requirements(name) == variant.needs


def test_the_experiments_read_the_registry():
    from forwardinf.experiments import diffusion, mislabel, setup

    assert set(setup.FORWARD_INF_VARIANTS) | set(setup.IMAGE_VARIANTS) == set(forward_inf_names("classification",
                                                                                                 "image"))
    assert all(setup.FORWARD_INF_VARIANTS[n] == FORWARD_INF[n].kw for n in setup.FORWARD_INF_VARIANTS)
    assert set(mislabel.FI_VARIANTS) == set(forward_inf_names(checkpoints=True))
    assert all(diffusion.VARIANTS[n].items() >= FORWARD_INF[n].kw.items() for n in diffusion.VARIANTS)
    # the configurations the experiments ran under their old labels
    margin = make_estimator("forward-inf-margin", _mlp())
    assert (margin.score, margin.optimizer, margin.lr, margin.steps) == ("margin", "nsgd", 1e-3, 1)
    assert FORWARD_INF["forward-inf-margin-cp"].kw == {"score": "margin"}
    assert FORWARD_INF["forward-inf-margin-cp"].needs == {"checkpoints"}
    assert diffusion.VARIANTS["forward-inf-diffusion"] == dict(score="margin", optimizer="adam", lr=3e-4, steps=3)
    assert diffusion.VARIANTS["forward-inf-diffusion-contrast"]["contrast"] is True
    # the library default is the same estimator under every route
    default = make_estimator("forward-inf", _mlp())
    plain = fi.ForwardINF(_mlp())
    assert all(getattr(default, k) == getattr(plain, k) for k in ("score", "optimizer", "lr", "steps"))


def test_unknown_names_are_refused_with_the_list():
    with pytest.raises(ValueError, match="forward-inf-margin"):
        requirements("forward-inf-bogus")


def test_the_classifier_experiments_refuse_other_protocols_variants():
    from forwardinf.experiments.setup import make_method

    for name in ("forward-inf-margin-cp", "forward-inf-diffusion", "forward-inf-trace"):
        with pytest.raises(ValueError, match="choose a classifier's"):
            make_method(name, _mlp(), None)
