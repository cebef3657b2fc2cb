"""reparam-zoo: structural re-parameterization for vision models.

RefConv surgery (`convert` -> train -> `fold` / `fuse`), the ReXNetV1 and RevCol zoo (registered with timm
on import), parameter/MAC reports and self-describing model files.
"""
from .checkpoint import load_checkpoint
from .deploy import FuseReport, fold, fuse
from .errors import ArgumentConflictError, CheckpointError, ConversionError, EquivalenceError, ReparamError
from .layers.refconv import RefConv1d, RefConv2d, RefConv3d, RefConvNd
from .report import Comparison, Report, compare, report
from .architectures import create_model
from .modelfile import load, save
from .resolve import load_model
from .surgery import ConversionSummary, convert
from . import models  # noqa: F401  (registers the zoo with timm)
from .train import TrainResult, resume, train
from .ablate import AblationResult, ablate, resume_ablation  # noqa: E402  (after train: ablate builds on it)
from .quantize import QuantizationError, export_int8, quant_compare, quant_report
from .latency import measure_latency

from .version import __version__

__all__ = [
    "RefConv1d", "RefConv2d", "RefConv3d", "RefConvNd",
    "convert", "fold", "fuse", "ConversionSummary", "FuseReport",
    "load_checkpoint", "create_model", "save", "load", "load_model",
    "train", "resume", "TrainResult", "ablate", "resume_ablation", "AblationResult",
    "report", "compare", "Report", "Comparison",
    "export_int8", "quant_report", "quant_compare", "QuantizationError", "measure_latency",
    "ReparamError", "ArgumentConflictError", "ConversionError", "CheckpointError", "EquivalenceError",
    "__version__",
]
