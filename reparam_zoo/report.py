"""Parameter and MAC reports for any stage of a model: plain, RefConv (training), fused (deployed).

This module computes (`report`, `compare`, `layer_params`, with the counting itself in counting.py and
memory.py); report_render.py turns the numbers into table, markdown, CSV and JSON.

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

from dataclasses import asdict, dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .deploy import STAGES, model_stage
from .errors import ReparamError
from .layers.refconv import RefConvNd
from .memory import tensor_bytes, training_memory
from .model_info import require_input_size, require_module, timm_cfg, unwrap
from .surgery import refconv_layers
from .counting import (MACS_TOLERANCE, MacsCheck, ModuleRow, add_outside_parts, count_macs, folded_view,
                       group_totals, module_rows, unique_tensors)
from . import torchvision_models
from .report_render import FORMATS, UNIT, ComparisonRendering, ReportRendering, int_or_none

__all__ = [
    "report", "compare", "layer_params", "Report", "Comparison", "LayerParams", "MacsCheck", "ModuleRow",
    "STAGES", "FORMATS", "MACS_TOLERANCE", "UNIT",
]


class LayerParams(NamedTuple):
    """Parameters one layer holds itself in training (incl. its base kernel) and after folding."""

    name: str
    training: int
    inference: int


_TRAINING_KEYS = ("params", "trainable_params", "frozen_params", "buffers", "transform_macs",
                  "base_kernel_params", "macs", "weight_bytes", "gradient_bytes", "activation_bytes")
_INFERENCE_KEYS = ("params", "macs", "conv_linear_macs", "buffers", "weight_bytes")


@dataclass
class Report(ReportRendering):
    """Counts of one model at one input size; render with `render(fmt)` or `str()`."""

    model: str
    stage: str
    input_size: Tuple[int, ...]
    training: Dict[str, int]
    inference: Dict[str, int]
    macs_check: MacsCheck
    unsupported_ops: Dict[str, int] = field(default_factory=dict)
    uncalled_modules: List[str] = field(default_factory=list)  # hold weights, but the forward never ran them
    # hold weights and ran, but nothing used their outputs (fvcore counts none of their MACs, flop_counter does)
    unused_output_modules: List[str] = field(default_factory=list)
    modules: List[ModuleRow] = field(default_factory=list)
    depth: int = 1
    refconv_layers: int = 0
    unit: str = UNIT
    memory_error: Optional[str] = None  # why the activations could not be measured
    architecture: Optional[str] = None  # timm's name (or the class name); `model` may be a file's name
    resized_input: Optional[Tuple[int, ...]] = None  # what a detector's own resize makes of `input_size`
    groups: Dict[str, Dict[str, int]] = field(default_factory=dict)  # backbone / neck / heads (/ other) totals
    outside_parts_ops: Dict[str, int] = field(default_factory=dict)  # the `other` group's MACs by fvcore op

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
            "inference": {k: int_or_none(self.inference.get(k)) for k in _INFERENCE_KEYS},
            "training": {k: int_or_none(self.training.get(k)) for k in _TRAINING_KEYS},
            "memory_error": self.memory_error,
            "refconv_layers": self.refconv_layers,
            "macs_check": self.macs_check.as_dict(),
            "unsupported_ops": dict(self.unsupported_ops),
            "uncalled_modules": list(self.uncalled_modules),
            "unused_output_modules": list(self.unused_output_modules),
            "depth": self.depth,
            "resized_input": None if self.resized_input is None else list(self.resized_input),
            "groups": {k: dict(v) for k, v in self.groups.items()},
            "outside_parts_ops": dict(self.outside_parts_ops),
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
                unused_output_modules=list(data.get("unused_output_modules", [])),
                outside_parts_ops=dict(data.get("outside_parts_ops") or {}),
                modules=[ModuleRow(**r) for r in data.get("modules", [])], depth=data.get("depth", 1),
                refconv_layers=data.get("refconv_layers", 0), unit=data.get("unit", UNIT),
                memory_error=data.get("memory_error"),
                resized_input=tuple(data["resized_input"]) if data.get("resized_input") else None,
                groups={str(k): dict(v) for k, v in (data.get("groups") or {}).items()},
            )
        except (KeyError, TypeError) as e:
            raise ReparamError(f"not a reparam-zoo report: {type(e).__name__} {e}") from None



@dataclass
class Comparison(ComparisonRendering):
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
    counts = count_macs(deployed, input_size, name, call)
    macs_by_module, check = counts.by_module, counts.check

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
    totals, outside_ops = {}, {}
    if groups:
        totals = group_totals(model, deployed, macs_by_module, groups)
        outside_ops = add_outside_parts(totals, training["params"], inference["params"], counts, groups)
    return Report(
        model=name, architecture=model_name(model), stage=stage, input_size=input_size, training=training,
        inference=inference,
        macs_check=check, unsupported_ops=counts.unsupported, uncalled_modules=counts.never_run,
        unused_output_modules=counts.unused_output, modules=modules, depth=depth,
        refconv_layers=len(refconvs), memory_error=memory.error,
        resized_input=torchvision_models.resized_size(model, input_size),
        groups=totals, outside_parts_ops=outside_ops,
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
        input_size = require_input_size(model, how="pass input_size, e.g. (3, 224, 224)")
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
