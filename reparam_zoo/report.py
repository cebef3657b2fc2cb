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

import copy
import csv
import io
import json
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .deploy import STAGES, model_stage
from .errors import ReparamError, first_line, preview
from .layers.refconv import RefConvNd
from .memory import MEASURE_BATCH, tensor_bytes, training_memory
from .model_info import cfg_input_size, device_and_dtype, example_inputs, require_module, timm_cfg, unwrap
from .surgery import refconv_layers
from . import torchvision_models

__all__ = [
    "report", "compare", "layer_params", "Report", "Comparison", "LayerParams", "MacsCheck", "ModuleRow",
    "STAGES", "FORMATS", "MACS_TOLERANCE", "UNIT",
]

FORMATS = ("table", "markdown", "json", "csv")
MACS_TOLERANCE = 0.02
UNIT = "MACs (multiply-accumulates per image, batch 1): one fused multiply-add = 1, as fvcore's 'flop'"
_MEMORY_NOTE = (f"memory: gradients of the trainable params; activations = what autograd keeps for the backward "
                f"per image (measured at batch {MEASURE_BATCH} in training mode, weights excluded)")

# fvcore's names (after its own simplification) for the conv/matmul work torch's flop_counter also sees
_FVCORE_MATMUL_OPS = ("conv", "linear", "addmm", "bmm", "matmul", "mm", "einsum")


@dataclass
class MacsCheck:
    """fvcore's conv/linear MACs against `torch.utils.flop_counter`'s FLOPs / 2."""

    fvcore_macs: int
    flop_counter_macs: int
    rel_diff: float
    tolerance: float = MACS_TOLERANCE
    fvcore_by_op: Dict[str, int] = field(default_factory=dict)
    flop_counter_by_op: Dict[str, int] = field(default_factory=dict)

    @property
    def agrees(self) -> bool:
        return self.rel_diff <= self.tolerance

    def as_dict(self) -> dict:
        out = asdict(self)
        out["agrees"] = self.agrees
        return out

    def describe(self) -> str:
        verdict = f"within {self.tolerance:.0%}" if self.agrees else f"DISAGREE beyond {self.tolerance:.0%}"
        line = (f"MACs check: fvcore conv/linear {self.fvcore_macs:,} vs torch flop_counter "
                f"{self.flop_counter_macs:,} ({self.rel_diff:.2%}, {verdict})")
        if not self.agrees:
            by_op = ", ".join(f"{op} {n:,}" for op, n in self.flop_counter_by_op.items())
            line += f"; flop_counter MACs by op: {by_op}"
        return line


@dataclass
class ModuleRow:
    """One module of the per-module table (its whole subtree counted)."""

    name: str
    type: str
    training_params: int
    trainable_params: int
    frozen_params: int
    buffers: int
    transform_macs: int
    inference_params: int
    macs: int
    inference_buffers: int = 0  # reports written before this field counted none
    group: str = ""  # backbone / neck / heads of a detector or segmenter ("" for other models)


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

    def _module_rows(self) -> List[List[object]]:
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
            lines += aligned_lines(self._module_headers(), [[_num(v) for v in row] for row in self._module_rows()],
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
) -> Report:
    """Params (total/trainable/frozen, buffers apart) and MACs of `model` for training and for inference.

    `input_size` is one sample's shape without the batch dimension (None: the timm `pretrained_cfg`
    input size). `depth` limits the per-module table (0: none, 1: top-level children, ...). `stage`
    overrides the detected stage: "refconv" (has RefConv layers), "fused" (has a `fuse_report`) or
    "plain". The model is left as it was (train/eval mode, requires_grad, BatchNorm statistics).
    """
    require_module(model, "report")
    model = unwrap(model)
    input_size = _resolve_input_size(model, input_size)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
        raise ReparamError(f"depth must be a non-negative integer, got {depth!r}")
    stage = _check_stage(model, stage)
    name = name or model_name(model)
    refconvs = [m for _, m in refconv_layers(model)]

    deployed = _folded_view(model) if refconvs else model
    macs_by_module, unsupported, uncalled, check = _count_macs(deployed, input_size, name)

    base_ids = {id(m.weight_base) for m in refconvs}
    params = _unique(model.parameters())
    base_kernels = sum(m.weight_base.numel() for m in refconvs)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params) + base_kernels
    training = {
        "params": total,
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        "buffers": sum(b.numel() for b in _unique(model.buffers()) if id(b) not in base_ids),
        "transform_macs": sum(m.transform_macs() for m in refconvs),
        "base_kernel_params": base_kernels,
        "macs": macs_by_module.get("", 0),
    }
    inference = {
        "params": sum(p.numel() for p in _unique(deployed.parameters())),
        "macs": macs_by_module.get("", 0),
        "conv_linear_macs": check.fvcore_macs,
        "buffers": sum(b.numel() for b in _unique(deployed.buffers())),
    }
    memory = training_memory(model, input_size)
    groups = torchvision_models.module_groups(model)
    training.update(weight_bytes=memory.weight_bytes, gradient_bytes=memory.gradient_bytes,
                    activation_bytes=memory.activation_bytes)
    inference["weight_bytes"] = tensor_bytes(list(deployed.parameters()) + list(deployed.buffers()))
    modules = _module_rows(model, deployed, macs_by_module, depth, groups) if depth else []
    return Report(
        model=name, architecture=model_name(model), stage=stage, input_size=input_size, training=training,
        inference=inference,
        macs_check=check, unsupported_ops=unsupported, uncalled_modules=uncalled, modules=modules, depth=depth,
        refconv_layers=len(refconvs), memory_error=memory.error,
        resized_input=torchvision_models.resized_size(model, input_size),
        groups=_group_totals(model, deployed, macs_by_module, groups) if groups else {},
    )


def compare(
    a: Union[nn.Module, Report],
    b: Union[nn.Module, Report],
    input_size: Optional[Sequence[int]] = (3, 224, 224),
    *,
    names: Sequence[str] = ("A", "B"),
) -> Comparison:
    """Side-by-side report of two models (or two existing reports), with B - A and B / A, counted at
    `input_size` (C, H, W); `names` label the two columns."""
    names = tuple(names)
    if len(names) != 2 or not all(isinstance(n, str) and n for n in names):
        raise ReparamError(f"names must be two non-empty strings, got {names!r}")
    reports = tuple(x if isinstance(x, Report) else report(x, input_size, depth=0) for x in (a, b))
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


# -- counting ---------------------------------------------------------------------------------------
def _count_macs(model: nn.Module, input_size: Tuple[int, ...], name: str):
    """fvcore MACs by module, fvcore's unsupported ops, and the flop_counter cross-check, in eval mode
    without gradients (so that counting changes no BatchNorm statistics)."""
    from torch.utils.flop_counter import FlopCounterMode

    FlopCountAnalysis = _fvcore_analysis()
    device, dtype = device_and_dtype(model)
    if device.type == "meta":
        raise ReparamError(
            f"{name} is on the meta device: MACs need real tensors (build it on cpu; params alone can be "
            "counted on meta with layer_params or sum(p.numel()))"
        )
    inputs = example_inputs(model, input_size)  # a detector takes a list of images
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            analysis = (FlopCountAnalysis(model, inputs).unsupported_ops_warnings(False)
                        .uncalled_modules_warnings(False).tracer_warnings("none"))
            by_module = dict(analysis.by_module())
            by_op = analysis.by_operator()
            unsupported = dict(sorted(analysis.unsupported_ops().items()))
            uncalled = _outermost_with_weights(model, analysis.uncalled_modules())
            with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
                model(*inputs)
    except Exception as e:  # the user's model failed to run: one line, not a traceback
        raise ReparamError(f"cannot count MACs of {name} on input 1x{'x'.join(map(str, input_size))}: "
                           f"{type(e).__name__}: {first_line(e)}") from None
    finally:
        for module, training in modes:
            module.training = training
    fvcore_ops = {op: int(n) for op, n in by_op.items() if op in _FVCORE_MATMUL_OPS}
    torch_ops = {str(op): int(n) // 2 for op, n in counter.get_flop_counts().get("Global", {}).items()}
    fv, tc = sum(fvcore_ops.values()), int(counter.get_total_flops()) // 2
    rel = abs(fv - tc) / max(fv, tc) if max(fv, tc) else 0.0
    check = MacsCheck(fvcore_macs=fv, flop_counter_macs=tc, rel_diff=rel, fvcore_by_op=fvcore_ops,
                      flop_counter_by_op=torch_ops)
    return ({k: int(v) for k, v in by_module.items()}, {k: int(v) for k, v in unsupported.items()}, uncalled,
            check)


def _outermost_with_weights(model: nn.Module, names) -> List[str]:
    """The outermost of `names` that hold parameters (fvcore also lists never-run Identity and dropout
    modules, which cost nothing)."""
    modules = dict(model.named_modules())
    weighted = sorted(n for n in names if n in modules and any(True for _ in modules[n].parameters()))
    return [n for n in weighted if not any(n.startswith(other + ".") for other in weighted)]


def _cpu_attention_flops():
    """flop_counter's attention formula for the CPU attention kernel, which it has no entry for: without it
    the cross-check would not see attention on CPU at all."""
    from torch.utils.flop_counter import sdpa_flop_count

    def formula(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: formula}


def _fvcore_analysis():
    # fvcore.nn's __init__ scripts its focal losses with the deprecated torch.jit.script: a warning
    # about code we never call, so silence it instead of passing it on to the user.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis
    return FlopCountAnalysis


def _folded_view(model: nn.Module) -> nn.Module:
    """The structure `fold(model)` deploys, without copying the model's tensors or computing a kernel.

    A copy of the module tree whose parameters and buffers alias the original's, with each RefConv
    replaced by the plain conv `to_conv()` would build (same class, attributes and shapes) holding the
    base kernel: counting needs shapes only, and refocusing every kernel in float64 costs seconds.
    """
    memo = {}
    for module in model.modules():
        if isinstance(module, RefConvNd):
            memo[id(module)] = _conv_like_folded(module)
        for p in module._parameters.values():
            if p is not None:
                memo.setdefault(id(p), p)
        for value in list(module._buffers.values()) + list(vars(module).values()):
            for t in _tensors_in(value):
                memo.setdefault(id(t), t)
    view = copy.deepcopy(model, memo)
    view.__dict__.pop("refconv_summary", None)
    return view


def _conv_like_folded(layer: RefConvNd) -> nn.Module:
    # `_template` is the original conv with weightless (meta) tensors, the same template `to_conv` copies
    conv = copy.deepcopy(layer._template)
    conv.weight = nn.Parameter(layer.weight_base, requires_grad=False)
    if layer.bias is not None:
        conv.bias = layer.bias
    return conv


def _tensors_in(value) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, torch.Tensor):
                yield v


def _module_rows(model: nn.Module, deployed: nn.Module, macs: Dict[str, int], depth: int,
                 groups: Optional[Dict[str, str]] = None) -> List[ModuleRow]:
    """Rows down to `depth`; for a detector or segmenter (`groups`: part module -> backbone/neck/heads) each
    part's module and its submodules down to `depth` levels below it, tagged with the part."""
    if not groups:
        return _rows_below(model, deployed, macs, "", depth)
    rows = []
    for root, group in groups.items():
        for row in _rows_below(model, deployed, macs, root, depth - 1, include_root=True):
            row.group = group
            rows.append(row)
    return rows


def _group_totals(model: nn.Module, deployed: nn.Module, macs: Dict[str, int],
                  groups: Dict[str, str]) -> Dict[str, Dict[str, int]]:
    totals: Dict[str, Dict[str, int]] = {}
    for root, group in groups.items():
        row = _rows_below(model, deployed, macs, root, 0, include_root=True)
        entry = totals.setdefault(group, {"training_params": 0, "inference_params": 0, "macs": 0})
        for r in row:
            entry["training_params"] += r.training_params
            entry["inference_params"] += r.inference_params
            entry["macs"] += r.macs
    return totals


def _rows_below(model: nn.Module, deployed: nn.Module, macs: Dict[str, int], root: str, depth: int,
                include_root: bool = False) -> List[ModuleRow]:
    base = root.count(".") + 1 if root else 0
    full = base + depth  # rows are the modules with at most `full` name parts
    refconvs = refconv_layers(model)
    base_ids = {id(m.weight_base) for _, m in refconvs}
    params = _by_module(model.named_parameters(), full)
    trainable = _by_module(((n, p) for n, p in model.named_parameters() if p.requires_grad), full)
    bases = _by_module(((_join(n, "weight_base"), m.weight_base) for n, m in refconvs), full)
    buffers = _by_module(((n, b) for n, b in model.named_buffers() if id(b) not in base_ids), full)
    transform = _by_module(((_join(n, "transform_weight"), m.transform_macs()) for n, m in refconvs), full)
    deployed_params = params if deployed is model else _by_module(deployed.named_parameters(), full)
    deployed_buffers = buffers if deployed is model else _by_module(deployed.named_buffers(), full)
    rows = []
    for name, module in model.named_modules():
        if root and not (name == root or name.startswith(root + ".")):
            continue
        if name == root and not include_root or not name or name.count(".") >= full:
            continue
        total = params.get(name, 0) + bases.get(name, 0)
        row = ModuleRow(
            name=name, type=type(module).__name__, training_params=total, trainable_params=trainable.get(name, 0),
            frozen_params=total - trainable.get(name, 0), buffers=buffers.get(name, 0),
            transform_macs=transform.get(name, 0), inference_params=deployed_params.get(name, 0),
            macs=macs.get(name, 0), inference_buffers=deployed_buffers.get(name, 0),
        )
        if row.training_params or row.buffers or row.macs or row.inference_params:
            rows.append(row)
    return rows


def _by_module(named: Iterable[Tuple[str, object]], depth: int) -> Dict[str, int]:
    """Sum tensor sizes (or plain ints) into every ancestor module up to `depth` levels down."""
    out: Dict[str, int] = {}
    for qualified, value in named:
        n = value if isinstance(value, int) else value.numel()
        parts = qualified.split(".")[:-1]
        for k in range(min(len(parts), depth) + 1):
            key = ".".join(parts[:k])
            out[key] = out.get(key, 0) + n
    return out


def _join(module: str, tensor: str) -> str:
    return f"{module}.{tensor}" if module else tensor


def _unique(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


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
