"""Tiny language models built from configs, and a word-level tokenizer built from a corpus.

Nothing is downloaded: the tokenizer is trained on the texts you give it (``tokenizers``'
``WordLevel`` model wrapped in a ``transformers`` fast tokenizer) and the models are
``transformers`` GPT-2 / T5 built from a config with a seeded random init. Both save and load
with the usual ``save_pretrained`` / :func:`load_language_model` (local folders only).

Choices that matter for attribution:
- eager attention (vmap/jvp-friendly and bit-reproducible on CPU);
- GPT-2's output layer (``lm_head``) is untied from the input embedding, so "the last layer" of
  TracIn's one-layer shortcut is its own parameter (transformers always ties T5's: there the
  last layer is ``shared.weight``; see :func:`output_layer_name`);
- no dropout, so train and eval mode compute the same function.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import torch
from torch import nn

from forwardinf.core.seeding import seeded

SPECIALS = {"pad": "[PAD]", "eos": "</s>", "unk": "[UNK]", "mask": "<extra_id_0>", "bos": "<s>"}
# T5 convention: pad 0 (also the decoder start), eos 1.
SPECIAL_ORDER = ("pad", "eos", "unk", "mask", "bos")

LM_CONFIGS: dict[str, dict[str, Any]] = {
    # ~0.6M parameters + the embeddings: trains on a few thousand sentences in about a minute on CPU.
    "gpt2-tiny": dict(arch="gpt2", n_embd=128, n_layer=2, n_head=4, n_positions=64),
    "gpt2-small": dict(arch="gpt2", n_embd=256, n_layer=4, n_head=4, n_positions=128),
    "t5-tiny": dict(arch="t5", d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4),
}


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("language models need the 'lm' extra: pip install 'forwardinf[lm]'") from e
    return transformers


def build_tokenizer(texts: Iterable[str], *, lowercase: bool = False, min_frequency: int = 1) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` whose vocabulary is every word of ``texts``.

    Words are split at whitespace and punctuation; ids 0-4 are ``[PAD] </s> [UNK] <extra_id_0>
    <s>`` (pad, eos, unknown, the T5 sentinel, bos); then words by descending frequency.
    """
    transformers = _require_transformers()
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token=SPECIALS["unk"]))
    norms = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(norms)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    trainer = trainers.WordLevelTrainer(vocab_size=10**7, min_frequency=min_frequency,
                                        special_tokens=[SPECIALS[k] for k in SPECIAL_ORDER])
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=SPECIALS["pad"], eos_token=SPECIALS["eos"], unk_token=SPECIALS["unk"],
        bos_token=SPECIALS["bos"], additional_special_tokens=[SPECIALS["mask"]])
    return fast


def build_language_model(name: str, tokenizer: Any, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """A seeded, randomly initialised model from ``LM_CONFIGS[name]`` sized to ``tokenizer``.

    ``overrides`` replace config entries (e.g. ``n_layer=4``). The caller's RNG state is left alone.
    """
    if name not in LM_CONFIGS:
        raise ValueError(f"unknown language model {name!r}; expected one of {sorted(LM_CONFIGS)}")
    transformers = _require_transformers()
    cfg = {**LM_CONFIGS[name], **overrides}
    arch = cfg.pop("arch")
    ids = {k: tokenizer.convert_tokens_to_ids(SPECIALS[k]) for k in ("pad", "eos", "bos")}
    vocab = len(tokenizer)
    with seeded(seed):
        if arch == "gpt2":
            config = transformers.GPT2Config(
                vocab_size=vocab, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False, **cfg)
            config._attn_implementation = "eager"
            model = transformers.GPT2LMHeadModel(config)
        elif arch == "t5":
            config = transformers.T5Config(
                vocab_size=vocab, pad_token_id=ids["pad"], eos_token_id=ids["eos"],
                decoder_start_token_id=ids["pad"], dropout_rate=0.0, feed_forward_proj="relu", **cfg)
            config._attn_implementation = "eager"
            model = transformers.T5ForConditionalGeneration(config)
        else:  # pragma: no cover - guarded by LM_CONFIGS
            raise ValueError(f"unknown architecture {arch!r}")
    return model.eval()


def output_layer_name(model: nn.Module) -> str:
    """Name of the output layer's weight (``"lm_head.weight"``, or ``"shared.weight"`` when tied as
    in transformers' T5): "the last layer" of TracIn's one-layer shortcut."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        raise ValueError(f"{type(model).__name__} has no output embedding layer")
    for name, p in model.named_parameters():
        if p is out.weight:
            return name
    raise ValueError("the output layer's weight is not among the model's parameters")


def is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def save_language_model(model: nn.Module, tokenizer: Any, path: str | os.PathLike) -> None:
    """Save model and tokenizer into one folder (``save_pretrained`` format)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def load_language_model(path: str | os.PathLike) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local folder written by ``save_pretrained``; never downloads."""
    transformers = _require_transformers()
    path = os.fspath(path)
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} is not a saved model folder (no config.json)")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    auto = (transformers.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False)
            else transformers.AutoModelForCausalLM)
    model = auto.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def train_language_model(model: nn.Module, task: Any, dataset: Any, *, epochs: int = 20, lr: float = 3e-3,
                         batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0,
                         checkpoint_epochs: Iterable[int] = (), progress: bool = False) -> list[dict[str, Any]]:
    """Fine-tune ``model`` in place on ``task.query_loss`` with Adam and a cosine schedule.

    ``dataset``: a map-style dataset of task batches (e.g. :class:`~forwardinf.tasks.language_model.DictDataset`).
    Returns the checkpoints taken after each epoch in ``checkpoint_epochs`` (1-based), each
    ``{"epoch", "lr" (the mean step size of that epoch), "state_dict" (a copy)}``, for TracInCP.
    The model is left in eval mode; shuffling is seeded and the caller's RNG is left alone.
    """
    import math

    from forwardinf.data.inputs import gather

    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be a non-negative int, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    n = len(dataset)
    steps = max(epochs * math.ceil(n / batch_size), 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    wanted = set(checkpoint_epochs)
    out = []
    epoch_iter: Any = range(1, epochs + 1)
    if progress:
        from tqdm.auto import tqdm
        epoch_iter = tqdm(epoch_iter, desc="fine-tune", unit="epoch", leave=False)
    model.train()
    for epoch in epoch_iter:
        order = torch.randperm(n, generator=gen)
        lrs = []
        for start in range(0, n, batch_size):
            lrs.append(opt.param_groups[0]["lr"])
            batch = gather(dataset, order[start:start + batch_size].tolist())
            loss = task.query_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch in wanted:
            out.append({"epoch": epoch, "lr": sum(lrs) / len(lrs),
                        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}})
    model.eval()
    return out
