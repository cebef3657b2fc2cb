"""`reparam convert`: a model into its RefConv training form, written as a self-describing model file."""
from __future__ import annotations

import os

import click

from .common import (DEFAULT_MAP_K, echo, FORMAT_NAMES, INITS, TRAIN_SCOPES, check_map_k, check_model_file_name, check_output,
                     default_output, echo_lines, format_of_path, input_paths, input_size_option, known_input_size,
                     model_options, output_option, resolve, settle_model_output, steps, wrote)


@click.command("convert")
@click.argument("model", metavar="MODEL")
@click.option("--refconv", is_flag=True,
              help="Replace the spatial convs by RefConv layers (the only conversion so far; required).")
@model_options
@click.option("--map-k", type=int, default=DEFAULT_MAP_K, show_default=True, callback=check_map_k,
              help="Kernel size of the refocusing transform (odd, at most the layer's kernel).")
@click.option("--init", type=click.Choice(INITS), default="zero", show_default=True,
              help="Transform init; zero keeps the model's outputs exactly.")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Convert only convs whose qualified name matches (repeatable), e.g. 'layer4.*'.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave matching convs alone (repeatable).")
@click.option("--train-scope", type=click.Choice(TRAIN_SCOPES), default="transforms", show_default=True,
              help="What trains: only the transforms, also norm layers, or everything but the base kernels.")
@input_size_option("Input size for the training-vs-inference MACs report (default: the model's timm config).")
@output_option("Output file (default: <stem>.refconv.safetensors next to MODEL, or in the current folder "
               "for an architecture name).")
@click.option("--dry-run", is_flag=True, help="Show what would be converted; write nothing.")
def convert_command(model, refconv, arch, checkpoint, num_classes, pretrained, trust_pickle, map_k, init, include,
                    exclude, train_scope, input_size, output, dry_run):
    """Convert MODEL for RefConv refocus training and write it as a model file.

    MODEL is a timm, zoo or torchvision:NAME architecture name (with --checkpoint or --pretrained
    weights), a reparam .safetensors model file, a checkpoint file with --arch, or (with --trust-pickle)
    a pickled model.
    Prints the converted and skipped layers and the training-vs-inference params/MACs.
    """
    if not refconv:
        raise click.UsageError("say which conversion: --refconv (RefConv is the only conversion so far)")
    explicit_output = output
    if not dry_run:  # checked before any work, so that a bad path fails at once
        output = output or default_output(model, ".refconv.safetensors")
        check_output(output, input_paths(model, checkpoint))
        if format_of_path(output) not in (None, "safetensors"):
            raise click.BadParameter(f"'{output}' names {FORMAT_NAMES[format_of_path(output)]} file; convert writes "
                                     "a model file (.safetensors)", param_hint="-o/--output")
        if not trust_pickle:  # only a trusted pickle can lack an architecture: the name is checked now
            check_model_file_name(output, has_architecture=True)
    # the library, once the command line is known to be usable
    from reparam_zoo.checkpoint import check_finite
    from reparam_zoo.modelfile import save
    from reparam_zoo.module_attrs import architecture_of, refconv_summary_of
    from reparam_zoo.report import report
    from reparam_zoo.surgery import convert

    with steps("convert", 3 if dry_run else 4) as step:
        step("loading")
        resolved = resolve(model, arch=arch, checkpoint=checkpoint, num_classes=num_classes,
                           pretrained=pretrained, trust_pickle=trust_pickle, weights_matter=True)
        if not dry_run:  # checked as soon as loading tells whether the model has an architecture
            output = settle_model_output(output, explicit=bool(explicit_output),
                                         has_architecture=architecture_of(resolved.model) is not None,
                                         pickle_default=default_output(model, ".refconv.pt"),
                                         inputs=input_paths(model, checkpoint))
        check_finite(resolved.model.state_dict(), action="convert them")
        step("converting")
        converted = convert(resolved.model, map_k=map_k, init=init, include=include or None,
                            exclude=exclude or None, train_scope=train_scope)
        echo_lines(str(refconv_summary_of(converted)))

        step("counting params and MACs")
        size = known_input_size(converted, input_size)
        if size is None:
            echo("(pass --input-size C,H,W for the training-vs-inference MACs report)")
        else:
            echo("")
            echo_lines(report(converted, size, depth=0, name=_name(converted)).render("table"))
        if dry_run:
            echo("dry run: nothing written")
            return

        step("writing")
        existed = os.path.exists(output)
        save(converted, output, trust_pickle=trust_pickle)
    echo(wrote(output, existed))


def _name(model) -> str:
    from reparam_zoo.module_attrs import architecture_of

    arch = architecture_of(model)
    return arch["name"] if arch else type(model).__name__
