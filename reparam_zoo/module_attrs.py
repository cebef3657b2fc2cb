"""The attributes reparam-zoo hangs on a model, each read and written here and nowhere else.

A model carries what was done to it as plain attributes: deepcopy (convert, fold and fuse all copy) carries
them along and they pickle with the module, so no side registry can fall out of step with the model.

    reparam_arch      {"name", "source", "kwargs"}: how `create_model` built it (what `save` describes)
    refconv_summary   the `ConversionSummary` of `convert` (RefConv settings, training scope, converted layers)
    fuse_report       the `FuseReport` of `fuse` (what was folded, fused, left alone, and how it verified)
    reparam_extra     the caller's `extra_metadata` of a loaded model file (e.g. a run's class names)

The readers return None for a model without the attribute (or with a stray value of another type), so the
rest of the library asks one question in one way. Imports no torch: the types are checked lazily.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

__all__ = [
    "ARCH_ATTR", "REFCONV_ATTR", "FUSE_ATTR", "EXTRA_ATTR",
    "architecture_of", "set_architecture",
    "refconv_summary_of", "set_refconv_summary", "pop_refconv_summary",
    "fuse_report_of", "set_fuse_report", "pop_fuse_report",
    "extra_of", "set_extra", "restore_extra",
]

ARCH_ATTR = "reparam_arch"
REFCONV_ATTR = "refconv_summary"
FUSE_ATTR = "fuse_report"
EXTRA_ATTR = "reparam_extra"

_MISSING = object()


def _unwrap(model: Any) -> Any:
    from .model_info import unwrap

    return unwrap(model)


def architecture_of(model: Any) -> Optional[Dict[str, Any]]:
    """The architecture tag `create_model` put on `model` (None for models it did not build)."""
    arch = getattr(_unwrap(model), ARCH_ATTR, None)
    return arch if isinstance(arch, dict) else None


def set_architecture(model: Any, arch: Dict[str, Any]) -> None:
    setattr(model, ARCH_ATTR, arch)


def refconv_summary_of(model: Any):
    """The `ConversionSummary` `convert` left on `model`, or None."""
    from .surgery import ConversionSummary

    summary = getattr(model, REFCONV_ATTR, None)
    return summary if isinstance(summary, ConversionSummary) else None


def set_refconv_summary(model: Any, summary) -> None:
    setattr(model, REFCONV_ATTR, summary)


def pop_refconv_summary(model: Any):
    """Remove the conversion summary (the model is no longer converted); returns it, or None."""
    return model.__dict__.pop(REFCONV_ATTR, None)


def fuse_report_of(model: Any):
    """The `FuseReport` `fuse` left on `model` (a fused model), or None."""
    from .deploy import FuseReport

    report = getattr(model, FUSE_ATTR, None)
    return report if isinstance(report, FuseReport) else None


def set_fuse_report(model: Any, report) -> None:
    model.__dict__.pop(FUSE_ATTR, None)
    setattr(model, FUSE_ATTR, report)


def pop_fuse_report(model: Any):
    return model.__dict__.pop(FUSE_ATTR, None)


def extra_of(model: Any) -> Optional[Dict[str, Any]]:
    """The `extra_metadata` of the file `model` was loaded from (None: none)."""
    extra = getattr(model, EXTRA_ATTR, None)
    return extra if isinstance(extra, dict) else None


def set_extra(model: Any, extra: Optional[Dict[str, Any]]) -> Any:
    """Set (or with None, remove) the extra metadata; returns the previous value, to restore it with
    `restore_extra`."""
    previous = model.__dict__.get(EXTRA_ATTR, _MISSING)
    if extra is None:
        model.__dict__.pop(EXTRA_ATTR, None)
    else:
        setattr(model, EXTRA_ATTR, extra)
    return previous


def restore_extra(model: Any, previous: Any) -> None:
    set_extra(model, None if previous is _MISSING else previous)
