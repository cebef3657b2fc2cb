"""How long the deploy path takes against model size: convert, fold, fuse and verify.

    python benchmarks/fuse_time.py [--models resnet18 mobilenetv2_100 rexnetv1_100 resnet50 convnext_tiny
        revcol_base torchvision:fasterrcnn_mobilenet_v3_large_320_fpn] [--reps 3] [--threads N] [--no-readme]
        [--merge]

For each model (timm, zoo or `torchvision:NAME`, random weights), with the library's defaults (copies, not in
place), at the model's own input size (a detector: one image of its `min_size`, which it resizes itself):

* convert: `reparam_zoo.convert(model)`.
* fold:    `reparam_zoo.fold(refconv)`, after giving every transform small random values (as after
  training, so that no stage can take a shortcut on zeros); kernels are computed in float64.
* fuse:    `reparam_zoo.fuse(refconv, verify=False)`: fold, Rep blocks, conv+BatchNorm fusion (the
  tracing forward at batch 1 included).
* verify:  `reparam_zoo.verify.verify_equivalence` of the fused model against the RefConv model on the
  model's default input size, as `fuse(verify=True)` runs it (batches 1 and 2; every folded/fused module
  on its captured input, and end to end: a detector's backbone and dense-head outputs).
* total:   convert + fuse + verify, the cost of `fuse(convert(model))` with verification.

Each stage is timed `--reps` times (median; wall and process CPU time), on one model instance, in one
process. `--merge` keeps the rows of models not measured now from the existing results file (the README
table marks them and names the run they came from).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


import reparam_zoo  # noqa: E402  (also registers rexnetv1_* and revcol_* with timm)
from reparam_zoo import modelfile  # noqa: E402
from reparam_zoo.deploy import changed_units  # noqa: E402
from reparam_zoo.model_info import example_inputs  # noqa: E402
from reparam_zoo.torchvision_models import continuous_output_modules  # noqa: E402
from reparam_zoo.verify import as_call_inputs, verify_equivalence  # noqa: E402
from reparam_zoo.surgery import refconv_layers  # noqa: E402

from benchmarks import _common  # noqa: E402

DEFAULT_MODELS = ("resnet18", "mobilenetv2_100", "rexnetv1_100", "resnet50", "convnext_tiny", "revcol_base",
                  "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn")
STAGES = ("convert", "fold", "fuse", "verify")


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def measure(name: str, reps: int) -> dict:
    torch.manual_seed(0)
    model = modelfile.create_model(name).eval()
    inputs = example_inputs(model)
    wall = {s: [] for s in STAGES}
    cpu = {s: [] for s in STAGES}

    def record(stage, fn):
        out, w, c = timed(fn)
        wall[stage].append(w)
        cpu[stage].append(c)
        return out

    for _ in range(reps):
        refconv = record("convert", lambda: reparam_zoo.convert(model))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, layer in refconv_layers(refconv):
                layer.transform_weight.copy_(torch.randn(layer.transform_weight.shape, generator=generator) * 0.01)
        refconv.eval()
        record("fold", lambda: reparam_zoo.fold(refconv))
        fused = record("fuse", lambda: reparam_zoo.fuse(refconv, example_inputs=inputs, verify=False))
        report = fused.fuse_report
        max_abs, max_rel, shapes = record(
            "verify", lambda: verify_equivalence(
                refconv, fused, inputs, rtol=report.rtol, atol=report.atol, absorbed=dict(report.fused),
                units=changed_units(report.folded, report.fused, report.reparameterized),
                output_modules=continuous_output_modules(fused))
        )
        summary = refconv.refconv_summary
        del refconv, fused
    median = {s: statistics.median(wall[s]) for s in STAGES}
    median_cpu = {s: statistics.median(cpu[s]) for s in STAGES}
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "input_size": as_call_inputs(inputs).shape()[-3:],
        "refconv_layers": len(summary.converted),
        "transform_params": summary.transform_params,
        "conv_bn_fused": len(report.fused),
        "verified_on": shapes, "max_abs_error": max_abs, "max_rel_error": max_rel,
        "stage_s": median, "stage_cpu_s": median_cpu,
        "total_s": median["convert"] + median["fuse"] + median["verify"],
        "total_cpu_s": median_cpu["convert"] + median_cpu["fuse"] + median_cpu["verify"],
        "times": {"wall": wall, "cpu": cpu},
    }


def readme_block(results: dict) -> str:
    rows = []
    for name, r in results["models"].items():
        s = r["stage_s"]
        rows.append([
            name, f"{r['params'] / 1e6:.2f}M", f"{r['transform_params'] / 1e6:.2f}M", r["refconv_layers"],
            r["conv_bn_fused"], "x".join(map(str, r["input_size"][1:])),
            f"{s['convert']:.2f}", f"{s['fold']:.2f}", f"{s['fuse']:.2f}", f"{s['verify']:.2f}",
            f"**{r['total_s']:.2f}**", f"{r['total_cpu_s']:.2f}", f"{r['max_rel_error']:.1e}",
        ])
        if r.get("from_run"):
            rows[-1][0] = f"{name} *"
    earlier = {r["from_run"] for r in results["models"].values() if r.get("from_run")}
    header = [
        "model", "params", "transform params", "RefConv layers", "conv+BN fused", "verify input",
        "convert s", "fold s", "fuse s", "verify s", "total s", "(CPU s)", "max rel err",
    ]
    return "\n".join([
        "## Deploy path time against model size (`fuse_time.py`)",
        "",
        "```", results["command"], "```", "",
        f"{_common.facts_line(results['environment'])}; median of {results['reps']} runs per stage (wall "
        "seconds; total = convert + fuse + verify, its CPU seconds in brackets). `fuse` includes its own fold, "
        "so `fold` is shown for reference and not added to the total.",
        "",
        _common.markdown_table(header, rows),
    ] + ([""] + [f"\\* from an earlier run: {run}" for run in sorted(earlier)] if earlier else []))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--merge", action="store_true",
                        help="keep the other models' rows from the existing results file")
    _common.add_run_options(parser, "fuse_time.json")
    args = _common.parse_run_options(parser, argv, models_attr=None)
    unknown = [m for m in args.models if not modelfile.is_architecture(m)]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")

    results = {
        "command": _common.command_line("fuse_time.py", argv),
        "environment": _common.machine_facts(),
        "reps": args.reps,
        "models": {},
    }
    if args.merge and os.path.exists(args.out):
        with open(args.out) as f:
            earlier = json.load(f)
        run = f"`{earlier['command']}`, {_common.facts_line(earlier['environment'])}"
        for name, row in earlier["models"].items():
            if name not in args.models:
                results["models"][name] = {**row, "from_run": row.get("from_run") or run}
    started = time.perf_counter()
    for name in args.models:
        r = measure(name, args.reps)
        results["models"][name] = r
        s = r["stage_s"]
        print(
            f"{name} ({r['params'] / 1e6:.1f}M params, {r['transform_params'] / 1e6:.1f}M transform): convert "
            f"{s['convert']:.2f} s, fold {s['fold']:.2f} s, fuse {s['fuse']:.2f} s, verify {s['verify']:.2f} s, "
            f"total {r['total_s']:.2f} s",
            flush=True,
        )
    _common.finish_run(results, args, "fuse_time", readme_block, started)
    print(f"wrote {args.out} [{results['elapsed_s']:.0f} s]")
    return results


if __name__ == "__main__":
    main()
