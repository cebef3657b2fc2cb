"""Parameter and MAC reports for any stage of a model: plain, RefConv (training), fused (deployed).

Units. **params** are counted elements of parameters; buffers (BatchNorm running statistics, ...)
are counted separately. **MACs** are multiply-accumulates for one input image (batch 1): fvcore's
"flop", where one fused multiply-add counts 1 (fvcore also counts the BatchNorm, LayerNorm, pooling and
upsampling work it knows, e.g. 2 per element for an eval BatchNorm). `conv_linear_macs` is the conv and
matmul part alone, the number papers quote (ReXNet, RevCol); it is cross-checked against
`torch.utils.flop_counter` (which counts 2 per MAC and only conv/matmul), and a disagreement beyond 2%
(usually work fvcore cannot see, such as attention kernels) is flagged in the report. Ops fvcore does
not count are listed once in the report (`unsupported_ops`) instead of logged.

Training vs inference. A report has two columns:

* **training**: the model as it trains. For a RefConv model the frozen base kernels are buffers in
  PyTorch's sense, but they are the model's weights, so they count as (frozen) params here:
  `params = trainable_params + frozen_params` = every parameter plus every base kernel, and
  `base_kernel_params` says how many of the frozen ones are base kernels. `buffers` excludes the base
  kernels. `transform_macs` is the cost of evaluating the refocusing transforms once per training
  step (independent of the batch size); `macs` is the forward cost per image.
* **inference**: what deploys. RefConv model: the model after `reparam_zoo.fold` (same structure and
  cost as the original model); fused model (it has a `fuse_report`): the model itself, BatchNorm gone;
  plain model: the model itself.

So for a RefConv model `training.params - inference.params` is exactly the transforms' size.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .deploy import STAGES, model_stage
from .errors import ReparamError, preview
from .layers.refconv import RefConvNd
from .memory import MEASURE_BATCH, tensor_bytes, training_memory
from .model_info import cfg_input_size, require_module, timm_cfg, unwrap
from .surgery import refconv_layers
from .counting import (MACS_TOLERANCE, MacsCheck, ModuleRow, count_macs, folded_view, group_totals, module_rows,
                       unique_tensors)
from . import torchvision_models

__all__ = [
    "report", "compare", "layer_params", "Report", "Comparison", "LayerParams", "MacsCheck", "ModuleRow",
    "STAGES", "FORMATS", "MACS_TOLERANCE", "UNIT",
]

FORMATS = ("table", "markdown", "json", "csv")
UNIT = "MACs (multiply-accumulates per image, batch 1): one fused multiply-add = 1, as fvcore's 'flop'"
_MEMORY_NOTE = (f"memory: gradients of the trainable params; activations = what autograd keeps for the backward "
                f"per image (measured at batch {MEASURE_BATCH} in training mode, weights excluded)")



class LayerParams(NamedTuple):
    """Parameters one layer holds itself in training (incl. its base kernel) and after folding."""

    name: str
    training: int
    inference: int


_TRAINING_KEYS = ("params", "trainable_params", "frozen_params", "buffers", "transform_macs",
                  "base_kernel_params", "macs", "weight_bytes", "gradient_bytes", "activation_bytes")
_INFERENCE_KEYS = ("params", "macs", "conv_linear_macs", "buffers", "weight_bytes")


@dataclass
class Report:
    """Counts of one model at one input size; render with `render(fmt)` or `str()`."""

    model: str
    stage: str
    input_size: Tuple[int, ...]
    training: Dict[str, int]
    inference: Dict[str, int]
    macs_check: MacsCheck
    unsupported_ops: Dict[str, int] = field(default_factory=dict)
    uncalled_modules: List[str] = field(default_factory=list)  # hold weights, but the forward never ran them
    modules: List[ModuleRow] = field(default_factory=list)
    depth: int = 1
    refconv_layers: int = 0
    unit: str = UNIT
    memory_error: Optional[str] = None  # why the activations could not be measured
    architecture: Optional[str] = None  # timm's name (or the class name); `model` may be a file's name
    resized_input: Optional[Tuple[int, ...]] = None  # what a detector's own resize makes of `input_size`
    groups: Dict[str, Dict[str, int]] = field(default_factory=dict)  # backbone / neck / heads totals

    @property
    def flags(self) -> List[str]:
        """Problems a reader must see: in the table, markdown and JSON; CSV has no place for them, so the
        command line prints them on stderr."""
        return [] if self.macs_check.agrees else [self.macs_check.describe()]

    # -- data ---------------------------------------------------------------------------------------
    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "architecture": self.architecture,
            "stage": self.stage,
            "input_size": list(self.input_size),
            "unit": self.unit,
            "inference": {k: _int_or_none(self.inference.get(k)) for k in _INFERENCE_KEYS},
            "training": {k: _int_or_none(self.training.get(k)) for k in _TRAINING_KEYS},
            "memory_error": self.memory_error,
            "refconv_layers": self.refconv_layers,
            "macs_check": self.macs_check.as_dict(),
            "unsupported_ops": dict(self.unsupported_ops),
            "uncalled_modules": list(self.uncalled_modules),
            "depth": self.depth,
            "resized_input": None if self.resized_input is None else list(self.resized_input),
            "groups": {k: dict(v) for k, v in self.groups.items()},
            "modules": [asdict(r) for r in self.modules],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        try:
            check = dict(data["macs_check"])
            check.pop("agrees", None)
            return cls(
                model=data["model"], stage=data["stage"], input_size=tuple(data["input_size"]),
                training=dict(data["training"]), inference=dict(data["inference"]),
                macs_check=MacsCheck(**check), unsupported_ops=dict(data.get("unsupported_ops", {})),
                uncalled_modules=list(data.get("uncalled_modules", [])), architecture=data.get("architecture"),
                modules=[ModuleRow(**r) for r in data.get("modules", [])], depth=data.get("depth", 1),
                refconv_layers=data.get("refconv_layers", 0), unit=data.get("unit", UNIT),
                memory_error=data.get("memory_error"),
                resized_input=tuple(data["resized_input"]) if data.get("resized_input") else None,
                groups={str(k): dict(v) for k, v in (data.get("groups") or {}).items()},
            )
        except (KeyError, TypeError) as e:
            raise ReparamError(f"not a reparam-zoo report: {type(e).__name__} {e}") from None

    # -- renderers ----------------------------------------------------------------------------------
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
        return (f"{self.model} ({stage}) at 1x{size}{resized}: {_si(self.inference['params'])} params, "
                f"{_si(self.inference['macs'])} MACs deployed")

    def _notes(self) -> List[str]:
        notes = [f"unit: {self.unit}", _MEMORY_NOTE]
        if self.memory_error:
            notes.append(f"activations not measured: the training-mode forward failed ({self.memory_error})")
        if self.macs_check.agrees:
            notes.append(self.macs_check.describe())
        if self.unsupported_ops:
            notes.append(f"not counted by fvcore: {_format_counts(self.unsupported_ops)}")
        if self.uncalled_modules:
            notes.append(f"not run by an eval forward, so no MACs counted: {preview(self.uncalled_modules)}")
        if self.resized_input is not None:
            notes.append("a detector resizes its images itself (min_size/max_size, then pads): MACs and "
                         f"activations are those of its {'x'.join(map(str, self.resized_input))} input, and "
                         "activations were measured in train mode with made-up targets")
        return [f"WARNING: {f}" for f in self.flags] + notes

    def _group_lines(self) -> List[List[object]]:
        return [[g, _num(v.get("training_params")), _num(v.get("inference_params")), _num(v.get("macs"))]
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
        lines += aligned_lines(["", "training", "inference"], [[m, _num(a), _num(b)] for m, a, b in self._summary_rows()])
        lines.append("")
        lines += self._notes()
        if self.groups:
            lines += ["", "by part:"]
            lines += aligned_lines(self._GROUP_HEADERS, self._group_lines())
        if self.modules:
            lines += ["", f"per module (depth {self.depth}{' below each part' if self.groups else ''}):"]
            left = 3 if self.groups else 2
            lines += aligned_lines(self._module_headers(), [[_num(v) for v in row] for row in self.module_rows()],
                                   left=left)
        return "\n".join(lines)

    __str__ = to_table

    def to_markdown(self) -> str:
        lines = [f"**{self._title()}**", ""]
        lines += markdown_lines(["", "training", "inference"],
                                 [[m.strip(), _num(a), _num(b)] for m, a, b in self._summary_rows()], numeric_from=1)
        lines.append("")
        lines += [f"- {n}" for n in self._notes()]
        if self.groups:
            lines += ["", "By part:", ""]
            lines += markdown_lines(self._GROUP_HEADERS, self._group_lines(), numeric_from=1)
        if self.modules:
            lines += ["", f"Per module (depth {self.depth}):", ""]
            rows = [([r.group] if self.groups else []) + [
                f"`{r.name}`", r.type, _num(r.training_params), _num(r.trainable_params), _num(r.inference_params),
                _num(r.macs), _num(r.transform_macs)] for r in self.modules]
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
        return _render(self, fmt)


@dataclass
class Comparison:
    """Two reports side by side: B - A and B / A for every count."""

    reports: Tuple[Report, Report]
    names: Tuple[str, str] = ("A", "B")

    _METRICS = (
        ("training params", "training", "params"),
        ("trainable params", "training", "trainable_params"),
        ("frozen params", "training", "frozen_params"),
        ("training buffers", "training", "buffers"),
        ("transform MACs / step", "training", "transform_macs"),
        ("inference params", "inference", "params"),
        ("inference buffers", "inference", "buffers"),
        ("MACs / image", "inference", "macs"),
        ("training weights + buffers (bytes)", "training", "weight_bytes"),
        ("gradients (bytes)", "training", "gradient_bytes"),
        ("activations / image (bytes)", "training", "activation_bytes"),
        ("inference weights + buffers (bytes)", "inference", "weight_bytes"),
    )

    def rows(self) -> List[dict]:
        out = []
        for label, column, key in self._METRICS:
            a, b = (getattr(r, column).get(key) for r in self.reports)
            if a is None or b is None:
                out.append({"metric": label, "a": a, "b": b, "delta": None, "ratio": None})
                continue
            out.append({"metric": label, "a": a, "b": b, "delta": b - a, "ratio": (b / a) if a else None})
        return out

    @property
    def flags(self) -> List[str]:
        return [f"{n}: {f}" for n, r in zip(self.names, self.reports) for f in r.flags]

    def as_dict(self) -> dict:
        return {"names": list(self.names), "models": [r.as_dict() for r in self.reports], "rows": self.rows()}

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
            rows.append([row["metric"], _num(row["a"]), _num(row["b"]), _signed(row["delta"]), _ratio(row["ratio"])])
        return rows

    def _notes(self) -> List[str]:
        notes = [f"WARNING: {f}" for f in self.flags] + [f"unit: {UNIT}", _MEMORY_NOTE]
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
        return _render(self, fmt)


# -- the public functions ---------------------------------------------------------------------------
def report(
    model: nn.Module,
    input_size: Optional[Sequence[int]] = (3, 224, 224),
    *,
    depth: int = 1,
    stage: Optional[str] = None,
    name: Optional[str] = None,
    example_inputs=None,
    example_kwargs: Optional[Dict[str, object]] = None,
) -> Report:
    """Params (total/trainable/frozen, buffers apart) and MACs of `model` for training and for inference.

    `input_size` is one sample's shape without the batch dimension (None: the timm `pretrained_cfg`
    input size). `depth` limits the per-module table (0: none, 1: top-level children, ...). `stage`
    overrides the detected stage: "refconv" (has RefConv layers), "fused" (has a `fuse_report`) or
    "plain". The model is left as it was (train/eval mode, requires_grad, BatchNorm statistics).
    `example_inputs` (and `example_kwargs`), as for `fuse`, replace `input_size` for a model that takes more
    than one image: a tuple of positional inputs, each any nesting of tensors, or a dict of keyword inputs;
    MACs are counted at their first sample, training memory on random inputs of their structure at batch 2.
    A detector (a torchvision detection model, any backbone) gets a list of one image of `input_size`, which
    it resizes itself (reported as `resized_input`), and made-up targets for the training-memory forward.
    """
    require_module(model, "report")
    model = unwrap(model)
    call = None
    if example_inputs is not None or example_kwargs:
        from .verify import as_call_inputs

        call = as_call_inputs(example_inputs if example_inputs is not None else {}, example_kwargs).first_sample()
        input_size = tuple(call.shape()[1:]) or None
        if input_size is None:
            raise ReparamError("example_inputs: cannot tell the input size from them (no batch-first tensor first)")
    input_size = _resolve_input_size(model, input_size)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ReparamError(f"depth must be a non-negative integer, got {depth!r}")
    stage = _check_stage(model, stage)
    name = name or model_name(model)
    refconvs = [m for _, m in refconv_layers(model)]

    deployed = folded_view(model) if refconvs else model
    macs_by_module, unsupported, uncalled, check = count_macs(deployed, input_size, name, call)

    base_ids = {id(m.weight_base) for m in refconvs}
    params = unique_tensors(model.parameters())
    base_kernels = sum(m.weight_base.numel() for m in refconvs)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params) + base_kernels
    training = {
        "params": total,
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        "buffers": sum(b.numel() for b in unique_tensors(model.buffers()) if id(b) not in base_ids),
        "transform_macs": sum(m.transform_macs() for m in refconvs),
        "base_kernel_params": base_kernels,
        "macs": macs_by_module.get("", 0),
    }
    inference = {
        "params": sum(p.numel() for p in unique_tensors(deployed.parameters())),
        "macs": macs_by_module.get("", 0),
        "conv_linear_macs": check.fvcore_macs,
        "buffers": sum(b.numel() for b in unique_tensors(deployed.buffers())),
    }
    memory = training_memory(model, input_size, call)
    groups = torchvision_models.module_groups(model)
    training.update(weight_bytes=memory.weight_bytes, gradient_bytes=memory.gradient_bytes,
                    activation_bytes=memory.activation_bytes)
    inference["weight_bytes"] = tensor_bytes(list(deployed.parameters()) + list(deployed.buffers()))
    modules = module_rows(model, deployed, macs_by_module, depth, groups) if depth else []
    return Report(
        model=name, architecture=model_name(model), stage=stage, input_size=input_size, training=training,
        inference=inference,
        macs_check=check, unsupported_ops=unsupported, uncalled_modules=uncalled, modules=modules, depth=depth,
        refconv_layers=len(refconvs), memory_error=memory.error,
        resized_input=torchvision_models.resized_size(model, input_size),
        groups=group_totals(model, deployed, macs_by_module, groups) if groups else {},
    )


def compare(
    a: Union[nn.Module, Report],
    b: Union[nn.Module, Report],
    input_size: Optional[Sequence[int]] = (3, 224, 224),
    *,
    names: Sequence[str] = ("A", "B"),
    example_inputs=None,
    example_kwargs: Optional[Dict[str, object]] = None,
) -> Comparison:
    """Side-by-side report of two models (or two existing reports), with B - A and B / A, counted at
    `input_size` (C, H, W); `names` label the two columns."""
    names = tuple(names)
    if len(names) != 2 or not all(isinstance(n, str) and n for n in names):
        raise ReparamError(f"names must be two non-empty strings, got {names!r}")
    reports = tuple(x if isinstance(x, Report) else report(x, input_size, depth=0, example_inputs=example_inputs,
                                                           example_kwargs=example_kwargs) for x in (a, b))
    return Comparison(reports=reports, names=names)


def layer_params(model: nn.Module) -> List[LayerParams]:
    """(module name, training params, inference params) of every module that holds weights itself.

    Training counts the module's own parameters plus its base kernel (RefConv); inference is what the
    module holds after `fold` (base kernel + bias for a RefConv; unchanged otherwise). For plotting the
    per-layer growth during refocus training (a depthwise 3x3 layer: C*9 -> C*9 + C^2*9).
    """
    rows = []
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, RefConvNd):
            base = module.weight_base.numel()
            bias = 0 if module.bias is None else module.bias.numel()
            rows.append(LayerParams(name, own + base, base + bias))
        elif own:
            rows.append(LayerParams(name, own, own))
    return rows


def model_name(model: nn.Module) -> str:
    return timm_cfg(model).get("architecture") or type(model).__name__


def _resolve_input_size(model: nn.Module, input_size) -> Tuple[int, ...]:
    if input_size is None:
        input_size = cfg_input_size(model)
        if not input_size:
            raise ReparamError(f"cannot tell the input size of {type(model).__name__} (no timm pretrained_cfg); "
                               "pass input_size, e.g. (3, 224, 224)")
    try:
        size = tuple(input_size)
    except TypeError:
        size = ()
    if not size or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ReparamError(f"input_size must be positive integers without the batch, e.g. (3, 224, 224); "
                           f"got {input_size!r}")
    return size


def _check_stage(model: nn.Module, stage: Optional[str]) -> str:
    detected = model_stage(model)
    if stage is None:
        return detected
    has_refconv = detected == "refconv"
    if stage not in STAGES:
        raise ReparamError(f"unknown stage '{stage}', expected one of {', '.join(STAGES)}")
    if (stage == "refconv") != has_refconv:
        has = "has RefConv layers" if has_refconv else "has no RefConv layers"
        raise ReparamError(f"stage '{stage}' does not fit the model: it {has}")
    return stage


# -- rendering --------------------------------------------------------------------------------------
def _render(obj, fmt: str) -> str:
    renderers = {"table": obj.to_table, "markdown": obj.to_markdown, "json": obj.to_json, "csv": obj.to_csv}
    if fmt not in renderers:
        raise ReparamError(f"unknown format '{fmt}', expected one of {', '.join(FORMATS)}")
    return renderers[fmt]()


def _num(value) -> str:
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


def _int_or_none(value) -> Optional[int]:
    return None if value is None else int(value)


def _blank_if_none(value) -> object:
    return "" if value is None else value


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _si(n: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def _indent(name: str, grouped: bool = False) -> str:
    return name if grouped else "  " * name.count(".") + name


def _format_counts(counts: Dict[str, int]) -> str:
    return ", ".join(f"{k} x{v:,}" for k, v in counts.items())


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
