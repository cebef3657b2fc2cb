"""Exceptions of the public API: each carries a message fit to print as one line."""


class ReparamError(Exception):
    """Base class: a user-facing problem (bad input, bad file, failed check), not a bug."""


class ConversionError(ReparamError):
    """RefConv conversion cannot proceed (nothing selected, bad map_k, ...)."""


class CheckpointError(ReparamError):
    """A checkpoint cannot be read or does not match the model."""


class EquivalenceError(ReparamError):
    """A folded/fused model does not reproduce the original within tolerance."""

    def __init__(self, message, *, max_abs_error=None, max_rel_error=None, first_diverging_module=None):
        super().__init__(message)
        self.max_abs_error = max_abs_error
        self.max_rel_error = max_rel_error
        self.first_diverging_module = first_diverging_module
