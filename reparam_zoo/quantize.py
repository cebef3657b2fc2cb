"""INT8 deployment checked before it is kept, and which layers make a model hard to quantize.

`export_int8` writes a static INT8 ONNX model with onnxruntime's own quantization tooling (QDQ format,
per-channel symmetric weights, per-tensor activations calibrated on real images with the model's own
preprocessing), then runs it in onnxruntime against the float ONNX model on held-out images; the file is
renamed into place only when their top-1 agreement reaches `min_agreement`.

`quant_report` simulates INT8 one layer at a time in PyTorch (fake quantization: weights per output
channel, the layer's input per tensor from calibration ranges) on the deployed (fused) model, and ranks
the layers by how much quantizing each alone costs the model's output (SQNR, in dB: higher is better).
Re-parameterized models often fail INT8 in a few layers whose fused kernels have a few channels with far
wider ranges than the rest; the report names them.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .calibration import CalibrationImages, calibration_images
from .errors import ReparamError, first_line
from .model_info import cfg_input_size, require_module, unwrap
from .tables import render_table
from .options import DEFAULT_CALIB_IMAGES, DEFAULT_HELD_OUT_IMAGES, DEFAULT_MIN_AGREEMENT, REPORT_CALIB_IMAGES

__all__ = ["QuantizationError", "Int8Result", "export_int8", "compare_outputs", "OutputAgreement",
           "quant_report", "quant_compare", "QuantReport", "QuantComparison", "LayerQuant", "sqnr_db"]

_BATCH = 16
QUANT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class QuantizationError(ReparamError):
    """The INT8 model was not written: it disagrees too much with the float model, or quantizing failed."""

    def __init__(self, message: str, agreement: Optional["OutputAgreement"] = None):
        super().__init__(message)
        self.agreement = agreement


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10*log10(sum ref^2 / sum (ref - approx)^2), in float64 (inf: exact)."""
    ref, err = reference.double(), reference.double() - approx.double()
    noise = float((err * err).sum())
    signal = float((ref * ref).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


# -- INT8 export --------------------------------------------------------------------------------------
@dataclass
class OutputAgreement:
    """How closely a quantized model's logits follow the float model's on the same images."""

    images: int
    top1_agreement: float
    max_logit_error: float
    mean_logit_error: float
    sqnr_db: float

    def describe(self) -> str:
        return (f"top-1 agreement {self.top1_agreement:.4f} on {self.images} held-out images, "
                f"max logit error {self.max_logit_error:.4g}, mean {self.mean_logit_error:.4g}, "
                f"SQNR {self.sqnr_db:.1f} dB")


def compare_outputs(reference: torch.Tensor, candidate: torch.Tensor) -> OutputAgreement:
    """Agreement of two (N, classes) logit tensors: argmax agreement, abs errors, SQNR."""
    if reference.shape != candidate.shape or reference.dim() != 2:
        raise QuantizationError(f"expected two (N, classes) logit tensors of one shape, got "
                                f"{tuple(reference.shape)} and {tuple(candidate.shape)}")
    diff = (reference.double() - candidate.double()).abs()
    agree = (reference.argmax(1) == candidate.argmax(1)).double().mean().item()
    return OutputAgreement(len(reference), agree, diff.max().item(), diff.mean().item(), sqnr_db(reference, candidate))


@dataclass
class Int8Result:
    """What `export_int8` wrote and the check that let it be written."""

    path: str
    agreement: OutputAgreement
    data: str  # where the calibration and held-out images came from
    float_max_abs_error: Optional[float] = None  # the float ONNX model against the PyTorch model

    def describe(self) -> str:
        return f"INT8 (QDQ, per-channel weights) vs float ONNX: {self.agreement.describe()}; {self.data}"


def _require_onnxruntime():
    try:
        import onnxruntime  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise ReparamError("INT8 export needs onnxruntime (pip install onnxruntime, or the 'deploy' extra)") from None


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a tensor of images, with a progress bar."""

    def __init__(self, images: torch.Tensor, name: str, progress: bool):
        from tqdm import tqdm

        self.images, self.name = images, name
        self.bar = tqdm(total=len(images), desc="calibrating", unit="img", disable=not progress or None, leave=False)
        self.rewind()

    def rewind(self):
        self.batches = iter(torch.split(self.images, _BATCH))

    def get_next(self):
        batch = next(self.batches, None)
        if batch is None:
            self.bar.close()
            return None
        self.bar.update(len(batch))
        return {self.name: batch.numpy()}


def _session(path: str):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its optimizer's notes are not the user's business
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _run_session(session, images: torch.Tensor) -> torch.Tensor:
    name = session.get_inputs()[0].name
    outs = [torch.from_numpy(session.run(None, {name: b.numpy()})[0]) for b in torch.split(images, _BATCH)]
    return torch.cat(outs)


def export_int8(
    model: nn.Module,
    path: Union[str, os.PathLike],
    calib: Union[str, os.PathLike, CalibrationImages],
    *,
    calib_images: int = DEFAULT_CALIB_IMAGES,
    held_out_images: int = DEFAULT_HELD_OUT_IMAGES,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
    input_size: Optional[Sequence[int]] = None,
    progress: bool = True,
) -> Int8Result:
    """Write `model` (a deployed classifier: fuse it first) as a static INT8 ONNX file at `path`.

    The float model is exported to ONNX (and checked, see `export`), quantized by onnxruntime
    (`quantize_static`, QDQ, per-channel int8 weights, int8 activations, MinMax calibration on
    `calib_images` images of the folder `calib`), then both run in onnxruntime on held-out images of
    the folder. The file is renamed into place only when the top-1 agreement is at least `min_agreement`;
    otherwise QuantizationError says the numbers and nothing is written.
    """
    from .export import export
    from .checkpoint import check_finite
    from .fileio import atomic_write, check_output_path

    require_module(model, "export_int8")
    if not isinstance(min_agreement, (int, float)) or not 0.0 <= min_agreement <= 1.0:
        raise ReparamError(f"min_agreement must be between 0 and 1, got {min_agreement!r}")
    path = os.fspath(path)
    if not path.lower().endswith(".onnx"):
        raise ReparamError(f"'{path}': an INT8 model is an ONNX file; name it <name>.onnx")
    check_output_path(path)
    _require_onnxruntime()
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    model = unwrap(model)
    check_finite(model.state_dict(), action="quantize them")
    float_model = copy.deepcopy(model).float().eval()  # INT8 is calibrated from float32
    data = calib if isinstance(calib, CalibrationImages) else calibration_images(
        float_model, calib, calib_images=calib_images, held_out_images=held_out_images, input_size=input_size,
        progress=progress)

    with tempfile.TemporaryDirectory(prefix="reparam-int8-") as work:
        float_path = os.path.join(work, "float.onnx")
        float_check = export(float_model, float_path, "onnx", example_inputs=(data.calibration[:1],))
        prepared = os.path.join(work, "prepared.onnx")
        try:  # onnxruntime's recommended pre-processing (shape inference, graph optimization)
            quant_pre_process(float_path, prepared, skip_symbolic_shape=True)
        except Exception as e:
            raise QuantizationError(f"onnxruntime could not prepare the model for quantization: {first_line(e)}") \
                from None
        float_logits = _run_session(_session(float_path), data.held_out)
        if float_logits.dim() != 2:
            raise QuantizationError(f"INT8 verification compares classifier logits (N, classes); the model returns "
                                    f"{tuple(float_logits.shape)}")
        checked: Dict[str, OutputAgreement] = {}

        def quantize_and_check(tmp: str) -> None:
            reader = _Batches(data.calibration, _session(prepared).get_inputs()[0].name, progress)
            try:
                quantize_static(prepared, tmp, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax,
                                # ranges merged every few batches, not all activations of all images kept
                                extra_options={"CalibMaxIntermediateOutputs": 4})
            except Exception as e:
                raise QuantizationError(f"onnxruntime quantization failed: {first_line(e)}") from None
            agreement = compare_outputs(float_logits, _run_session(_session(tmp), data.held_out))
            checked["agreement"] = agreement
            if not agreement.top1_agreement >= min_agreement:
                raise QuantizationError(
                    f"INT8 model not written: {agreement.describe()}; top-1 agreement is below --min-agreement "
                    f"{min_agreement:g} (calibrate on more or more representative images, or keep the sensitive "
                    f"layers in float: see reparam report --quant)", agreement)

        atomic_write(path, quantize_and_check)
    return Int8Result(path, checked["agreement"], data.describe(), float_check.max_abs_error)


# -- the sensitivity report ---------------------------------------------------------------------------
@dataclass
class LayerQuant:
    """One conv/linear of the deployed model: its weights' per-output-channel ranges and what INT8 costs."""

    name: str
    kind: str
    out_channels: int
    channel_absmax_min: float
    channel_absmax_median: float
    channel_absmax_max: float
    channel_range_ratio: float  # max / median of the per-channel |w| maxima: what a per-tensor scale would waste
    weight_sqnr_db: float  # the weights alone, per-channel int8
    input_min: float
    input_max: float
    layer_sqnr_db: float  # this layer's output, weights and input in int8
    output_sqnr_db: float  # the model's output with only this layer in int8 (the sensitivity)


def _weight_scales(weight: torch.Tensor) -> torch.Tensor:
    # symmetric, narrow range [-127, 127] (what onnxruntime uses for symmetric int8 weights)
    absmax = weight.detach().flatten(1).abs().amax(1).double()
    return (absmax / 127.0).clamp_min(1e-12)


def _fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    scales = _weight_scales(weight).float()
    zeros = torch.zeros(len(scales), dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight.detach().float(), scales, zeros, 0, -127, 127)


def _fake_quant_input(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    # asymmetric per-tensor int8 over the calibrated range, which must hold zero (so zero padding is exact)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-12)
    zero_point = int(round(-128 - lo / scale))
    return torch.fake_quantize_per_tensor_affine(x, scale, max(-128, min(127, zero_point)), -128, 127)


def _quantized_call(module: nn.Module, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    # the layer's own op called directly (calling the module would run its hooks again)
    weight, x = _fake_quant_weight(module.weight), _fake_quant_input(x, lo, hi)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    return module._conv_forward(x, weight, module.bias)


def _deployed(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """What deploys: the fused model (RefConvs folded, BatchNorms fused, verified); a fused model as it is."""
    from .deploy import fuse, model_stage

    model = unwrap(model)
    if model_stage(model) == "fused":
        return copy.deepcopy(model).float().eval()
    return fuse(copy.deepcopy(model).float().eval(), example_inputs=(example[:1],))


def _forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([_first(model(b)) for b in torch.split(images, _BATCH)])


def _first(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _layer_stats(name: str, module: nn.Module, lo: float, hi: float, layer_sqnr: float, output_sqnr: float):
    w = module.weight.detach().double()
    absmax = w.flatten(1).abs().amax(1)
    median = absmax.median().item()
    return LayerQuant(
        name=name, kind=type(module).__name__, out_channels=w.shape[0],
        channel_absmax_min=absmax.min().item(), channel_absmax_median=median, channel_absmax_max=absmax.max().item(),
        channel_range_ratio=absmax.max().item() / median if median > 0 else math.inf,
        weight_sqnr_db=sqnr_db(w, _fake_quant_weight(module.weight)), input_min=lo, input_max=hi,
        layer_sqnr_db=layer_sqnr, output_sqnr_db=output_sqnr)


def quant_report(
    model: nn.Module,
    calib: Union[None, str, os.PathLike, torch.Tensor] = None,
    *,
    calib_images: int = REPORT_CALIB_IMAGES,
    input_size: Optional[Sequence[int]] = None,
    name: Optional[str] = None,
    progress: bool = False,
) -> "QuantReport":
    """Per conv/linear of the deployed model: per-output-channel weight ranges and the SQNR of quantizing
    that layer alone to INT8, sorted most sensitive (lowest output SQNR) first.

    `calib`: a folder of images (read with the model's preprocessing), a tensor of images (N, C, H, W), or
    None for seeded random normal images (ranges from noise: use real images for decisions).
    """
    from tqdm import tqdm

    require_module(model, "quant_report")
    model = unwrap(model)
    name = name or _model_label(model)
    if isinstance(calib, torch.Tensor):
        images, source = calib.float(), f"{len(calib)} given images"
    elif calib is not None:
        data = calibration_images(model, calib, calib_images=calib_images, held_out_images=1, input_size=input_size,
                                  progress=progress)
        images, source = data.calibration, f"{len(data.calibration)} images from {os.fspath(calib)}"
    else:
        size = tuple(input_size) if input_size is not None else cfg_input_size(model, test=True)
        if not size:
            raise ReparamError(f"cannot tell the input size of {type(model).__name__}; pass input_size (C, H, W)")
        images = torch.randn((calib_images,) + tuple(size), generator=torch.Generator().manual_seed(0))
        source = f"{calib_images} random normal images (no calibration folder given)"
    deployed = _deployed(model, images)
    layers = [(n, m) for n, m in deployed.named_modules() if isinstance(m, QUANT_LAYERS)]
    if not layers:
        raise ReparamError(f"{name}: no conv or linear layer to quantize")

    ranges: Dict[str, List[float]] = {n: [math.inf, -math.inf] for n, _ in layers}
    energy: Dict[str, List[float]] = {n: [0.0, 0.0] for n, _ in layers}

    def observe(n):
        def hook(mod, args):
            ranges[n][0] = min(ranges[n][0], args[0].min().item())
            ranges[n][1] = max(ranges[n][1], args[0].max().item())
        return hook

    def layer_error(n):  # this layer's own output error, on float inputs (every other layer stays float)
        def hook(mod, args, out):
            quantized = _quantized_call(mod, args[0], *ranges[n])
            err = (out.double() - quantized.double())
            energy[n][0] += float(out.double().pow(2).sum())
            energy[n][1] += float(err.pow(2).sum())
        return hook

    handles = [m.register_forward_pre_hook(observe(n)) for n, m in layers]
    reference = _forward(deployed, images)
    for h in handles:
        h.remove()
    handles = [m.register_forward_hook(layer_error(n)) for n, m in layers]
    _forward(deployed, images)
    for h in handles:
        h.remove()

    def replace(n):
        return lambda mod, args, out: _quantized_call(mod, args[0], *ranges[n])

    rows = []
    for n, m in tqdm(layers, desc="quantizing layer by layer", disable=not progress or None, leave=False):
        handle = m.register_forward_hook(replace(n))
        output_sqnr = sqnr_db(reference, _forward(deployed, images))
        handle.remove()
        signal, noise = energy[n]
        layer_sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
        rows.append(_layer_stats(n, m, *ranges[n], layer_sqnr, output_sqnr))
    handles = [m.register_forward_hook(replace(n)) for n, m in layers]
    all_sqnr = sqnr_db(reference, _forward(deployed, images))
    for h in handles:
        h.remove()
    rows.sort(key=lambda r: (r.output_sqnr_db, r.layer_sqnr_db))
    return QuantReport(model=name, calibration=source, layers=rows, all_layers_sqnr_db=all_sqnr)


def _model_label(model: nn.Module) -> str:
    from .report import model_name

    return model_name(model)


_COLUMNS = [("layer", "name"), ("type", "kind"), ("out", "out_channels"), ("|w| ch min", "channel_absmax_min"),
            ("|w| ch median", "channel_absmax_median"), ("|w| ch max", "channel_absmax_max"),
            ("max/median", "channel_range_ratio"), ("weight SQNR dB", "weight_sqnr_db"),
            ("input min", "input_min"), ("input max", "input_max"), ("layer SQNR dB", "layer_sqnr_db"),
            ("output SQNR dB", "output_sqnr_db")]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 or math.isinf(value) else f"{value:.3g}"
    return str(value)


def _finite(value):
    """JSON has no infinity: an exact (noise-free) SQNR is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass
class QuantReport:
    """`quant_report`'s result: layers most sensitive first; `render(fmt)` as table, markdown, json or csv."""

    model: str
    calibration: str
    layers: List[LayerQuant] = field(default_factory=list)
    all_layers_sqnr_db: float = math.nan  # the model's output with every conv/linear in int8 at once

    def as_dict(self) -> dict:
        return {"model": self.model, "calibration": self.calibration,
                "all_layers_sqnr_db": _finite(self.all_layers_sqnr_db),
                "layers": [{k: _finite(v) for k, v in asdict(r).items()} for r in self.layers]}

    def _notes(self) -> List[str]:
        return [f"INT8 sensitivity of {self.model} (deployed: fused), most sensitive first; calibration: "
                f"{self.calibration}",
                "weights per output channel (symmetric int8), each layer's input per tensor (int8 over the calibrated "
                "range); SQNR = 10 log10(signal / quantization noise), higher is better",
                f"every conv/linear in int8 at once: output SQNR {_cell(self.all_layers_sqnr_db)} dB"]

    def render(self, fmt: str = "table") -> str:
        rows = [[getattr(r, key) for _, key in _COLUMNS] for r in self.layers]
        return render_table(fmt, [h for h, _ in _COLUMNS], rows, cell=_cell, notes=self._notes(), as_dict=self.as_dict,
                            csv_headers=[key for _, key in _COLUMNS], left=2, numeric_from=2)


@dataclass
class QuantComparison:
    """Two quant reports joined by layer name (layers of one model only are listed with blanks)."""

    reports: Tuple[QuantReport, QuantReport]
    names: Tuple[str, str]

    def rows(self) -> List[list]:
        a, b = ({r.name: r for r in rep.layers} for rep in self.reports)
        order = [r.name for r in self.reports[1].layers] + [n for n in a if n not in b]  # B's most sensitive first
        out = []
        for n in order:
            ra, rb = a.get(n), b.get(n)
            sa = ra.output_sqnr_db if ra else None
            sb = rb.output_sqnr_db if rb else None
            out.append([n, ra.channel_range_ratio if ra else None, rb.channel_range_ratio if rb else None, sa, sb,
                        (sb - sa) if (sa is not None and sb is not None) else None])
        return out

    def headers(self) -> List[str]:
        a, b = self.names
        return ["layer", f"max/median {a}", f"max/median {b}", f"output SQNR dB {a}", f"output SQNR dB {b}",
                "B - A dB"]

    def as_dict(self) -> dict:
        return {"names": list(self.names), "reports": [r.as_dict() for r in self.reports],
                "rows": [dict(zip(self.headers(), [_finite(v) for v in row])) for row in self.rows()]}

    def render(self, fmt: str = "table") -> str:
        notes = [f"INT8 sensitivity side by side (deployed models, per-layer output SQNR; higher is better; B's most "
                 f"sensitive layers first); calibration: {self.reports[1].calibration}"]
        notes += [f"{n}: every conv/linear in int8 at once: output SQNR {_cell(r.all_layers_sqnr_db)} dB"
                  for n, r in zip(self.names, self.reports)]
        # csv writes None (a layer only one model has) as an empty field, the text formats as a blank cell
        return render_table(fmt, self.headers(), self.rows(), cell=lambda v: "" if v is None else _cell(v),
                            notes=notes, as_dict=self.as_dict)


def quant_compare(a: Union[nn.Module, QuantReport], b: Union[nn.Module, QuantReport], calib=None, *,
                  names: Sequence[str] = ("A", "B"), **kwargs) -> QuantComparison:
    """`quant_report` of two models (e.g. the original and the refocused+fused one) on the same calibration."""
    names = tuple(names)
    if len(names) != 2 or not all(isinstance(n, str) and n for n in names):
        raise ReparamError(f"names must be two non-empty strings, got {names!r}")
    reports = tuple(x if isinstance(x, QuantReport) else quant_report(x, calib, name=n, **kwargs)
                    for x, n in zip((a, b), names))
    return QuantComparison(reports, names)
