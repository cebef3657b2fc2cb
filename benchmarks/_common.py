"""Shared plumbing of the benchmark scripts: machine facts, interleaved timing, atomic result files and
the generated blocks of benchmarks/README.md."""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from reparam_zoo.tables import markdown_lines

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
README = os.path.join(BENCH_DIR, "README.md")
MIB = 2 ** 20
# {variant: {"wall": [seconds per sample], "cpu": [...], optional named parts: [...]}}
Times = Dict[str, Dict[str, List[float]]]


def machine_facts() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "device": "cpu",
        "load_average_at_start": os.getloadavg(),
    }


def _cpu_model() -> Optional[str]:
    """The CPU's name from /proc/cpuinfo: MKL's and oneDNN's kernel choices, and so the ratios, differ between
    CPUs (one matmul formulation measured 0.65x of the conv it replaced on an earlier machine, 1.00x on an
    AMD EPYC)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def add_run_options(parser, result_name: str) -> None:
    """The options every benchmark script has: threads, where the JSON goes, and whether the README changes."""
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (default 1: on a shared machine more threads measure the scheduler)")
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, result_name))
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")


def parse_run_options(parser, argv, models_attr: Optional[str] = "models"):
    """Parse, set the thread count and refuse unknown timm model names (the option `models_attr`, if any)
    with a usage error."""
    import timm
    import torch

    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = getattr(args, models_attr) if models_attr else []
    unknown = [m for m in names if m not in timm.list_models()]
    if unknown:
        parser.error(f"unknown timm model(s): {', '.join(unknown)}")
    return args


def finish_run(results: dict, args, block_name: str, render_block, started: float) -> None:
    """Close a run the same way in every script: end-of-run load and time, the JSON, the README block."""
    results["environment"]["load_average_at_end"] = os.getloadavg()
    results["elapsed_s"] = time.perf_counter() - started
    write_json(args.out, results)
    if not args.no_readme:
        update_readme_block(block_name, render_block(results))


def command_line(script: str, argv: Optional[Sequence[str]]) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"benchmarks/{script}"] + [shlex.quote(a) for a in args])


def interleaved(
    variants: Dict[str, Callable[[], Optional[dict]]],
    reps: int,
    warmup: int = 1,
    budget_s: float = 0.0,
    max_reps: int = 0,
) -> Times:
    """Run every variant `reps` times, rotating the order each round so that drifting load on a shared
    machine hits all variants alike; then keep adding rounds while `budget_s` (wall seconds, warm-up
    included) allows another one, up to `max_reps`. Returns {variant: {"wall": [...], "cpu": [...]}} in
    seconds. A variant may return a dict of named sub-times (CPU seconds); they are kept as well."""
    started = time.perf_counter()
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: Times = {name: {"wall": [], "cpu": []} for name in names}
    rep = 0
    while True:
        elapsed = time.perf_counter() - started
        per_round = elapsed / (rep + warmup) if rep + warmup else 0.0
        if rep >= reps and (rep >= max(max_reps, reps) or elapsed + per_round > budget_s):
            break
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            parts = variants[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
            for part, seconds in (parts or {}).items():
                times[name].setdefault(part, []).append(seconds)
        rep += 1
    return times


def median_ratio(times: Times, numerator: str, denominator: str, kind: str = "wall") -> float:
    """Median over rounds of the per-round ratio: each round ran both variants back to back, so the
    ratio within a round is less exposed to slow drifts of the machine's load than a ratio of medians."""
    pairs = zip(times[numerator][kind], times[denominator][kind])
    return statistics.median(a / b for a, b in pairs)


def min_ratio(times: Times, numerator: str, denominator: str, kind: str = "cpu") -> float:
    """Ratio of the fastest samples: contention on a shared machine only ever adds time, so the minimum is
    the sample closest to the code's own cost."""
    return min(times[numerator][kind]) / min(times[denominator][kind])


def write_json(path: str, data: dict) -> None:
    """Write to a temporary file in the same folder, then rename: no half-written results."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write(path, json.dumps(data, indent=2) + "\n")


def update_readme_block(name: str, body: str, path: str = README) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in the README (appended at
    the end when the markers are missing); everything outside the markers is kept as it is."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    _atomic_write(path, text)



def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    return "\n".join(markdown_lines(header, rows))


def goals_text(goals_met: Dict[str, bool]) -> str:
    return "; ".join(f"{name.replace('_', ' ')}: {'yes' if met else 'NO'}" for name, met in goals_met.items())


def section_head(title: str, command: str) -> list:
    """A README section's first lines: its title and the command that produced it."""
    return [f"## {title}", "", "```", command, "```", ""]


def facts_line(facts: dict) -> str:
    """The run's environment in one line: torch, threads, CPUs, the load average at start (and end, if known)."""
    load = ", ".join(f"{x:.1f}" for x in facts["load_average_at_start"])
    return (
        f"torch {facts['torch']}, {facts['threads']} thread{'s' if facts['threads'] != 1 else ''}, "
        f"{facts['cpu_count']} CPUs ({facts.get('cpu_model') or facts['machine']}), "
        f"load average at start {load}"
    ) + (f" (at end {', '.join(f'{x:.1f}' for x in facts['load_average_at_end'])})"
         if facts.get("load_average_at_end") else "")


def _atomic_write(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        # mkstemp creates 0600; give the result the permissions an ordinary new file would get
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def budget_shares(names: Sequence[str], budget_s: float):
    """(name, seconds) for each name in turn: an equal share of what is left of `budget_s` wall seconds."""
    started = time.perf_counter()
    for i, name in enumerate(names):
        yield name, max(0.0, budget_s - (time.perf_counter() - started)) / (len(names) - i)

