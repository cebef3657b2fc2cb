"""One table of rows in the formats the report commands write: an aligned text table, markdown, JSON, CSV."""
from __future__ import annotations

import csv
import io
import json
from typing import Any, Callable, List, Optional, Sequence

from .errors import ReparamError

__all__ = ["render_table"]


def render_table(fmt: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], *, cell: Callable[[Any], str],
                 notes: Sequence[str], as_dict: Callable[[], dict], csv_headers: Optional[Sequence[str]] = None,
                 left: int = 1, numeric_from: int = 1) -> str:
    """`rows` (raw values) as `fmt`: "json" is `as_dict()`; "csv" the raw values under `csv_headers` (default
    `headers`); "markdown" and "table" the values through `cell`, under the `notes` lines (`left` / `numeric_from`:
    how many leading columns are text)."""
    from .report import aligned_lines, markdown_lines  # report.py imports torch, deploy, counting: only when rendering

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
