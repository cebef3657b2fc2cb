"""reparam-zoo: structural re-parameterization for vision models.

RefConv surgery (`convert` -> train -> `fold` / `fuse`), the ReXNetV1 and RevCol zoo (registered with timm
on import), parameter/MAC reports and self-describing model files.
"""
from .checkpoint import load_checkpoint
from .deploy import FuseReport, fold, fuse
from .errors import CheckpointError, ConversionError, EquivalenceError, ReparamError
from .layers.refconv import RefConv1d, RefConv2d, RefConv3d, RefConvNd
from .surgery import ConversionSummary, convert
from . import models  # noqa: F401  (registers the zoo with timm)

__version__ = "0.1.0"

__all__ = [
    "RefConv1d", "RefConv2d", "RefConv3d", "RefConvNd",
    "convert", "fold", "fuse", "ConversionSummary", "FuseReport",
    "load_checkpoint",
    "ReparamError", "ConversionError", "CheckpointError", "EquivalenceError",
    "__version__",
]
