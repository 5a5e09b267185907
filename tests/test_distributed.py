"""Sharding across torchrun ranks: the layout, automatic batch size, and 2 ranks == 1 process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import forwardinf as fi
from forwardinf.cli import main as cli_main
from forwardinf.distributed import (DistContext, activation_bytes, auto_batch_size, score_to_store, shard_dataset,
                                    shard_ranges, shards_of_rank)
from forwardinf.models import MLP


def test_shard_layout_does_not_depend_on_world_size():
    assert shard_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(8, 4) == [(0, 4), (4, 8)]
    for world in (1, 2, 3, 5):
        dealt = sorted(s for r in range(world) for s in shards_of_rank(7, r, world))
        assert dealt == list(range(7))  # every shard exactly once
    assert shards_of_rank(7, 1, 3) == [1, 4]
    with pytest.raises(ValueError, match="shard_size"):
        shard_ranges(10, 0)
    with pytest.raises(ValueError, match="rank 2 outside"):
        shards_of_rank(4, 2, 2)


def test_shard_dataset_views():
    x, y = torch.arange(20.0).view(10, 2), torch.arange(10)
    part = shard_dataset(TensorDataset(x, y), 3, 7)
    assert isinstance(part, TensorDataset) and torch.equal(part.tensors[0], x[3:7])
    assert part.tensors[0].data_ptr() == x[3].data_ptr()  # a view, no copy
    other = shard_dataset(Subset(TensorDataset(x, y), range(10)), 2, 4)
    assert [int(other[i][1]) for i in range(len(other))] == [2, 3]
    with pytest.raises(ValueError, match="outside"):
        shard_dataset(TensorDataset(x, y), 5, 11)


def test_activation_bytes_counts_every_module_output_and_the_inputs():
    model = MLP((1, 8, 8), 10, hidden=(32,))
    batch = (torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    # outputs: MLP 10 + Flatten 64 + Linear 32 + ReLU 32 + Linear 10 floats; inputs 64 floats + one int64
    assert activation_bytes(model, fi.ClassificationTask(), batch) == (10 + 64 + 32 + 32 + 10 + 64) * 4 + 8
    one = auto_batch_size(model, fi.ClassificationTask(), batch, n_models=1, budget_bytes=856 * 100)
    many = auto_batch_size(model, fi.ClassificationTask(), batch, n_models=4, budget_bytes=856 * 100)
    assert (one, many) == (100, 25)
    assert auto_batch_size(model, fi.ClassificationTask(), batch, n_models=1, budget_bytes=1) == 1
    assert auto_batch_size(model, fi.ClassificationTask(), batch, budget_bytes=2**40, max_batch=512) == 512


def test_one_process_store_equals_in_memory_estimator(tmp_path):
    torch.manual_seed(0)
    model = MLP((1, 6, 6), 5, hidden=(12,)).eval()
    x, y = torch.randn(90, 1, 6, 6), torch.randint(0, 5, (90,))
    est = fi.ForwardINF(model, fi.ClassificationTask(), score="loss", batch_size=30)
    run = score_to_store(est, (x, y), (x[:7], y[:7]), tmp_path, shard_size=30, query_block=3, k=4)
    direct = fi.ForwardINF(model, fi.ClassificationTask(), score="loss", batch_size=30).fit((x, y))
    # shards of 30 = batches of 30: the same arithmetic, so the very same numbers
    assert torch.equal(run.store.to_tensor(), direct.influence((x[:7], y[:7])))
    top = direct.top_k((x[:7], y[:7]), k=4)
    assert torch.equal(run.indices, top.indices) and torch.equal(run.scores, top.scores)
    assert run.stats.written == 3 * 3 and (run.rank, run.world_size) == (0, 1)
    assert not hasattr(est, "train_")  # the template is never fitted


def test_store_refuses_estimators_that_cannot_be_sharded(tmp_path):
    torch.manual_seed(0)
    model = MLP((1, 6, 6), 5, hidden=(12,)).eval()
    x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 5, (40,))
    for est in (fi.InfluenceFunction(model, solver="exact", damping=0.1),
                fi.ForwardINF(model, optimizer="kfac", score="influence")):  # curvature of the whole set
        assert not est.capabilities.shardable
        with pytest.raises(ValueError, match=f"{type(est).__name__} cannot be sharded.*at least 40"):
            score_to_store(est, (x, y), (x[:3], y[:3]), tmp_path / "refused", shard_size=20)
        assert not (tmp_path / "refused").exists()  # refused before anything is written
    # one shard: nothing is sharded, the scores are the whole fit's
    est = fi.InfluenceFunction(model, solver="exact", damping=0.1)
    run = score_to_store(est, (x, y), (x[:3], y[:3]), tmp_path / "one", shard_size=40, k=3)
    assert torch.equal(run.store.to_tensor(), est.fit((x, y)).influence((x[:3], y[:3])))
    assert fi.TracIn(model).capabilities.shardable and fi.ForwardINF(model).capabilities.shardable


def test_agree_in_one_process_reraises():
    ctx = DistContext()
    ctx.agree(None)
    with pytest.raises(KeyError):
        ctx.agree(KeyError("x"))


MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
''')


def _problem(tmp: Path) -> list[str]:
    from forwardinf.data.loaders import load_digits

    d = load_digits()
    np.savez(tmp / "digits.npz", x_train=d.x_train[:240].numpy(), y_train=d.y_train[:240].numpy(),
             x_test=d.x_test[:6].numpy(), y_test=d.y_test[:6].numpy())
    (tmp / "net.py").write_text(MODEL_FILE)
    return ["score", "--model", f"{tmp / 'net.py'}:model", "--train", f"{tmp / 'digits.npz'}:train",
            "--queries", f"{tmp / 'digits.npz'}:test", "--shard-size", "50", "--query-block", "4", "--k", "5",
            "--threads", "1", "--quiet"]


def test_two_torchrun_ranks_equal_one_process(tmp_path):
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun not available")
    args = _problem(tmp_path)
    assert cli_main(args + ["--out", str(tmp_path / "one")]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "forwardinf.cli", *args, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    one = sorted((tmp_path / "one" / "store" / "blocks").iterdir())
    two = sorted((tmp_path / "two" / "store" / "blocks").iterdir())
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 2 * 5
    for a, b in zip(one, two):  # bit-identical: each shard is computed the same way on any rank
        assert np.array_equal(np.load(a), np.load(b)), a.name
    assert (tmp_path / "one" / "topk.csv").read_text() == (tmp_path / "two" / "topk.csv").read_text()
    import json
    res = json.loads((tmp_path / "two" / "results.json").read_text())
    assert res["config"]["world_size"] == 2
    # rank 0 wrote shards 0, 2, 4 (3 shards x 2 query blocks); rank 1 the other two shards
    assert res["methods"]["forward-inf"]["blocks_written_rank0"] == 6
