"""Loading the user's model and data for ``forwardinf score`` (and for anyone scripting it).

The forms a model or data set may take (a ``module:callable``, a ``torch.export`` program, a
TorchScript file, a state-dict checkpoint with its architecture; an image folder, an .npz file, a
built-in dataset ``NAME:train|test``) are listed in ``forwardinf score --help``
(:mod:`forwardinf.scoring.command`). Nothing here unpickles code (``weights_only`` loads).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from forwardinf.data.inputs import as_dataset, gather, to_device
from forwardinf.distributed import shard_dataset
from forwardinf.tasks import ClassificationTask, Task

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_object(spec: str, what: str) -> Any:
    """The object named by ``module:attr`` or ``path/to/file.py:attr`` (``attr`` may be dotted)."""
    if ":" not in spec:
        raise ValueError(f"{what} {spec!r}: expected module:callable (or file.py:callable), or an existing file")
    mod_name, attr = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise FileNotFoundError(f"{what} {spec!r}: {path} not found")
        module_spec = importlib.util.spec_from_file_location(f"_forwardinf_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        # As `python -m` and the interpreter do: the current folder is importable (nets:build finds ./nets.py).
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name is not None and not mod_name.startswith(e.name):  # the module imports a missing package
                raise ValueError(f"{what} {spec!r}: importing {mod_name!r} failed: {e}") from e
            local = Path(*mod_name.split(".")).with_suffix(".py")
            hint = f" (or give the file: {local}:{attr})" if local.is_file() else "; is it on PYTHONPATH?"
            raise ValueError(f"{what} {spec!r}: cannot import module {mod_name!r} ({e}){hint}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def call_object(spec: str, what: str) -> Any:
    """What ``spec`` names (:func:`load_object`), called when it is a function or class (a model
    builder); an ``nn.Module`` or a ``Dataset`` as it is."""
    fn = load_object(spec, what)
    return fn() if callable(fn) and not isinstance(fn, (nn.Module, Dataset)) else fn


class ScriptedModule(nn.Module):
    """A TorchScript module that torch.func can run with other parameters.

    ``functional_call`` cannot swap a ScriptModule's parameters, so this wrapper owns copies of
    them (same dotted names, in holder submodules) and hands the current ones to the script
    before each call; ``grad``/``vmap``/``jvp`` see through the script's ops.
    """

    def __init__(self, script: torch.jit.ScriptModule) -> None:
        super().__init__()
        object.__setattr__(self, "script", script)  # not a submodule: its tensors are the ones below
        self._names: list[tuple[str, str]] = []
        for kind, named in (("param", script.named_parameters()), ("buffer", script.named_buffers())):
            for name, t in named:
                holder = self._holder(name)
                leaf = name.rsplit(".", 1)[-1]
                if kind == "param":
                    holder.register_parameter(leaf, nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad))
                else:
                    holder.register_buffer(leaf, t.detach().clone())
                self._names.append((name, leaf))
        self.train(script.training)

    @property
    def code(self) -> str:
        """The script's inlined graph, so that score stores fingerprint its code (``hashing.fingerprint_code``)."""
        return str(self.script.inlined_graph)

    def _holder(self, name: str) -> nn.Module:
        holder: nn.Module = self
        for part in name.split(".")[:-1]:
            if part not in holder._modules:
                holder.add_module(part, nn.Module())
            holder = holder._modules[part]
        return holder

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for name, leaf in self._names:
            holder, target = self, self.script
            for part in name.split(".")[:-1]:
                holder, target = holder._modules[part], getattr(target, part)
            target._c.setattr(leaf, getattr(holder, leaf))
        if self.script.training != self.training:
            self.script.train(self.training)
        return self.script(*args, **kwargs)


def load_model(args: argparse.Namespace, device: torch.device) -> nn.Module:
    spec = args.model
    path = Path(spec)
    if path.is_file() and path.suffix != ".py":
        if args.arch:
            model = call_object(args.arch, "--arch")
            if not isinstance(model, nn.Module):
                raise ValueError(f"--arch {args.arch!r} returned {type(model).__name__}, not an nn.Module")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - pickles with code are refused by weights_only
                raise ValueError(f"--model {spec}: not a state-dict checkpoint loadable with weights_only=True ({e})") from e
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise ValueError(f"--model {spec}: expected a state dict, got {type(state).__name__}")
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"--model {spec} does not fit --arch {args.arch}: {e}") from e
            return model.to(device).eval()
        if path.suffix == ".pt2":
            return load_exported(path, device)
        try:
            script = torch.jit.load(str(path), map_location=device)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"--model {spec} is not a TorchScript file; for a state-dict checkpoint also give "
                             f"--arch module:callable that builds the model ({e})") from e
        return ScriptedModule(script).eval()
    model = call_object(spec, "--model")
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model.to(device)


def load_exported(path: Path, device: torch.device) -> nn.Module:
    """A ``torch.export`` program (``torch.export.save``, ``.pt2``) as a module torch.func can run.

    The exported graph runs as it was exported (export it in eval mode); its ``train()`` and
    ``eval()`` raise, so they are removed: the library's mode switches then only set flags that
    nothing reads. Its parameters are ordinary attributes, so ``functional_call`` swaps them.
    """
    try:
        module = torch.export.load(str(path)).module()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--model {path}: not a torch.export program saved with torch.export.save ({e})") from e
    del module.train, module.eval
    return module.to(device)


class ImageFolder(Dataset):
    """Images under ``root/<class>/...`` (classes in sorted order) as ``(float [C, H, W], label)``.

    Loaded lazily, one image per ``__getitem__`` (memory does not grow with the folder). Pixels
    in [0, 1], then ``(x - mean) / std``; every image is converted to the mode of the first
    (grey or RGB) and must have the same size unless ``size`` resizes them. A folder without
    sub-folders gives label -1 (unlabelled).
    """

    def __init__(self, root: str | Path, mean: list[float] | None = None, std: list[float] | None = None,
                 size: tuple[int, int] | None = None) -> None:
        self.root = Path(root)
        classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.classes = classes
        if classes:
            self.files = [(f, i) for i, c in enumerate(classes) for f in sorted((self.root / c).rglob("*"))
                          if f.suffix.lower() in IMAGE_EXTENSIONS]
        else:
            self.files = [(f, -1) for f in sorted(self.root.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.files:
            raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        with _open_image(self.files[0][0]) as im:
            self.mode = "L" if im.mode in ("L", "1", "I", "I;16", "F") else "RGB"
            self.size = tuple(size) if size else (im.size[1], im.size[0])
        for path, _ in self.files:  # up front: a damaged image must not stop the sweep halfway
            with _open_image(path) as im:
                try:
                    im.verify()
                except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged files
                    raise ValueError(f"{path}: damaged image ({e}); remove or replace it") from None
                if size is None and (im.size[1], im.size[0]) != self.size:
                    raise ValueError(f"{path}: size {im.size[1]}x{im.size[0]} differs from "
                                     f"{self.size[0]}x{self.size[1]} of the first image; pass --image-size H W")
        channels = 1 if self.mode == "L" else 3
        self.mean = torch.tensor(mean if mean else [0.0] * channels, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std if std else [1.0] * channels, dtype=torch.float32).view(-1, 1, 1)
        if self.mean.numel() not in (1, channels) or self.std.numel() not in (1, channels):
            raise ValueError(f"--mean/--std need 1 or {channels} values for {self.mode} images")
        self.resize = size is not None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        path, label = self.files[i]
        with _open_image(path) as im:
            try:
                im = im.convert(self.mode)
            except Exception as e:  # noqa: BLE001 - truncated pixel data shows only when decoded
                raise ValueError(f"{path}: damaged image ({e}); remove or replace it") from None
            if self.resize:
                im = im.resize((self.size[1], self.size[0]))
            elif (im.size[1], im.size[0]) != self.size:
                raise ValueError(f"{path}: size {im.size[1]}x{im.size[0]} differs from {self.size[0]}x{self.size[1]} "
                                 "of the first image; pass --image-size H W")
            arr = np.asarray(im, dtype=np.float32) / 255.0
        x = torch.from_numpy(arr).reshape(self.size[0], self.size[1], -1).permute(2, 0, 1).contiguous()
        return (x - self.mean) / self.std, torch.tensor(label, dtype=torch.long)

    def names(self) -> list[str]:
        return [str(f.relative_to(self.root)) for f, _ in self.files]


def _open_image(path: Path) -> Any:
    """``PIL.Image.open(path)``, a file PIL cannot read refused naming it."""
    from PIL import Image

    try:
        return Image.open(path)
    except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"{path}: not a readable image ({e}); remove or replace it") from None


def _npz(spec: str, mean: list[float] | None, std: list[float] | None) -> Dataset:
    path_str, _, split = spec.partition(".npz")
    path = Path(path_str + ".npz")
    split = split.lstrip(":")
    candidates = [(f"x_{split}", f"y_{split}")] if split else [("inputs", "targets"), ("x", "y"), ("X", "y")]
    try:
        with np.load(path, allow_pickle=False) as d:
            found = next(((xk, yk) for xk, yk in candidates if xk in d.files and yk in d.files), None)
            if found is None:
                want = " or ".join(f"{xk}/{yk}" for xk, yk in candidates)
                raise ValueError(f"{path}: no arrays {want}; it holds {sorted(d.files)}")
            x, y = d[found[0]], d[found[1]]
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # truncated or not an .npz at all
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if x.ndim == 0 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{path}: expected inputs [N, ...] and targets [N], got {x.shape} and {y.shape}")
    y = integer_labels(y, f"{path}: {found[1]}")
    xt = torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype == np.uint8:  # images: [0, 255] -> [0, 1], channels first
        xt = xt.float() / 255.0
        if xt.ndim == 3:
            xt = xt[:, None]
        elif xt.ndim == 4 and xt.shape[-1] in (1, 3) and xt.shape[1] not in (1, 3):
            xt = xt.permute(0, 3, 1, 2).contiguous()
    elif xt.is_floating_point():
        xt = xt.float()
    if mean or std:
        c = xt.shape[1]
        m = torch.tensor(mean or [0.0]).view(1, -1, *([1] * (xt.ndim - 2)))
        s = torch.tensor(std or [1.0]).view(1, -1, *([1] * (xt.ndim - 2)))
        if m.shape[1] not in (1, c) or s.shape[1] not in (1, c):
            raise ValueError(f"--mean/--std need 1 or {c} values")
        xt = (xt - m) / s
    return TensorDataset(xt, torch.from_numpy(y))


def integer_labels(y: np.ndarray, what: str) -> np.ndarray:
    """Class labels as int64, refusing what ``.long()`` would silently truncate (1.7 -> 1) or wrap."""
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{what}: labels must be integers, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{what}: labels must be whole numbers (class indices), got {y[i]!r} at position {i} "
                             f"({int(bad.sum())} such); a float array of labels would be truncated")
    if y.size and (y.min() < -1 or y.max() >= 2**31):
        raise ValueError(f"{what}: labels must be class indices >= 0 (-1 = unlabelled), got range [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def load_data(spec: str, args: argparse.Namespace, what: str) -> Dataset:
    """A Dataset from one of the accepted data specs (see the module doc)."""
    from forwardinf.data.loaders import LOADERS, load_dataset

    path = Path(spec)
    if path.is_dir():
        return ImageFolder(path, args.mean, args.std, tuple(args.image_size) if args.image_size else None)
    if ".npz" in spec and Path(spec.partition(".npz")[0] + ".npz").is_file():
        return _npz(spec, args.mean, args.std)
    name, _, split = spec.partition(":")
    if name.lower() in LOADERS or name.lower().replace("_", "-") in LOADERS:
        if split not in ("train", "test"):
            raise ValueError(f"{what} {spec!r}: give the split, {name}:train or {name}:test")
        data = load_dataset(name, args.data_root)
        return TensorDataset(*(data.train() if split == "train" else data.test()))
    if ":" not in spec:
        raise FileNotFoundError(f"{what} {spec}: no such file or folder (nor a module:callable)")
    return as_dataset(call_object(spec, what), what)


def first_n(dataset: Dataset, n: int | None, what: str) -> Dataset:
    if n is None:
        return dataset
    if n < 1:
        raise ValueError(f"{what}: must be a positive integer, got {n}")
    return shard_dataset(dataset, 0, min(n, len(dataset)))


def check_runs(model: nn.Module, task: Task, data: Dataset, what: str, device: torch.device) -> None:
    """Refuse data the model cannot run on, before the batch-size probe and the sweep: its loss on
    the first 8 examples, and for a classifier every label within the model's classes."""
    from forwardinf.core.params import mode

    probe = to_device(gather(data, range(min(8, len(data)))), device)
    try:
        with torch.no_grad(), mode(model, False):
            losses = task.loss(model, probe)
    except (RuntimeError, IndexError, TypeError, ValueError) as e:
        x = probe[0] if isinstance(probe, (tuple, list)) else None
        hint = (f"; its inputs are {x.dtype}: a float model needs float inputs (save them as float32)"
                if torch.is_tensor(x) and not x.is_floating_point() else "")
        raise ValueError(f"{what}: the model cannot run on its examples ({' '.join(str(e).split())}){hint}") from None
    if not torch.isfinite(losses).all():
        raise ValueError(f"{what}: the model's loss on its first examples is not finite (NaN/inf inputs?)")
    if isinstance(task, ClassificationTask) and isinstance(data, TensorDataset) and len(data.tensors) == 2:
        with torch.no_grad(), mode(model, False):
            n_classes = model(probe[0]).shape[-1]
        y = data.tensors[1]
        if y.ndim != 1 or (y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes)):
            raise ValueError(f"{what}: labels must be class indices [N] in 0..{n_classes - 1} (the model has "
                             f"{n_classes} outputs), got shape {tuple(y.shape)}, range [{int(y.min())}, {int(y.max())}]")


def label_by_prediction(queries: Dataset, model: nn.Module, device: torch.device) -> Dataset:
    """Unlabelled queries (label -1) get the model's predicted class: explain what it predicts."""
    x, y = gather(queries, range(len(queries)))[:2]
    if not (y < 0).any():
        return queries
    with torch.no_grad():
        was = model.training
        model.eval()
        pred = model(x.to(device)).argmax(-1).cpu()
        model.train(was)
    return TensorDataset(x, torch.where(y < 0, pred, y))



__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "ScriptedModule", "check_runs", "integer_labels", "load_data",
           "load_exported", "load_model", "load_object"]
