"""Score store: blocks on disk, manifest checks, streaming top-k, and resuming a killed run."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import forwardinf as fi
from forwardinf.distributed import score_to_store
from forwardinf.storage import (ScoreStore, StoreMismatchError, StreamingTopK, TopK, make_manifest, read_topk_csv,
                                write_topk)


def _manifest(**kw):
    base = dict(model="m0", train="t0", queries="q0", n_train=10, n_query=5, shard_size=4, query_block=2,
                config={"lr": 0.001, "score": "cosine"})
    return make_manifest(**{**base, **kw})


# ------------------------------------------------------------------------------ streaming top-k
def test_streaming_topk_matches_full_topk_in_any_block_order():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 103, generator=g)
    scores[:, 50] = scores[:, 10]  # exact ties: the lower index must win
    bounds = [(0, 13), (13, 40), (40, 41), (41, 103)]
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        top = StreamingTopK(7, 5)
        for b in order:
            a, z = bounds[b]
            top.update(scores[:, a:z], a)
        idx, val = top.result()
        ref_val, _ = scores.topk(5, dim=1)
        assert torch.equal(val, ref_val)
        assert torch.equal(scores.gather(1, idx), val)
        for q in range(7):
            if 10 in idx[q] or 50 in idx[q]:
                assert 10 in idx[q] and (50 not in idx[q] or list(idx[q]).index(10) < list(idx[q]).index(50))


def test_streaming_topk_k_larger_than_columns_and_nan_refused():
    top = StreamingTopK(2, 10)
    top.update(torch.tensor([[1.0, 3.0], [2.0, 2.0]]), 5)
    idx, val = top.result()
    assert idx.tolist() == [[6, 5], [5, 6]] and val.shape == (2, 2)
    with pytest.raises(ValueError, match="NaN"):
        top.update(torch.tensor([[float("nan")], [0.0]]), 7)


# ------------------------------------------------------------------------------------- store
def test_store_blocks_are_memory_mapped_and_assemble(tmp_path):
    full = torch.arange(50, dtype=torch.float32).reshape(5, 10)
    store = ScoreStore.create(tmp_path / "s", _manifest())
    assert (store.n_query_blocks, store.n_shards) == (3, 3)
    assert store.missing()[:2] == [(0, 0), (1, 0)]  # shard-major
    for qb, s in store.missing():
        (q0, q1), (t0, t1) = store.query_range(qb), store.shard_range(s)
        store.write(qb, s, full[q0:q1, t0:t1])
    assert store.complete and isinstance(store.read(2, 2), np.memmap)
    assert store.read(2, 2).shape == (1, 2)
    assert torch.equal(store.to_tensor(), full)
    assert torch.equal(store.rows(1, 4), full[1:4])
    idx, val = store.top_k(3)
    assert idx.tolist() == [[9, 8, 7]] * 5 and torch.equal(val, full[:, [9, 8, 7]])
    assert store.top_k(2, opponents=True).indices.tolist() == [[0, 1]] * 5  # the lowest scores
    assert not [p for p in (tmp_path / "s" / "blocks").iterdir() if "tmp" in p.name]
    with pytest.raises(ValueError, match="shape"):
        store.write(0, 0, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        store.write(0, 0, torch.full((2, 4), float("inf")))


def test_store_proponents_and_opponents_with_ties_match_a_full_sort(tmp_path):
    g = torch.Generator().manual_seed(1)
    full = torch.randint(-3, 4, (5, 10), generator=g).float()  # many exact ties, across shards
    store = ScoreStore.create(tmp_path, _manifest())
    for qb, s in store.missing():
        (q0, q1), (t0, t1) = store.query_range(qb), store.shard_range(s)
        store.write(qb, s, full[q0:q1, t0:t1])
    for opponents, order in ((False, torch.argsort(-full, dim=1, stable=True)),
                             (True, torch.argsort(full, dim=1, stable=True))):
        top = store.top_k(6, opponents=opponents)  # ties to the lower index: a stable sort's order
        assert isinstance(top, TopK)
        assert torch.equal(top.indices, order[:, :6]) and torch.equal(top.scores, full.gather(1, order[:, :6]))
        other = torch.argsort(full, dim=1, stable=True) if not opponents else torch.argsort(-full, dim=1, stable=True)
        assert torch.equal(top.opponents, other[:, :6]) and torch.equal(top.opponent_scores, full.gather(1, other[:, :6]))


def test_incomplete_store_says_so(tmp_path):
    store = ScoreStore.create(tmp_path, _manifest())
    store.write(0, 0, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="incomplete: 8 of 9 blocks missing"):
        store.top_k(2)


@pytest.mark.parametrize("field, value, words", [
    ("model", "m1", "model fingerprint"),
    ("train", "t1", "training-set fingerprint"),
    ("queries", "q1", "query-set fingerprint"),
    ("shard_size", 5, "shard size"),
    ("config", {"lr": 0.01, "score": "cosine"}, "configuration differs (lr: store 0.001 != now 0.01)"),
])
def test_mismatched_store_is_refused(tmp_path, field, value, words):
    ScoreStore.create(tmp_path, _manifest())
    with pytest.raises(StoreMismatchError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ScoreStore.create(tmp_path, _manifest(**{field: value}))
    ScoreStore.create(tmp_path, _manifest())  # the same manifest reopens fine
    store = ScoreStore.create(tmp_path, _manifest(**{field: value}), overwrite=True)
    assert store.manifest[field] == value or field == "config"


def test_other_version_and_foreign_folder_refused(tmp_path):
    ScoreStore.create(tmp_path / "a", _manifest())
    saved = json.loads((tmp_path / "a" / "manifest.json").read_text())
    saved["version"] = "0.0.1"
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(saved))
    with pytest.raises(StoreMismatchError, match="forwardinf version: store has '0.0.1'"):
        ScoreStore.create(tmp_path / "a", _manifest())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(StoreMismatchError, match="not a score store"):
        ScoreStore.create(tmp_path / "b", _manifest())
    with pytest.raises(FileNotFoundError):
        ScoreStore.open(tmp_path / "c")


def test_store_refuses_other_model_data_or_config_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,))
    est = fi.ForwardINF(model, fi.ClassificationTask(), score="loss")
    score_to_store(est, (x, y), (x[:3], y[:3]), tmp_path, shard_size=16, query_block=2)
    with pytest.raises(StoreMismatchError, match="training-set fingerprint"):
        score_to_store(est, (x + 1e-3, y), (x[:3], y[:3]), tmp_path, shard_size=16, query_block=2)
    with pytest.raises(StoreMismatchError, match="configuration differs.*lr"):
        score_to_store(fi.ForwardINF(model, fi.ClassificationTask(), score="loss", lr=0.5), (x, y), (x[:3], y[:3]),
                       tmp_path, shard_size=16, query_block=2)
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    with pytest.raises(StoreMismatchError, match="model fingerprint"):
        score_to_store(fi.ForwardINF(other, fi.ClassificationTask(), score="loss"), (x, y), (x[:3], y[:3]),
                       tmp_path, shard_size=16, query_block=2)


# ------------------------------------------------------------------------------------ resume
JOB = textwrap.dedent('''
    import os, signal, sys
    import torch
    import forwardinf as fi
    from forwardinf.distributed import score_to_store

    def problem():
        g = torch.Generator().manual_seed(3)
        x, y = torch.randn(150, 1, 6, 6, generator=g), torch.randint(0, 4, (150,), generator=g)
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 12), torch.nn.Tanh(),
                                    torch.nn.Linear(12, 4)).eval()
        return fi.ForwardINF(model, fi.ClassificationTask(), n_directions=4, batch_size=32), (x, y), (x[:5], y[:5])

    def run(store, kill_after=None):
        est, train, queries = problem()
        done = []
        def on_block(qb, s):
            done.append((qb, s))
            if kill_after is not None and len(done) == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a real crash
        return score_to_store(est, train, queries, store, shard_size=40, query_block=2, k=4, on_block=on_block)

    if __name__ == "__main__":
        torch.set_num_threads(1)
        run(sys.argv[1], int(sys.argv[2]))
''')


def test_run_killed_midway_resumes_to_identical_results(tmp_path):
    path = tmp_path / "job.py"
    path.write_text(JOB)
    spec = importlib.util.spec_from_file_location("resume_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)

    killed = subprocess.run([sys.executable, str(path), str(tmp_path / "store"), "5"], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    blocks = sorted(p.name for p in (tmp_path / "store" / "blocks").iterdir())
    assert len(blocks) == 5 and all(b.endswith(".npy") for b in blocks)  # whole blocks only

    resumed = job.run(tmp_path / "store")
    assert (resumed.stats.reused, resumed.stats.written) == (5, 12 - 5)
    fresh = job.run(tmp_path / "fresh")
    assert fresh.stats.written == 12
    assert torch.equal(resumed.store.to_tensor(), fresh.store.to_tensor())
    assert torch.equal(resumed.indices, fresh.indices) and torch.equal(resumed.scores, fresh.scores)
    # and both are what the in-memory estimator gives
    est, train, queries = job.problem()
    direct = est.fit(train).influence(queries)
    # (shard edges change batch boundaries, hence float rounding, not the result)
    torch.testing.assert_close(fresh.store.to_tensor(), direct, rtol=0, atol=1e-4)
    assert torch.equal(fresh.indices[:, 0], direct.argmax(1))


# -------------------------------------------------------------------------------- top-k table
def test_topk_table_round_trip(tmp_path):
    idx = torch.tensor([[3, 1], [0, 2]])
    val = torch.tensor([[0.5, 0.25], [1 / 3, -2.0]])
    path = write_topk(tmp_path / "t.csv", idx, val, train_ids=["a", "b", "c", "d"])
    lines = path.read_text().splitlines()
    assert lines[0] == "query,rank,train_index,score,train_id" and lines[1].endswith(",d")
    i2, v2 = read_topk_csv(path)
    assert torch.equal(i2, idx) and torch.equal(v2, val)
    with pytest.raises(ValueError, match="fmt"):
        write_topk(tmp_path / "t.x", idx, val, fmt="xlsx")


def test_topk_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    idx, val = torch.tensor([[2, 0]]), torch.tensor([[1.0, 0.5]])
    table = pq.read_table(write_topk(tmp_path / "t.parquet", idx, val, fmt="parquet")).to_pydict()
    assert table["train_index"] == [2, 0] and table["rank"] == [1, 2]
