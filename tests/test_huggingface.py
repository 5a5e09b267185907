"""Hugging Face models as users build them: transformers (default attention), PEFT/LoRA, `datasets`.

Tiny models from configs with default settings (no attn_implementation override: sdpa), nothing
downloaded. For each model of the matrix every registry method that supports transformers models
runs, the default Forward-INF ranks exact copies of 4 training rows first (ties counted against
it), and the model is bit-identical afterwards (parameters, buffers, every module's mode).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
import forwardinf as fi  # noqa: E402
from forwardinf.baselines import make_estimator  # noqa: E402
from forwardinf.baselines.methods import FORWARD_INF  # noqa: E402
from forwardinf.core.params import fingerprint  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")  # transformers' deprecation and config chatter
V, N, T, QUERIES = 64, 16, 8, (0, 5, 10, 15)  # vocabulary, training rows, tokens, rows copied as queries

# Registry methods that run on transformers models; the others refuse them with a ValueError.
KFAC = ("forward-inf-counterfactual", "forward-inf-counterfactual-tail", "forward-inf-counterfactual-ekfac")
SUPPORTED = (*[n for n, v in FORWARD_INF.items() if v.task in ("classification", "language") and not v.needs
               and n not in ("forward-inf-authors", *KFAC)],
             "if-100", "if-1000", "if-10000", "if-cg", "if-exact", "tracin-last", "grad-cos", "grad-dot")
REFUSED = ("forward-inf-authors",  # perturbs float inputs
           *KFAC,  # K-FAC: Linear / Conv2d only
           "representer")  # (inputs, targets) batches only
# Baselines that need class labels [B] and a per-example embedding: they run on these models and refuse
# the others (per-token labels; a head on every token, as GPT-2's classifier; token ids as pixel-nn's inputs).
CLASSIFIER_BASELINES = {"knn-shapley": ("bert", "distilbert", "vit"), "tmc-shapley": ("bert", "distilbert", "vit"),
                        "feature-nn": ("bert", "distilbert", "vit"), "pixel-nn": ("vit",)}
# LiSSA's / CG's depth and the damping and scale estimates only change how long the same code path runs (as in test_contract)
OVERRIDES = {name: {"depth": 5, "damping": 0.01, "scale": 100.0} for name in ("if-100", "if-1000", "if-10000", "if-cg")}
OVERRIDES["tmc-shapley"] = {"permutations": 2}  # more permutations only repeat the same retraining path


def _tokens(n: int = N, t: int = T, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask) [n, t]``: a third of the rows right-padded (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, t), generator=g)
    attn = torch.ones_like(ids)
    attn[: n // 3, t - 3:] = 0
    return ids.masked_fill(attn == 0, 0), attn


def _classification(n: int = N, seed: int = 0) -> dict:
    ids, attn = _tokens(n, seed=seed)
    return {"input_ids": ids, "attention_mask": attn, "labels": torch.arange(n) % 2}


def _causal() -> dict:
    ids, attn = _tokens()
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :2] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _seq2seq() -> dict:
    ids, attn = _tokens()
    return {"input_ids": ids, "attention_mask": attn, "labels": torch.randint(3, V, (N, 5), generator=torch.Generator().manual_seed(1))}


def _images() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(N, 3, 8, 8, generator=g), "labels": torch.arange(N) % 3}


def _llama(cls: type, **kw) -> torch.nn.Module:
    return cls(transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, **kw))


def _lora() -> torch.nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(_llama(transformers.LlamaForCausalLM), config)


# name -> (model builder, data builder, "classification" | "lm", tail split)
MODELS = {
    "llama": (lambda: _llama(transformers.LlamaForCausalLM), _causal, "lm", "model.layers.1"),
    "gpt2": (lambda: transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=16, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)), _classification, "classification", "transformer.h.1"),
    "bert": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16)), _classification, "classification", "bert.encoder.layer.1"),
    "distilbert": (lambda: transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
        vocab_size=V, dim=16, hidden_dim=32, n_layers=2, n_heads=2, max_position_embeddings=16)),
        _classification, "classification", "distilbert.transformer.layer.1"),
    "bart": (lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)), _seq2seq, "lm",
        "model.encoder.layers.1"),
    "vit": (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3)), _images, "classification", "vit.layers.1"),
    "lora-llama": (_lora, _causal, "lm", "base_model.model.model.layers.1"),
}


def _setup(name: str) -> tuple[torch.nn.Module, fi.Task, dict, dict]:
    build, data, kind, _ = MODELS[name]
    torch.manual_seed(0)
    model = build()  # built from a config: train mode, default (sdpa) attention
    task = fi.LanguageModelTask.for_model(model) if kind == "lm" else fi.ClassificationTask()
    train = data()
    queries = {k: v[list(QUERIES)] for k, v in train.items()}
    return model, task, train, queries


def _ranks(scores: torch.Tensor) -> list[int]:
    """Rank of each query's own training row, ties counted against it."""
    own = scores[torch.arange(len(QUERIES)), torch.tensor(QUERIES)]
    return (scores >= own[:, None]).sum(1).tolist()


def _state(model: torch.nn.Module) -> tuple[list, list]:
    return fingerprint(model), [m.training for m in model.modules()]


def _same(before: tuple[list, list], model: torch.nn.Module) -> bool:
    params, modes = _state(model)
    return modes == before[1] and all(a == c and torch.equal(b, d) for (a, b), (c, d) in zip(before[0], params))


@pytest.mark.parametrize("name", MODELS)
def test_default_attention_is_sdpa(name):
    model = _setup(name)[0]
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", MODELS)
def test_default_forward_inf_ranks_copies_first_and_leaves_the_model_bit_identical(name):
    model, task, train, queries = _setup(name)
    model.train()
    list(model.modules())[-1].eval()  # mixed modes come back as they were
    before = _state(model)
    scores = fi.ForwardINF(model, task).fit(train).influence(queries)
    assert scores.shape == (len(QUERIES), N) and torch.isfinite(scores).all()
    assert _ranks(scores) == [1] * len(QUERIES)
    assert _same(before, model)


@pytest.mark.parametrize("name", MODELS)
def test_every_supported_registry_method_runs(name):
    model, task, train, queries = _setup(name)
    before = _state(model)
    for method in SUPPORTED:
        kw = dict(OVERRIDES.get(method, {}))
        if FORWARD_INF.get(method) is not None and FORWARD_INF[method].estimator is fi.TailForwardINF:
            kw["split"] = MODELS[name][3]
        scores = make_estimator(method, model, task, **kw).fit(train).influence(queries)
        assert scores.shape == (len(QUERIES), N) and torch.isfinite(scores).all(), method
    assert _same(before, model)


@pytest.mark.parametrize("method", CLASSIFIER_BASELINES)
def test_classifier_baselines_take_hugging_face_batches_or_refuse_them_clearly(method):
    for name in MODELS:
        model, task, train, queries = _setup(name)
        before = _state(model)
        est = make_estimator(method, model, task, **OVERRIDES.get(method, {}))
        if name in CLASSIFIER_BASELINES[method]:
            scores = est.fit(train).influence(queries)
            assert scores.shape == (len(QUERIES), N) and torch.isfinite(scores).all(), name
        else:
            with pytest.raises(ValueError, match="class indices|every token|float inputs"):
                est.fit(train).influence(queries)
        assert _same(before, model), name


@pytest.mark.parametrize("method", REFUSED)
def test_the_other_methods_refuse_hugging_face_batches_clearly(method):
    model, task, train, queries = _setup("bert")
    with pytest.raises(ValueError):
        make_estimator(method, model, task).fit(train).influence(queries)


def test_default_attention_scores_equal_eager_attention():
    out = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = _llama(transformers.LlamaForSequenceClassification, attn_implementation=impl).eval()
        train = _classification()
        out[impl] = fi.ForwardINF(model).fit(train).influence({k: v[:4] for k, v in train.items()})
    torch.testing.assert_close(out["sdpa"], out["eager"], atol=1e-4, rtol=0)


def test_a_users_task_passing_the_2d_mask_works_under_vmap():
    class MyTask(fi.Task):
        def loss(self, model, batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")

    model, _, train, queries = _setup("bert")
    model.eval()
    for est in (fi.ForwardINF(model, MyTask()), fi.TracIn(model, MyTask())):
        assert _ranks(est.fit(train).influence(queries)) == [1] * len(QUERIES)


@pytest.mark.parametrize("name", ["bert", "distilbert", "llama-classifier"])
def test_cosine_does_not_saturate_a_duplicate_ranks_first_with_no_ties(name):
    torch.manual_seed(0)
    if name == "llama-classifier":
        model = _llama(transformers.LlamaForSequenceClassification)
    else:
        model = MODELS[name][0]()
    train = _classification(64, seed=3)
    rows = torch.arange(0, 64, 8)
    scores = fi.ForwardINF(model.eval()).fit(train).influence({k: v[rows] for k, v in train.items()})
    own = scores[torch.arange(len(rows)), rows]
    assert ((scores >= own[:, None]).sum(1) == 1).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_norms_take_the_closed_form_and_equal_per_example_autograd(name):
    """The cosine's sensitivities: linear layers, embeddings (tied heads, padding) and GPT-2's
    Conv1D by their closed form, the rest materialized; equal to each example's own backward pass."""
    from forwardinf.core.grad_norms import squared_grad_norms
    from forwardinf.core.params import bind, buffers_of, select_params

    model, task, train, _ = _setup(name)
    model.eval()
    params, buffers = select_params(model, None), buffers_of(model)
    one = lambda p, ex: task.score_loss(bind(model, p, buffers), {k: v[None] for k, v in ex.items()}).sum()  # noqa: E731
    plan: dict = {}
    with torch.no_grad():
        got = squared_grad_norms(one, params, train, model, 2**30, plan)
    assert plan["checked"] and plan["ghost"], "the closed form was dropped"
    expected = []
    for i in range(N):
        model.zero_grad()
        task.score_loss(model, {k: v[i:i + 1] for k, v in train.items()}).sum().backward()
        expected.append(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None))
    model.zero_grad()
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "lora-llama"])
def test_tail_mode_splits_at_a_block_and_equals_forward_inf_on_the_tail(name):
    from forwardinf.estimators.hf_tail import tail_parameter_names

    model, task, train, queries = _setup(name)
    model.eval()
    split = MODELS[name][3]
    before = _state(model)
    tail = fi.TailForwardINF(model, task, split=split).fit(train).influence(queries)
    full = fi.ForwardINF(model, task, params=tail_parameter_names(model, split)).fit(train).influence(queries)
    torch.testing.assert_close(tail, full, atol=1e-5, rtol=0)
    assert _ranks(tail) == [1] * len(QUERIES)
    assert _same(before, model)


def test_tail_mode_refuses_a_split_that_is_not_a_block():
    model, task, train, _ = _setup("bert")
    with pytest.raises(ValueError, match="bert.encoder.layer"):
        fi.TailForwardINF(model, task, split="classifier").fit(train)


def test_lora_scores_the_adapters_only_and_leaves_the_base_weights():
    model, task, train, queries = _setup("lora-llama")
    est = fi.ForwardINF(model.eval(), task).fit(train)
    update = est._update_each(queries, len(QUERIES)).moved  # the forward-mode scores: θ_q - θ only
    assert update and all("lora_" in k for k in update)
    base = fi.ForwardINF(model, task, params="*lora_A*").fit(train).influence(queries)  # a chosen subset
    assert _ranks(base) == [1] * len(QUERIES)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(V - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                cls_token="[CLS]", sep_token="[SEP]")


def _texts(n: int = N) -> list[str]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, T, (n,), generator=g)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, V - 4, (int(k),), generator=g)) for k in lengths]


def test_datasets_collators_and_samplers():
    datasets = pytest.importorskip("datasets")
    from torch.utils.data import DataLoader, Sampler, SubsetRandomSampler

    model = MODELS["bert"][0]().eval()
    tok, texts = _tokenizer(), _texts()
    labels = [i % 2 for i in range(N)]
    ds = datasets.Dataset.from_dict({"text": texts, "label": labels})
    ds = ds.map(lambda b: tok(b["text"], padding="max_length", max_length=T), batched=True)
    scores = fi.ForwardINF(model).fit(ds).influence(ds.select(list(QUERIES)))  # text column left out
    assert _ranks(scores) == [1] * len(QUERIES)

    examples = [dict(tok(t), labels=y) for t, y in zip(texts, labels)]  # per-example, unpadded
    collate = transformers.DataCollatorWithPadding(tok)
    with pytest.raises(ValueError, match="DataCollatorWithPadding"):
        fi.ForwardINF(model).fit(examples)
    est = fi.ForwardINF(model).fit(DataLoader(examples, batch_size=4, collate_fn=collate))
    queries = DataLoader([examples[i] for i in QUERIES], collate_fn=collate)
    assert _ranks(est.influence(queries)) == [1] * len(QUERIES)

    class Reversed(Sampler):
        def __iter__(self):
            return iter(range(N - 1, -1, -1))

        def __len__(self):
            return N

    rev = fi.ForwardINF(model).fit(DataLoader(examples, batch_size=4, collate_fn=collate, sampler=Reversed()))
    assert rev.influence(queries).argmax(1).tolist() == [N - 1 - i for i in QUERIES]  # positions in sampler order
    dropped = fi.ForwardINF(model).fit(DataLoader(examples, batch_size=5, collate_fn=collate, drop_last=True))
    assert len(dropped.train_) == 15
    with pytest.raises(ValueError, match="different order on every pass"):
        fi.ForwardINF(model).fit(DataLoader(examples, collate_fn=collate, sampler=SubsetRandomSampler(range(8))))


def test_padded_token_tuples_are_refused():
    model, _, train, _ = _setup("bert")
    with pytest.raises(ValueError, match="attention_mask"):
        fi.ForwardINF(model).fit((train["input_ids"], train["labels"]))


def test_readme_hugging_face_example_runs_as_written():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    after = readme.split("<!-- hf-example -->", 1)[1]
    code = re.search(r"```python\n(.*?)```", after, re.S).group(1)
    exec(compile(code, "README.md (hf-example)", "exec"), {})


@pytest.mark.parametrize("name,seed", [("bert", 0), ("distilbert", 0), ("bert", 1)])
def test_self_influence_puts_flipped_labels_on_top_for_every_score(name, seed):
    """A small classifier trained to fit 96 sequences, 10 of them with flipped labels: the default
    score's self-influence ranks the flipped ones high (AUC well above the 0.5 of chance) and agrees
    with TracIn's. (Measured for the others' joint self mode: 'loss' AUC 0.89 / 0.39 / 0.81 on these
    three runs, not robust; see the report.)"""
    g = torch.Generator().manual_seed(seed)
    n, vocab = 96, 32
    ids = torch.randint(3, vocab, (n, 6), generator=g)
    clean = (ids[:, 0] < (3 + vocab) // 2).long()  # the label is a rule on the first token
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=g)[:10]] = True
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.where(flipped, 1 - clean, clean)}
    torch.manual_seed(seed)
    model = (transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)) if name == "bert"
        else transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            vocab_size=vocab, dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=16, dropout=0.0,
            attention_dropout=0.0, seq_classif_dropout=0.0)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        for idx in torch.randperm(n, generator=g).split(16):
            batch = {k: v[idx] for k, v in data.items()}
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    before = _state(model)
    s = fi.ForwardINF(model).fit(data).self_influence()
    auc = (s[flipped][:, None] > s[~flipped][None, :]).float().mean().item()
    assert auc > 0.75, auc
    tracin = fi.TracIn(model).fit(data).self_influence()
    assert torch.corrcoef(torch.stack([s.log(), tracin.log()]))[0, 1] > 0.8  # the same quantity, estimated
    assert _same(before, model)
