"""Tail mode for Hugging Face transformers: split at any decoder / encoder block.

``torch.fx`` cannot trace a transformers model (its forward branches on configuration and
masks), so the split works with hooks on the block where the tail begins instead:

- the *prefix pass* runs the user's task on the whole model and stops at the split block,
  keeping the hidden states that enter it, ``[B, T, H]`` (the model computed them its own way:
  embeddings, positions, masks, earlier blocks);
- the *tail* (:class:`HFTail`) runs the same model on the same batch with the blocks before the
  split left out of its block list, the cached hidden states put in as the split block's input
  (a forward pre-hook), and everything after (final norm, pooling, head) as the model does it.
  The embedding lookup still runs (its output is replaced), which costs ``O(T H)`` per example.

Works for the block lists of the common families (Llama / Qwen / Mistral ``model.layers``,
GPT-2 ``transformer.h``, BERT ``bert.encoder.layer``, DistilBERT ``distilbert.transformer.layer``,
T5/BART blocks of one stack), whatever the task and the padding: the batch's own fields
(``input_ids``, ``attention_mask``, ``labels``) stay in the cached dataset, and the cached
hidden states travel in the batch as ``tail_hidden`` (a per-token ``[B, T, H]`` field, cut
alike when a task trims padding columns).
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from forwardinf.core.attention import functional_attention
from forwardinf.data.inputs import TensorDict, batches, to_device

HIDDEN = "tail_hidden"  # the batch field that carries the cached hidden states [B, T, H]


class _Stop(Exception):
    """Raised by the prefix pass's hook once the split block's input is known."""


def is_hf_batch(model: nn.Module, batch: Any) -> bool:
    """A transformers model (it has a ``config``) fed dict batches of keyword inputs."""
    return hasattr(model, "config") and isinstance(batch, dict) and "inputs" not in batch


def block_list(model: nn.Module, split: str) -> tuple[nn.ModuleList, int]:
    """``(the ModuleList holding block split, its index)``; ``split`` e.g. ``"model.layers.3"``."""
    parent_name, _, index = split.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else None
    except AttributeError:
        parent = None
    if not isinstance(parent, nn.ModuleList) or not index.isdigit() or int(index) >= len(parent):
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)
                 and any(True for _ in m[0].parameters())]
        raise ValueError(f"split={split!r}: on a transformers model the tail begins at a block, named "
                         f"'<block list>.<index>'; block lists here: {lists} (e.g. {lists[0] + '.1' if lists else '...'})")
    return parent, int(index)


def tail_parameter_names(model: nn.Module, split: str) -> list[str]:
    """Names of the trainable parameters the tail owns: the split block's and every one registered
    after it (later blocks, final norm, pooler, head). A head tied to the input embedding is
    registered (first) under the embedding's name, so it stays frozen with the prefix."""
    blocks, index = block_list(model, split)
    first = {id(p) for p in blocks[index].parameters()}
    names, seen = [], False
    for name, p in model.named_parameters():
        seen = seen or id(p) in first
        if seen and p.requires_grad and not _in_earlier_block(name, split, index):
            names.append(name)
    return names


def _in_earlier_block(name: str, split: str, index: int) -> bool:
    prefix = split.rpartition(".")[0] + "."
    if not name.startswith(prefix):
        return False
    head = name[len(prefix):].split(".")[0]
    return head.isdigit() and int(head) < index


@contextlib.contextmanager
def _hidden_hook(block: nn.Module, hook: Any) -> Iterator[None]:
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _hidden_of(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def prefix_hidden(model: nn.Module, task: Any, batch: dict[str, Tensor], split: str) -> Tensor:
    """``[B, T, H]``: the hidden states entering block ``split`` when ``task`` scores ``batch``
    (the task's own model call, stopped at the block; a task that trims padding columns is run
    untrimmed, so ``T`` is the batch's width)."""
    blocks, index = block_list(model, split)
    seen: list[Tensor] = []

    def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(_hidden_of(args, kwargs))
        raise _Stop

    if getattr(task, "trim_padding", False):
        task = copy.copy(task)
        task.trim_padding = False
    with _hidden_hook(blocks[index], capture), functional_attention():  # the kernels the tail's calls use
        try:
            task.loss(model, batch)
        except _Stop:
            pass
    if not seen:
        raise ValueError(f"split={split!r}: the task's forward never reached this block")
    return seen[0]


class HFTail(nn.Module):
    """The transformers model from block ``split`` on, fed the cached hidden states.

    ``forward(*args, tail_hidden [B, T, H], **kwargs)`` is ``model(*args, **kwargs)`` with the
    blocks before the split skipped and ``tail_hidden`` entering the split block. Shares the
    model's modules and parameters (under ``model.<name>``); the model's block list is swapped
    for the call only and restored after.
    """

    def __init__(self, model: nn.Module, split: str) -> None:
        super().__init__()
        self.model = model
        self.split = split
        blocks, self.index = block_list(model, split)
        parent_name = split.rpartition(".")[0]
        self._owner_name, _, self._attr = parent_name.rpartition(".")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = kwargs.pop(HIDDEN)
        owner = self.model.get_submodule(self._owner_name) if self._owner_name else self.model
        blocks = getattr(owner, self._attr)

        def feed(_module: nn.Module, a: tuple, kw: dict) -> tuple[tuple, dict]:
            h = hidden.to(_hidden_of(a, kw).dtype)
            return ((h, *a[1:]), kw) if a else (a, {**kw, "hidden_states": h})

        owner._modules[self._attr] = nn.ModuleList(list(blocks)[self.index:])
        try:
            with _hidden_hook(blocks[self.index], feed):
                return self.model(*args, **kwargs)
        finally:
            owner._modules[self._attr] = blocks


def hf_tail_params(model: nn.Module, split: str, patterns: Any) -> list[str]:
    """The :class:`HFTail` parameter names (``model.<name>``) the tail's update touches: the tail's
    own trainable parameters, narrowed to ``patterns`` (names in the user's model) if given."""
    names = tail_parameter_names(model, split)
    if patterns is not None:
        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n, p + ".*") for p in pats)]
        if not names:
            raise ValueError(f"params={pats!r} matches no trainable parameter of the tail from {split!r}; "
                             f"its names look like {tail_parameter_names(model, split)[:4]}")
    if not names:
        raise ValueError(f"split={split!r}: the tail has no trainable parameter")
    return ["model." + n for n in names]


def hf_features(model: nn.Module, task: Any, dataset: Any, split: str, batch_size: int, dtype: torch.dtype,
                device: torch.device, name: str) -> TensorDict:
    """``dataset``'s fields plus ``tail_hidden [N, T, H]`` (in ``dtype``), the prefix's output,
    one pass in batches of ``batch_size`` (eval mode is the caller's)."""
    parts: list[dict[str, Tensor]] = []
    for _, batch in batches(dataset, batch_size):
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            h = prefix_hidden(model, task, batch, split)
        if not torch.isfinite(h).all():
            raise ValueError(f"{name}: the prefix produced non-finite hidden states")
        parts.append({**{k: v.cpu() for k, v in batch.items() if torch.is_tensor(v)}, HIDDEN: h.to(dtype).cpu()})
    widths = {tuple(p[HIDDEN].shape[1:]) for p in parts}
    if len(widths) > 1:
        raise ValueError(f"{name}: batches of different widths {sorted(widths)}; tail mode caches one "
                         "[N, T, H] tensor: pad every example to one length (padding='max_length')")
    return TensorDict({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
