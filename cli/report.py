"""`reparam report` and `reparam compare`: params and MACs of any stage, for training and for inference."""
from __future__ import annotations

import os

import click

from .common import (DEFAULT_REPEATS, DEFAULT_WARMUP, LATENCY_BATCH, REPORT_CALIB_IMAGES, RUNTIMES, echo, echo_lines,
                     input_size_option, known_input_size, model_options, report_format_option, resolve)

_SIZE_HELP = "Input size for the MACs (default: the model's timm config, else 3,224,224)."
_DEFAULT_SIZE = (3, 224, 224)


def _deploy_options(f):
    """--quant (INT8 sensitivity) and --latency (measured timing) and their settings, for report and compare."""
    options = [
        click.option("--quant", is_flag=True,
                     help="Add the INT8 sensitivity of the deployed (fused) model: per conv/linear, per-channel weight "
                          "ranges and the SQNR of quantizing that layer alone, most sensitive first."),
        click.option("--calib", metavar="DIR", type=click.Path(file_okay=False),
                     help="Calibration images for --quant (a folder of images or a data folder with train/; default: "
                          "random normal inputs, which say little about real activation ranges)."),
        click.option("--calib-images", type=click.IntRange(min=1), default=REPORT_CALIB_IMAGES, show_default=True,
                     metavar="N", help="Calibration images for --quant."),
        click.option("--latency", is_flag=True,
                     help="Add measured latency at batch 1 and --batch (a RefConv model: its training-mode forward and "
                          "its fused deploy model), timed interleaved in this process."),
        click.option("--batch", type=click.IntRange(min=1), default=LATENCY_BATCH, show_default=True, metavar="N",
                     help="The second batch size for --latency."),
        click.option("--runtime", "runtimes", multiple=True, type=click.Choice(RUNTIMES[1:]),
                     help="Also time the exported deploy model in this runtime (repeatable) with --latency."),
        click.option("--warmup", type=click.IntRange(min=0), default=DEFAULT_WARMUP, show_default=True, metavar="N",
                     help="Untimed runs per form before timing (--latency)."),
        click.option("--repeats", type=click.IntRange(min=1), default=DEFAULT_REPEATS, show_default=True, metavar="N",
                     help="Timed runs per form and batch size (--latency)."),
        click.option("--threads", type=click.IntRange(min=1), metavar="N",
                     help="CPU threads for --latency, PyTorch and onnxruntime alike (default: PyTorch's setting)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _check_deploy_options(quant, calib, latency, ctx) -> None:
    from click.core import ParameterSource

    if calib is not None and not quant:
        raise click.UsageError("--calib is for --quant (calibration images)")
    if calib is not None and not os.path.isdir(calib):
        raise click.BadParameter(f"'{calib}': {'not a folder' if os.path.exists(calib) else 'no such folder'}",
                                 param_hint="--calib")
    timing = [option for name, option in (("batch", "--batch"), ("runtimes", "--runtime"), ("warmup", "--warmup"),
                                          ("repeats", "--repeats"), ("threads", "--threads"))
              if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
    if timing and not latency:
        raise click.UsageError(f"{timing[0]} is for --latency")


def _extras(models, names, size, *, quant, calib, calib_images, latency, batch, runtimes, warmup, repeats, threads):
    """The --quant and --latency sections, in order."""
    sections = []
    if quant:
        from reparam_zoo.quantize import quant_compare, quant_report

        if len(models) == 1:
            sections.append(("quant", quant_report(models[0], calib, calib_images=calib_images, input_size=size,
                                                   name=names[0], progress=True)))
        else:
            sections.append(("quant", quant_compare(models[0], models[1], calib, names=names,
                                                    calib_images=calib_images, input_size=size, progress=True)))
    if latency:
        from reparam_zoo.latency import measure_latency

        sections.append(("latency", measure_latency(dict(zip(names, models)), size, batch=batch, warmup=warmup,
                                                    repeats=repeats, threads=threads,
                                                    runtimes=("eager",) + tuple(runtimes), progress=True)))
    return sections


@click.command("report")
@click.argument("model", metavar="MODEL")
@model_options
@input_size_option(_SIZE_HELP)
@report_format_option()
@click.option("--depth", type=click.IntRange(min=0), default=1, show_default=True,
              help="Per-module rows down to this depth (0: totals only).")
@_deploy_options
@click.pass_context
def report_command(ctx, model, arch, checkpoint, num_classes, pretrained, trust_pickle, input_size, fmt, depth,
                   quant, calib, calib_images, latency, batch, runtimes, warmup, repeats, threads):
    """Params (trainable/frozen, buffers apart) and MACs of MODEL, for training and for inference.

    MODEL is as for `reparam convert`; a RefConv model file shows what refocus training costs next to
    what deploys. Only the report goes to stdout (machine formats stay parseable).
    """
    _check_deploy_options(quant, calib, latency, ctx)
    from reparam_zoo.report import report

    resolved = resolve(model, arch=arch, checkpoint=checkpoint, num_classes=num_classes, pretrained=pretrained,
                       trust_pickle=trust_pickle)
    size = _size(resolved.model, input_size)
    result = report(resolved.model, size, depth=depth, name=_label(model))
    _show(result, fmt, _extras([resolved.model], [_label(model)], size, quant=quant, calib=calib,
                               calib_images=calib_images, latency=latency, batch=batch, runtimes=runtimes,
                               warmup=warmup, repeats=repeats, threads=threads))


@click.command("compare")
@click.argument("model_a", metavar="A")
@click.argument("model_b", metavar="B")
@click.option("--trust-pickle", is_flag=True,
              help="Allow A or B to be a whole pickled nn.Module (unpickling runs code: only trusted files).")
@input_size_option(_SIZE_HELP)
@report_format_option()
@click.option("--names", metavar="NAME_A,NAME_B", help="Column names (default: the file or architecture names).")
@_deploy_options
@click.pass_context
def compare_command(ctx, model_a, model_b, trust_pickle, input_size, fmt, names, quant, calib, calib_images, latency,
                    batch, runtimes, warmup, repeats, threads):
    """Two models side by side, with B - A and B / A: e.g. a RefConv model file and its fused file.

    A and B are architecture names or model files (reparam .safetensors; pickles with --trust-pickle).
    """
    _check_deploy_options(quant, calib, latency, ctx)
    if names is not None:
        labels = tuple(n.strip() for n in names.split(","))
        if len(labels) != 2 or not all(labels):
            raise click.BadParameter(f"expected two comma-separated names, got '{names}'", param_hint="--names")
    else:
        labels = (_label(model_a), _label(model_b))
        if labels[0] == labels[1]:
            labels = ("A", "B")
    from reparam_zoo.report import compare

    a, b = (_resolve_compared(spec, trust_pickle) for spec in (model_a, model_b))
    size = input_size or known_input_size(a, None) or known_input_size(b, None) or _DEFAULT_SIZE
    _show(compare(a, b, size, names=labels), fmt,
          _extras([a, b], list(labels), size, quant=quant, calib=calib, calib_images=calib_images, latency=latency,
                  batch=batch, runtimes=runtimes, warmup=warmup, repeats=repeats, threads=threads))


def _show(result, fmt: str, extras=()) -> None:
    if extras and fmt == "json":  # one JSON document: the report and each added section under its name
        import json

        echo_lines(json.dumps({"report": result.as_dict(), **{k: v.as_dict() for k, v in extras}}, indent=2))
    else:  # the other formats: the sections one after another, a blank line between
        echo_lines("\n\n".join([result.render(fmt).rstrip("\n")] + [v.render(fmt).rstrip("\n") for _, v in extras]))
    if fmt == "csv":  # the other formats carry the warnings themselves
        for flag in result.flags:
            echo(f"warning: {flag}", err=True)


def _resolve_compared(spec: str, trust_pickle: bool):
    from reparam_zoo.errors import ArchitectureUnknownError

    try:
        return resolve(spec, trust_pickle=trust_pickle).model
    except ArchitectureUnknownError:
        raise ArchitectureUnknownError(
            f"{spec}: a weights file that does not say its architecture, and compare takes no --arch; make it a "
            "reparam model file first (reparam fuse FILE --arch NAME, or reparam convert FILE --arch NAME --refconv) "
            "and compare that"
        ) from None


def _size(model, input_size):
    size = known_input_size(model, input_size)
    if size is None:
        echo(f"(no input size known for {type(model).__name__}: using {','.join(map(str, _DEFAULT_SIZE))}; "
                   "pass --input-size)", err=True)
        return _DEFAULT_SIZE
    return size


def _label(spec: str) -> str:
    """A file's name without its last extension (`r18.refconv`), or the architecture name."""
    return os.path.splitext(os.path.basename(spec))[0] if os.path.isfile(spec) else spec
