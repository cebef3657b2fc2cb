"""Inference cost of the three stages of a RefConv model: before folding, and fused for deployment.

    python benchmarks/inference.py [--models resnet18 mobilenetv2_100 rexnetv1_100] [--batches 1 32]
        [--size 224] [--reps 7] [--max-reps 40] [--budget-s 300] [--threads 1] [--no-readme]

For each timm model (`pretrained=False`, eval mode, under `torch.no_grad()`), side by side in one process:

* plain:   the original model.
* refconv: `reparam_zoo.convert(model)` with small random transforms (as after training), before folding.
  Without autograd a RefConv computes its refocused kernel once and reuses it, so its forward should
  cost what the plain model's does.
* fused:   `reparam_zoo.fuse(refconv)`: RefConvs folded into plain convs and BatchNorms folded into the
  convs (verified against the RefConv model), the deployed model.

One timed sample is one forward at batch 32, or `--inner` forwards at batch 1. Variants run interleaved
in rotating order after a warm-up: at least `--reps` rounds, more while the (model, batch)'s share of
`--budget-s` lasts. Reported are process CPU times (primary: with one thread it is the process's own
work, where wall time on a shared machine measures the other jobs) and wall times; ratios both as the
median over rounds of the per-round ratio and as the ratio of the fastest samples (contention only ever
adds time).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402

import reparam_zoo  # noqa: E402  (also registers rexnetv1_* with timm)
from reparam_zoo.surgery import refconv_layers  # noqa: E402

from benchmarks import _common  # noqa: E402

DEFAULT_MODELS = ("resnet18", "mobilenetv2_100", "rexnetv1_100")
VARIANTS = ("plain", "refconv", "fused")
GOALS = {"refconv_vs_plain_max": 1.02, "fused_vs_plain_below": 1.0}


def build_variants(name: str, size: int) -> dict:
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False).eval()
    refconv = reparam_zoo.convert(plain).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in refconv_layers(refconv):
            layer.transform_weight.copy_(torch.randn(layer.transform_weight.shape, generator=generator) * 0.01)
    example = (torch.randn(1, 3, size, size, generator=generator),)
    fused = reparam_zoo.fuse(refconv, example_inputs=example).eval()
    return {"plain": plain, "refconv": refconv, "fused": fused}


def forward_fn(model, x, inner: int):
    def run():
        with torch.no_grad():
            for _ in range(inner):
                model(x)
    return run


def measure(name: str, args, budget_s: float) -> dict:
    models = build_variants(name, args.size)
    report = models["fused"].fuse_report
    result = {
        "params": sum(p.numel() for p in models["plain"].parameters()),
        "refconv_layers": len(report.folded), "fused_conv_bn": len(report.fused),
        "fuse_max_abs_error": report.max_abs_error, "fuse_max_rel_error": report.max_rel_error,
        "batches": {},
    }
    for i, batch in enumerate(args.batches):
        started = time.perf_counter()
        x = torch.randn(batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(2))
        repeat = args.inner if batch == 1 else 1
        times = _common.interleaved(
            {v: forward_fn(models[v], x, repeat) for v in VARIANTS}, reps=args.reps, warmup=1,
            budget_s=budget_s / (len(args.batches) - i), max_reps=args.max_reps,
        )
        budget_s -= time.perf_counter() - started
        result["batches"][str(batch)] = {
            "forwards_per_sample": repeat,
            "rounds": len(times["plain"]["cpu"]),
            "forward_cpu_ms": {v: 1e3 * statistics.median(times[v]["cpu"]) / repeat for v in VARIANTS},
            "forward_ms": {v: 1e3 * statistics.median(times[v]["wall"]) / repeat for v in VARIANTS},
            **{
                f"{v}_vs_plain{suffix}": fn(times, v, "plain", kind)
                for v in ("refconv", "fused")
                for suffix, fn, kind in (
                    ("_cpu_time", _common.median_ratio, "cpu"), ("_cpu_time_of_minima", _common.min_ratio, "cpu"),
                    ("_wall", _common.median_ratio, "wall"),
                )
            },
            "times": times,
        }
    return result


def readme_block(results: dict) -> str:
    rows = []
    for name, r in results["models"].items():
        for batch, b in r["batches"].items():
            ms = b["forward_cpu_ms"]
            rows.append([
                name, batch, b["rounds"], f"{ms['plain']:.1f}", f"{ms['refconv']:.1f}", f"{ms['fused']:.1f}",
                f"**{b['refconv_vs_plain_cpu_time']:.3f}** / {b['refconv_vs_plain_cpu_time_of_minima']:.3f} "
                f"[{b['refconv_vs_plain_wall']:.2f}]",
                f"**{b['fused_vs_plain_cpu_time']:.3f}** / {b['fused_vs_plain_cpu_time_of_minima']:.3f} "
                f"[{b['fused_vs_plain_wall']:.2f}]",
                f"{r['fused_conv_bn']}", f"{r['fuse_max_rel_error']:.1e}",
            ])
    header = [
        "model", "batch", "rounds", "plain CPU ms", "RefConv CPU ms", "fused CPU ms",
        "RefConv/plain: median / minima [wall]", "fused/plain: median / minima [wall]", "conv+BN fused",
        "fuse max rel err",
    ]
    env = results["environment"]
    return "\n".join([
        *_common.section_head("Inference: RefConv before folding, and fused (`inference.py`)", results["command"]),
        f"{_common.facts_line(env)}; "
        f"{results['resolution']}x{results['resolution']}, `torch.no_grad()`, eval mode; CPU ms per forward "
        f"(medians; a batch-1 sample is {results['inner']} forwards). Ratios of process CPU time: the median of "
        "per-round ratios (bold) and the ratio of the fastest samples; wall-time ratio in brackets. Goals: "
        f"RefConv/plain <= {GOALS['refconv_vs_plain_max']}, fused/plain < 1. Goals met (median CPU ratios): "
        f"{_common.goals_text(results['goals_met'])}.",
        "",
        _common.markdown_table(header, rows),
    ])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=7, help="rounds per model and batch at least")
    parser.add_argument("--max-reps", type=int, default=40, help="rounds per model and batch at most")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="wall seconds for all timings together; rounds beyond --reps are added while a "
                             "(model, batch)'s share lasts")
    parser.add_argument("--inner", type=int, default=10, help="forwards per timed sample at batch 1")
    _common.add_run_options(parser, "inference.json")
    args = _common.parse_run_options(parser, argv)

    results = {
        "command": _common.command_line("inference.py", argv),
        "environment": _common.machine_facts(),
        "resolution": args.size, "min_reps": args.reps, "max_reps": args.max_reps, "budget_s": args.budget_s,
        "inner": args.inner,
        "goals": GOALS,
        "models": {},
    }
    started = time.perf_counter()
    for name, share in _common.budget_shares(args.models, args.budget_s):
        t0 = time.perf_counter()
        r = measure(name, args, share)
        results["models"][name] = r
        for batch, b in r["batches"].items():
            ms = b["forward_cpu_ms"]
            print(
                f"{name} batch {batch} ({b['rounds']} rounds): CPU ms plain {ms['plain']:.1f}, RefConv "
                f"{ms['refconv']:.1f}, fused {ms['fused']:.1f}; RefConv/plain {b['refconv_vs_plain_cpu_time']:.3f} "
                f"(minima {b['refconv_vs_plain_cpu_time_of_minima']:.3f}, wall {b['refconv_vs_plain_wall']:.3f}), "
                f"fused/plain {b['fused_vs_plain_cpu_time']:.3f} (minima {b['fused_vs_plain_cpu_time_of_minima']:.3f}"
                f", wall {b['fused_vs_plain_wall']:.3f})",
                flush=True,
            )
        print(f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    batches = [b for r in results["models"].values() for b in r["batches"].values()]
    results["goals_met"] = {
        "refconv_vs_plain": all(b["refconv_vs_plain_cpu_time"] <= GOALS["refconv_vs_plain_max"] for b in batches),
        "fused_vs_plain": all(b["fused_vs_plain_cpu_time"] < GOALS["fused_vs_plain_below"] for b in batches),
    }
    _common.finish_run(results, args, "inference", readme_block, started)
    print(f"goals met: {results['goals_met']}; wrote {args.out} [{results['elapsed_s']:.0f} s]")
    return results


if __name__ == "__main__":
    main()
