"""Measured latency beside the counted MACs: MACs do not say whether re-parameterization made a model faster.

Every form being compared (a RefConv model's training-mode forward and its fused deploy model, two models
of `compare`, eager PyTorch and the exported artifacts) is timed in one process, interleaved: each repeat
runs every form once, in a rotating order, so a noisy machine slows all of them alike and their ratio
stays meaningful. Reported per form and batch size: median, quartiles (the spread), fastest run.
"""
from __future__ import annotations

import contextlib
import copy
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .errors import ReparamError, first_line
from .model_info import cfg_input_size, require_module, unwrap
from .tables import render_table
from .options import DEFAULT_REPEATS, DEFAULT_WARMUP, RUNTIMES

__all__ = ["RUNTIMES", "LatencyRow", "LatencyReport", "measure_latency", "latency_forms"]



@dataclass
class LatencyRow:
    model: str
    form: str  # "train-mode forward", "deploy (fused)", "eval"
    runtime: str  # one of RUNTIMES
    batch: int
    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    per_image_ms: float
    ratio: float  # median / the first row's median at the same batch size


@dataclass
class _Form:
    model: str
    form: str
    runtime: str
    run: Callable[[torch.Tensor], object]


def _time_once(run: Callable, x: torch.Tensor) -> float:
    start = time.perf_counter()
    run(x)
    return (time.perf_counter() - start) * 1000.0


def _eager(model: nn.Module, train_mode: bool) -> Callable:
    """A forward as training runs it (train mode, autograd recording) or as inference runs it."""
    if train_mode:
        model.train()

        def run(x):
            with torch.enable_grad():
                return model(x)
        return run
    model.eval()

    def infer(x):
        with torch.inference_mode():
            return model(x)
    return infer


def _exported(model: nn.Module, runtime: str, example: Tuple[torch.Tensor, ...], work: str, threads: int) -> Callable:
    """The deploy model written by `export` (checked against the model there) and loaded back to run."""
    from .export import export

    if runtime == "onnxruntime":
        try:
            import onnxruntime
        except ImportError:
            raise ReparamError("onnxruntime timing needs onnxruntime (pip install onnxruntime, or the 'deploy' extra)") \
                from None
        path = os.path.join(work, f"{len(os.listdir(work))}.onnx")
        export(model, path, "onnx", example_inputs=example)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # the same threads as PyTorch, so the comparison is fair
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x.numpy()})
    if runtime == "torch.export":
        path = os.path.join(work, f"{len(os.listdir(work))}.pt2")
        export(model, path, "pt2", example_inputs=example)
        program = torch.export.load(path).module()

        def run(x):
            with torch.inference_mode():
                return program(x)
        return run
    raise ReparamError(f"unknown runtime '{runtime}', expected one of {', '.join(RUNTIMES)}")


def latency_forms(model: nn.Module, name: str, runtimes: Sequence[str], example: Tuple[torch.Tensor, ...],
                  work: str, threads: int) -> List[_Form]:
    """What to time for one model: a RefConv model's training-mode forward and its fused deploy model, any
    other model as it is (eval); the exported runtimes run the deploy model."""
    from .deploy import fuse, model_stage

    model = unwrap(model)
    if model_stage(model) == "refconv":
        deploy = fuse(copy.deepcopy(model).eval(), example_inputs=example)
        forms = [_Form(name, "train-mode forward", "eager", _eager(copy.deepcopy(model), train_mode=True)),
                 _Form(name, "deploy (fused)", "eager", _eager(deploy, train_mode=False))]
        deploy_label = "deploy (fused)"
    else:
        deploy = copy.deepcopy(model).eval()
        forms = [_Form(name, "eval", "eager", _eager(deploy, train_mode=False))]
        deploy_label = "eval"
    for runtime in runtimes:
        if runtime != "eager":
            forms.append(_Form(name, deploy_label, runtime, _exported(deploy, runtime, example, work, threads)))
    return forms


@contextlib.contextmanager
def _torch_threads(threads: Optional[int]):
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def measure_latency(
    models: Union[nn.Module, Mapping[str, nn.Module]],
    input_size: Optional[Sequence[int]] = None,
    *,
    batch: Optional[int] = None,
    warmup: int = DEFAULT_WARMUP,
    repeats: int = DEFAULT_REPEATS,
    threads: Optional[int] = None,
    runtimes: Sequence[str] = ("eager",),
    progress: bool = False,
) -> "LatencyReport":
    """Time one model, or several (`{name: model}`), at batch 1 and `batch`, interleaved in this process.

    `runtimes`: "eager" always runs; "onnxruntime" and "torch.export" add the exported deploy model
    (written and checked by `export` in a temporary folder). `threads`: PyTorch's and onnxruntime's
    intra-op threads (default: PyTorch's current setting). Models are copied, never changed.
    """
    from tqdm import tqdm

    if isinstance(models, nn.Module):
        from .report import model_name

        models = {model_name(unwrap(models)): models}
    for m in models.values():
        require_module(m, "measure_latency")
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise ReparamError(f"unknown runtime '{unknown[0]}', expected one of {', '.join(RUNTIMES)}")
    for what, value, low in (("warmup", warmup, 0), ("repeats", repeats, 1), ("batch", batch or 1, 1),
                             ("threads", threads or 1, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ReparamError(f"{what} must be an integer >= {low}, got {value!r}")
    first = unwrap(next(iter(models.values())))
    size = tuple(input_size) if input_size is not None else cfg_input_size(first, test=True)
    if not size:
        raise ReparamError(f"cannot tell the input size of {type(first).__name__}; pass input_size (C, H, W)")
    batches = sorted({1, batch or 1})
    generator = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn((b,) + size, generator=generator) for b in batches}

    with _torch_threads(threads) as used_threads, tempfile.TemporaryDirectory(prefix="reparam-latency-") as work:
        example = (inputs[1],)
        forms = [f for name, m in models.items()
                 for f in latency_forms(m, name, runtimes, example, work, used_threads)]
        times: Dict[Tuple[int, int], List[float]] = {(i, b): [] for i in range(len(forms)) for b in batches}
        bar = tqdm(total=len(batches) * (warmup + repeats), desc="timing", unit="round", disable=not progress or None,
                   leave=False)
        skipped: List[str] = []
        for b in batches:
            x = inputs[b]
            runnable = []
            for i, form in enumerate(forms):  # e.g. a train-mode BatchNorm cannot normalize one 1x1 sample
                try:
                    form.run(x)
                    runnable.append(i)
                except Exception as e:
                    skipped.append(f"{form.model} {form.form} ({form.runtime}) not timed at batch {b}: "
                                   f"{first_line(e)}")
            for r in range(warmup + repeats):
                # a rotating order: no form always runs first (cold caches) or right after the heaviest one
                for k in range(len(runnable)):
                    i = runnable[(k + r) % len(runnable)]
                    elapsed = _time_once(forms[i].run, x)
                    if r >= warmup:
                        times[(i, b)].append(elapsed)
                bar.update(1)
        bar.close()

    rows = []
    for b in batches:
        base = None
        for i, form in enumerate(forms):
            t = sorted(times[(i, b)])
            if not t:
                continue
            q = statistics.quantiles(t, n=4, method="inclusive") if len(t) > 1 else [t[0]] * 3
            median = statistics.median(t)
            base = median if base is None else base
            rows.append(LatencyRow(form.model, form.form, form.runtime, b, median, q[0], q[2], t[0], median / b,
                                   median / base))
    return LatencyReport(rows=rows, input_size=size, threads=used_threads, warmup=warmup, repeats=repeats,
                         skipped=skipped)


_COLUMNS = [("model", "model"), ("form", "form"), ("runtime", "runtime"), ("batch", "batch"),
            ("median ms", "median_ms"), ("p25 ms", "p25_ms"), ("p75 ms", "p75_ms"), ("min ms", "min_ms"),
            ("ms/image", "per_image_ms"), ("x first", "ratio")]


@dataclass
class LatencyReport:
    rows: List[LatencyRow] = field(default_factory=list)
    input_size: Tuple[int, ...] = ()
    threads: int = 1
    warmup: int = DEFAULT_WARMUP
    repeats: int = DEFAULT_REPEATS
    skipped: List[str] = field(default_factory=list)  # forms that failed to run at a batch size, with why

    def as_dict(self) -> dict:
        return {"input_size": list(self.input_size), "threads": self.threads, "warmup": self.warmup,
                "repeats": self.repeats, "rows": [asdict(r) for r in self.rows], "skipped": list(self.skipped)}

    def notes(self) -> List[str]:
        return [self._note()] + [f"skipped: {s}" for s in self.skipped]

    def _note(self) -> str:
        return (f"latency on CPU, {self.threads} thread(s), input {','.join(map(str, self.input_size))}: "
                f"{self.warmup} warm-up + {self.repeats} timed runs per form, interleaved in one process; "
                "median and quartiles (p25-p75); 'x first' = median / the first row's at that batch")

    def render(self, fmt: str = "table") -> str:
        rows = [[getattr(r, key) for _, key in _COLUMNS] for r in self.rows]
        return render_table(fmt, [h for h, _ in _COLUMNS], rows, cell=_cell, notes=self.notes(), as_dict=self.as_dict,
                            csv_headers=[key for _, key in _COLUMNS], left=3, numeric_from=3)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return str(value)
