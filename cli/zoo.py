"""`reparam zoo list` / `reparam zoo report NAME`: the shipped ReXNetV1 and RevCol variants."""
from __future__ import annotations

import json

import click

from reparam_zoo.report import aligned_lines, markdown_lines

from .common import echo_lines, input_size_option, report_format_option


# The papers' numbers (ReXNet and RevCol papers): params, MACs at 224 (the papers' "FLOPs"), ImageNet top-1.
# `approx` marks numbers the authors give only roughly.
PUBLISHED = {
    "rexnetv1_100": dict(params=4.80e6, macs=0.40e9, top1="77.9"),
    "rexnetv1_130": dict(params=7.56e6, macs=0.66e9, top1="79.5"),
    "rexnetv1_150": dict(params=9.73e6, macs=0.88e9, top1="80.3"),
    "rexnetv1_200": dict(params=16.37e6, macs=1.53e9, top1="81.6"),
    "rexnetv1_300": dict(params=34.71e6, macs=3.40e9, top1="82.8"),
    "revcol_tiny": dict(params=30.46e6, macs=4.5e9, top1="82.2"),
    "revcol_small": dict(params=60.57e6, macs=9.0e9, top1="83.5"),
    "revcol_base": dict(params=138.62e6, macs=16.6e9, top1="84.1"),
    "revcol_large": dict(params=273.10e6, macs=39e9, top1="86.6 (in22k)"),
    "revcol_xlarge": dict(params=834e6, macs=120e9, top1="88.2 (in22k)", approx=True),
    "revcol_huge": dict(params=2.16e9, macs=None, top1=None, approx=True),
}
# measured vs published params: the papers round to 2 decimals of millions (approx numbers: 1%)
_PARAMS_RTOL = 0.001
_APPROX_RTOL = 0.01


@click.group("zoo")
def zoo_group():
    """The ReXNetV1 and RevCol variants shipped with reparam-zoo (registered with timm)."""


@zoo_group.command("list")
@click.option("--format", "fmt", type=click.Choice(("table", "markdown", "json")), default="table",
              show_default=True, help="Output format.")
def zoo_list(fmt):
    """Every variant with its measured params (built on the meta device: no memory, no compute) next to the
    published params, MACs at 224 and top-1. `reparam zoo report NAME` measures one variant's MACs."""
    rows = _rows()
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    headers = ["name", "family", "params", "published", "match", "MACs@224 (published)", "top-1 (published)",
               "input"]
    cells = [[r["name"], r["family"], f"{r['params']:,}", _params(r["published_params"], r["approx"]),
              "yes" if r["params_match"] else "NO", _macs(r["published_macs"], r["approx"]), r["published_top1"] or "-",
              "x".join(map(str, r["input_size"]))] for r in rows]
    lines = markdown_lines(headers, cells, numeric_from=2) if fmt == "markdown" else aligned_lines(headers, cells, left=2)
    echo_lines("\n".join(lines))
    if fmt == "table":
        click.echo("\nparams: counted parameter elements; MACs: multiply-accumulates per image (papers' 'FLOPs')")


@zoo_group.command("report")
@click.argument("name", metavar="NAME")
@input_size_option("Input size (default: the variant's timm config).")
@report_format_option()
@click.option("--depth", type=click.IntRange(min=0), default=1, show_default=True,
              help="Per-module rows down to this depth (0: totals only).")
def zoo_report(name, input_size, fmt, depth):
    """The full params/MACs report of one variant (randomly initialised), with its published numbers."""
    from reparam_zoo.modelfile import create_model
    from reparam_zoo.report import report

    names = zoo_names()
    if name not in names:
        raise click.BadParameter(f"'{name}' is not a zoo variant; one of: {', '.join(names)}", param_hint="NAME")
    model = create_model(name)
    result = report(model, input_size, depth=depth, name=name)
    published = PUBLISHED.get(name, {})
    if fmt == "json":
        click.echo(json.dumps({**result.as_dict(), "published": published}, indent=2))
        return
    echo_lines(result.render(fmt))
    if fmt in ("table", "markdown") and published:
        click.echo("")
        click.echo(f"published: {_params(published['params'], published.get('approx'))} params, "
                   f"{_macs(published['macs'], published.get('approx'))} MACs at 224, "
                   f"top-1 {published['top1'] or '-'}")


def zoo_names():
    import timm

    import reparam_zoo  # noqa: F401  (registers the zoo)

    names = [n for n in timm.list_models() if _family(n)]
    order = list(PUBLISHED)  # family by family, smallest first
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def _family(name: str):
    import timm

    module = getattr(timm.models.model_entrypoint(name), "__module__", "") or ""
    return {"reparam_zoo.models.rexnet": "ReXNetV1", "reparam_zoo.models.revcol": "RevCol"}.get(module)


def _rows():
    import torch
    from tqdm import tqdm

    from reparam_zoo.modelfile import create_model

    rows = []
    for name in tqdm(zoo_names(), desc="building on meta", file=click.get_text_stream("stderr"), disable=None,
                     leave=False):
        with torch.device("meta"):
            model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        published = PUBLISHED.get(name, {})
        approx = bool(published.get("approx"))
        expected = published.get("params")
        match = expected is not None and abs(params - expected) <= (_APPROX_RTOL if approx else _PARAMS_RTOL) * expected
        rows.append(dict(
            name=name, family=_family(name), params=params, published_params=expected, params_match=match,
            published_macs=published.get("macs"), published_top1=published.get("top1"), approx=approx,
            input_size=list(model.pretrained_cfg.get("input_size", ())),
        ))
    return rows


def _params(value, approx=False):
    if value is None:
        return "-"
    prefix = "~" if approx else ""
    return f"{prefix}{value / 1e9:.2f}B" if value >= 1e9 else f"{prefix}{value / 1e6:.2f}M"


def _macs(value, approx=False):
    return "-" if value is None else f"{'~' if approx else ''}{value / 1e9:.2f}G"
