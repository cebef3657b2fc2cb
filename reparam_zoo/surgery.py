"""Model surgery: find convs by name pattern, swap them for RefConv layers, freeze by training scope."""
from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch.nn as nn
from torch.nn.modules.batchnorm import _NormBase

from .errors import ConversionError, preview
from .layers.refconv import RefConvNd, unsupported_reason
from .options import DEFAULT_MAP_K, INITS, TRAIN_SCOPES, check_map_k
from .model_info import require_module
from .module_attrs import set_refconv_summary

_NORM_TYPES = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


@dataclass
class ConvertedLayer:
    name: str
    kind: str  # e.g. "RefConv2d 64->64 3x3 g=64"
    transform_params: int


@dataclass
class ConversionSummary:
    """What `convert` did: settings, converted layers, skipped layers with their reason, counts."""

    map_k: int
    init: str
    train_scope: str
    converted: List[ConvertedLayer] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    params_before: int = 0
    trainable_after: int = 0
    # requires_grad of every parameter before conversion, so that folding gives the model back as it was
    requires_grad_before: Dict[str, bool] = field(default_factory=dict, repr=False)

    @property
    def converted_names(self) -> List[str]:
        return [c.name for c in self.converted]

    @property
    def transform_params(self) -> int:
        return sum(c.transform_params for c in self.converted)

    def skipped_by_reason(self) -> Dict[str, List[str]]:
        out: Dict[str, List[str]] = {}
        for name, reason in self.skipped:
            out.setdefault(reason, []).append(name)
        return out

    def __str__(self) -> str:
        lines = [
            f"RefConv: {len(self.converted)} layers converted (map_k={self.map_k}, init={self.init}, "
            f"train_scope={self.train_scope}); {len(self.skipped)} convs left alone",
        ]
        lines += [f"  + {c.name}: {c.kind}, {c.transform_params:,} transform params" for c in self.converted]
        for reason, names in self.skipped_by_reason().items():
            lines.append(f"  - {reason}: {len(names)} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
        lines.append(
            f"  params: {self.params_before:,} before; trainable now {self.trainable_after:,} "
            f"({self.transform_params:,} in transforms)"
        )
        return "\n".join(lines)


def convert(
    model: nn.Module,
    *,
    map_k: int = DEFAULT_MAP_K,
    init: str = "zero",
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    train_scope: str = "transforms",
    inplace: bool = False,
) -> nn.Module:
    """Replace the spatial convs of `model` by RefConv layers and freeze all but `train_scope`.

    `include`/`exclude` are glob patterns on qualified module names (e.g. "stem.*", "layer4.*.conv2").
    The summary is available as `model.refconv_summary`. With zero init the result computes exactly
    what the input model computes. `init`: one of INITS ("zero", "xavier", "kaiming"); `train_scope`: one
    of TRAIN_SCOPES ("transforms", "transforms+norm", "all-but-base"). The result is a converted copy;
    with `inplace` the model itself is converted (saves a copy's memory).
    """
    require_module(model, "convert")
    from .checkpoint import check_finite

    check_finite(model.state_dict(), action="convert them")  # a NaN base kernel would poison every refocused one
    check_map_k(map_k)
    if init not in INITS:
        raise ConversionError(f"unknown init '{init}', expected one of {', '.join(INITS)}")
    if train_scope not in TRAIN_SCOPES:
        raise ConversionError(f"unknown train_scope '{train_scope}', expected one of {', '.join(TRAIN_SCOPES)}")
    already = [n for n, m in model.named_modules() if isinstance(m, RefConvNd)]
    if already:
        raise ConversionError(
            f"model is already converted ({len(already)} RefConv layers, e.g. '{already[0]}'); fold it first"
        )
    include, exclude = _patterns(include), _patterns(exclude)
    if not inplace:
        model = copy.deepcopy(model)

    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    _check_patterns_match([n for n, _ in convs], include, "include")
    _check_patterns_match([n for n, _ in convs], exclude, "exclude")

    summary = ConversionSummary(
        map_k=map_k, init=init, train_scope=train_scope,
        params_before=sum(p.numel() for p in model.parameters()),
        requires_grad_before={n: p.requires_grad for n, p in model.named_parameters()},
    )
    replacements: Dict[int, RefConvNd] = {}
    for name, conv in convs:
        reason = _skip_reason(name, conv, map_k, include, exclude)
        if reason is not None:
            summary.skipped.append((name, reason))
            continue
        refconv = RefConvNd.from_conv(conv, map_k=map_k, init=init)
        replacements[id(conv)] = refconv
        summary.converted.append(ConvertedLayer(
            name=name, kind=_describe(refconv),
            transform_params=refconv.transform_weight.numel(),
        ))
    hooked = [name for name, conv in convs if id(conv) in replacements and _has_hooks(conv)]
    if hooked:
        warnings.warn(f"hooks registered on {preview(hooked)} stay on the original convs: register them on the "
                      "RefConv layers (and again on the folded convs) if they are still needed", stacklevel=2)
    if not replacements:
        reasons = "; ".join(f"{r}: {len(ns)}" for r, ns in summary.skipped_by_reason().items()) or "no convs"
        raise ConversionError(f"no conv layer selected for RefConv conversion ({reasons})")
    replace_modules(model, lambda m: replacements.get(id(m)))
    model = replacements.get(id(model), model)  # the model may be the conv itself
    apply_train_scope(model, train_scope)
    summary.trainable_after = sum(p.numel() for p in model.parameters() if p.requires_grad)
    set_refconv_summary(model, summary)
    return model


def replace_modules(model: nn.Module, replacement_for: Callable[[nn.Module], Optional[nn.Module]]) -> int:
    """Swap every occurrence of each module for which `replacement_for` returns a module.

    A module reachable under several names (shared) is replaced everywhere by the same new module.
    Returns the number of attribute slots changed.
    """
    changed = 0
    for parent in list(_all_modules(model)):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            new = replacement_for(child)
            if new is not None:
                parent._modules[child_name] = new
                changed += 1
    return changed


def apply_train_scope(model: nn.Module, train_scope: str) -> None:
    """Set requires_grad: transforms always train; base kernels are buffers and never do."""
    if train_scope not in TRAIN_SCOPES:
        raise ConversionError(f"unknown train_scope '{train_scope}', expected one of {', '.join(TRAIN_SCOPES)}")
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if isinstance(module, RefConvNd) and pname == "transform_weight":
                p.requires_grad_(True)
            elif train_scope == "all-but-base":
                p.requires_grad_(True)
            elif train_scope == "transforms+norm":
                p.requires_grad_(isinstance(module, _NORM_TYPES))
            else:
                p.requires_grad_(False)


def refconv_layers(model: nn.Module) -> List[Tuple[str, RefConvNd]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RefConvNd)]


def _all_modules(model: nn.Module) -> Iterable[nn.Module]:
    seen = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        yield m
        stack.extend(c for c in m._modules.values() if c is not None)


def _patterns(patterns) -> List[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def _check_patterns_match(names: List[str], patterns: List[str], what: str) -> None:
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ConversionError(f"{what} pattern '{pattern}' matches no conv layer")


def _skip_reason(name, conv, map_k, include, exclude) -> Optional[str]:
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return "not included"
    if any(fnmatch.fnmatchcase(name, p) for p in exclude):
        return "excluded"
    return unsupported_reason(conv, map_k)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _describe(refconv: RefConvNd) -> str:
    kernel = "x".join(str(k) for k in refconv.kernel_size)
    return f"{type(refconv).__name__} {refconv.in_channels}->{refconv.out_channels} {kernel} g={refconv.groups}"

