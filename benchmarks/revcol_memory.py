"""RevCol: memory kept for backward and step time, reversible (save_memory=True) vs ordinary backprop.

    python benchmarks/revcol_memory.py [--reps 5] [--out benchmarks/results/revcol_memory.json]

What is counted as "saved": every tensor autograd keeps for backward between the forward and the
backward (seen through `torch.autograd.graph.saved_tensors_hooks`), deduplicated by storage and
counted by the whole storage's size, *excluding parameters* (they exist whether or not a backward is
pending; the reversible Function saves them only for autograd's in-place modification check). The
input image is included in both modes (the stem conv keeps it). The reversible Function also keeps one
RNG snapshot per level outside autograd's saved tensors (to replay DropPath masks); those bytes are
reported separately as `rng_snapshot_bytes` and included in `reversible_total_mib`.

Step time is forward + backward (cross-entropy on random labels, train mode, the variant's default
drop path), measured for the two modes side by side in alternating order, median of `--reps` steps
after one warm-up step each, on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import timm  # noqa: E402

import reparam_zoo.models  # noqa: E402,F401  (registers revcol_* with timm)
from reparam_zoo.models.revcol import RevCol  # noqa: E402

MIB = 2 ** 20
# Authors' implementation, CPU, batch 2, 224, no heads (SPEC 3).
AUTHORS_MIB = {"revcol_tiny": (468, 20.8), "revcol_small": (931, 32.2), "revcol_base": (1520, 62)}
AUTHORS_GROWTH_PER_COLUMN_MIB = 2.9
AUTHORS_STEP_RATIO = 1.45
GOALS = {"memory_ratio_min": 20.0, "growth_per_column_mib_max": AUTHORS_GROWTH_PER_COLUMN_MIB, "step_ratio_max": 1.35}
# Fixed small config for the growth per added column: T-sized levels (channels and blocks of RevCol-T).
GROWTH_CONFIG = dict(channels=(64, 128, 256, 512), layers=(2, 2, 4, 2))
GROWTH_COLUMNS = (4, 8, 16)


def _loss(model, x, labels):
    return F.cross_entropy(model(x), labels)


def saved_for_backward(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes of distinct non-parameter storages autograd keeps between forward and backward."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, x, labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def rng_snapshot_bytes(model: RevCol) -> int:
    # one CPU generator state per level and column (see reversible._RngState)
    return model.num_columns * model.num_levels * torch.get_rng_state().numel()


def step_seconds(model, x, labels) -> float:
    start = time.perf_counter()
    _loss(model, x, labels).backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def measure_variant(name: str, batch: int, size: int, reps: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).train()
    x = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 1000, (batch,))

    memory = {}
    for mode, save_memory in (("ordinary", False), ("reversible", True)):
        model.save_memory = save_memory
        memory[mode] = saved_for_backward(model, x, labels)

    times = {"ordinary": [], "reversible": []}
    for save_memory in (False, True):  # warm-up
        model.save_memory = save_memory
        step_seconds(model, x, labels)
    for rep in range(reps):
        order = (False, True) if rep % 2 == 0 else (True, False)
        for save_memory in order:
            model.save_memory = save_memory
            times["reversible" if save_memory else "ordinary"].append(step_seconds(model, x, labels))

    rng_bytes = rng_snapshot_bytes(model)
    ordinary_s, reversible_s = statistics.median(times["ordinary"]), statistics.median(times["reversible"])
    result = {
        "batch": batch, "resolution": size,
        "ordinary_saved_mib": memory["ordinary"] / MIB,
        "reversible_saved_mib": memory["reversible"] / MIB,
        "rng_snapshot_bytes": rng_bytes,
        "reversible_total_mib": (memory["reversible"] + rng_bytes) / MIB,
        "memory_ratio": memory["ordinary"] / (memory["reversible"] + rng_bytes),
        "ordinary_step_s": ordinary_s,
        "reversible_step_s": reversible_s,
        "step_ratio": reversible_s / ordinary_s,
        "step_ratio_per_rep_median": statistics.median(
            r / o for r, o in zip(times["reversible"], times["ordinary"])
        ),
        "step_times_s": times,
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
        totals[num_columns] = saved_for_backward(model, x, labels) + rng_snapshot_bytes(model)
    first, last = GROWTH_COLUMNS[0], GROWTH_COLUMNS[-1]
    return {
        "config": {k: list(v) for k, v in GROWTH_CONFIG.items()}, "batch": batch, "resolution": size,
        "reversible_total_mib": {str(n): b / MIB for n, b in totals.items()},
        "growth_per_column_mib": (totals[last] - totals[first]) / (last - first) / MIB,
        "authors_growth_per_column_mib": AUTHORS_GROWTH_PER_COLUMN_MIB,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["revcol_tiny", "revcol_small", "revcol_base"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "revcol_memory.json"))
    args = parser.parse_args(argv)

    results = {
        "command": "python benchmarks/revcol_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "what_is_counted": (
            "saved-for-backward storages (saved_tensors_hooks, deduplicated by storage, parameters excluded; "
            "input image included), plus the reversible Function's RNG snapshots"
        ),
        "environment": {
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "device": "cpu",
        },
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
            f"{r['reversible_step_s']:.3f} s ({r['step_ratio']:.2f}x) [{time.perf_counter() - started:.0f} s]",
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
        "step_ratio": all(v["step_ratio"] <= GOALS["step_ratio_max"] for v in variants),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"goals met: {results['goals_met']}; wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
