"""RevCol: memory kept for backward and step time, reversible (save_memory=True) vs ordinary backprop.

    python benchmarks/revcol_memory.py [--variants revcol_tiny revcol_small revcol_base] [--batch 2]
        [--size 224] [--reps 9] [--threads 1] [--no-readme]

Memory (what is counted): every tensor autograd keeps for backward between the forward and the
backward (seen through `torch.autograd.graph.saved_tensors_hooks`), deduplicated by storage and
counted by the whole storage's size, *parameters excluded* (they exist whether or not a backward is
pending; layers keep them for their input gradients, and the reversible Function saves them only for
autograd's in-place modification check). The input image is included in both modes (the stem conv
keeps it). The reversible Function also keeps one CPU RNG snapshot per level outside autograd's saved
tensors (to replay DropPath masks); those bytes are reported as `rng_snapshot_bytes` and included in
`reversible_total_mib`. `ordinary_saved_mib_including_parameters` adds the parameters that layers save,
for comparison with counts made that way.

Step time: forward + backward (cross-entropy on random labels, train mode, the variant's default drop
path), the two modes interleaved in rotating order for `--reps` rounds after one warm-up step each, on
CPU with `--threads` intra-op threads (default 1: on a machine shared with other jobs a second thread
mostly adds synchronisation stalls). Reported: medians of wall time and of process CPU time, and the
ratios as the median over rounds of the per-round ratio. CPU time is the steadier measure of the work
on a loaded machine (wall time includes waiting for a core).

Growth per added column: a fixed T-sized config (RevCol-T's channels and blocks) at 4, 8 and 16 columns,
reversible total memory (saved + RNG snapshots), (total(16) - total(4)) / 12.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402

import reparam_zoo.models  # noqa: E402,F401  (registers revcol_* with timm)
from reparam_zoo.models.revcol import RevCol  # noqa: E402

from benchmarks import _common  # noqa: E402

MIB = _common.MIB
# Authors' implementation, CPU, batch 2, 224, no heads (measured on their code).
AUTHORS_MIB = {"revcol_tiny": (468, 20.8), "revcol_small": (931, 32.2), "revcol_base": (1520, 62)}
AUTHORS_GROWTH_PER_COLUMN_MIB = 2.9
AUTHORS_STEP_RATIO = 1.45
GOALS = {"memory_ratio_min": 20.0, "growth_per_column_mib_max": AUTHORS_GROWTH_PER_COLUMN_MIB, "step_ratio_max": 1.35}
# Fixed small config for the growth per added column: T-sized levels (channels and blocks of RevCol-T).
GROWTH_CONFIG = dict(channels=(64, 128, 256, 512), layers=(2, 2, 4, 2))
GROWTH_COLUMNS = (4, 8, 16)


def _loss(model, x, labels):
    return F.cross_entropy(model(x), labels)


def saved_for_backward(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple:
    """Bytes of the distinct storages autograd keeps between forward and backward:
    (non-parameter storages, parameter storages)."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations, parameters = {}, {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        kind = parameters if storage.data_ptr() in parameter_storages else activations
        kind[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, x, labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(activations.values()), sum(parameters.values())


def rng_snapshot_bytes(model: RevCol) -> int:
    # one CPU generator state per level and column (see reversible._RngState)
    return model.num_columns * model.num_levels * torch.get_rng_state().numel()


def measure_variant(name: str, batch: int, size: int, reps: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).train()
    x = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 1000, (batch,))

    memory, parameter_memory = {}, {}
    for mode, save_memory in (("ordinary", False), ("reversible", True)):
        model.save_memory = save_memory
        memory[mode], parameter_memory[mode] = saved_for_backward(model, x, labels)

    def step(save_memory: bool):
        def run():
            model.save_memory = save_memory
            _loss(model, x, labels).backward()
            model.zero_grad(set_to_none=True)
        return run

    times = _common.interleaved({"ordinary": step(False), "reversible": step(True)}, reps=reps, warmup=1)
    wall = {mode: t["wall"] for mode, t in times.items()}
    cpu = {mode: t["cpu"] for mode, t in times.items()}
    rng_bytes = rng_snapshot_bytes(model)
    result = {
        "batch": batch, "resolution": size,
        "ordinary_saved_mib": memory["ordinary"] / MIB,
        # for comparison with counts that include the weights layers keep for their input gradients
        "ordinary_saved_mib_including_parameters": (memory["ordinary"] + parameter_memory["ordinary"]) / MIB,
        "reversible_saved_mib": memory["reversible"] / MIB,
        "rng_snapshot_bytes": rng_bytes,
        "reversible_total_mib": (memory["reversible"] + rng_bytes) / MIB,
        "memory_ratio": memory["ordinary"] / (memory["reversible"] + rng_bytes),
        "ordinary_step_s": statistics.median(wall["ordinary"]),
        "reversible_step_s": statistics.median(wall["reversible"]),
        "ordinary_step_cpu_s": statistics.median(cpu["ordinary"]),
        "reversible_step_cpu_s": statistics.median(cpu["reversible"]),
        # medians of the per-round ratios (both modes run back to back in each round)
        "step_ratio": _common.median_ratio(times, "reversible", "ordinary", "wall"),
        "step_ratio_cpu_time": _common.median_ratio(times, "reversible", "ordinary", "cpu"),
        "step_wall_s": wall,
        "step_cpu_s": cpu,
    }
    if name in AUTHORS_MIB:
        result["authors_ordinary_mib"], result["authors_reversible_mib"] = AUTHORS_MIB[name]
    return result


def measure_growth(batch: int, size: int) -> dict:
    totals = {}
    for num_columns in GROWTH_COLUMNS:
        torch.manual_seed(0)
        model = RevCol(**GROWTH_CONFIG, num_columns=num_columns, num_classes=1000, save_memory=True).train()
        x = torch.randn(batch, 3, size, size)
        labels = torch.randint(0, 1000, (batch,))
        totals[num_columns] = saved_for_backward(model, x, labels)[0] + rng_snapshot_bytes(model)
    first, last = GROWTH_COLUMNS[0], GROWTH_COLUMNS[-1]
    return {
        "config": {k: list(v) for k, v in GROWTH_CONFIG.items()}, "batch": batch, "resolution": size,
        "reversible_total_mib": {str(n): b / MIB for n, b in totals.items()},
        "growth_per_column_mib": (totals[last] - totals[first]) / (last - first) / MIB,
        "authors_growth_per_column_mib": AUTHORS_GROWTH_PER_COLUMN_MIB,
    }


def readme_block(results: dict) -> str:
    goals, met = results["goals"], results["goals_met"]
    rows = []
    for name, r in results["variants"].items():
        rows.append([
            name,
            f"{r['ordinary_saved_mib']:.0f} ({r['ordinary_saved_mib_including_parameters']:.0f})",
            f"{r['reversible_total_mib']:.1f}",
            f"**{r['memory_ratio']:.0f}x**",
            f"{r.get('authors_ordinary_mib', '-')} / {r.get('authors_reversible_mib', '-')}",
            f"{r['ordinary_step_s']:.2f} / {r['reversible_step_s']:.2f}",
            f"**{r['step_ratio']:.2f}**",
            f"{r['ordinary_step_cpu_s']:.2f} / {r['reversible_step_cpu_s']:.2f}",
            f"**{r['step_ratio_cpu_time']:.2f}**",
        ])
    header = [
        "variant", "ordinary saved MiB (incl. params)", "reversible MiB", "memory ratio",
        "authors' MiB ord. / rev.", "step s (wall) ord. / rev.", "rev./ord. wall",
        "step s (CPU) ord. / rev.", "rev./ord. CPU time",
    ]
    growth = results["growth"]
    totals = ", ".join(f"{n} columns {mib:.2f} MiB" for n, mib in growth["reversible_total_mib"].items())
    verdict = lambda ok: "met" if ok else "**missed**"  # noqa: E731
    lines = [
        "```", results["command"], "```", "",
        f"{_common.facts_line(results['environment'])}; batch {results['batch']}, {results['resolution']}x"
        f"{results['resolution']}, no supervision heads, train mode with the variant's drop path; "
        f"{results['reps']} interleaved rounds, medians; ratios are medians of per-round ratios.",
        "",
        _common.markdown_table(header, rows),
        "",
        f"Growth of reversible memory per added column (T-sized config, {totals}): "
        f"**{growth['growth_per_column_mib'] * 1024:.1f} KiB** per column "
        f"(authors: ~{AUTHORS_GROWTH_PER_COLUMN_MIB} MiB, each column kept its four output maps; here only the "
        "last column's maps are kept, the RNG snapshots "
        "of the column's levels are what remains).",
        "",
        f"Goals: memory ratio >= {goals['memory_ratio_min']:.0f}x for T/S/B: {verdict(met['memory_ratio'])}; "
        f"growth per column < {goals['growth_per_column_mib_max']} MiB: {verdict(met['growth_per_column'])}; "
        f"reversible step <= {goals['step_ratio_max']}x ordinary: {verdict(met['step_ratio_wall'])} in wall time, "
        f"{verdict(met['step_ratio_cpu_time'])} in CPU time (authors: ~{AUTHORS_STEP_RATIO}x).",
        "",
        "What is counted: tensors autograd keeps for backward (saved_tensors_hooks, deduplicated by storage), "
        "parameters excluded, input image included, plus the reversible Function's per-level RNG snapshots. "
        "The authors' ordinary figures match ours when the weights that layers keep for backward are counted "
        "too (in brackets). The floor of the reversible step is one extra forward (recomputation in backward), "
        "about 4/3 of an ordinary step when backward costs twice a forward; wall time on this shared 2-core "
        "machine varies with other jobs' load (load average in the line above), CPU time less so.",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["revcol_tiny", "revcol_small", "revcol_base"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=9)
    _common.add_run_options(parser, "revcol_memory.json")
    args = _common.parse_run_options(parser, argv, models_attr="variants")

    results = {
        "command": _common.command_line("revcol_memory.py", argv),
        "environment": _common.machine_facts(),
        "batch": args.batch, "resolution": args.size, "reps": args.reps,
        "what_is_counted": __doc__.split("Memory (what is counted): ")[1].split("\n\n")[0].strip(),
        "goals": GOALS,
        "authors_step_ratio": AUTHORS_STEP_RATIO,
        "variants": {},
    }
    for name in args.variants:
        started = time.perf_counter()
        r = measure_variant(name, args.batch, args.size, args.reps)
        results["variants"][name] = r
        print(
            f"{name}: saved {r['ordinary_saved_mib']:.1f} MiB ordinary vs {r['reversible_total_mib']:.2f} MiB "
            f"reversible ({r['memory_ratio']:.0f}x); step {r['ordinary_step_s']:.3f} s vs "
            f"{r['reversible_step_s']:.3f} s ({r['step_ratio']:.2f}x wall, {r['step_ratio_cpu_time']:.2f}x CPU time) "
            f"[{time.perf_counter() - started:.0f} s]",
            flush=True,
        )
    growth = measure_growth(args.batch, args.size)
    results["growth"] = growth
    print(
        f"growth per added column (T-sized, batch {args.batch}, {args.size}): "
        f"{growth['growth_per_column_mib']:.4f} MiB; totals {growth['reversible_total_mib']}",
        flush=True,
    )
    variants = results["variants"].values()
    results["goals_met"] = {
        "memory_ratio": all(v["memory_ratio"] >= GOALS["memory_ratio_min"] for v in variants),
        "growth_per_column": growth["growth_per_column_mib"] < GOALS["growth_per_column_mib_max"],
        "step_ratio_wall": all(v["step_ratio"] <= GOALS["step_ratio_max"] for v in variants),
        "step_ratio_cpu_time": all(v["step_ratio_cpu_time"] <= GOALS["step_ratio_max"] for v in variants),
    }
    results["environment"]["load_average_at_end"] = os.getloadavg()
    _common.write_json(args.out, results)
    if not args.no_readme:
        _common.update_readme_block(
            "revcol_memory", "## RevCol: reversible training memory and step time\n\n" + readme_block(results)
        )
    print(f"goals met: {results['goals_met']}; wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
