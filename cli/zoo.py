"""`reparam zoo list` / `reparam zoo report NAME`: the shipped ReXNetV1 and RevCol variants."""
from __future__ import annotations

import json

import click

from reparam_zoo.tables import aligned_lines, markdown_lines

from .common import echo, echo_lines, input_size_option, report_format_option


@click.group("zoo")
def zoo_group():
    """The ReXNetV1 and RevCol variants shipped with reparam-zoo (registered with timm)."""


@zoo_group.command("list")
@click.option("--format", "fmt", type=click.Choice(("table", "markdown", "json")), default="table",
              show_default=True, help="Output format.")
def zoo_list(fmt):
    """Every variant with its measured params (built on the meta device: no memory, no compute) next to the
    published params, MACs at 224 and top-1. `reparam zoo report NAME` measures one variant's MACs."""
    from reparam_zoo.zoo import zoo_table

    rows = zoo_table()
    if fmt == "json":
        echo(json.dumps(rows, indent=2))
        return
    headers = ["name", "family", "params", "published", "match", "MACs@224 (published)", "top-1 (published)",
               "input"]
    cells = [[r["name"], r["family"], f"{r['params']:,}", _params(r["published_params"], r["approx"]),
              "yes" if r["params_match"] else "NO", _macs(r["published_macs"], r["approx"]), r["published_top1"] or "-",
              "x".join(map(str, r["input_size"]))] for r in rows]
    lines = markdown_lines(headers, cells, numeric_from=2) if fmt == "markdown" else aligned_lines(headers, cells, left=2)
    echo_lines("\n".join(lines))
    if fmt == "table":
        echo("\nparams: counted parameter elements; MACs: multiply-accumulates per image (papers' 'FLOPs')")


@zoo_group.command("report")
@click.argument("name", metavar="NAME")
@input_size_option("Input size (default: the variant's timm config).")
@report_format_option()
@click.option("--depth", type=click.IntRange(min=0), default=1, show_default=True,
              help="Per-module rows down to this depth (0: totals only).")
def zoo_report(name, input_size, fmt, depth):
    """The full params/MACs report of one variant (randomly initialised), with its published numbers."""
    from reparam_zoo.architectures import create_model
    from reparam_zoo.report import report
    from reparam_zoo.zoo import PUBLISHED, zoo_names

    names = zoo_names()
    if name not in names:
        raise click.BadParameter(f"'{name}' is not a zoo variant; one of: {', '.join(names)}", param_hint="NAME")
    model = create_model(name)
    result = report(model, input_size, depth=depth, name=name)
    published = PUBLISHED.get(name, {})
    if fmt == "json":
        echo(json.dumps({**result.as_dict(), "published": published}, indent=2))
        return
    echo_lines(result.render(fmt))
    if fmt in ("table", "markdown") and published:
        echo("")
        echo(f"published: {_params(published['params'], published.get('approx'))} params, "
                   f"{_macs(published['macs'], published.get('approx'))} MACs at 224, "
                   f"top-1 {published['top1'] or '-'}")


def _params(value, approx=False):
    if value is None:
        return "-"
    if approx:  # as roughly as the paper gives it
        return f"~{value / 1e9:.3g}B" if value >= 1e9 else f"~{value / 1e6:.3g}M"
    return f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.2f}M"


def _macs(value, approx=False):
    if value is None:
        return "-"
    return f"~{value / 1e9:.3g}G" if approx else f"{value / 1e9:.2f}G"
