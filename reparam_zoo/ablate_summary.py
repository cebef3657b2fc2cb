"""What an ablation (`reparam_zoo.ablate`) measured, summarised: mean ± std over seeds per arm, the paired
difference of every arm to the baseline seed by seed, the markdown report and the per-epoch plot.

Pure arithmetic over the per-run records (plain dicts, as `ablate` writes them to OUT/<arm>/seed<k>/arm.json);
no torch. A record carries `metric` (the task's best-model metric at the last epoch, display scale: every
arm the same budget, no epoch picked on the validation split), `best_metric` (at the best epoch, the
model each run keeps for deployment), `curve` (the metric per epoch, epoch 0 = before training),
`train_time_s` and `peak_rss_mib`.
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["summarize", "markdown", "plot", "reading"]

WHAT_TRAINS = {
    "refocus": "RefConv (scope {scope}) over the pretrained, frozen base",
    "finetune": "every weight of the plain model",
    "continue": "every weight of the plain model, at the pretraining learning rate",
    "random-base": "RefConv (scope {scope}) over a re-initialised, frozen base",
}


def _mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def summarize(records: Dict[str, List[Dict[str, Any]]], baseline: str) -> Dict[str, Dict[str, Any]]:
    """Per arm (records in seed order, the same seeds for every arm): the metric's mean and sample std, the
    per-seed differences to `baseline` (paired by seed), their mean and std, the seeds the arm wins (a
    strictly higher metric) and ties, the best epoch's metric, training time and peak memory."""
    base = [r["metric"] for r in records[baseline]]
    summary = {}
    for arm, runs in records.items():
        values = [r["metric"] for r in runs]
        diffs = [a - b for a, b in zip(values, base)]
        times = [r["train_time_s"] for r in runs if r.get("train_time_s") is not None]
        rss = [r["peak_rss_mib"] for r in runs if r.get("peak_rss_mib") is not None]
        summary[arm] = {
            "metric": _mean_std(values), "per_seed": values,
            "best_metric": _mean_std([r["best_metric"] for r in runs]),
            "vs_baseline": None if arm == baseline else {
                **_mean_std(diffs), "per_seed": diffs, "wins": sum(d > 0 for d in diffs),
                "ties": sum(d == 0 for d in diffs), "seeds": len(diffs)},
            "train_time_s": statistics.mean(times) if times else None,
            "peak_rss_mib": max(rss) if rss else None,
            "lr": runs[0]["lr"],
        }
    return summary


def _pm(stats: Dict[str, Optional[float]], signed: bool = False) -> str:
    mean = f"{stats['mean']:+.2f}" if signed else f"{stats['mean']:.2f}"
    return mean if stats["std"] is None else f"{mean} ± {stats['std']:.2f}"


def markdown(results: Dict[str, Any]) -> str:
    """The report: settings, the table of arms, the learning-rate grid, the deployed cost, what it means."""
    s, metric, baseline = results["summary"], results["metric"], results["baseline"]
    settings = results["settings"]
    seeds = settings["seeds"]
    lines = [f"# Refocus or fine-tune: {results['model']} on {results['data_dir']}", "",
             f"{seeds} seed(s) per arm; every arm trains {settings['epochs']} epochs, batch {settings['batch_size']}, "
             f"{settings['optimizer']} (weight decay {settings['weight_decay']}), warmup "
             f"{settings['warmup_epochs']} epoch(s) then cosine, with the same data order and augmentation for a "
             "given seed and the same validation; only what trains and the learning rate differ.", "",
             f"{metric['label']} on the validation split after the last epoch (every arm the same budget, no epoch "
             f"picked), mean ± sample std over seeds; the difference to {baseline} is paired by seed (wins: seeds "
             "where the arm scores strictly higher). Best epoch: the model each run keeps for deployment "
             "(epoch 0, the model as it started, counts).", ""]
    header = ["arm", "what trains", "lr", f"{metric['label']}", "per seed", f"vs {baseline} (paired)", "wins",
              "best epoch (kept)", "train time (s)", "peak RSS (MiB)"]
    rows = []
    for arm in results["arms"]:
        a = s[arm]
        vs = a["vs_baseline"]
        chosen = results["lrs"][arm]
        rows.append([
            arm, WHAT_TRAINS[arm].format(scope=settings["train_scope"]),
            f"{chosen['lr']:g}" + (f" ({chosen['source']})" if chosen["source"] != "given" else ""),
            _pm(a["metric"]), " ".join(f"{v:.2f}" for v in a["per_seed"]),
            "—" if vs is None else _pm(vs, signed=True),
            "—" if vs is None else f"{vs['wins']}/{vs['seeds']}" + (f" ({vs['ties']} tied)" if vs["ties"] else ""),
            _pm(a["best_metric"]),
            "" if a["train_time_s"] is None else f"{a['train_time_s']:.1f}",
            "" if a["peak_rss_mib"] is None else f"{a['peak_rss_mib']:.0f}",
        ])
    lines += _table(header, rows)
    grid = results.get("lr_grid")
    if grid:
        lines += ["", f"Learning rates tried on the validation split ({results['settings']['grid_epochs']} epoch(s), "
                      f"seed {settings['seed']}; {metric['label']} after the last epoch):", ""]
        rates = sorted({lr for tried in grid.values() for lr in tried})
        lines += _table(["arm", *[f"lr {lr:g}" for lr in rates], "chosen"],
                        [[arm, *[f"{tried[lr]:.2f}" if lr in tried else "" for lr in rates],
                          f"{results['lrs'][arm]['lr']:g}"] for arm, tried in grid.items()])
    cost = results.get("deploy_cost") or {}
    if cost:
        lines += ["", "Deployed cost (each arm's model fused for deployment and verified; "
                      f"input {'x'.join(map(str, results['input_size']))}):", ""]
        lines += _table(["arm", "params", "MACs", "RefConvs folded", "conv+norm fused", "max abs error"],
                        [[arm, f"{c['params']:,}", f"{c['macs']:,}", c["folded"], c["fused"],
                          f"{c['max_abs_error']:.1e}"] for arm, c in cost.items()])
        lines += ["", results["deploy_cost_note"]]
    lines += ["", "Reading: " + results["reading"], ""]
    if results.get("notes"):
        lines += ["Notes:", *[f"- {n}" for n in results["notes"]], ""]
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows]]


def plot(results: Dict[str, Any], curves: Dict[str, List[List[float]]], path: str, log) -> bool:
    """The validation metric per epoch, one colour per arm: the mean over seeds, each seed thin. Returns
    whether it was written (matplotlib is optional)."""
    try:
        # the Figure API, not pyplot: no global backend or figure state changes under a notebook's feet
        from matplotlib.figure import Figure
    except ImportError:
        log("note: matplotlib is not installed (pip install 'reparam-zoo[plot]'); no ablation plot")
        return False
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for k, arm in enumerate(results["arms"]):
        colour = f"C{k}"
        runs = curves[arm]
        for run in runs:
            ax.plot(range(len(run)), run, "-", color=colour, alpha=0.25, linewidth=0.8)
        length = min(len(run) for run in runs)
        mean = [statistics.mean(run[e] for run in runs) for e in range(length)]
        ax.plot(range(length), mean, "o-", color=colour, label=f"{arm} (lr {results['lrs'][arm]['lr']:g})")
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel(f"validation {results['metric']['label']}")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{results['model']}: mean over {results['settings']['seeds']} seed(s), each seed thin")
    fig.tight_layout()
    from .fileio import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return True


def reading(results: Dict[str, Any]) -> str:
    """What the numbers say, and nothing more: per arm the paired difference and how often it won."""
    s, baseline, label = results["summary"], results["baseline"], results["metric"]["label"]
    parts = []
    for arm in results["arms"]:
        vs = s[arm]["vs_baseline"]
        if vs is None:
            continue
        n, wins, ties = vs["seeds"], vs["wins"], vs["ties"]
        losses = n - wins - ties
        spread = "" if vs["std"] is None else f" ± {vs['std']:.2f}"
        if n == 1:
            verdict = "one seed: no estimate of the seed-to-seed spread, so no evidence either way"
        elif ties == n:
            verdict = "equal on every seed"
        elif wins == n:
            verdict = "higher on every seed"
        elif losses == n:
            verdict = "lower on every seed"
        else:
            verdict = f"higher on {wins}, lower on {losses}" + (f", equal on {ties}" if ties else "") + f" of {n} seeds"
        parts.append(f"{arm} minus {baseline}: {vs['mean']:+.2f}{spread} points of {label} ({verdict})")
    return "; ".join(parts) + "."
