"""Plain-text tables whose columns line up, for the CLI and the scripts."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-align text columns and right-align numeric ones; ``None`` prints as ``-``."""
    cells, numeric = _cells(headers, rows)
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _cells(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> tuple[list[list[str]], list[bool]]:
    """The rows as text, and which columns are numeric."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    numeric = [all(_is_number(r[i]) for r in rows if r[i] is not None) and rows != [] for i in range(len(headers))]
    return cells, numeric


def _is_number(x: object) -> bool:
    if isinstance(x, (int, float)):
        return True
    try:
        float(str(x).rstrip("x%"))
        return True
    except ValueError:
        return False


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; ``None`` prints as ``-``, numeric columns align right."""
    cells, numeric = _cells(headers, rows)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(out)
