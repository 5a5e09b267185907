"""Reporting for every experiment: ``results.json`` + ``report.md`` (:func:`results_object`,
:func:`write_outputs`, :func:`markdown_table`), matplotlib set up for figures (:func:`pyplot`), and
query reports: what a model's per-query attribution looks like, as an image grid and an HTML page.

matplotlib is the optional extra ``plots``: it is imported only when a figure is drawn, with the
non-interactive ``Agg`` backend unless the user chose one (``force=False``).

Every experiment that ranks training points per query (leakage, memorization, mislabel in self mode)
can hand its queries, the training inputs and the top-k indices/scores to :func:`save_query_grid`
(one PNG) or :func:`write_query_html` (a self-contained static page, images embedded as base64 PNG).

Images are NCHW tensors (1 channel = grey, 3 channels = RGB), usually *normalised*; pass
``denormalize`` (e.g. :meth:`forwardinf.data.loaders.DataSplit.denormalize`) to map them back to
[0, 1]. Without it, an image outside [0, 1] is min-max rescaled on its own so it stays visible.
"""
from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from forwardinf.io import atomic_write_text, jsonable, write_json

Denormalize = Callable[[Tensor], Tensor]

_GREEN = "#1a9e3a"
_RED = "#c0392b"


# ------------------------------------------------------------------------------ results files
def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats shown with 4 significant digits."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def results_object(experiment: str, dataset: str, config: dict, methods: dict) -> dict:
    """The fixed ``results.json`` schema."""
    return {"experiment": experiment, "dataset": dataset, "config": jsonable(config), "methods": jsonable(methods)}


def write_outputs(out_dir: str | os.PathLike, results: dict, report: str) -> Path:
    """Write ``results.json`` and ``report.md`` into ``out_dir`` (created), each atomically (a
    reader sees the old file or the whole new one); return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", report.rstrip() + "\n")
    return out


def pyplot() -> Any:
    """``matplotlib.pyplot``, on the ``Agg`` backend unless one was chosen before (``force=False``).

    Raises ``ImportError`` without matplotlib (``pip install 'forwardinf[plots]'``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def can_plot() -> bool:
    """Whether matplotlib is installed (figures are skipped, the numbers still written, without it)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


# ------------------------------------------------------------------------------------- helpers
def _as_tensor(x: Any, name: str) -> Tensor:
    if x is None:
        raise ValueError(f"{name} is required")
    t = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    return t.detach().cpu()


def _images(x: Any, name: str) -> Tensor:
    """Check ``x`` is ``[N, C, H, W]`` with C in {1, 3} (a single ``[C, H, W]`` image is accepted)."""
    t = _as_tensor(x, name).float()
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4 or t.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be images [N, C, H, W] with C = 1 (grey) or 3 (RGB), "
                         f"got shape {tuple(t.shape)}")
    return t


def _index_table(idx: Any, scores: Any, n_query: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``idx``/``scores`` ``[Q, k]`` (a ``[k]`` row is promoted when Q == 1) -> int / float arrays."""
    i = _as_tensor(idx, f"{name}_indices").long()
    s = _as_tensor(scores, f"{name}_scores").double()
    if i.dim() == 1:
        i, s = i.unsqueeze(0), s.reshape(1, -1)
    if i.dim() != 2 or i.shape[0] != n_query:
        raise ValueError(f"{name}_indices must be [n_query={n_query}, k], got {tuple(i.shape)}")
    if s.shape != i.shape:
        raise ValueError(f"{name}_scores must have the shape of {name}_indices {tuple(i.shape)}, "
                         f"got {tuple(s.shape)}")
    return i.numpy(), s.numpy()


def _optional_vector(v: Any, n: int, name: str) -> np.ndarray | None:
    if v is None:
        return None
    a = _as_tensor(v, name).reshape(-1).numpy()
    if len(a) != n:
        raise ValueError(f"{name} must have {n} entries, got {len(a)}")
    return a


def _to_hwc(img: Tensor, denormalize: Denormalize | None) -> np.ndarray:
    """``[C, H, W]`` -> ``[H, W]`` (grey) or ``[H, W, 3]`` in [0, 1] for imshow / imsave."""
    if denormalize is not None:
        img = denormalize(img.unsqueeze(0))[0]
    else:
        lo, hi = float(img.min()), float(img.max())
        if lo < 0.0 or hi > 1.0:  # still normalised: rescale this image alone so it is visible
            img = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)
    arr = img.clamp(0, 1).numpy()
    return arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))


def _label(y: Any, class_names: Sequence[str] | None) -> str:
    y = int(y)
    if class_names is not None and 0 <= y < len(class_names):
        return str(class_names[y])
    return str(y)


def _check_indices(idx: np.ndarray, n_train: int, name: str) -> None:
    if idx.size and (idx.min() < 0 or idx.max() >= n_train):
        raise ValueError(f"{name}_indices must lie in [0, {n_train}), got range "
                         f"[{idx.min()}, {idx.max()}]")


class _Table:
    """The validated content of a query report, shared by the PNG and HTML writers."""

    def __init__(self, queries: Any, train_inputs: Any, top_indices: Any, top_scores: Any, *,
                 query_labels: Any = None, train_labels: Any = None, bottom_indices: Any = None,
                 bottom_scores: Any = None, highlight: Any = None, max_queries: int | None = None):
        self.queries = _images(queries, "queries")
        self.train = _images(train_inputs, "train_inputs")
        if self.queries.shape[1:] != self.train.shape[1:]:
            raise ValueError(f"queries {tuple(self.queries.shape[1:])} and train_inputs "
                             f"{tuple(self.train.shape[1:])} must have the same image shape")
        q = self.queries.shape[0]
        self.top_i, self.top_s = _index_table(top_indices, top_scores, q, "top")
        _check_indices(self.top_i, self.train.shape[0], "top")
        self.bot_i = self.bot_s = None
        if bottom_indices is not None or bottom_scores is not None:
            if bottom_indices is None or bottom_scores is None:
                raise ValueError("bottom_indices and bottom_scores must be given together")
            self.bot_i, self.bot_s = _index_table(bottom_indices, bottom_scores, q, "bottom")
            _check_indices(self.bot_i, self.train.shape[0], "bottom")
        self.query_labels = _optional_vector(query_labels, q, "query_labels")
        self.train_labels = _optional_vector(train_labels, self.train.shape[0], "train_labels")
        self.highlight = _optional_vector(highlight, q, "highlight")
        if max_queries is not None and max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {max_queries}")
        self.n = q if max_queries is None else min(q, max_queries)


# ------------------------------------------------------------------------------------- PNG grid
def save_query_grid(path: str | os.PathLike, queries: Any, train_inputs: Any, top_indices: Any,
                    top_scores: Any, *, query_labels: Any = None, train_labels: Any = None,
                    bottom_indices: Any = None, bottom_scores: Any = None,
                    denormalize: Denormalize | None = None, class_names: Sequence[str] | None = None,
                    highlight: Any = None, max_queries: int = 8, title: str | None = None) -> Path:
    """Draw one row per query: the query, its top-k training images, then (optionally) its bottom-k.

    Args:
        path: where the PNG goes (parent folders are created).
        queries: ``[Q, C, H, W]`` query images (C = 1 or 3).
        train_inputs: ``[N, C, H, W]`` training images; indices below are positions in it.
        top_indices, top_scores: ``[Q, k]`` proponents, most influential first.
        query_labels: ``[Q]`` labels shown under each query; train_labels: ``[N]``.
        bottom_indices, bottom_scores: ``[Q, k']`` opponents (lowest scores), titled in red.
        denormalize: maps ``[B, C, H, W]`` normalised images to [0, 1].
        class_names: label -> name for captions.
        highlight: ``[Q]`` ground-truth training index per query (-1 = none); outlined in green
            wherever it appears in that row.
        max_queries: draw at most this many rows (the first ones).

    Returns the path written.
    """
    plt = pyplot()

    t = _Table(queries, train_inputs, top_indices, top_scores, query_labels=query_labels,
               train_labels=train_labels, bottom_indices=bottom_indices, bottom_scores=bottom_scores,
               highlight=highlight, max_queries=max_queries)
    k = t.top_i.shape[1]
    kb = 0 if t.bot_i is None else t.bot_i.shape[1]
    gap = 1 if kb else 0  # an empty column separates proponents from opponents
    cols = 1 + k + gap + kb
    grey = t.queries.shape[1] == 1
    widths = [1.0] * (1 + k) + [0.3] * gap + [1.0] * kb
    fig, axes = plt.subplots(t.n, cols, figsize=(1.35 * sum(widths), 1.6 * t.n + (0.4 if title else 0)),
                             squeeze=False, gridspec_kw={"width_ratios": widths})

    def show(ax: Any, img: Tensor, text: str, color: str = "black", outline: str | None = None) -> None:
        ax.imshow(_to_hwc(img, denormalize), cmap="gray" if grey else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(text, fontsize=6.5, color=color)
        for sp in ax.spines.values():
            sp.set_visible(outline is not None)
            if outline is not None:
                sp.set_edgecolor(outline)
                sp.set_linewidth(3.0)

    for r in range(t.n):
        row = axes[r]
        qlab = "" if t.query_labels is None else f" [{_label(t.query_labels[r], class_names)}]"
        show(row[0], t.queries[r], f"query {r}{qlab}", outline="#2c5aa0")
        target = None if t.highlight is None else int(t.highlight[r])
        entries = [(c, int(i), float(s), "black") for c, (i, s) in
                   enumerate(zip(t.top_i[r], t.top_s[r]), start=1)]
        if kb:
            row[1 + k].axis("off")
            entries += [(c, int(i), float(s), _RED) for c, (i, s) in
                        enumerate(zip(t.bot_i[r], t.bot_s[r]), start=2 + k)]
        for c, i, s, color in entries:
            lab = "" if t.train_labels is None else f" [{_label(t.train_labels[i], class_names)}]"
            show(row[c], t.train[i], f"#{i}{lab}\n{s:.3g}", color=color,
                 outline=_GREEN if target is not None and i == target else None)
    if kb:
        axes[0][1].annotate("proponents (top-k)", (0, 1.45), xycoords="axes fraction", fontsize=7)
        axes[0][2 + k].annotate("opponents (bottom-k)", (0, 1.45), xycoords="axes fraction",
                                fontsize=7, color=_RED)
    if title:
        import textwrap

        width = max(30, int(14 * sum(widths)))  # characters that fit across the figure
        fig.suptitle("\n".join(textwrap.fill(line, width) for line in title.splitlines()), fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------- HTML page
def _png_b64(img: Tensor, denormalize: Denormalize | None) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import image as mpimg

    arr = _to_hwc(img, denormalize)
    buf = io.BytesIO()
    if arr.ndim == 2:
        mpimg.imsave(buf, arr, cmap="gray", vmin=0.0, vmax=1.0, format="png")
    else:
        mpimg.imsave(buf, arr, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin-bottom:1.2em}
td{padding:3px;text-align:center;vertical-align:top;font-size:11px}
img{width:64px;height:64px;image-rendering:pixelated;border:3px solid transparent}
img.query{border-color:#2c5aa0} img.hit{border-color:#1a9e3a}
td.opp{color:#c0392b} td.sep{width:18px}
h2{font-size:15px;margin:0.8em 0 0.2em}
"""


def write_query_html(out_dir: str | os.PathLike, name: str, queries: Any, train_inputs: Any,
                     top_indices: Any, top_scores: Any, *, query_labels: Any = None,
                     train_labels: Any = None, bottom_indices: Any = None, bottom_scores: Any = None,
                     denormalize: Denormalize | None = None, class_names: Sequence[str] | None = None,
                     highlight: Any = None, max_queries: int = 50, title: str | None = None) -> Path:
    """Write ``out_dir/<name>.html``: each query with its top-k proponents and bottom-k opponents.

    Same arguments as :func:`save_query_grid`; every image is embedded as a base64 PNG, so the page
    is one self-contained file. Returns its path.
    """
    if not name or any(ch in name for ch in "/\\"):
        raise ValueError(f"name must be a plain file stem without slashes, got {name!r}")
    t = _Table(queries, train_inputs, top_indices, top_scores, query_labels=query_labels,
               train_labels=train_labels, bottom_indices=bottom_indices, bottom_scores=bottom_scores,
               highlight=highlight, max_queries=max_queries)
    cache: dict[int, str] = {}

    def train_img(i: int) -> str:
        if i not in cache:
            cache[i] = _png_b64(t.train[i], denormalize)
        return cache[i]

    def cell(i: int, s: float, cls: str, hit: bool) -> str:
        lab = "" if t.train_labels is None else f"<br>{html.escape(_label(t.train_labels[i], class_names))}"
        return (f'<td class="{cls}"><img class="{"hit" if hit else ""}" alt="train {i}" '
                f'src="data:image/png;base64,{train_img(i)}"><br>#{i}{lab}<br>{s:.4g}</td>')

    head = html.escape(title or name)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{head}</title><style>{_CSS}</style></head><body>", f"<h1>{head}</h1>",
             f"<p>{t.n} of {t.queries.shape[0]} queries; proponents = highest scores"
             + ("; opponents (red) = lowest scores" if t.bot_i is not None else "")
             + ("; green outline = ground-truth training point" if t.highlight is not None else "")
             + ".</p>"]
    for r in range(t.n):
        target = None if t.highlight is None else int(t.highlight[r])
        qlab = "" if t.query_labels is None else f" (label {html.escape(_label(t.query_labels[r], class_names))})"
        parts.append(f'<h2 id="q{r}">query {r}{qlab}' +
                     (f", ground truth #{target}" if target is not None and target >= 0 else "") + "</h2>")
        parts.append("<table><tr>")
        parts.append(f'<td><img class="query" alt="query {r}" '
                     f'src="data:image/png;base64,{_png_b64(t.queries[r], denormalize)}"><br>query</td>')
        parts += [cell(int(i), float(s), "top", int(i) == target) for i, s in zip(t.top_i[r], t.top_s[r])]
        if t.bot_i is not None:
            parts.append('<td class="sep"></td>')
            parts += [cell(int(i), float(s), "opp", int(i) == target)
                      for i, s in zip(t.bot_i[r], t.bot_s[r])]
        parts.append("</tr></table>")
    parts.append("</body></html>")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.html"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
