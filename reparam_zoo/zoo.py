"""The shipped ReXNetV1 and RevCol variants next to the papers' numbers for them."""
from __future__ import annotations

import json
from typing import List, Optional

import timm
import torch
from tqdm import tqdm

from . import models  # noqa: F401  (registers the zoo with timm)
from .architectures import create_model
from .errors import ReparamError
from .options import ZOO_FORMATS
from .tables import aligned_lines, markdown_lines

__all__ = ["PUBLISHED", "ZOO_FORMATS", "zoo_names", "family", "zoo_table", "render_zoo_table", "published_line"]

# The papers' numbers (ReXNet and RevCol papers): params, MACs at 224 (the papers' "FLOPs"), ImageNet top-1.
# `approx` marks numbers the authors give only roughly.
PUBLISHED = {
    "rexnetv1_090": dict(params=4.09e6, macs=0.35e9, top1="77.2"),
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
PARAMS_RTOL = 0.001
APPROX_RTOL = 0.01

_FAMILIES = {"reparam_zoo.models.rexnet": "ReXNetV1", "reparam_zoo.models.revcol": "RevCol"}


def family(name: str) -> Optional[str]:
    """"ReXNetV1" or "RevCol" for a zoo variant, None for any other timm name."""
    module = getattr(timm.models.model_entrypoint(name), "__module__", "") or ""
    return _FAMILIES.get(module)


def zoo_names() -> List[str]:
    """Every registered zoo variant, family by family, smallest first."""
    order = list(PUBLISHED)
    names = [n for n in timm.list_models() if family(n)]
    return sorted(names, key=lambda n: (order.index(n) if n in order else len(order), n))


def zoo_table(progress: bool = True) -> List[dict]:
    """Each variant's measured parameter count (built on the meta device: no memory, no compute) next to
    the published params, MACs at 224 and top-1, and whether the counts match."""
    rows = []
    for name in tqdm(zoo_names(), desc="building on meta", disable=None if progress else True, leave=False):
        with torch.device("meta"):
            model = create_model(name)
        params = sum(p.numel() for p in model.parameters())
        published = PUBLISHED.get(name, {})
        approx = bool(published.get("approx"))
        expected = published.get("params")
        match = expected is not None and abs(params - expected) <= (APPROX_RTOL if approx else PARAMS_RTOL) * expected
        rows.append(dict(
            name=name, family=family(name), params=params, published_params=expected, params_match=match,
            published_macs=published.get("macs"), published_top1=published.get("top1"), approx=approx,
            input_size=list(model.pretrained_cfg.get("input_size", ())),
        ))
    return rows


_HEADERS = ["name", "family", "params", "published", "match", "MACs@224 (published)", "top-1 (published)", "input"]


def render_zoo_table(rows: List[dict], fmt: str = "table") -> str:
    """`zoo_table()`'s rows as a table, markdown or JSON."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt not in ZOO_FORMATS:
        raise ReparamError(f"unknown format '{fmt}', expected one of {', '.join(ZOO_FORMATS)}")
    cells = [[r["name"], r["family"], f"{r['params']:,}", _params(r["published_params"], r["approx"]),
              "yes" if r["params_match"] else "NO", _macs(r["published_macs"], r["approx"]), r["published_top1"] or "-",
              "x".join(map(str, r["input_size"]))] for r in rows]
    if fmt == "markdown":
        return "\n".join(markdown_lines(_HEADERS, cells, numeric_from=2))
    return "\n".join(aligned_lines(_HEADERS, cells, left=2) + [
        "", "params: counted parameter elements; MACs: multiply-accumulates per image (papers' 'FLOPs')"])


def published_line(name: str) -> Optional[str]:
    """The papers' numbers for a zoo variant in one line (None: none published)."""
    published = PUBLISHED.get(name)
    if not published:
        return None
    return (f"published: {_params(published['params'], published.get('approx'))} params, "
            f"{_macs(published['macs'], published.get('approx'))} MACs at 224, top-1 {published['top1'] or '-'}")


def _params(value, approx=False) -> str:
    if value is None:
        return "-"
    if approx:  # as roughly as the paper gives it
        return f"~{value / 1e9:.3g}B" if value >= 1e9 else f"~{value / 1e6:.3g}M"
    return f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.2f}M"


def _macs(value, approx=False) -> str:
    if value is None:
        return "-"
    return f"~{value / 1e9:.3g}G" if approx else f"{value / 1e9:.2f}G"
