"""Query report: PNG grid and HTML page are written, well-formed, and reject bad input."""
from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

import pytest
import torch

from forwardinf.experiments.report import save_query_grid, write_query_html

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _data(c: int = 1, n: int = 20, q: int = 3, k: int = 4):
    g = torch.Generator().manual_seed(0)
    train = torch.randn(n, c, 8, 8, generator=g)
    queries = train[:q] + 0.05 * torch.randn(q, c, 8, 8, generator=g)
    scores = torch.randn(q, n, generator=g)
    scores[torch.arange(q), torch.arange(q)] = 10.0  # each query's source ranks first
    top = scores.topk(k, dim=1)
    bot = scores.topk(2, dim=1, largest=False)
    return train, queries, top, bot


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_png_written(tmp_path, channels):
    import matplotlib.image as mpimg

    train, queries, top, bot = _data(c=channels)
    path = save_query_grid(tmp_path / "sub" / "grid.png", queries, train, top.indices, top.values,
                           query_labels=torch.tensor([0, 1, 2]), train_labels=torch.arange(20) % 10,
                           bottom_indices=bot.indices, bottom_scores=bot.values,
                           highlight=torch.tensor([0, 1, -1]), class_names=[str(i) for i in range(10)])
    assert path.exists() and path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    # 3 query rows, 1 + 4 + 1 + 2 columns: wider than tall, and non-blank.
    assert img.shape[1] > img.shape[0] > 100
    assert img[..., :3].std() > 0.05


def test_grid_denormalize_and_max_queries(tmp_path):
    train, queries, top, _ = _data(q=3)
    seen = []

    def denorm(x):
        seen.append(tuple(x.shape))
        return (x * 0.5 + 0.5).clamp(0, 1)

    save_query_grid(tmp_path / "g.png", queries, train, top.indices, top.values,
                    denormalize=denorm, max_queries=2)
    # 2 rows x (1 query + 4 top) images, each denormalised as a batch of one.
    assert len(seen) == 10 and all(s == (1, 1, 8, 8) for s in seen)


def test_grid_rejects_bad_input(tmp_path):
    train, queries, top, _ = _data()
    with pytest.raises(ValueError, match="top_indices"):
        save_query_grid(tmp_path / "x.png", queries, train, top.indices[:2], top.values[:2])
    with pytest.raises(ValueError, match="top_scores"):
        save_query_grid(tmp_path / "x.png", queries, train, top.indices, top.values[:, :2])
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        save_query_grid(tmp_path / "x.png", queries, train, top.indices + 100, top.values)
    with pytest.raises(ValueError, match="C = 1"):
        save_query_grid(tmp_path / "x.png", torch.zeros(3, 2, 8, 8), torch.zeros(20, 2, 8, 8),
                        top.indices, top.values)
    with pytest.raises(ValueError, match="together"):
        save_query_grid(tmp_path / "x.png", queries, train, top.indices, top.values,
                        bottom_indices=top.indices)


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.imgs, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag not in ("meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(tag)
        else:
            self.stack.pop()


@pytest.mark.parametrize("channels", [1, 3])
def test_html_page_well_formed(tmp_path, channels):
    train, queries, top, bot = _data(c=channels)
    path = write_query_html(tmp_path, "leak<1>", queries, train, top.indices, top.values,
                            bottom_indices=bot.indices, bottom_scores=bot.values,
                            train_labels=torch.arange(20) % 10, highlight=torch.tensor([0, 1, 2]))
    text = path.read_text()
    assert path.name == "leak<1>.html"
    p = _Collect()
    p.feed(text)
    p.close()
    assert not p.errors and p.stack == []  # every tag closed in order
    assert "<title>leak&lt;1&gt;</title>" in text  # escaped
    # 3 queries x (1 + 4 top + 2 bottom) images, all valid embedded PNGs.
    assert len(p.imgs) == 3 * 7
    for a in p.imgs:
        m = re.fullmatch(r"data:image/png;base64,(.+)", a["src"])
        assert m and base64.b64decode(m.group(1))[:8] == PNG_MAGIC
    # The ground-truth point (rank 1 of every row by construction) is outlined once per query.
    assert sum(a.get("class") == "hit" for a in p.imgs) == 3
    for i in range(3):
        assert f"query {i}" in text and f"#{int(top.indices[i, 0])}" in text


def test_html_rejects_path_in_name(tmp_path):
    train, queries, top, _ = _data()
    with pytest.raises(ValueError, match="name"):
        write_query_html(tmp_path, "a/b", queries, train, top.indices, top.values)
