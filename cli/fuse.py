"""`reparam fuse`: fold RefConvs, fuse conv+BN, verify, and only then write the deployable model."""
from __future__ import annotations

import os

import click

from click.core import ParameterSource

from .common import (DEFAULT_CALIB_IMAGES, DEFAULT_HELD_OUT_IMAGES, DEFAULT_MIN_AGREEMENT, EXPORT_FORMATS, FORMAT_NAMES,
                     check_model_file_name, check_output, default_output, echo, echo_lines, options,
                     format_of_path, input_paths, input_size_option, model_options, output_option,
                     resolve, settle_model_output, steps, tolerance_option, wrote)


@click.command("fuse")
@click.argument("model", metavar="MODEL")
@model_options
@output_option("Output file (default: <stem>.fused.<ext> next to MODEL, or in the current folder for an "
               "architecture name; a '.refconv' in the stem is dropped).")
@input_size_option("Input size for tracing and verification (default: the model's timm config).")
@tolerance_option("rtol", 1e-4, "Relative tolerance of the verification (relative to the output's largest magnitude).")
@tolerance_option("atol", 0.0, "Absolute slack of the verification, for outputs that should be exactly zero.")
@click.option("--no-verify", is_flag=True, help="Skip checking the fused model against the original.")
@click.option("--fold-only", is_flag=True,
              help="Only fold the RefConvs: the original structure and state_dict keys (BatchNorms kept), "
                   "loadable into the unconverted architecture. Default output <stem>.folded.<ext>.")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="safetensors", show_default=True,
              help="safetensors: a reparam model file (reloadable, self-describing); torchscript (jit.trace), "
                   "onnx, pt2 (torch.export): deployment artifacts, checked against the fused model before "
                   "they are kept.")
@click.option("--int8", is_flag=True,
              help="Write a static INT8 ONNX model (onnxruntime quantization: QDQ, per-channel weights), calibrated "
                   "on --calib images and kept only when it agrees with the float model on held-out images. "
                   "Default output <stem>.fused.int8.onnx.")
@click.option("--calib", "calib", metavar="DIR", type=click.Path(file_okay=False),
              help="Images for --int8: a folder of images (flat or in sub-folders) or a data folder "
                   "(train/ calibrates, val/ is held out).")
@click.option("--calib-images", type=click.IntRange(min=1), default=DEFAULT_CALIB_IMAGES, show_default=True, metavar="N",
              help="Calibration images for --int8.")
@click.option("--held-out-images", type=click.IntRange(min=1), default=DEFAULT_HELD_OUT_IMAGES, show_default=True,
              metavar="N",
              help="Held-out images the INT8 model is checked on (--int8).")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=DEFAULT_MIN_AGREEMENT, show_default=True,
              help="Smallest top-1 agreement of the INT8 model with the float model for it to be written (--int8).")
@click.pass_context
def fuse_command(ctx, model, arch, checkpoint, num_classes, pretrained, trust_pickle, output, input_size, rtol, atol,
                 no_verify, fold_only, fmt, int8, calib, calib_images, held_out_images, min_agreement):
    """Fold RefConv layers, fuse conv+BatchNorm, verify the result, then write it.

    Verification (random inputs at batch 1 and 2 against the unfused model) runs before anything is
    written; a model that fails it is not written. A model without a rebuildable architecture (a
    pickled module, with --trust-pickle) is written back as a pickle (.pt). MODEL is as for
    `reparam convert`.
    """
    explicit_output = output
    fmt = _int8_format(ctx, int8, calib, fmt)
    if output is not None:
        fmt = _format_for(output, fmt, explicit=int8 or ctx.get_parameter_source("fmt") is ParameterSource.COMMANDLINE)
    stem_suffix = ".folded" if fold_only else ".fused"
    output = output or default_output(model, stem_suffix + (".int8" if int8 else "") + options.EXPORT_SUFFIXES[fmt],
                                      strip=(".refconv",))
    check_output(output, input_paths(model, checkpoint))
    if fmt == "safetensors" and explicit_output and not trust_pickle:
        check_model_file_name(output, has_architecture=True)  # only a trusted pickle can lack one
    from reparam_zoo.deploy import fuse, nothing_to_fuse
    from reparam_zoo.model_info import example_inputs
    from reparam_zoo.export import export
    from reparam_zoo.checkpoint import check_finite
    from reparam_zoo.module_attrs import architecture_of, fuse_report_of

    with steps("fuse", 3) as step:
        step("loading")
        resolved = resolve(model, arch=arch, checkpoint=checkpoint, num_classes=num_classes,
                           pretrained=pretrained, trust_pickle=trust_pickle, weights_matter=True)
        source = resolved.model.eval()
        if fmt == "safetensors":  # checked as soon as loading tells whether the model has an architecture
            output = settle_model_output(output, explicit=bool(explicit_output),
                                         has_architecture=architecture_of(source) is not None,
                                         pickle_default=default_output(model, stem_suffix + ".pt",
                                                                       strip=(".refconv",)),
                                         inputs=input_paths(model, checkpoint))
        check_finite(source.state_dict(), action="fuse them")
        inputs = example_inputs(source, input_size)

        step(("folding" if fold_only else "fusing") + ("" if no_verify else " and verifying"))
        if nothing_to_fuse(source, fold_only=fold_only):  # fuse() then returns it as it is
            echo("already fused, nothing left to do: writing it as it is; what its fuse recorded:")
        fused = fuse(source, example_inputs=inputs, verify=not no_verify, rtol=rtol, atol=atol, fold_only=fold_only)
        echo_lines(str(fuse_report_of(fused)))

        existed = os.path.exists(output)
        if int8:
            from reparam_zoo.quantize import export_int8

            step("quantizing to INT8 and checking it on held-out images")
            int8_result = export_int8(fused, output, calib, calib_images=calib_images, held_out_images=held_out_images,
                                      min_agreement=min_agreement, input_size=input_size)
            echo(f"{wrote(output, existed)} [onnx int8] {int8_result.describe()}")
            return
        step(f"writing {fmt}")
        result = export(fused, output, fmt, example_inputs=inputs, rtol=rtol, atol=atol, trust_pickle=trust_pickle)
    checked = ""
    if result.max_abs_error is not None:
        checked = (f" (the written file reproduces the fused model: max abs error {result.max_abs_error:.3g}, "
                   f"max rel error {result.max_rel_error:.3g})")
    echo(f"{wrote(output, existed)} [{result.format}]{checked}")


def _int8_format(ctx, int8: bool, calib, fmt: str) -> str:
    """--int8 writes ONNX and needs --calib; the INT8 options mean nothing without --int8."""
    if not int8:
        given = [option for name, option in (("calib", "--calib"), ("calib_images", "--calib-images"),
                                             ("held_out_images", "--held-out-images"),
                                             ("min_agreement", "--min-agreement"))
                 if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"{given[0]} is for --int8 (the INT8 model's calibration and check)")
        return fmt
    if ctx.get_parameter_source("fmt") is ParameterSource.COMMANDLINE and fmt != "onnx":
        raise click.BadParameter(f"--int8 writes an ONNX model, but --format is {fmt}", param_hint="--format")
    if calib is None:
        raise click.UsageError("--int8 needs --calib DIR: images to calibrate and check the INT8 model on")
    if not os.path.isdir(calib):  # before any work
        raise click.BadParameter(f"'{calib}': {'not a folder' if os.path.exists(calib) else 'no such folder'}",
                                 param_hint="--calib")
    return "onnx"


def _format_for(output: str, fmt: str, *, explicit: bool) -> str:
    """The format to write: --format when given (it must not contradict the file name), else the one the
    output's name implies (`-o m.onnx`), else the default."""
    implied = format_of_path(output)
    if explicit and implied is not None and implied != fmt:
        raise click.BadParameter(f"'{output}' names {FORMAT_NAMES[implied]} file, but --format is {fmt}",
                                 param_hint="-o/--output")
    fmt = fmt if explicit else (implied or fmt)
    if implied is None and fmt != "safetensors":  # (model files: check_model_file_name knows the rule)
        raise click.BadParameter(f"'{output}' does not say it is {FORMAT_NAMES[fmt]} file; name it "
                                 f"<name>{options.EXPORT_SUFFIXES[fmt]}", param_hint="-o/--output")
    return fmt
