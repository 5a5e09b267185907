"""Tail-only Forward-INF, and reduced-precision forward sweeps.

Tail-only mode: only the last layers (the *tail*, from module ``split`` on) are updated on the
queries, so everything the forward computes before them (the *prefix*) is the same for every
query. The prefix runs once over the training set and its output is cached; every query then
costs a forward pass of the tail alone. The scores are those of ``fi.ForwardINF(model, task,
params=<the tail's parameters>)``, the full engine restricted to the tail, computed with far
less work.

The split is found with ``torch.fx``: the model's forward is traced into a graph, cut before the
first call into module ``split``, and every value the tail reads from the prefix (one tensor for
a sequential model; several across a skip connection) becomes part of the cache, flattened to
one ``[N, D]`` matrix.

The cache is ``N x D`` numbers: when ``D`` is larger than the input (a conv net's last feature
map), holding it in memory costs more than the data. ``cache="disk"`` writes it to a file that
every sweep reads back batch by batch, so resident memory stays one batch (the operating
system's page cache keeps the file warm when memory allows); ``precision="bfloat16"`` halves it.
"""
from __future__ import annotations

import math
import os
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from forwardinf.core.autobatch import auto_batch_size
from forwardinf.core.params import mode, select_params
from forwardinf.data.checks import check_batch
from forwardinf.data.inputs import DataLike, TensorDict, batch_len, batches, check_finite, to_device
from forwardinf.estimators.base import Capabilities, Estimator, check_choice
from forwardinf.estimators.forward_inf import ForwardINF, ForwardINFConfig, check_values, forward_inf_capabilities
from forwardinf.estimators.hf_tail import HFTail, hf_features, hf_tail_params, is_hf_batch
from forwardinf.estimators.split import auto_split
from forwardinf.estimators.shortlist import shortlist_top_k
from forwardinf.tasks.base import Task

CACHES = ("auto", "memory", "disk")
# cache="auto" keeps features up to this size in memory and writes larger ones to a file: a
# cache bigger than this is usually bigger than the data, and in memory it would be most of
# the run's peak (60,000 x 3,136 float32 = 718 MB for a small CNN on Fashion-MNIST, 2.3x the
# inference peak) for no speed (the file is read back from the page cache at the same rate).
AUTO_MEMORY_BYTES = 256 * 2**20
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------ the split
@dataclass
class TailSplit:
    """A model cut in two: ``tail(features) == model(x)`` with ``features = flatten(prefix(x))``.

    ``prefix``: ``x -> tuple`` of the values the tail reads; ``tail``: ``features [B, D] -> output``
    sharing the model's own submodules (and parameters, under their original names).
    ``shapes``/``dtypes``: per-example shape and dtype of each prefix value; ``width``: ``D``.
    """

    prefix: fx.GraphModule
    tail: fx.GraphModule
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]

    @property
    def width(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def features(self, x: Any) -> Tensor:
        """``[B, D]``: the prefix's outputs on ``x``, each flattened, concatenated."""
        return torch.cat([v.flatten(1) for v in self.prefix(x)], 1)


def _in_module(target: str, split: str) -> bool:
    return target == split or target.startswith(split + ".")


def split_model(model: nn.Module, split: str, example: Tensor) -> TailSplit:
    """Cut ``model`` before its first call into module ``split`` (e.g. ``"fc"``, ``"classifier"``,
    ``"stages.3"``); ``example``: a batch of inputs ``[B, ...]`` to learn the cached shapes from.

    The tail is that module and everything the forward computes after it. Raises ``ValueError``
    if the forward cannot be traced, ``split`` is never called, a cached value is not a
    per-example tensor, or a parameter is used on both sides (tied weights: the prefix would no
    longer be frozen).
    """
    try:
        traced = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure is the user's model
        raise ValueError(f"tail mode needs a model torch.fx can trace (no data-dependent control flow): {e}") from e
    nodes = list(traced.graph.nodes)
    first = next((i for i, n in enumerate(nodes)
                  if n.op in ("call_module", "get_attr") and _in_module(str(n.target), split)), None)
    if first is None:
        names = [n for n, _ in model.named_children()]
        raise ValueError(f"split={split!r} is not a module the forward calls; top-level modules are {names}")
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"tail mode needs a model with one input; its forward takes {len(placeholders)}")
    prefix_nodes, tail_nodes = nodes[:first], nodes[first:]
    if any(n.op == "placeholder" for n in tail_nodes):
        raise ValueError("tail mode: the input placeholder must come before the split")
    _check_no_shared_parameters(traced, prefix_nodes, tail_nodes, split)

    in_prefix = set(prefix_nodes)
    frontier: list[fx.Node] = []
    for n in tail_nodes:
        for a in n.all_input_nodes:
            if a in in_prefix and a not in frontier:
                frontier.append(a)
    if not frontier:
        raise ValueError(f"split={split!r}: the tail reads nothing from the input; nothing to cache")

    pg = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in prefix_nodes:
        env[n] = pg.node_copy(n, lambda a: env[a])
    pg.output(tuple(env[f] for f in frontier))
    prefix = fx.GraphModule(traced, pg, class_name="Prefix")

    with torch.no_grad(), mode(model, False):
        values = prefix(example)
    shapes, dtypes = [], []
    for f, v in zip(frontier, values):
        if not torch.is_tensor(v) or v.ndim == 0 or v.shape[0] != example.shape[0]:
            raise ValueError(f"tail mode: the tail reads {f.name!r} from before the split, which is not a "
                             "per-example tensor (e.g. x.size(0)); split elsewhere or use torch.flatten")
        shapes.append(tuple(v.shape[1:]))
        dtypes.append(v.dtype)

    tg = fx.Graph()
    features = tg.placeholder("features")
    env = {}
    offset = 0
    for f, shape, dtype in zip(frontier, shapes, dtypes):
        width = math.prod(shape)
        v = tg.call_function(torch.narrow, (features, 1, offset, width))
        v = tg.call_method("reshape", (v, (-1, *shape)))
        env[f] = tg.call_method("to", (v, dtype))  # the cache may be in reduced precision
        offset += width
    for n in tail_nodes:
        if n.op == "output":
            tg.output(fx.map_arg(n.args[0], lambda a: env[a]))
        else:
            env[n] = tg.node_copy(n, lambda a: env[a])
    tail = fx.GraphModule(traced, tg, class_name="Tail")
    return TailSplit(prefix, tail, shapes, dtypes)


def _used_tensors(root: nn.Module, nodes: Iterable[fx.Node]) -> dict[int, str]:
    used: dict[int, str] = {}
    for n in nodes:
        if n.op == "call_module":
            for name, t in root.get_submodule(str(n.target)).named_parameters():
                used[id(t)] = f"{n.target}.{name}"
        elif n.op == "get_attr":
            t = root
            for part in str(n.target).split("."):
                t = getattr(t, part)
            if torch.is_tensor(t):
                used[id(t)] = str(n.target)
    return used


def _check_no_shared_parameters(root: nn.Module, prefix: list[fx.Node], tail: list[fx.Node], split: str) -> None:
    before, after = _used_tensors(root, prefix), _used_tensors(root, tail)
    shared = sorted(after[i] for i in set(before) & set(after))
    if shared:
        raise ValueError(f"split={split!r}: parameter(s) {shared} are used before and after the split (tied "
                         "weights), so updating the tail would change the cached prefix; split earlier")


# ----------------------------------------------------------------------- reduced precision
class ReducedPrecisionTask(Task):
    """Another task whose forward sweeps run in ``bfloat16``/``float16`` autocast.

    Sweeps over the training set (gradient disabled: base values, directional derivatives,
    scoring) run the model in reduced precision and return float32 per-example values, so every
    difference ``m(θ_q, z_i) - m(θ, z_i)`` and anything summed afterwards is float32. The query
    update (gradient enabled) runs in float32 as usual.
    """

    def __init__(self, task: Task, dtype: str = "bfloat16") -> None:
        self.task = task
        self.dtype = dtype

    def _run(self, fn: Callable[[Any, Any], Tensor], model: Any, batch: Any) -> Tensor:
        if torch.is_grad_enabled():
            return fn(model, batch)
        check_choice(type(self).__name__, "dtype", self.dtype, ("bfloat16", "float16"))
        with torch.autocast(_device_type(batch), dtype=PRECISIONS[self.dtype]):
            out = fn(model, batch)
        return out.float()

    def loss(self, model: Any, batch: Any) -> Tensor:
        return self._run(self.task.loss, model, batch)

    def score_loss(self, model: Any, batch: Any) -> Tensor:
        return self._run(self.task.score_loss, model, batch)

    def query_loss(self, model: Any, batch: Any) -> Tensor:
        return self.task.query_loss(model, batch)

    def validate(self, model: Any, batch: Any) -> None:
        self.task.validate(model, batch)


def _device_type(batch: Any) -> str:
    leaves = [batch] if torch.is_tensor(batch) else (list(batch.values()) if isinstance(batch, dict) else list(batch))
    for t in leaves:
        if torch.is_tensor(t):
            return t.device.type
    return "cpu"


# ----------------------------------------------------------------------------- the estimator
@dataclass(frozen=True, kw_only=True)
class TailForwardINFConfig(ForwardINFConfig):
    """Every knob of :class:`TailForwardINF`: ``split``, ``precision``, ``cache``, ``cache_dir``
    and those of :class:`ForwardINF` (``params`` are patterns within the tail)."""

    split: str | None = None
    precision: str = "float32"
    cache: str = "auto"
    cache_dir: str | None = None


class TailForwardINF(Estimator):
    """Forward-INF that updates only the model's tail, on a cached pass of the frozen prefix.

    ``fi.TailForwardINF(model, task, split="fc")`` gives the scores of
    ``fi.ForwardINF(model, task, params="fc")`` (the tail's parameters) but runs the prefix once
    over the training set in :meth:`fit`; each query then costs the update and one forward of
    the tail over the cached features ``[n_train, D]``.

    Args (all keyword):
        split: name of the module where the tail begins (``"fc"``, ``"classifier"``,
            ``"stages.3"``). The tail is that module and everything the forward does after it.
            On a transformers model fed dict batches: a block, ``"model.layers.3"`` (Llama, Qwen,
            Mistral), ``"transformer.h.1"`` (GPT-2), ``"bert.encoder.layer.1"`` (BERT); the cache
            is the hidden states entering it, kept in memory (:mod:`~forwardinf.estimators.hf_tail`).
            ``"auto"``: the layers after the last convolution, pooling, attention, recurrent or
            embedding call (a CNN's dense head; an MLP's every layer), see
            :mod:`forwardinf.estimators.split`; the module chosen is ``split_name_``.
        precision: ``"float32"``, or ``"bfloat16"``/``"float16"``: the prefix runs in autocast
            and the cache is stored in that dtype (half the memory). The tail, its update and
            every score difference stay float32, so base and updated models see the very same
            features.
        cache: ``"memory"`` (the features ``[n_train, D]`` as one tensor), ``"disk"`` (a file in
            ``cache_dir``, default the system's temporary folder, read back one batch at a time and
            deleted with the estimator): resident memory of one batch instead of ``n_train x D``,
            for one extra read of the file per sweep; or ``"auto"`` (default): memory up to
            256 MiB of features, disk above. The scores are the same to the bit either way; the
            choice made is ``cache_``.
        cache_dir: folder of the ``"disk"`` cache.
        steps, lr, optimizer, score, ...: any :class:`ForwardINF` keyword (``params`` are
            patterns within the tail; ``batch_size`` also sets the prefix pass's batch);
            ``fitted_fallback`` is refused: it perturbs inputs the tail never sees.

    All of them are the fields of :class:`TailForwardINFConfig` (``config=``).

    The model must take one input: the first element (or ``"inputs"``) of every batch.
    """

    Config = TailForwardINFConfig
    _shortlist_top_k = shortlist_top_k  # top_k(..., shortlist=K): forwardinf.estimators.shortlist
    fit_fields = ("split", "precision", "cache", "cache_dir", "batch_size")  # the cached prefix

    def __init__(self, model: nn.Module, task: Task | None = None, *, config: ForwardINFConfig | None = None,
                 **knobs: Any) -> None:
        """``split`` and every :class:`ForwardINF` knob a keyword, or ``config=`` (keywords override it)."""
        super().__init__(model, task, config, **knobs)

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return forward_inf_capabilities(self.optimizer)

    @property
    def forward_config(self) -> ForwardINFConfig:
        """The configuration of the tail's :class:`ForwardINF`."""
        config = ForwardINFConfig(**{k: getattr(self.config, k) for k in ForwardINFConfig.names()})
        if isinstance(self.__dict__.get("split_"), HFTail):  # the tail's own parameters, named as in HFTail
            config = config.replace(params=hf_tail_params(self.model, self.split, self.params))
        return config

    # -- fit --------------------------------------------------------------------------------
    def _load_train(self, train: DataLike) -> Any:
        return self._dataset(train, "train")  # checked below and by the tail's ForwardINF

    def _fit(self, dataset: Any) -> None:
        """Cut the model, cache the prefix over ``train``, fit the tail's ForwardINF on the cache."""
        first = to_device(next(batches(dataset, 8))[1], self._device())
        check_batch(self.model, self.task, first, "train")  # before tracing and probing: a clear error, not theirs
        hf = is_hf_batch(self.model, first)  # a transformers model: split at a block (hf_tail.py)
        if hf:
            if self.split == "auto":
                raise ValueError("TailForwardINF: split='auto' cuts plain module trees; on a transformers model name "
                                 "the block where the tail begins, e.g. split='model.layers.11' (Llama), "
                                 "'transformer.h.11' (GPT-2), 'bert.encoder.layer.11' (BERT)")
            self.split_name_, self.split_ = self.split, HFTail(self.model, self.split)
        elif self.split == "auto":  # the rule of forwardinf.estimators.split; the chosen name is split_name_
            self.split_name_, self.split_ = auto_split(self.model, _inputs(first), split_model,
                                                       kfac=self.optimizer == "kfac")
        else:
            self.split_name_, self.split_ = self.split, split_model(self.model, self.split, _inputs(first))
        with mode(self.model, False):  # the prefix pass: one no-grad forward of the whole model at most
            self.prefix_batch_ = (auto_batch_size(self.model, self.task, first, max_batch=512, name="train")
                                  if self.batch_size == "auto" else int(self.batch_size))
        self.cache_ = "memory" if hf else self.cache
        if self.cache == "auto" and not hf:
            size = len(dataset) * self.split_.width * PRECISIONS[self.precision].itemsize
            self.cache_ = "disk" if size > AUTO_MEMORY_BYTES else "memory"
        self.features_ = self.features(dataset, "train", on_disk=self.cache_ == "disk", checked=True)
        tail = self.split_ if hf else self.split_.tail
        self.estimator_ = ForwardINF(tail, self.task, config=self.forward_config).fit(self.features_)

    def _fit_like(self, other: Estimator) -> "TailForwardINF":
        """Reuses ``other``'s cut and cached features when the prefix is configured the same."""
        if (not isinstance(other, TailForwardINF) or other.model is not self.model or other.task is not self.task
                or any(getattr(self, k) != getattr(other, k) for k in self.fit_fields)):
            return self.fit(other.train_)
        self._check_params()
        for attr in ("split_", "split_name_", "prefix_batch_", "cache_", "features_"):
            setattr(self, attr, getattr(other, attr))
        self.estimator_ = other.estimator_.with_config(self.forward_config)
        self.train_ = other.train_
        self.fitted_config_ = self.config
        return self

    def _tail(self) -> ForwardINF:
        """The tail's fitted ForwardINF (after checking this estimator is fitted to the model as it is)."""
        self._check_fitted()
        return self.estimator_

    def _check_params(self) -> None:
        name = type(self).__name__
        if self.split is None:
            raise TypeError(f"{name}: missing the keyword split= (the module where the tail begins, e.g. 'fc')")
        check_values(name, self.config)  # the tail's ForwardINF knobs (their fit on the tail checks the rest)
        select_params(self.model, self.params)  # a model with no trainable parameter: refused now
        check_choice(name, "precision", self.precision, PRECISIONS)
        check_choice(name, "cache", self.cache, CACHES)
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"{name}: invalid split={self.split!r}; expected a module name such as 'fc'")
        if self.fitted_fallback:
            raise ValueError(f"{name}: fitted_fallback perturbs the query's inputs, which the tail never sees; "
                             "use ForwardINF for it")

    def features(self, data: DataLike, name: str = "data", on_disk: bool = False, checked: bool = False) -> Dataset:
        """``data`` with each batch's inputs replaced by the prefix's features ``[N, D]``.

        Runs the prefix once, in eval mode (it is frozen), in the configured precision. With
        ``on_disk`` the features go to a file (see ``cache="disk"``), never all in memory.
        ``checked``: the first batch was checked already (fit's), so not again.
        """
        self._check_split()
        dataset = self._dataset(data, name)
        if not checked:
            check_batch(self.model, self.task, next(batches(dataset, 8))[1], name)
        n, dtype, device = len(dataset), PRECISIONS[self.precision], self._device()
        if isinstance(self.split_, HFTail):
            return hf_features(self.model, self.task, dataset, self.split, self.prefix_batch_, dtype, device, name)
        out: Tensor | FeatureFile = (FeatureFile(n, self.split_.width, dtype, self.cache_dir) if on_disk
                                     else torch.empty(n, self.split_.width, dtype=dtype))
        rest: list[list[Any]] = []
        keys: list[str] | None = None
        with torch.no_grad(), mode(self.model, False), tqdm(total=n, desc=f"prefix ({name})", unit="ex", leave=False,
                                                          disable=not self.progress) as bar:
            for start, batch in batches(dataset, self.prefix_batch_):
                check_finite(batch, name)
                x = to_device(_inputs(batch), device)
                try:
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                        f = self.split_.features(x)
                except RuntimeError as e:  # e.g. inputs of another shape than the training data's
                    raise ValueError(f"{name}: the model cannot run on these inputs: {e}") from e
                # checked batch by batch: isfinite over the whole cache would briefly need 2.5x its size
                if not torch.isfinite(f).all():
                    raise ValueError(f"{name}: the prefix produced non-finite features")
                out[start:start + batch_len(batch)] = f.to(dtype).cpu()
                fields, keys = _other_fields(batch)
                rest.append(fields)
                bar.update(batch_len(batch))
        others = [torch.cat([r[j] for r in rest]) for j in range(len(rest[0]))] if rest else []
        if isinstance(out, FeatureFile):
            out.close()
            return _FileDataset(out, others, keys)
        if keys is None:
            return TensorDataset(out, *others)
        return TensorDict({"inputs": out, **dict(zip(keys, others))})

    def _check_split(self) -> None:
        if not hasattr(self, "split_"):
            self._check_fitted()

    # -- contract ---------------------------------------------------------------------------
    def influence(self, queries: DataLike, joint: bool = False, indices: Any = None) -> Tensor:
        """Scores ``[n_query, n]`` (or ``[n]`` if ``joint``), as :meth:`ForwardINF.influence`;
        ``indices``: training positions ``[n]`` to score (default all)."""
        return self._tail().influence(self.features(queries, "queries"), joint=joint, indices=indices)

    def self_influence(self) -> Tensor:
        """``[n_train]``: the tail's :meth:`ForwardINF.self_influence` (higher = more suspicious)."""
        return self._tail().self_influence()

    def _score_blocks(self, queries: DataLike, chunk: int) -> Any:
        return self._tail()._score_blocks(self.features(queries, "queries"), chunk)

    @property
    def base_losses_(self) -> Tensor:
        """``[n_train]`` losses of the unchanged model."""
        return self._tail().base_losses_

    def tune(self, queries: DataLike, targets: Any, **grid: Any) -> "TailForwardINFConfig":
        """:meth:`ForwardINF.tune` on the tail: this configuration with the chosen ``lr``/``steps``/``score``."""
        chosen = self._tail().tune(self.features(queries, "queries"), targets, **grid)
        self.tune_results_ = self._tail().tune_results_
        return self.config.replace(lr=chosen.lr, steps=chosen.steps, score=chosen.score)


def _inputs(batch: Any) -> Tensor:
    if torch.is_tensor(batch):
        return batch
    if isinstance(batch, dict):
        if "inputs" not in batch:
            raise ValueError("tail mode: dict batches must hold the model's input under 'inputs'")
        return batch["inputs"]
    return batch[0]


def _other_fields(batch: Any) -> tuple[list[Any], list[str] | None]:
    """Everything in a batch but the model's input (targets, ...); dict keys if it is a dict."""
    if torch.is_tensor(batch):
        return [], None
    if isinstance(batch, dict):
        keys = [k for k in batch if k != "inputs"]
        return [batch[k] for k in keys], keys
    return list(batch[1:]), None


class FeatureFile:
    """A ``[n, D]`` matrix in a ``.npy`` file, written in row blocks, read back in row blocks.

    Writes go through plain file writes, not a memory map: the dirty pages of a mapped file count
    in the process's resident size until it is unmapped (SmallCNN on 60,000 Fashion-MNIST images:
    the fit peaked 1.95x the inference sweep with a writable map, the whole 718 MB file). Each read
    maps the file, copies the rows asked for into a fresh tensor and drops the map, so the process
    holds only those rows (the operating system's page cache keeps the file warm).
    ``bfloat16``, which NumPy lacks, is stored as its raw 16-bit words. The file lives in
    ``folder`` (default: the temporary folder) and is deleted when this object is
    garbage-collected.
    """

    def __init__(self, n: int, width: int, dtype: torch.dtype, folder: str | None = None) -> None:
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix="forwardinf-tail-", suffix=".npy", dir=folder)
        os.close(fd)
        self._finalizer = weakref.finalize(self, _unlink, self.path)
        self.shape, self.dtype = (n, width), dtype
        self._words = torch.int16 if dtype == torch.bfloat16 else dtype  # what NumPy stores
        header = np.lib.format.open_memmap(self.path, mode="w+", shape=self.shape,
                                           dtype=torch.empty(0, dtype=self._words).numpy().dtype)
        self._offset, self._row_bytes = header.offset, width * header.dtype.itemsize  # where row 0 starts
        del header  # the file has its header and size; the map is not kept
        self._written = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __setitem__(self, rows: slice, block: Tensor) -> None:
        """Write the rows ``[start, stop)`` (blocks must come in order)."""
        if rows.start != self._written or block.shape != (rows.stop - rows.start, self.shape[1]):
            raise ValueError(f"FeatureFile: rows must be written in order as [B, {self.shape[1]}] blocks")
        with open(self.path, "r+b") as f:
            f.seek(self._offset + rows.start * self._row_bytes)
            f.write(block.to(self.dtype).view(self._words).contiguous().numpy().tobytes())
        self._written = rows.stop

    def close(self) -> None:
        if self._written != self.shape[0]:
            raise ValueError(f"FeatureFile: {self._written} of {self.shape[0]} rows written")

    def rows(self, start: int, stop: int) -> Tensor:
        """``[stop - start, D]``: rows ``start..stop-1`` read from the file."""
        block = np.array(np.load(self.path, mmap_mode="r")[start:stop])  # a copy; the map goes with it
        return torch.from_numpy(block).view(self.dtype)


def _unlink(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class _FileDataset(Dataset):
    """Cached features on disk and the batch's other fields in memory, fetched a batch at a time."""

    def __init__(self, features: FeatureFile, others: list[Tensor], keys: list[str] | None) -> None:
        self.features, self.others, self.keys = features, others, keys

    def __len__(self) -> int:
        return len(self.features)

    def _example(self, f: Tensor, i: int) -> Any:
        fields = [o[i] for o in self.others]
        if self.keys is None:
            return (f, *fields)
        return {"inputs": f, **dict(zip(self.keys, fields))}

    def __getitem__(self, i: int) -> Any:
        return self._example(self.features.rows(i, i + 1)[0], i)

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """One read for a contiguous run of indices (every sweep's case), else one per example."""
        first = indices[0]
        if list(indices) == list(range(first, first + len(indices))):
            block = self.features.rows(first, first + len(indices))
            return [self._example(block[j], i) for j, i in enumerate(indices)]
        return [self[i] for i in indices]
