"""The documentation site builds with ``mkdocs build --strict`` and documents the whole public API.

The build runs the site's hooks (the command-line page from argparse, the method registry, the
benchmark pages) and mkdocstrings over the docstrings; ``--strict`` fails on any broken link or
anchor, missing page or unresolved reference. Skipped only when mkdocs itself is not installed
(the ``docs`` extra).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import forwardinf as fi

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "reference" / "api.md"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="the docs extra (mkdocs, mkdocs-material, mkdocstrings[python])")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


def public_names() -> list[str]:
    return sorted(n for n in fi.__all__ if n != "__version__")


def test_every_public_name_has_a_directive_in_the_api_reference():
    documented = set(re.findall(r"^::: forwardinf\.(\w+)\s*$", API.read_text(), flags=re.M))
    missing = set(public_names()) - documented
    assert not missing, f"forwardinf.__all__ names without a '::: forwardinf.NAME' in {API.name}: {sorted(missing)}"


def test_site_builds_strict_and_renders_every_public_name(site):
    html = (site / "reference" / "api" / "index.html").read_text()
    missing = [n for n in public_names() if f'id="forwardinf.{n}"' not in html]
    assert not missing, f"not rendered in the API reference: {missing}"
    assert "__version__" in html


def test_cli_page_has_every_subcommand(site):
    from forwardinf.cli import COMMANDS

    html = (site / "reference" / "cli" / "index.html").read_text()
    for name in COMMANDS:
        assert f'id="forwardinf-{name}"' in html, name
    assert "--query-chunk" in html  # an option of `score`, from argparse


def test_registry_page_lists_every_method(site):
    from forwardinf.baselines import registry

    html = (site / "reference" / "methods" / "index.html").read_text()
    names = list(registry.FORWARD_INF) + list(registry.METHODS) + list(registry.PEER_METHODS) + list(registry.REFERENCE_METHODS)
    assert all(f"<code>{n}</code>" in html for n in names), [n for n in names if f"<code>{n}</code>" not in html]


def test_benchmark_pages_are_all_in_the_site(site):
    index = (site / "reference" / "benchmarks" / "index.html").read_text()
    for md in sorted((ROOT / "benchmarks" / "results").glob("*.md")):
        assert (site / "benchmarks" / "results" / md.stem / "index.html").is_file(), md.name
        assert f"benchmarks/results/{md.stem}/" in index, md.name


def test_no_page_fetches_from_the_network(site):
    """Material's Google fonts are off (theme.font: false): no page references fonts.googleapis.com."""
    for page in site.rglob("*.html"):
        assert "fonts.googleapis.com" not in page.read_text(errors="ignore"), page


def test_readme_commands():
    readme = (ROOT / "README.md").read_text()
    for marker in ("<!-- demo-command -->", "<!-- test-command -->", "<!-- docs-command -->"):
        lines = readme.split(marker, 1)[1].lstrip("\n").splitlines()
        assert lines[0] == "```bash" and lines[2] == "```", marker  # one command line in its fence
    test_command = readme.split("<!-- test-command -->", 1)[1].splitlines()[2]
    assert re.search(r'\.\[[a-z,]*\bdocs\b[a-z,]*\]', test_command), "the test command installs the docs extra"
    assert "mkdocs build --strict" in readme.split("<!-- docs-command -->", 1)[1].splitlines()[2]
    assert "<!-- hf-example -->\n```python" in readme
