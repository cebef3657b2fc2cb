"""Writing a model for deployment: a reparam model file (`save`) or an artifact for inference runtimes
(TorchScript, ONNX, torch.export), each artifact loaded back and checked against the model before it is kept."""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import torch
import torch.nn as nn

from .errors import EquivalenceError, ReparamError, first_line
from .fileio import atomic_write, output_file
from .model_info import unwrap
from .checkpoint import check_finite
from .fileio import check_output_path
from .modelfile import save
from .module_attrs import architecture_of
from .options import EXPORT_FORMATS, EXPORT_SUFFIXES, FORMAT_NAMES, format_of_path

__all__ = ["EXPORT_FORMATS", "EXPORT_SUFFIXES", "FORMAT_NAMES", "ExportResult", "export", "format_of_path"]

PathLike = Union[str, os.PathLike]

@dataclass
class ExportResult:
    """What `export` wrote, and how closely the written artifact reproduces the model (None: not checked)."""

    path: str
    format: str
    max_abs_error: Optional[float] = None
    max_rel_error: Optional[float] = None


def export(
    model: nn.Module,
    path: PathLike,
    fmt: str = "safetensors",
    *,
    example_inputs: Optional[Any] = None,
    rtol: float = 1e-4,
    atol: float = 0.0,
    trust_pickle: bool = False,
    extra_metadata: Optional[Dict[str, Any]] = None,
) -> ExportResult:
    """Write `model` as a reparam model file (`safetensors`, see `save`) or a deployment artifact
    (`torchscript` via torch.jit.trace, `onnx` via torch.onnx.export, `pt2` via torch.export.save).

    An artifact is written to a temporary file, loaded back and run against `model` on random inputs shaped
    like `example_inputs` (batch 1 and 2) before it is renamed to `path`; a mismatch raises EquivalenceError
    and leaves nothing behind. `example_inputs` are as for `fuse`: a tensor, a tuple of positional inputs
    (each any nesting of tensors, e.g. a detector's `([image],)`) or a dict of keyword inputs; ONNX takes
    tensors only.
    """
    from .verify import as_call_inputs, check_tolerances, verify_equivalence

    check_tolerances(rtol, atol)
    if fmt not in EXPORT_FORMATS:
        raise ReparamError(f"unknown format '{fmt}', expected one of {', '.join(EXPORT_FORMATS)}")
    path = os.fspath(path)
    model = unwrap(model)
    if fmt == "safetensors":
        written = "safetensors" if architecture_of(model) is not None else "pickle"
        return ExportResult(save(model, path, extra_metadata=extra_metadata, trust_pickle=trust_pickle), written)
    if example_inputs is None:
        raise ReparamError(f"{fmt} export traces the model: it needs example inputs (--input-size)")
    inputs = as_call_inputs(example_inputs)
    check_output_path(path)
    check_finite(model.state_dict())
    model.eval()
    result = ExportResult(path, fmt)

    def write_and_check(tmp: str) -> None:
        runner = _EXPORTERS[fmt](model, tmp, inputs)
        try:
            result.max_abs_error, result.max_rel_error, _ = verify_equivalence(
                model, _Artifact(runner), inputs, rtol=rtol, atol=atol, in_float64=False,  # runs as exported
                batch_sizes=(1, 2) if _flat(inputs) else (1,))  # a traced list keeps its length
        except EquivalenceError as e:
            raise EquivalenceError(f"the exported {fmt} file does not reproduce the model: {e}",
                                   max_abs_error=e.max_abs_error, max_rel_error=e.max_rel_error) from None

    atomic_write(path, write_and_check)
    return result


class _Artifact(nn.Module):
    """A loaded artifact as a leaf module, so the verifier can run it like the model it came from."""

    def __init__(self, runner: Callable):
        super().__init__()
        object.__setattr__(self, "runner", runner)

    def forward(self, *inputs, **kwargs):
        return self.runner(*inputs, **kwargs)


def _export_torchscript(model: nn.Module, tmp: str, inputs) -> Callable:
    # Tracer warnings (data-dependent control flow) are what the output check after saving is for.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # strict=False: list and dict outputs (a segmenter's {"out": ...}, a detector's detections)
        traced = torch.jit.trace(model, inputs.args, check_trace=False, strict=False,
                                 example_kwarg_inputs=inputs.kwargs or None)
    # through a Python file: torch.jit.save to a path aborts the process when the write fails (a full disk)
    with output_file(tmp) as f:
        torch.jit.save(traced, f)
    return torch.jit.load(tmp, map_location="cpu")


def _export_pt2(model: nn.Module, tmp: str, inputs) -> Callable:
    # exported at batch 2 with the batch dimension dynamic (an example of batch 1 would pin it to 1); nested
    # inputs (a list of images) as they are, their sizes fixed
    flat = _flat(inputs)
    args = tuple(torch.cat([t, t]) for t in inputs.args) if flat else inputs.args
    dynamic = tuple({0: torch.export.Dim.AUTO} for _ in args) if flat else None
    try:
        program = torch.export.export(model, args, kwargs=inputs.kwargs or None, dynamic_shapes=dynamic)
    except Exception as e:
        raise ReparamError(f"torch.export cannot capture {type(model).__name__}: {first_line(e)}") from None
    # serialized in memory: torch's zip writer aborts the process when a write under it fails (a full disk),
    # to a path or a file alike; the bytes are then written by Python, whose errors are exceptions
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with output_file(tmp) as f:
        f.write(buffer.getbuffer())
    del buffer
    return torch.export.load(tmp).module()


def _flat(call) -> bool:
    """Positional tensors only (batch-first, so the batch dimension can vary)."""
    return not call.kwargs and all(isinstance(t, torch.Tensor) for t in call.args)


def _export_onnx(model: nn.Module, tmp: str, call) -> Callable:
    if not _flat(call):
        raise ReparamError("ONNX export takes tensor inputs only (no lists, dicts or keyword inputs); use "
                           "torchscript or pt2 for this model")
    inputs = call.args
    try:
        import onnx  # noqa: F401  (checking the written file needs it)
    except ImportError:
        raise ReparamError("ONNX export needs the 'onnx' package (pip install onnx, or the 'dev' extra)") from None
    names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    try:
        with torch.no_grad():
            torch.onnx.export(model, inputs, tmp, dynamo=False, input_names=names, output_names=["output"],
                              dynamic_axes={n: {0: "batch"} for n in names + ["output"]})
    except ImportError as e:
        raise ReparamError(f"ONNX export is not available here ({first_line(e)})") from None
    except OSError:
        raise  # a failed write: atomic_write names the output and the cause
    except Exception as e:
        raise ReparamError(f"ONNX export of {type(model).__name__} failed: {first_line(e)}") from None
    return _onnx_runner(tmp, names)


def _onnx_runner(path: str, names: List[str]) -> Callable:
    """onnxruntime when installed, else onnx's own reference evaluator (slow, but always there)."""
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        session = ReferenceEvaluator(path)

    def run(*inputs):
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
        return tuple(torch.from_numpy(o) for o in session.run(None, feed))

    return run


_EXPORTERS = {"torchscript": _export_torchscript, "pt2": _export_pt2, "onnx": _export_onnx}
