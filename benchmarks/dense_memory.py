"""RevCol inside a detector: training memory and step time, reversible (save_memory=True) vs ordinary.

    python benchmarks/dense_memory.py [--model fasterrcnn_revcol_tiny_fpn] [--size 512] [--batch 1]
        [--trainable-layers 5] [--reps 3] [--threads 1] [--no-readme]

The detector is `reparam_zoo.create_model(MODEL)` (torchvision's Faster R-CNN over RevCol + FPN) in train
mode with made-up targets (3 boxes per image), images of SIZE x SIZE with min_size = max_size = SIZE, so
torchvision's resize keeps them as they are.

Saved for backward: what autograd keeps between the forward and the backward, seen through
`torch.autograd.graph.saved_tensors_hooks` as in revcol_memory.py (deduplicated by storage, whole
storage counted, parameters excluded), split by where it was saved: inside the backbone body (RevCol),
inside the FPN, or elsewhere (the detector's transform, RPN and RoI heads and their losses). The
reversible body's figure includes the per-level RNG snapshots of the reversible Function (kept outside
autograd's saved tensors). The backbone's ratio ordinary / reversible is the goal (>= 20x, as in
classification); the whole detector's figures stand beside it, with the share FPN + heads hold
(they are not reversible).

Peak RSS: each mode in a fresh process (this script with --child MODE): resident memory after building
the model and the peak resident memory (VmHWM) after its first training step; the difference is
what a step adds at its peak: saved activations, gradients, backward temporaries.

Step time: forward + backward of the summed detector losses, the two modes interleaved in rotating
order for `--reps` rounds after one warm-up step each; medians of wall and process CPU time, ratios as
the median of per-round ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reparam_zoo.modelfile import create_model  # noqa: E402

from benchmarks import _common  # noqa: E402
from benchmarks.revcol_memory import rng_snapshot_bytes  # noqa: E402

MIB = _common.MIB
GOALS = {"backbone_memory_ratio_min": 20.0, "step_ratio_max": 1.35}
REGIONS = ("backbone", "fpn", "heads")


def build(name: str, size: int, trainable_layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, trainable_layers=trainable_layers, min_size=size, max_size=size).train()


def example(batch: int, size: int):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(batch)]
    s = size
    boxes = torch.tensor([[0.1 * s, 0.1 * s, 0.5 * s, 0.6 * s], [0.4 * s, 0.3 * s, 0.9 * s, 0.8 * s],
                          [0.2 * s, 0.5 * s, 0.45 * s, 0.95 * s]])
    targets = [dict(boxes=boxes.clone(), labels=torch.tensor([1, 5, 17])) for _ in range(batch)]
    return images, targets


def step(model, images, targets) -> None:
    torch.manual_seed(1)  # the same proposal sampling in both modes
    sum(model(images, targets).values()).backward()
    model.zero_grad(set_to_none=True)


def saved_by_region(model, images, targets) -> Dict[str, int]:
    """Bytes autograd keeps for backward, by the region of the detector that saved them (parameters
    excluded; the pack hook of revcol_memory.saved_for_backward, with the region read off module hooks)."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    region = ["heads"]
    storages: Dict[str, Dict[int, int]] = {r: {} for r in REGIONS}

    def enter(name):
        def hook(module, args):
            region.append(name)
        return hook

    def leave(module, args, output):
        region.pop()

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[region[-1]][storage.data_ptr()] = storage.nbytes()
        return t

    # the body is read through forward_intermediates inside `backbone`, so its region is `backbone`
    # minus the FPN
    handles = [model.backbone.register_forward_pre_hook(enter("backbone")),
               model.backbone.register_forward_hook(leave),
               model.backbone.fpn.register_forward_pre_hook(enter("fpn")),
               model.backbone.fpn.register_forward_hook(leave)]
    try:
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = sum(model(images, targets).values())
    finally:
        for h in handles:
            h.remove()
    loss.backward()
    model.zero_grad(set_to_none=True)
    # a storage seen in two regions (an FPN input is a backbone output) counts where it was first saved
    seen, out = set(), {}
    for r in REGIONS:
        out[r] = sum(n for ptr, n in storages[r].items() if ptr not in seen)
        seen |= storages[r].keys()
    return out


def child(args) -> None:
    """One mode in this fresh process: RSS after the build, peak RSS after one training step."""
    torch.set_num_threads(args.threads)
    model = build(args.model, args.size, args.trainable_layers)
    model.backbone.body.save_memory = args.child == "reversible"
    images, targets = example(args.batch, args.size)
    with open("/proc/self/statm") as f:
        rss_before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    step(model, images, targets)
    print(json.dumps({"rss_after_build_mib": rss_before / MIB, "peak_rss_mib": _high_water_mark() / MIB}))


def _high_water_mark() -> int:
    """Peak resident bytes of this process's memory (VmHWM). Not ru_maxrss: Linux carries that across
    exec, so a child started by a large parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def peak_rss(args, mode: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", mode, "--model", args.model,
               "--size", str(args.size), "--batch", str(args.batch), "--trainable-layers",
               str(args.trainable_layers), "--threads", str(args.threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    rss = {mode: peak_rss(args, mode) for mode in ("ordinary", "reversible")}
    model = build(args.model, args.size, args.trainable_layers)
    body = model.backbone.body
    images, targets = example(args.batch, args.size)
    saved = {}
    for mode, save_memory in (("ordinary", False), ("reversible", True)):
        body.save_memory = save_memory
        saved[mode] = saved_by_region(model, images, targets)
    rng = rng_snapshot_bytes(body)
    saved["reversible"]["backbone"] += rng

    def timed(save_memory: bool):
        def run():
            body.save_memory = save_memory
            step(model, images, targets)
        return run

    times = _common.interleaved({"ordinary": timed(False), "reversible": timed(True)}, reps=args.reps, warmup=1)
    mib = {mode: {r: b / MIB for r, b in regions.items()} for mode, regions in saved.items()}
    for mode in mib:
        mib[mode]["total"] = sum(saved[mode].values()) / MIB
    return {
        "saved_mib": mib,
        "rng_snapshot_bytes_in_reversible_backbone": rng,
        "backbone_memory_ratio": saved["ordinary"]["backbone"] / saved["reversible"]["backbone"],
        "detector_memory_ratio": sum(saved["ordinary"].values()) / sum(saved["reversible"].values()),
        "fpn_and_heads_share_ordinary": (saved["ordinary"]["fpn"] + saved["ordinary"]["heads"])
        / sum(saved["ordinary"].values()),
        "fpn_and_heads_share_reversible": (saved["reversible"]["fpn"] + saved["reversible"]["heads"])
        / sum(saved["reversible"].values()),
        "rss_mib": rss,
        "step_wall_s": {m: statistics.median(t["wall"]) for m, t in times.items()},
        "step_cpu_s": {m: statistics.median(t["cpu"]) for m, t in times.items()},
        "step_ratio": _common.median_ratio(times, "reversible", "ordinary", "wall"),
        "step_ratio_cpu_time": _common.median_ratio(times, "reversible", "ordinary", "cpu"),
        "samples": times,
    }


def readme_block(results: dict) -> str:
    r, met = results["result"], results["goals_met"]
    s = r["saved_mib"]
    rows = [[mode, f"{s[mode]['backbone']:.1f}", f"{s[mode]['fpn']:.1f}", f"{s[mode]['heads']:.1f}",
             f"{s[mode]['total']:.1f}",
             f"{100 * r['fpn_and_heads_share_' + mode]:.0f}%",
             f"{r['rss_mib'][mode]['rss_after_build_mib']:.0f} / {r['rss_mib'][mode]['peak_rss_mib']:.0f}",
             f"{r['step_wall_s'][mode]:.2f} / {r['step_cpu_s'][mode]:.2f}"]
            for mode in ("ordinary", "reversible")]
    header = ["mode", "saved MiB: RevCol body", "FPN", "transform + RPN + RoI heads", "whole detector",
              "FPN + heads share", "RSS MiB after build / peak in a step", "step s wall / CPU"]
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    return "\n".join([
        "```", results["command"], "```", "",
        f"{_common.facts_line(results['environment'])}; `{results['model']}`, batch {results['batch']}, "
        f"{results['size']}x{results['size']} (min_size = max_size), trainable_layers {results['trainable_layers']}, "
        f"train mode with made-up targets; {results['reps']} interleaved rounds, medians. Measured on a shared, "
        "loaded 2-core machine: wall times carry other jobs' load, CPU times less so.",
        "",
        _common.markdown_table(header, rows),
        "",
        f"Backbone saved memory inside the detector, ordinary / reversible: **{r['backbone_memory_ratio']:.0f}x** "
        f"(goal >= {GOALS['backbone_memory_ratio_min']:.0f}x: {verdict(met['backbone_memory_ratio'])}); whole "
        f"detector **{r['detector_memory_ratio']:.1f}x**: the FPN and heads are not reversible and hold "
        f"{100 * r['fpn_and_heads_share_reversible']:.0f}% of the reversible detector's saved memory "
        f"({100 * r['fpn_and_heads_share_ordinary']:.0f}% of the ordinary one's). Reversible / ordinary step: "
        f"**{r['step_ratio']:.2f}x** wall, **{r['step_ratio_cpu_time']:.2f}x** CPU time (goal <= "
        f"{GOALS['step_ratio_max']}: {verdict(met['step_ratio_wall'])} in wall time, "
        f"{verdict(met['step_ratio_cpu_time'])} in CPU time).",
        "",
        "What is counted: tensors autograd keeps for backward (saved_tensors_hooks, deduplicated by storage, "
        "parameters excluded) by the region that saved them, plus the reversible Function's RNG snapshots in the "
        "body's figure; RSS from a fresh process per mode.",
    ])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fasterrcnn_revcol_tiny_fpn")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--trainable-layers", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    _common.add_run_options(parser, "dense_memory.json")
    parser.add_argument("--child", choices=["ordinary", "reversible"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return {}
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {
        "command": _common.command_line("dense_memory.py", argv),
        "environment": _common.machine_facts(),
        "model": args.model, "size": args.size, "batch": args.batch,
        "trainable_layers": args.trainable_layers, "reps": args.reps, "goals": GOALS,
        "what_is_counted": __doc__.split("Saved for backward: ")[1].split("\n\n")[0].strip(),
    }
    r = results["result"] = measure(args)
    results["goals_met"] = {
        "backbone_memory_ratio": r["backbone_memory_ratio"] >= GOALS["backbone_memory_ratio_min"],
        "step_ratio_wall": r["step_ratio"] <= GOALS["step_ratio_max"],
        "step_ratio_cpu_time": r["step_ratio_cpu_time"] <= GOALS["step_ratio_max"],
    }
    results["environment"]["load_average_at_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - started
    _common.write_json(args.out, results)
    print(json.dumps({k: v for k, v in r.items() if k != "samples"}, indent=1))
    if not args.no_readme:
        _common.update_readme_block(
            "dense_memory", "## RevCol inside a detector: training memory and step time (`dense_memory.py`)\n\n"
            + readme_block(results))
    print(f"goals met: {results['goals_met']}; wrote {args.out} in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
