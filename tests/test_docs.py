"""The docs site builds with warnings as errors, the README stays short, and each figure lives in one place."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import rmsprop_impls

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

README_MAX_LINES = 250

#: A measured figure: a number with the unit of a time, a rate, a ratio or a share ("1 × 16M" is a tree).
FIGURE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:\s?(?:GB/s|ms|µs)\b|×|%)|(?<![\w.])\d+\.\d+x\b")

#: Pages that other branches create; the README may link to them before they land.
PENDING_PAGES = {
    "docs/guides/installing.md",
    "docs/guides/platforms.md",
    "docs/guides/selftest.md",
    "docs/guides/tracking.md",
    "docs/kernels/cpu.md",
    "docs/kernels/gpu.md",
}


def _docs_pages() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted(DOCS.rglob("*.md"))}


def _figure_rows(text: str) -> set[str]:
    """Markdown table rows that hold a digit, whitespace-normalised (a figure table's body)."""
    rows = set()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and re.search(r"\d", line) and not re.fullmatch(r"[|:\- ]+", line):
            rows.add(" ".join(line.split()))
    return rows


def test_docs_build_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link, a missing page, a page left out of the nav or a docstring
    mkdocstrings cannot render fails the build."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "core" / "index.html").is_file()


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_figures_are_not_repeated_in_the_docs():
    readme_figures = set(FIGURE.findall(README.read_text()))
    for page, text in _docs_pages().items():
        repeated = readme_figures & set(FIGURE.findall(text))
        assert not repeated, f"{page} repeats the README's figures {sorted(repeated)}: keep each in one place"


def test_no_table_row_of_figures_in_two_places():
    """A table of measurements lives on one page: the README or one docs page."""
    seen: dict[str, str] = {}
    for page, text in {"README.md": README.read_text(), **_docs_pages()}.items():
        for row in _figure_rows(text):
            assert row not in seen, f"the row {row!r} is in both {seen[row]} and {page}"
            seen[row] = page


def test_figure_checks_catch_a_copy():
    """The two checks above flag a figure table copied from one page into another."""
    row = "| 1 × 16M | 6.04 | 55.5 | 115% |"
    assert FIGURE.findall(row) == ["115%"]
    assert _figure_rows(f"| tree | ms |\n|---|---:|\n{row}\n") == {row}
    assert FIGURE.findall("55.5 GB/s, 3.03x and 7.8 µs") == ["55.5 GB/s", "3.03x", "7.8 µs"]


def test_readme_links_into_the_docs_resolve():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert local, "the README links into the docs"
    missing = [link for link in local if not (ROOT / link).exists() and link not in PENDING_PAGES]
    assert not missing, f"README.md links to missing files: {missing}"


def test_every_exported_name_is_in_the_reference():
    reference = (DOCS / "reference" / "index.md").read_text()
    missing = [name for name in rmsprop_impls.__all__ if f"[`{name}`]" not in reference]
    assert not missing, f"docs/reference/index.md does not list {missing}"
