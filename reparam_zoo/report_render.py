"""Rendering reports: table, markdown, CSV and JSON text from the counts `report()` and `compare()` made.

Kept apart from the counting, as fvcore keeps `flop_count_table` apart from `FlopCountAnalysis`: the
numbers are computed once (report.py, counting.py) and every format is a view of them. `Report` and
`Comparison` take their renderers from the mixins here, so `report(model).to_markdown()` reads as before.
The table primitives (`aligned_lines`, `markdown_lines`) are in tables.py, shared with the zoo table.
"""
from __future__ import annotations

import csv
import io
import json
from typing import Dict, List, Optional, Tuple

from .errors import ReparamError, preview
from .memory import MEASURE_BATCH
from .counting import OUTSIDE_PARTS
from .options import REPORT_FORMATS as FORMATS
from .tables import aligned_lines, markdown_lines

__all__ = ["FORMATS", "UNIT", "ReportRendering", "ComparisonRendering", "render", "num", "si", "int_or_none"]

UNIT = "MACs (multiply-accumulates per image, batch 1): one fused multiply-add = 1, as fvcore's 'flop'"
MEMORY_NOTE = (f"memory: gradients of the trainable params; activations = what autograd keeps for the backward "
               f"per image (measured at batch {MEASURE_BATCH} in training mode, weights excluded)")


class ReportRendering:
    """The renderers of a `Report` (a dataclass with the fields report.py declares)."""

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def _summary_rows(self) -> List[Tuple[str, object, object]]:
        t, i = self.training, self.inference
        return [
            ("params", t["params"], i["params"]),
            ("trainable params", t["trainable_params"], None),
            ("frozen params", t["frozen_params"], None),
            ("  of which base kernels", t["base_kernel_params"], None),
            ("buffers", t["buffers"], i["buffers"]),
            ("MACs / image", t["macs"], i["macs"]),
            ("  of which conv/linear", i["conv_linear_macs"], i["conv_linear_macs"]),
            ("transform MACs / step", t["transform_macs"], 0),
            ("weights + buffers", _mib(t.get("weight_bytes")), _mib(i.get("weight_bytes"))),
            ("gradients", _mib(t.get("gradient_bytes")), None),
            ("activations / image", _mib(t.get("activation_bytes")), None),
        ]

    def _title(self) -> str:
        size = "x".join(str(s) for s in self.input_size)
        stage = f"{self.stage}, {self.refconv_layers} RefConv layers" if self.stage == "refconv" else self.stage
        resized = ""
        if self.resized_input is not None:
            resized = f" (resized by the model to {'x'.join(str(s) for s in self.resized_input)})"
        return (f"{self.model} ({stage}) at 1x{size}{resized}: {si(self.inference['params'])} params, "
                f"{si(self.inference['macs'])} MACs deployed")

    def _notes(self) -> List[str]:
        notes = [f"unit: {self.unit}", MEMORY_NOTE]
        if self.memory_error:
            notes.append(f"activations not measured: the training-mode forward failed ({self.memory_error})")
        if self.macs_check.agrees:
            notes.append(self.macs_check.describe())
        if self.unsupported_ops:
            notes.append(f"not counted by fvcore: {_format_counts(self.unsupported_ops)}")
        if self.uncalled_modules:
            notes.append(f"not run by an eval forward, so no MACs counted: {preview(self.uncalled_modules)}")
        if self.unused_output_modules:
            notes.append("run, but nothing uses their outputs (fvcore's traced graph drops them: no MACs counted, "
                         f"torch's flop_counter counts them): {preview(self.unused_output_modules)}")
        if OUTSIDE_PARTS in self.groups:
            parts = ", ".join(g for g in self.groups if g != OUTSIDE_PARTS)
            ops = ", ".join(f"{op} {n:,}" for op, n in self.outside_parts_ops.items())
            notes.append(f"part '{OUTSIDE_PARTS}': what the model's own forward computes outside {parts}"
                         + (f" (MACs by op: {ops})" if ops else ""))
        if self.resized_input is not None:
            notes.append("a detector resizes its images itself (min_size/max_size, then pads): MACs and "
                         f"activations are those of its {'x'.join(map(str, self.resized_input))} input, and "
                         "activations were measured in train mode with made-up targets")
        return [f"WARNING: {f}" for f in self.flags] + notes

    def _group_lines(self) -> List[List[object]]:
        return [[g, num(v.get("training_params")), num(v.get("inference_params")), num(v.get("macs"))]
                for g, v in self.groups.items()]

    def module_rows(self) -> List[List[object]]:
        grouped = bool(self.groups)
        return [([r.group] if grouped else []) + [_indent(r.name, grouped), r.type, r.training_params,
                r.trainable_params, r.inference_params, r.macs, r.transform_macs] for r in self.modules]

    _MODULE_HEADERS = ["module", "type", "training params", "trainable", "inference params", "MACs",
                       "transform MACs"]
    _GROUP_HEADERS = ["group", "training params", "inference params", "MACs"]

    def _module_headers(self) -> List[str]:
        return (["group"] if self.groups else []) + self._MODULE_HEADERS

    def to_table(self) -> str:
        lines = [self._title(), ""]
        lines += aligned_lines(["", "training", "inference"], [[m, num(a), num(b)] for m, a, b in self._summary_rows()])
        lines.append("")
        lines += self._notes()
        if self.groups:
            lines += ["", "by part:"]
            lines += aligned_lines(self._GROUP_HEADERS, self._group_lines())
        if self.modules:
            lines += ["", f"per module (depth {self.depth}{' below each part' if self.groups else ''}):"]
            left = 3 if self.groups else 2
            lines += aligned_lines(self._module_headers(), [[num(v) for v in row] for row in self.module_rows()],
                                   left=left)
        return "\n".join(lines)

    __str__ = to_table

    def to_markdown(self) -> str:
        lines = [f"**{self._title()}**", ""]
        lines += markdown_lines(["", "training", "inference"],
                                 [[m.strip(), num(a), num(b)] for m, a, b in self._summary_rows()], numeric_from=1)
        lines.append("")
        lines += [f"- {n}" for n in self._notes()]
        if self.groups:
            lines += ["", "By part:", ""]
            lines += markdown_lines(self._GROUP_HEADERS, self._group_lines(), numeric_from=1)
        if self.modules:
            lines += ["", f"Per module (depth {self.depth}):", ""]
            rows = [([r.group] if self.groups else []) + [
                f"`{r.name}`", r.type, num(r.training_params), num(r.trainable_params), num(r.inference_params),
                num(r.macs), num(r.transform_macs)] for r in self.modules]
            lines += markdown_lines(self._module_headers(), rows, numeric_from=3 if self.groups else 2)
        return "\n".join(lines)

    _CSV_FIELDS = ["module", "type", "training_params", "trainable_params", "frozen_params", "training_buffers",
                   "transform_macs", "inference_params", "inference_buffers", "macs", "group"]

    def to_csv(self) -> str:
        """One row per module; the first row, module `(model)`, holds the totals. Exact integers."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self._CSV_FIELDS)
        t, i = self.training, self.inference
        writer.writerow(["(model)", self.model, t["params"], t["trainable_params"], t["frozen_params"],
                         t["buffers"], t["transform_macs"], i["params"], i["buffers"], i["macs"], ""])
        for r in self.modules:
            writer.writerow([r.name, r.type, r.training_params, r.trainable_params, r.frozen_params, r.buffers,
                             r.transform_macs, r.inference_params, r.inference_buffers, r.macs, r.group])
        return out.getvalue()

    def render(self, fmt: str = "table") -> str:
        return render(self, fmt)


class ComparisonRendering:
    """The renderers of a `Comparison` (two reports and their names)."""

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def _headers(self) -> List[str]:
        a, b = self.names
        return ["", a, b, f"{b} - {a}", f"{b} / {a}"]

    def _table_rows(self) -> List[List[str]]:
        rows = [["model", *(r.model for r in self.reports), "", ""],
                ["stage", *(r.stage for r in self.reports), "", ""],
                ["input", *("x".join(map(str, r.input_size)) for r in self.reports), "", ""]]
        for row in self.rows():
            rows.append([row["metric"], num(row["a"]), num(row["b"]), _signed(row["delta"]), _ratio(row["ratio"])])
        return rows

    def _notes(self) -> List[str]:
        notes = [f"WARNING: {f}" for f in self.flags] + [f"unit: {UNIT}", MEMORY_NOTE]
        for name, r in zip(self.names, self.reports):
            if r.unsupported_ops:
                notes.append(f"{name}: not counted by fvcore: {_format_counts(r.unsupported_ops)}")
        return notes

    def to_table(self) -> str:
        return "\n".join(aligned_lines(self._headers(), self._table_rows()) + [""] + self._notes())

    __str__ = to_table

    def to_markdown(self) -> str:
        lines = markdown_lines(self._headers(), self._table_rows(), numeric_from=1)
        return "\n".join(lines + [""] + [f"- {n}" for n in self._notes()])

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        a, b = self.names
        writer.writerow(["metric", a, b, "delta", "ratio"])
        for row in self.rows():
            ratio = "" if row["ratio"] is None else f"{row['ratio']:.6g}"
            writer.writerow([row["metric"], _blank_if_none(row["a"]), _blank_if_none(row["b"]),
                             _blank_if_none(row["delta"]), ratio])
        return out.getvalue()

    def render(self, fmt: str = "table") -> str:
        return render(self, fmt)


# -- helpers --------------------------------------------------------------------------------------
def render(obj, fmt: str) -> str:
    renderers = {"table": obj.to_table, "markdown": obj.to_markdown, "json": obj.to_json, "csv": obj.to_csv}
    if fmt not in renderers:
        raise ReparamError(f"unknown format '{fmt}', expected one of {', '.join(FORMATS)}")
    return renderers[fmt]()


def num(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _signed(value: Optional[int]) -> str:
    if value is None:
        return "-"
    return f"{value:+,}" if value else "0"


def _mib(n: Optional[int]) -> Optional[str]:
    return None if n is None else f"{n / 2 ** 20:,.1f} MiB"


def int_or_none(value) -> Optional[int]:
    return None if value is None else int(value)


def _blank_if_none(value) -> object:
    return "" if value is None else value


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}x"


def si(n: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def _indent(name: str, grouped: bool = False) -> str:
    return name if grouped else "  " * name.count(".") + name


def _format_counts(counts: Dict[str, int]) -> str:
    return ", ".join(f"{k} x{v:,}" for k, v in counts.items())
