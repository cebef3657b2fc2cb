"""Plain-text and markdown tables (stdlib only): the report, the comparison and the zoo list print through these."""
from __future__ import annotations

from typing import List, Sequence

__all__ = ["aligned_lines", "markdown_lines"]


def aligned_lines(headers: Sequence[str], rows: Sequence[Sequence[object]], left: int = 1) -> List[str]:
    """Columns padded to their widest cell: the first `left` columns left-aligned, the numbers right-aligned."""
    cells = [list(map(str, headers))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]


def markdown_lines(headers: Sequence[str], rows: Sequence[Sequence[object]], numeric_from: int = 1) -> List[str]:
    """A markdown table: the columns from `numeric_from` on are right-aligned."""
    def esc(c):
        return str(c).replace("|", "\\|")

    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines
