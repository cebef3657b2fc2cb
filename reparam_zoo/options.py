"""The choices and defaults of the library's options, and the checks that need nothing else: stdlib only.

These are the single source for both faces of the library: the modules that do the work (refconv, surgery,
export, report rendering) import their constants from here, and the command line shows them in `--help`
and checks its arguments with them without importing torch (see cli/lazy.py). Keep it a leaf: the standard
library and `reparam_zoo.errors` only.
"""
from __future__ import annotations

import difflib
import os
from typing import Any, Optional, Union

from .errors import ConversionError

__all__ = ["DEFAULT_MAP_K", "INITS", "TRAIN_SCOPES", "EXPORT_FORMATS", "EXPORT_SUFFIXES", "FORMAT_NAMES",
           "REPORT_FORMATS", "ZOO_FORMATS", "DEFAULT_CALIB_IMAGES",
           "DEFAULT_HELD_OUT_IMAGES", "DEFAULT_MIN_AGREEMENT", "REPORT_CALIB_IMAGES", "RUNTIMES", "DEFAULT_WARMUP",
           "DEFAULT_REPEATS", "LATENCY_BATCH", "TORCHVISION_PREFIX", "ZOO_VARIANTS", "zoo_variant_problem",
           "check_map_k", "split_torchvision_name", "format_of_path"]

DEFAULT_MAP_K = 3  # the RefConv transform kernel when none is given (the paper's 3x3)
INITS = ("zero", "xavier", "kaiming")  # how a RefConv transform starts ("zero": exactly the original conv)
TRAIN_SCOPES = ("transforms", "transforms+norm", "all-but-base")  # what trains after convert

EXPORT_FORMATS = ("safetensors", "torchscript", "onnx", "pt2")
# the suffix each format is written with, the ones a name may say it with, and how messages name it
EXPORT_SUFFIXES = {"safetensors": ".safetensors", "torchscript": ".torchscript.pt", "onnx": ".onnx", "pt2": ".pt2"}
_FORMAT_BY_SUFFIX = {".safetensors": "safetensors", ".onnx": "onnx", ".pt2": "pt2", ".torchscript.pt": "torchscript",
                     ".torchscript": "torchscript", ".ts": "torchscript"}
FORMAT_NAMES = {"safetensors": "a safetensors", "onnx": "an ONNX", "pt2": "a pt2 (torch.export)",
                "torchscript": "a TorchScript"}

# INT8 (quantize.py): images that calibrate, images the INT8 model is checked on, and the top-1 agreement with
# the float model it needs to be written; a report's sensitivity table calibrates on fewer
DEFAULT_CALIB_IMAGES = 256
DEFAULT_HELD_OUT_IMAGES = 256
DEFAULT_MIN_AGREEMENT = 0.99
REPORT_CALIB_IMAGES = 32
# latency (latency.py): the forms timed, and the untimed and timed runs per form
RUNTIMES = ("eager", "onnxruntime", "torch.export")
DEFAULT_WARMUP = 3
DEFAULT_REPEATS = 20
LATENCY_BATCH = 8  # the second batch size `reparam report --latency` times

TORCHVISION_PREFIX = "torchvision:"  # a MODEL argument `torchvision:resnet50` names a torchvision model

REPORT_FORMATS = ("table", "markdown", "json", "csv")
ZOO_FORMATS = ("table", "markdown", "json")  # `reparam zoo list`
# The shipped variants, family by family, smallest first (what `reparam zoo report NAME` takes), so that a
# wrong NAME is refused before torch loads. timm's registry is the truth (reparam_zoo.zoo.zoo_names);
# tests/test_cli_startup.py keeps this copy equal to it.
ZOO_VARIANTS = ("rexnetv1_090", "rexnetv1_100", "rexnetv1_130", "rexnetv1_150", "rexnetv1_200", "rexnetv1_300",
                "revcol_tiny", "revcol_small", "revcol_base", "revcol_large", "revcol_xlarge", "revcol_huge")


def zoo_variant_problem(name: str) -> Optional[str]:
    """Why `name` is not a zoo variant, in one line with the close names (as for a wrong MODEL name), or None."""
    if name in ZOO_VARIANTS:
        return None
    close = difflib.get_close_matches(str(name), ZOO_VARIANTS, n=3, cutoff=0.75)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"'{name}' is not a zoo variant; {hint}one of: {', '.join(ZOO_VARIANTS)}"


def check_map_k(map_k: int) -> None:
    """The RefConv transform kernel is centred on the base kernel: a positive odd size."""
    if not isinstance(map_k, int) or isinstance(map_k, bool) or map_k < 1 or map_k % 2 == 0:
        raise ConversionError(f"map_k must be a positive odd integer, got {map_k!r}")


def split_torchvision_name(name: Any) -> Optional[str]:
    """`resnet50` for `torchvision:resnet50`; None for a name without the prefix."""
    if isinstance(name, str) and name.startswith(TORCHVISION_PREFIX):
        return name[len(TORCHVISION_PREFIX):]
    return None


def format_of_path(path: Union[str, "os.PathLike[str]"]) -> Optional[str]:
    """The export format a file name implies (`m.onnx` -> onnx), or None for other names (`m.pt`)."""
    lower = os.fspath(path).lower()
    for suffix in sorted(_FORMAT_BY_SUFFIX, key=len, reverse=True):
        if lower.endswith(suffix):
            return _FORMAT_BY_SUFFIX[suffix]
    return None
