"""reparam-zoo: structural re-parameterization for vision models.

RefConv surgery (`convert` -> train -> `fold` / `fuse`), the ReXNetV1 and RevCol zoo (registered with timm
on import), parameter/MAC reports and self-describing model files.

The layout, one job per module, imports flowing one way (data from a file or name, to a converted, trained,
fused model, to its report and its file):

    leaves (stdlib only)   errors, version, options (every option's choices and defaults), fileio (atomic
                           writes, output-path rules), train/config, ablate_config: the command line reads
                           them without importing torch, and the heavy modules take their constants from them
    building and files     architectures (models by name) -> checkpoint (reading weights) -> filemeta (what
                           metadata may ask for) -> modelfile (the format: save/load) -> resolve (what a
                           MODEL argument is); module_attrs (the attributes hung on models, one accessor each)
    the method             layers/refconv, surgery (convert), deploy (fold/fuse) + verify (equivalence)
    measuring              counting + memory -> report (the numbers) -> report_render (the text); zoo (the
                           published numbers and the zoo table)
    training               train/ (config, setup, loop, state, run_dir, tasks/), ablate, data readers
    deployment checks      export, quantize, calibration, latency

Importing this package registers the zoo with timm (`timm.create_model("rexnetv1_100")` then works), so it
imports torch; the `reparam` command line avoids that for --help and usage errors (see cli/lazy.py).
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
