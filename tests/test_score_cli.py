"""``forwardinf score`` on a user's own model and data: every model and data form, end to end."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

import forwardinf as fi
from forwardinf.cli import main as cli_main
from forwardinf.data.loaders import load_digits
from forwardinf.scoring import ImageFolder, ScriptedModule
from forwardinf.storage import ScoreStore, read_topk_csv

NET = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def trained():
        from forwardinf.data.loaders import load_digits
        from forwardinf.training import train_classifier
        d = load_digits()
        return train_classifier(build(), (d.x_train[:200], d.y_train[:200]), epochs=3, lr=0.05, seed=0)

    def queries():
        from forwardinf.data.loaders import load_digits
        d = load_digits()
        return d.x_train[:4].clone(), d.y_train[:4].clone()
''')


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A user's folder: net.py (model builders), train.npz, and the trained model as state dict + TorchScript."""
    tmp = tmp_path_factory.mktemp("user")
    (tmp / "net.py").write_text(NET)
    d = load_digits()
    np.savez(tmp / "train.npz", inputs=d.x_train[:200].numpy(), targets=d.y_train[:200].numpy())
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    from forwardinf.scoring import load_object
    model = load_object(f"{tmp / 'net.py'}:trained", "--model")().eval()
    torch.set_num_threads(saved)
    torch.save(model.state_dict(), tmp / "weights.pt")
    torch.jit.save(torch.jit.script(model), tmp / "scripted.pt")
    batch = torch.export.Dim("batch")
    torch.export.save(torch.export.export(model, (d.x_train[:2],), dynamic_shapes=({0: batch},)), tmp / "exported.pt2")
    return tmp, model


def _args(tmp, out, *extra):
    return ["score", "--train", str(tmp / "train.npz"), "--queries", f"{tmp / 'net.py'}:queries",
            "--shard-size", "64", "--query-block", "2", "--k", "5", "--out", str(out), "--quiet", *extra]


def test_state_dict_checkpoint_gives_the_estimators_top_k(user):
    tmp, model = user
    out = tmp / "run_ckpt"
    assert cli_main(_args(tmp, out, "--model", str(tmp / "weights.pt"), "--arch", f"{tmp / 'net.py'}:build")) == 0
    idx, val = read_topk_csv(out / "topk.csv")
    d = load_digits()
    est = fi.ForwardINF(model, fi.ClassificationTask(), batch_size=64, query_chunk=16, seed=0)
    top = est.fit((d.x_train[:200], d.y_train[:200])).top_k((d.x_train[:4], d.y_train[:4]), k=5)
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(val, top.scores, rtol=0, atol=1e-4)  # batch 64 = shard 64 here; the rest is rounding
    assert idx[:, 0].tolist() == [0, 1, 2, 3]  # queries duplicate training points 0..3
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == "score" and set(res["methods"]) == {"forward-inf"}
    assert res["methods"]["forward-inf"]["seconds"] > 0 and res["methods"]["forward-inf"]["n_train"] == 200
    assert ScoreStore.open(out / "store").complete and (out / "report.md").is_file()


def test_torchscript_and_callable_models_agree(user):
    tmp, _ = user
    script = tmp / "run_script"
    call = tmp / "run_callable"
    assert cli_main(_args(tmp, script, "--model", str(tmp / "scripted.pt"))) == 0
    assert cli_main(_args(tmp, call, "--model", f"{tmp / 'net.py'}:trained")) == 0
    a = ScoreStore.open(script / "store").to_tensor()
    b = ScoreStore.open(call / "store").to_tensor()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert torch.equal(read_topk_csv(script / "topk.csv")[0][:, :2], read_topk_csv(call / "topk.csv")[0][:, :2])


def test_exported_program_gives_the_callables_scores(user):
    tmp, _ = user
    exported, call = tmp / "run_exported", tmp / "run_callable_2"
    assert cli_main(_args(tmp, exported, "--model", str(tmp / "exported.pt2"))) == 0
    assert cli_main(_args(tmp, call, "--model", f"{tmp / 'net.py'}:trained")) == 0
    a = ScoreStore.open(exported / "store").to_tensor()
    b = ScoreStore.open(call / "store").to_tensor()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_scripted_module_runs_under_torch_func(user):
    tmp, model = user
    wrapped = ScriptedModule(torch.jit.load(str(tmp / "scripted.pt")))
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in model.named_parameters()]
    x, y = load_digits().x_train[:3], load_digits().y_train[:3]
    task = fi.ClassificationTask()
    g1 = torch.func.grad(lambda p: task.query_loss(fi.core.params.bind(wrapped, p), (x, y)))(dict(wrapped.named_parameters()))
    g2 = torch.func.grad(lambda p: task.query_loss(fi.core.params.bind(model, p), (x, y)))(dict(model.named_parameters()))
    for k in g2:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-6)


def test_tail_mode_and_params_give_the_same_table(user):
    tmp, _ = user
    model = ["--model", f"{tmp / 'net.py'}:trained", "--batch-size", "64"]  # (auto would size them differently)
    assert cli_main(_args(tmp, tmp / "run_tail", *model, "--tail", "4")) == 0
    assert cli_main(_args(tmp, tmp / "run_params", *model, "--option", "forward-inf.params=['4','6']")) == 0
    assert (tmp / "run_tail" / "topk.csv").read_text() == (tmp / "run_params" / "topk.csv").read_text()
    assert cli_main(_args(tmp, tmp / "run_disk", *model, "--tail", "4", "--tail-cache", "disk")) == 0
    assert (tmp / "run_disk" / "topk.csv").read_text() == (tmp / "run_tail" / "topk.csv").read_text()


def test_image_folders_with_unlabelled_queries(user, tmp_path):
    from PIL import Image

    tmp, model = user
    d = load_digits()
    pixels = (d.denormalize(d.x_train[:30]) * 255).round().to(torch.uint8)
    for i in range(30):
        folder = tmp_path / "train" / f"class{int(d.y_train[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i, 0].numpy(), mode="L").save(folder / f"{i:03d}.png")
    (tmp_path / "queries").mkdir()
    for i in (3, 7):
        Image.fromarray(pixels[i, 0].numpy(), mode="L").save(tmp_path / "queries" / f"q{i}.png")
    data = ImageFolder(tmp_path / "train")
    x0, y0 = data[0]
    assert x0.shape == (1, 8, 8) and 0 <= float(x0.min()) and float(x0.max()) <= 1
    assert data.classes == sorted(data.classes) and int(y0) == 0
    out = tmp_path / "out"
    code = cli_main(["score", "--model", f"{tmp / 'net.py'}:trained", "--train", str(tmp_path / "train"),
                     "--queries", str(tmp_path / "queries"), "--k", "3", "--out", str(out), "--quiet"])
    assert code == 0
    lines = (out / "topk.csv").read_text().splitlines()
    assert lines[0] == "query,rank,train_index,score,train_id"
    assert lines[1].startswith("q3.png,1,") and len(lines) == 1 + 2 * 3
    assert all(line.split(",")[-1].startswith("class") for line in lines[1:])


def test_mismatched_store_is_refused_by_the_cli(user, capsys):
    tmp, _ = user
    out = tmp / "run_mismatch"
    model = ["--model", f"{tmp / 'net.py'}:trained"]
    assert cli_main(_args(tmp, out, *model)) == 0
    assert cli_main(_args(tmp, out, *model, "--option", "forward-inf.lr=0.01")) == 2
    err = capsys.readouterr().err
    assert "configuration differs" in err and "lr: store 0.001 != now 0.01" in err and "--overwrite" in err
    assert cli_main(_args(tmp, out, *model, "--option", "forward-inf.lr=0.01", "--overwrite")) == 0


def test_bad_specs_fail_clearly(user, capsys):
    tmp, _ = user
    assert cli_main(_args(tmp, tmp / "bad1", "--model", str(tmp / "weights.pt"))) == 2
    assert "not a TorchScript file" in capsys.readouterr().err
    (tmp / "broken.pt2").write_bytes(b"not a program")
    assert cli_main(_args(tmp, tmp / "bad0", "--model", str(tmp / "broken.pt2"))) == 2
    assert "not a torch.export program" in capsys.readouterr().err
    assert cli_main(_args(tmp, tmp / "bad2", "--model", "no_such_module_xyz:build")) == 2
    assert "cannot import module 'no_such_module_xyz'" in capsys.readouterr().err
    assert cli_main(["score", "--model", f"{tmp / 'net.py'}:trained", "--out", str(tmp / "bad3")]) == 2
    assert "give --model, --train and --queries" in capsys.readouterr().err
    assert cli_main(_args(tmp, tmp / "bad4", "--model", f"{tmp / 'net.py'}:trained", "--train",
                          str(tmp / "nothing.npz"))) == 2
    assert "nothing.npz: no such file or folder" in capsys.readouterr().err
    np.savez(tmp / "odd.npz", a=np.zeros(3))
    assert cli_main(_args(tmp, tmp / "bad5", "--model", f"{tmp / 'net.py'}:trained", "--train", str(tmp / "odd.npz"))) == 2
    assert "no arrays inputs/targets or x/y or X/y; it holds ['a']" in capsys.readouterr().err
    # K-FAC's curvature comes from the whole training set: 200 points in shards of 64 are refused
    assert cli_main(_args(tmp, tmp / "bad6", "--model", f"{tmp / 'net.py'}:trained", "--preset", "counterfactual")) == 2
    assert "ForwardINF cannot be sharded" in capsys.readouterr().err


def test_score_moved_out_of_experiments_keeps_its_names():
    """``score`` lives in forwardinf.scoring; the old module name still gives the same objects."""
    from forwardinf import scoring
    from forwardinf.cli import COMMANDS, build_parser
    from forwardinf.experiments import EXPERIMENTS
    from forwardinf.experiments import score as old

    assert COMMANDS["score"] == "forwardinf.scoring.command" and "score" not in EXPERIMENTS
    assert old.load_object is scoring.load_object and old.ImageFolder is scoring.ImageFolder
    assert build_parser().parse_args(["score"])._module.run is old.run


def test_old_spellings_are_refused_with_the_new_one(capsys):
    for argv, new in [(["score", "--lr", "0.1"], "--option forward-inf.lr=VALUE"),
                      (["score", "--params", "fc", "x"], "--option forward-inf.params=VALUE"),
                      (["diffusion", "--score", "loss"], "--option forward-inf-diffusion.score=VALUE"),
                      (["hypothesis", "--weight-decay", "0"], "--train-weight-decay"),
                      (["hypothesis", "--fi-steps", "3"], "--option forward-inf-group.steps=VALUE")]:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{argv[1]} is now {new}" in err, err
