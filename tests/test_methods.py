"""The method table is the one place a method name is defined.

Read from the source (``ast``): every string literal of the library that equals a method name is
collected, docstrings left out. Library code (everything but the experiments and the command
line, which pick names from the table for their defaults and help) may spell a name only in
``forwardinf.baselines.methods``, and there only once.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import forwardinf as fi
from forwardinf.baselines.methods import (FORWARD_INF, METHODS, PEER_METHODS, PEERS, REFERENCE_METHODS, TABLE,
                                         make_estimator)

SRC = Path(__file__).resolve().parents[1] / "src" / "forwardinf"
TABLE_MODULE = SRC / "baselines" / "methods.py"
# Modules that choose among the names (defaults, help texts), not define them.
USERS = ("experiments", "cli.py")
# A name that is also something else: "trak" is the peer package traker's import name.
ALSO_PACKAGES = {cls.package for cls in PEERS.values()}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _spellings() -> dict[str, list[str]]:
    """``{name: ["module:line", ...]}`` for every literal equal to a table name, outside docstrings."""
    found = defaultdict(list)
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(USERS):
            continue
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in TABLE
                    and id(node) not in skip and not (node.value in ALSO_PACKAGES and path != TABLE_MODULE)):
                found[node.value].append(f"{rel}:{node.lineno}")
    return found


def test_each_method_name_is_defined_once_in_the_table():
    spellings = _spellings()
    elsewhere = {n: s for n, s in spellings.items() if any(not p.startswith("baselines/methods.py") for p in s)}
    assert not elsewhere, f"method names spelled outside forwardinf.baselines.methods: {elsewhere}"
    twice = {n: s for n, s in spellings.items() if len(s) > 1}
    assert not twice, f"method names spelled more than once in the table: {twice}"


def test_the_views_partition_the_table():
    views = [*FORWARD_INF, *METHODS[1:], *PEER_METHODS, *REFERENCE_METHODS]
    assert sorted(views) == sorted(TABLE) and len(set(views)) == len(views)
    assert METHODS[0] == "forward-inf" and fi.make_estimator is make_estimator


def _problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A small trained digits MLP and 40 of its training points."""
    from forwardinf.data.loaders import load_digits
    from forwardinf.models import build_model

    d = load_digits(seed=0)
    x, y = d.x_train[:40], d.y_train[:40]
    return build_model("mlp", (1, 8, 8), 10, seed=0).eval(), x, y


@pytest.mark.parametrize("name", ["tracin-3", "hydra", "tmc-shapley"])
def test_old_catch_all_keywords_warn_and_mean_the_same_run(name):
    model, x, y = _problem()
    states = [{k: v + 0.01 * c for k, v in model.state_dict().items()} for c in range(3)]
    rec = fi.TrajectoryRecorder(model)
    rec.record(torch.arange(40), lr=0.1)
    kw = {"permutations": 2} if name == "tmc-shapley" else {}
    new = fi.make_estimator(name, model, run=fi.TrainingRun(checkpoints=states, trajectory=rec), **kw)
    with pytest.warns(DeprecationWarning, match="run=TrainingRun"):
        old = fi.make_estimator(name, model, checkpoints=states, trajectory=rec, **kw)
    assert torch.equal(old.fit((x, y)).influence((x[:2], y[:2])), new.fit((x, y)).influence((x[:2], y[:2])))


def test_a_run_is_checked_on_construction():
    with pytest.raises(ValueError, match="2 lrs for 3 checkpoints"):
        fi.TrainingRun(checkpoints=[{}, {}, {}], lrs=[1.0, 2.0])
    with pytest.raises(ValueError, match="train_fn must be callable"):
        fi.TrainingRun(train_fn="not a function")
    with pytest.raises(ValueError, match="LeaveOneOut needs run=TrainingRun"):
        fi.LeaveOneOut()
    with pytest.raises(ValueError, match="hydra needs trajectory="):
        fi.make_estimator("hydra", torch.nn.Linear(2, 2), run=fi.TrainingRun(checkpoints=[{}]))
    with pytest.raises(TypeError, match="run must be a TrainingRun"):
        fi.TracIn(torch.nn.Linear(2, 2), run=[{}])
