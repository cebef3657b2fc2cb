"""Exceptions of the public API (each carries a message fit to print as one line) and the helpers that keep
messages to one line."""
from typing import Iterable


class ReparamError(Exception):
    """Base class: a user-facing problem (bad input, bad file, failed check), not a bug."""


class ConversionError(ReparamError):
    """RefConv conversion cannot proceed (nothing selected, bad map_k, ...)."""


class ArgumentConflictError(ReparamError):
    """Arguments that contradict each other (a usage error: the command line exits with status 2)."""


class CheckpointError(ReparamError):
    """A checkpoint cannot be read or does not match the model."""


class ArchitectureError(ReparamError):
    """An architecture name that timm does not know, or a model that cannot be rebuilt from its name."""


class ArchitectureUnknownError(CheckpointError):
    """A weights file that does not say its architecture (a bare state_dict, a safetensors file without
    reparam metadata): it needs `arch`."""


class OutputError(ReparamError):
    """An output file cannot be written (a full disk, a file-size limit, permissions): nothing was left behind."""


class EquivalenceError(ReparamError):
    """A folded/fused model does not reproduce the original within tolerance."""

    def __init__(self, message, *, max_abs_error=None, max_rel_error=None, first_diverging_module=None):
        super().__init__(message)
        self.max_abs_error = max_abs_error
        self.max_rel_error = max_rel_error
        self.first_diverging_module = first_diverging_module


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (tracebacks of nested tools are long), or its type."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def preview(items: Iterable, n: int = 5) -> str:
    """The first `n` items, comma-separated, and how many more there are."""
    items = [str(item) for item in items]
    more = f", ... +{len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
