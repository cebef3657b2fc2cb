"""Plain-text and markdown tables (stdlib only): the report, the comparison, the zoo list and the latency and
quantization reports print through these."""
from __future__ import annotations

import csv
import io
import json
from typing import Any, Callable, List, Optional, Sequence

__all__ = ["aligned_lines", "markdown_lines", "render_table"]


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


def render_table(fmt: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], *, cell: Callable[[Any], str],
                 notes: Sequence[str], as_dict: Callable[[], dict], csv_headers: Optional[Sequence[str]] = None,
                 left: int = 1, numeric_from: int = 1) -> str:
    """`rows` (raw values) as `fmt`: "json" is `as_dict()`; "csv" the raw values under `csv_headers` (default
    `headers`); "markdown" and "table" the values through `cell`, under the `notes` lines (`left` / `numeric_from`:
    how many leading columns are text)."""
    from .errors import ReparamError

    if fmt == "json":
        return json.dumps(as_dict(), indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(list(headers if csv_headers is None else csv_headers))
        writer.writerows(rows)
        return out.getvalue()
    cells: List[List[str]] = [[cell(v) for v in row] for row in rows]
    if fmt == "markdown":
        return "\n".join([f"_{n}_  " for n in notes] + [""] + markdown_lines(headers, cells, numeric_from=numeric_from))
    if fmt == "table":
        return "\n".join(list(notes) + [""] + aligned_lines(headers, cells, left=left))
    raise ReparamError(f"unknown format '{fmt}', expected table, markdown, json or csv")
