"""MkDocs hooks: pages generated from the code and the measured results at build time.

Docstrings' Sphinx roles (``:class:`X``` ...) are shown as plain code (``on_page_content``).

- ``<!-- generate: cli -->``: the ``--help`` of every ``forwardinf`` subcommand, from the argparse
  parser that ``forwardinf.cli`` builds (so the page cannot drift from the command line);
- ``<!-- generate: methods -->``: every name of the method table (``forwardinf.baselines.methods``);
- ``<!-- generate: benchmarks -->``: an index of ``benchmarks/results/*.md``; every file of that
  folder is added to the site under ``benchmarks/results/`` and its pages to the navigation.

Links in the benchmark pages that point outside the site (to scripts, other folders) become plain
paths, so ``mkdocs build --strict`` checks every link that the site can resolve.
"""
from __future__ import annotations

import io
import os
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
BENCH_PREFIX = "benchmarks/results/"
BENCH_INDEX = "reference/benchmarks.md"
if str(ROOT / "src") not in sys.path:  # build from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))


def _title(md: Path) -> str:
    for line in md.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return md.stem


def _bench_pages() -> list[Path]:
    return sorted(RESULTS.glob("*.md"))


# -- configuration and files -------------------------------------------------------------------------
def on_config(config):
    """Put every benchmark page under the nav's Benchmarks section (after its index)."""
    def visit(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                if BENCH_INDEX in value:
                    value.extend({_title(p): BENCH_PREFIX + p.name} for p in _bench_pages())
                    return True
                if visit(value):
                    return True
        return False

    visit(config["nav"] or [])
    return config


def on_files(files: Files, config) -> Files:
    """Add ``benchmarks/results/*`` (pages, figures, JSON) to the site."""
    for path in sorted(RESULTS.iterdir()):
        if path.is_file():
            files.append(File.generated(config, BENCH_PREFIX + path.name, abs_src_path=str(path)))
    return files


# -- page contents -----------------------------------------------------------------------------------
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _local_links(markdown: str, page_dir: str, files: Files) -> str:
    """Keep links that resolve to a file of the site; show the others as a plain path."""
    def fix(m: re.Match) -> str:
        bang, text, target = m.groups()
        if re.match(r"^[a-z]+:|^#", target):
            return m.group(0)
        path = target.split("#")[0]
        uri = os.path.normpath(os.path.join(page_dir, path)).replace(os.sep, "/")
        if files.get_file_from_path(uri) is not None:
            return m.group(0)
        return f"{text} (`{target}`)" if text and text != target else f"`{target}`"

    return _LINK.sub(fix, markdown)


def _cli() -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width: fix it for the page
    from forwardinf.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    out = ["```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in subs.choices.items():
        out += [f"## `forwardinf {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def _rst_to_md(text: str) -> str:
    """Docstring markup to Markdown: ``:class:`X``` -> ``X``, ````code```` stays code."""
    return re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)


def _methods() -> str:
    from forwardinf.baselines import methods as r

    def cell(s: object) -> str:
        return str(s).replace("|", "\\|")

    out = ["| name | estimator | set for | keywords | needs |", "|---|---|---|---|---|"]
    for name, v in r.FORWARD_INF.items():
        kw = ", ".join(f"{k}={val!r}" for k, val in v.kw.items()) or "defaults"
        out.append(f"| `{name}` | {v.estimator.__name__} | {v.task} | `{cell(kw)}` | {', '.join(sorted(v.needs)) or '-'} |")
    groups = [(r.METHODS[1:], "baseline"), (r.PEER_METHODS, "peer library (optional install)"),
              (r.REFERENCE_METHODS, "reference (nearest neighbour)")]
    for names, kind in groups:
        for name in names:
            needs = ", ".join(sorted(r.requirements(name))) or "-"
            out.append(f"| `{name}` | {kind} | classification | see below | {needs} |")
    doc = _rst_to_md(r.__doc__ or "")
    return "\n".join(out) + "\n\n## What the names mean\n\n" + doc


def _benchmarks() -> str:
    out = ["| page | first line |", "|---|---|"]
    for p in _bench_pages():
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        first = next((ln for ln in lines if ln and not ln.startswith(("#", "|", "!", "<", "```", ">"))), "")
        first = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", first)[:160].replace("|", "\\|")
        out.append(f"| [{_title(p)}](../{BENCH_PREFIX}{p.name}) | {first} |")
    return "\n".join(out)


GENERATORS = {"cli": _cli, "methods": _methods, "benchmarks": _benchmarks}
# Docstrings use Sphinx roles (:class:`X`); rendered as Markdown they leave ":class:" before the code.
_ROLE = re.compile(r":(?:meth|func|class|mod|data|attr|exc|obj):(?=<code>)")


def on_page_content(html: str, page, config, files: Files) -> str:
    """Drop the Sphinx role prefixes (and the ``~`` shortening mark) that docstrings carry."""
    return _ROLE.sub("", html).replace("<code>~", "<code>")


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    src = page.file.src_uri
    if src.startswith(BENCH_PREFIX):
        return _local_links(markdown, os.path.dirname(src), files)
    for key, make in GENERATORS.items():
        marker = f"<!-- generate: {key} -->"
        if marker in markdown:
            with redirect_stdout(io.StringIO()):  # importing experiments must not print into the build log
                markdown = markdown.replace(marker, make())
    return markdown
