"""`reparam zoo list` / `reparam zoo report NAME`: the shipped ReXNetV1 and RevCol variants."""
from __future__ import annotations

import json

import click

from reparam_zoo.options import ZOO_FORMATS, zoo_variant_problem

from .common import echo, echo_lines, input_size_option, report_format_option


@click.group("zoo")
def zoo_group():
    """The ReXNetV1 and RevCol variants shipped with reparam-zoo (registered with timm)."""


@zoo_group.command("list")
@click.option("--format", "fmt", type=click.Choice(ZOO_FORMATS), default="table", show_default=True,
              help="Output format.")
def zoo_list(fmt):
    """Every variant with its measured params (built on the meta device: no memory, no compute) next to the
    published params, MACs at 224 and top-1. `reparam zoo report NAME` measures one variant's MACs."""
    from reparam_zoo.zoo import render_zoo_table, zoo_table

    echo_lines(render_zoo_table(zoo_table(), fmt))


@zoo_group.command("report")
@click.argument("name", metavar="NAME")
@input_size_option("Input size (default: the variant's timm config).")
@report_format_option()
@click.option("--depth", type=click.IntRange(min=0), default=1, show_default=True,
              help="Per-module rows down to this depth (0: totals only).")
def zoo_report(name, input_size, fmt, depth):
    """The full params/MACs report of one variant (randomly initialised), with its published numbers."""
    problem = zoo_variant_problem(name)  # before torch loads: the names are a torch-free list
    if problem:
        raise click.BadParameter(problem, param_hint="NAME")
    from reparam_zoo.architectures import create_model
    from reparam_zoo.report import report
    from reparam_zoo.zoo import PUBLISHED, published_line
    result = report(create_model(name), input_size, depth=depth, name=name)
    if fmt == "json":
        echo(json.dumps({**result.as_dict(), "published": PUBLISHED.get(name, {})}, indent=2))
        return
    echo_lines(result.render(fmt))
    line = published_line(name)
    if fmt in ("table", "markdown") and line:
        echo("")
        echo(line)
