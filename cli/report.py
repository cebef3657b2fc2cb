"""`reparam report` and `reparam compare`: params and MACs of any stage, for training and for inference."""
from __future__ import annotations

import os

import click

from .common import echo, echo_lines, input_size_option, known_input_size, model_options, report_format_option, resolve

_SIZE_HELP = "Input size for the MACs (default: the model's timm config, else 3,224,224)."
_DEFAULT_SIZE = (3, 224, 224)


@click.command("report")
@click.argument("model", metavar="MODEL")
@model_options
@input_size_option(_SIZE_HELP)
@report_format_option()
@click.option("--depth", type=click.IntRange(min=0), default=1, show_default=True,
              help="Per-module rows down to this depth (0: totals only).")
def report_command(model, arch, checkpoint, num_classes, pretrained, trust_pickle, input_size, fmt, depth):
    """Params (trainable/frozen, buffers apart) and MACs of MODEL, for training and for inference.

    MODEL is as for `reparam convert`; a RefConv model file shows what refocus training costs next to
    what deploys. Only the report goes to stdout (machine formats stay parseable).
    """
    from reparam_zoo.report import report

    resolved = resolve(model, arch=arch, checkpoint=checkpoint, num_classes=num_classes, pretrained=pretrained,
                       trust_pickle=trust_pickle)
    size = _size(resolved.model, input_size)
    _show(report(resolved.model, size, depth=depth, name=_label(model)), fmt)


@click.command("compare")
@click.argument("model_a", metavar="A")
@click.argument("model_b", metavar="B")
@click.option("--trust-pickle", is_flag=True,
              help="Allow A or B to be a whole pickled nn.Module (unpickling runs code: only trusted files).")
@input_size_option(_SIZE_HELP)
@report_format_option()
@click.option("--names", metavar="NAME_A,NAME_B", help="Column names (default: the file or architecture names).")
def compare_command(model_a, model_b, trust_pickle, input_size, fmt, names):
    """Two models side by side, with B - A and B / A: e.g. a RefConv model file and its fused file.

    A and B are architecture names or model files (reparam .safetensors; pickles with --trust-pickle).
    """
    from reparam_zoo.report import compare

    if names is not None:
        labels = tuple(n.strip() for n in names.split(","))
        if len(labels) != 2 or not all(labels):
            raise click.BadParameter(f"expected two comma-separated names, got '{names}'", param_hint="--names")
    else:
        labels = (_label(model_a), _label(model_b))
        if labels[0] == labels[1]:
            labels = ("A", "B")
    a, b = (_resolve_compared(spec, trust_pickle) for spec in (model_a, model_b))
    size = input_size or known_input_size(a, None) or known_input_size(b, None) or _DEFAULT_SIZE
    _show(compare(a, b, size, names=labels), fmt)


def _show(result, fmt: str) -> None:
    echo_lines(result.render(fmt))
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
