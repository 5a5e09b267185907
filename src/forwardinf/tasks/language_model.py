"""Language models: per-example loss over the *target* tokens of causal and seq2seq models.

A batch is a dict of tensors with a leading batch dim (what :func:`encode` produces):

- ``input_ids [B, T]``, ``attention_mask [B, T]`` (1 = real token, 0 = padding; integer, bool
  or float);
- ``labels``: causal models ``[B, T]``, aligned with ``input_ids`` (the token at position ``t``
  is predicted from positions ``< t``); seq2seq models ``[B, T_dec]``, the decoder's targets.
  ``-100`` marks every position that is not a target (prompt, context, padding);
- seq2seq only, optional: ``decoder_input_ids [B, T_dec]`` (default: ``labels`` shifted right
  behind ``decoder_start_token_id``) and ``decoder_attention_mask``;
- any other field is passed to the model as a keyword argument unchanged (e.g.
  ``token_type_ids``); per-token ones ``[B, T, ...]`` are trimmed with ``input_ids``.

The loss of an example is the mean negative log-likelihood of its target tokens, so prompts and
padding change nothing. Everything is vmap-safe: masks are built as 4-D additive tensors here
(transformers' own mask helpers test ``mask.all()``, data-dependent control flow that
``torch.func.vmap`` refuses) and no Python branch looks at tensor values.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from forwardinf.data.inputs import TensorDict, take
from forwardinf.tasks.base import Task

IGNORE = -100
KINDS = ("causal", "seq2seq")
MASKS = ("4d", "2d")
_NEG = torch.finfo(torch.float32).min
# Batch fields the task reads itself; any other field is passed to the model as a keyword
# (e.g. token_type_ids, or the cached hidden states of tail mode).
FIELDS = ("input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_attention_mask")


def autocast(dtype: torch.dtype | None, like: Tensor) -> Any:
    """``torch.autocast`` in ``dtype`` on ``like``'s device (matmuls in e.g. bfloat16, parameters
    untouched), or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=like.device.type, dtype=dtype)


def _logits(out: Any) -> Tensor:
    if torch.is_tensor(out):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


class LanguageModelTask(Task):
    """Mean NLL of each example's target tokens, ``Tensor[B]``, for ``transformers``-style LMs.

    Args (all keyword except ``kind``):
        kind: ``"causal"`` (GPT-2 style; labels aligned with ``input_ids`` and shifted here) or
            ``"seq2seq"`` (T5 style; labels are the decoder's targets).
            :meth:`for_model` reads it from ``model.config``.
        mask: ``"4d"`` (default) passes an additive ``[B, 1, T_q, T_k]`` float mask, which any
            attention implementation accepts under vmap; ``"2d"`` passes ``attention_mask``
            unchanged (for models that do not accept 4-D masks; not vmap-safe with SDPA).
        position_ids: causal only: pass positions counted over real tokens only, so left
            padding changes nothing either. Turn off for models without a ``position_ids`` input.
        decoder_start_token_id: seq2seq only: first decoder input (T5: the pad id, 0).
        pad_token_id: seq2seq only: replaces ``-100`` in the shifted decoder inputs.
        trim_padding: before the model runs, drop the columns that are padding in every row of the
            batch (:meth:`trim`): a batch of short sentences costs what they need, not the width
            of the longest sentence in the dataset. Skipped where the values are not concrete
            (inside ``vmap`` over examples); estimators that vmap per example call :meth:`trim`
            on the batch first.
        dtype: run the model under ``torch.autocast`` in this dtype (e.g. ``torch.bfloat16``:
            bfloat16 matmuls, parameters and their updates untouched, NLL in float32); None
            (default): the model's own dtype. Caution: autocast rounds float32 parameters to
            bfloat16 (8 bits of mantissa) in every matmul, so a small update moves only the
            weights it carries across a rounding boundary.
    """

    def __init__(self, kind: str = "causal", *, mask: str = "4d", position_ids: bool = True,
                 decoder_start_token_id: int = 0, pad_token_id: int = 0, trim_padding: bool = True,
                 dtype: torch.dtype | None = None) -> None:
        self.kind = kind
        self.mask = mask
        self.position_ids = position_ids
        self.decoder_start_token_id = decoder_start_token_id
        self.pad_token_id = pad_token_id
        self.trim_padding = trim_padding
        self.dtype = dtype

    @classmethod
    def for_model(cls, model: Any, **overrides: Any) -> "LanguageModelTask":
        """The task for a ``transformers`` model: kind and special ids from ``model.config``."""
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError("for_model needs a transformers model with a .config; build LanguageModelTask(kind=...) instead")
        seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        kw: dict[str, Any] = {"kind": "seq2seq" if seq2seq else "causal"}
        if seq2seq:
            pad = getattr(config, "pad_token_id", None)
            start = getattr(config, "decoder_start_token_id", None)
            kw["pad_token_id"] = 0 if pad is None else int(pad)
            kw["decoder_start_token_id"] = kw["pad_token_id"] if start is None else int(start)
        kw.update(overrides)
        return cls(**kw)

    # -- losses -------------------------------------------------------------------------
    def token_losses(self, model: Callable[..., Any], batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(nll [B, L], is_target [B, L])``: per-token negative log-likelihood and target mask."""
        logits, labels = self.logits_and_labels(model, batch)
        is_target = labels != IGNORE
        safe = torch.where(is_target, labels, torch.zeros_like(labels))
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        return nll * is_target, is_target

    def loss(self, model: Callable[..., Any], batch: dict[str, Tensor]) -> Tensor:
        """``[B]``: mean NLL over each example's target tokens (padding and prompts excluded)."""
        nll, is_target = self.token_losses(model, batch)
        return nll.sum(-1) / is_target.sum(-1).clamp_min(1)

    # -- model call ---------------------------------------------------------------------
    def logits_and_labels(self, model: Callable[..., Any], batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(logits [B, L, V], labels [B, L])`` aligned: ``logits[:, t]`` predicts ``labels[:, t]``."""
        if self.kind not in KINDS:
            raise ValueError(f"LanguageModelTask: invalid kind={self.kind!r}; expected one of {KINDS}")
        if self.trim_padding:
            try:
                batch = self.trim(batch)
            except RuntimeError:  # vmapped over examples: column counts are not concrete values here
                pass
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        extra = {k: v for k, v in batch.items() if k not in FIELDS}
        if self.kind == "causal":
            kwargs: dict[str, Any] = {**extra, "input_ids": ids, "attention_mask": self._causal_mask(attn)}
            if self.position_ids:
                kwargs["position_ids"] = (attn.long().cumsum(-1) - 1).clamp_min(0)
            with autocast(self.dtype, ids):
                logits = _logits(model(**kwargs))
            # Position t predicts token t + 1.
            return logits[:, :-1], labels[:, 1:]
        dec_ids = batch.get("decoder_input_ids")
        if dec_ids is None:
            dec_ids = self.shift_right(labels)
        kwargs = {**extra, "input_ids": ids, "attention_mask": self._encoder_mask(attn), "decoder_input_ids": dec_ids}
        dec_attn = batch.get("decoder_attention_mask")
        if dec_attn is not None:
            kwargs["decoder_attention_mask"] = self._causal_mask(dec_attn) if self.mask == "4d" else dec_attn
        with autocast(self.dtype, ids):
            return _logits(model(**kwargs)), labels

    def trim(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch without the columns that are padding in every row; the losses are unchanged.

        Encoder/causal inputs keep the span from the first to the last column any row attends to
        or (causal) labels; leading columns are cut only when positions are counted over real
        tokens (``position_ids=True``), since otherwise they shift the default positions. Seq2seq
        labels lose trailing all-``-100`` columns when the decoder inputs are derived from them.
        Needs concrete values (not usable inside ``vmap`` over examples: raises ``RuntimeError``).
        """
        attn, labels = batch["attention_mask"], batch["labels"]
        if attn.ndim != 2 or attn.shape[1] == 0:
            return batch
        used = attn.bool().any(0)
        aligned = self.kind == "causal"
        if aligned and labels.shape == attn.shape:
            used = used | (labels != IGNORE).any(0)
        cols = used.nonzero()
        if cols.numel() == 0:
            return batch
        first = int(cols.min()) if aligned and self.position_ids else 0
        last = int(cols.max()) + 1
        out = dict(batch)
        if first > 0 or last < attn.shape[1]:
            keys = ("input_ids", "attention_mask") + (("labels",) if aligned else ())
            per_token = [k for k, v in batch.items() if k not in FIELDS and torch.is_tensor(v) and v.shape[:2] == attn.shape]
            for k in (*keys, *per_token):  # per-token extra fields ([B, T, ...]) are cut alike
                out[k] = batch[k][:, first:last]
        if self.kind == "seq2seq" and "decoder_input_ids" not in batch and "decoder_attention_mask" not in batch:
            lab = (labels != IGNORE).any(0).nonzero()
            if lab.numel():
                out["labels"] = labels[:, :int(lab.max()) + 1]
        return out

    def shift_right(self, labels: Tensor) -> Tensor:
        """Decoder inputs ``[B, T_dec]``: ``decoder_start_token_id`` then ``labels[:, :-1]`` (-100 -> pad)."""
        start = torch.full_like(labels[:, :1], self.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=-1)
        return torch.where(shifted == IGNORE, torch.full_like(shifted, self.pad_token_id), shifted)

    def _causal_mask(self, attn: Tensor) -> Tensor:
        if self.mask == "2d":
            return attn
        t = attn.shape[-1]
        causal = torch.ones(t, t, dtype=torch.bool, device=attn.device).tril()
        ok = causal[None, None] & attn.bool()[:, None, None, :]
        # A padding query row would be all -inf (NaN softmax): let it see itself; it is never a target.
        ok = ok | torch.eye(t, dtype=torch.bool, device=attn.device)[None, None]
        return torch.zeros(ok.shape, device=attn.device).masked_fill(~ok, _NEG)

    def _encoder_mask(self, attn: Tensor) -> Tensor:
        if self.mask == "2d":
            return attn
        return torch.zeros(attn.shape[0], 1, 1, attn.shape[-1], device=attn.device).masked_fill(
            ~attn.bool()[:, None, None, :], _NEG)

    # -- checks -------------------------------------------------------------------------
    def validate(self, model: Callable[..., Any], batch: Any) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"LanguageModelTask: invalid kind={self.kind!r}; expected one of {KINDS}")
        if self.mask not in MASKS:
            raise ValueError(f"LanguageModelTask: invalid mask={self.mask!r}; expected one of {MASKS}")
        if not isinstance(batch, dict):
            raise ValueError(f"a language-model batch is a dict with input_ids, attention_mask and labels, got {type(batch).__name__}")
        missing = [k for k in ("input_ids", "attention_mask", "labels") if k not in batch]
        if missing:
            raise ValueError(f"batch lacks {missing}; expected input_ids, attention_mask and labels (see forwardinf.tasks.language_model.encode)")
        ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        for name, t in (("input_ids", ids), ("labels", labels)):
            if t.is_floating_point() or t.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
        if attn.numel() and not ((attn == 0) | (attn == 1)).all():  # int, bool or float 0/1, as transformers take
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
        if attn.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attn.shape)} but input_ids has {tuple(ids.shape)}")
        if self.kind == "causal" and labels.shape != ids.shape:
            raise ValueError(f"causal labels must align with input_ids {tuple(ids.shape)}, got {tuple(labels.shape)}")
        targets = labels[:, 1:] if self.kind == "causal" else labels
        empty = (targets == IGNORE).all(-1)
        if empty.any():
            raise ValueError(f"example {int(empty.nonzero()[0])} has no target token (every label is -100)")
        try:  # one example tells the vocabulary size; every id is checked against it below
            with torch.no_grad():
                logits, _ = self.logits_and_labels(model, take(batch, slice(0, 1)))
        except IndexError as e:  # the embedding lookup's complaint
            raise ValueError(f"input_ids hold token {int(ids.max())}, out of range for the model's embedding ({e})") from e
        vocab = logits.shape[-1]
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"input_ids hold token {int(ids.max())} out of range for a vocabulary of {vocab}")
        real = labels[labels != IGNORE]
        if real.numel() and (real.min() < 0 or real.max() >= vocab):
            raise ValueError(f"labels hold token {int(real.max())} out of range for a vocabulary of {vocab}")


# -- encoding ---------------------------------------------------------------------------------
# A dict of ``[N, ...]`` tensors as a dataset of dicts (the library's one, kept under this name).
DictDataset = TensorDict


def encode(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, kind: str = "causal",
           suffixes: Sequence[str] | None = None, max_length: int | None = None,
           padding_side: str = "right", bos: bool = True, eos: bool = True) -> dict[str, Tensor]:
    """Tokenise ``(prompt, target[, suffix])`` triples into a task batch (dict of ``[N, T]`` tensors).

    causal: the sequence is ``[bos] prompt target suffix [eos]`` and only the target's tokens
    are labelled. seq2seq: ``prompt`` (e.g. holding a T5 sentinel) is the encoder input and
    ``target [eos]`` the decoder's labels. ``tokenizer`` is a ``transformers`` tokenizer (or any
    object with ``encode(text, add_special_tokens=False)`` and ``pad_token_id`` /
    ``bos_token_id`` / ``eos_token_id``). Words are joined with single spaces.
    """
    if kind not in KINDS:
        raise ValueError(f"encode: invalid kind={kind!r}; expected one of {KINDS}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"encode: invalid padding_side={padding_side!r}; expected 'right' or 'left'")
    if len(prompts) != len(targets) or (suffixes is not None and len(suffixes) != len(prompts)):
        raise ValueError("encode: prompts, targets (and suffixes) must have the same length")

    def tok(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False)) if text.strip() else []

    pad = tokenizer.pad_token_id
    seqs, labs, encs = [], [], []
    for i, (p, t) in enumerate(zip(prompts, targets)):
        target_ids = tok(t)
        if not target_ids:
            raise ValueError(f"encode: example {i} has an empty target")
        if kind == "causal":
            head = ([tokenizer.bos_token_id] if bos else []) + tok(p)
            tail = tok(suffixes[i]) if suffixes is not None else []
            tail = tail + ([tokenizer.eos_token_id] if eos else [])
            seq = head + target_ids + tail
            lab = [IGNORE] * len(head) + target_ids + [IGNORE] * len(tail)
            if max_length is not None:
                seq, lab = seq[:max_length], lab[:max_length]
            seqs.append(seq)
            labs.append(lab)
        else:
            enc = tok(p) + ([tokenizer.eos_token_id] if eos else [])
            lab = target_ids + ([tokenizer.eos_token_id] if eos else [])
            if max_length is not None:
                enc, lab = enc[:max_length], lab[:max_length]
            encs.append(enc)
            labs.append(lab)
    if kind == "causal":
        ids, attn = _pad(seqs, pad, padding_side)
        labels, _ = _pad(labs, IGNORE, padding_side)
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}
    ids, attn = _pad(encs, pad, padding_side)
    labels, _ = _pad(labs, IGNORE, "right")
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _pad(rows: Sequence[Sequence[int]], value: int, side: str) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        out[i, sl] = torch.tensor(list(r), dtype=torch.long)
        mask[i, sl] = 1
    return out, mask
