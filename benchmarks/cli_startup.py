"""How long the `reparam` console script takes to answer what users type most: --help, a command's --help,
--version, a usage error, and `reparam zoo list`, against `python -c "import torch, timm"` in the same run.

    python benchmarks/cli_startup.py [--reps 5] [--no-readme]

Each case is a fresh process of the installed console script (the `reparam` next to this interpreter),
started with its output thrown away; the cases run interleaved (the order rotates every round, so drifting
load on a shared machine hits all alike). Reported: median wall seconds and median CPU seconds of the child
process (user + system, from getrusage), the fastest wall sample, and each case's median as a fraction of
the torch+timm import. The goal (issue 15): --help, command --help, --version and usage errors under 0.5 s,
a small fraction of importing torch and timm; `zoo list` has to import the library (it registers the zoo
with timm) and build every variant on the meta device.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _common  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(sys.executable), "reparam")
GOAL_S = 0.5
CASES = {
    "reparam --help": [SCRIPT, "--help"],
    "reparam convert --help": [SCRIPT, "convert", "--help"],
    "reparam train --help": [SCRIPT, "train", "--help"],
    "reparam --version": [SCRIPT, "--version"],
    "usage error: reparam convert --bogus": [SCRIPT, "convert", "--bogus"],
    "usage error: reparam train resnet18 (no --data)": [SCRIPT, "train", "resnet18"],
    "reparam zoo list": [SCRIPT, "zoo", "list"],
    'python -c "import torch, timm"': [sys.executable, "-c", "import torch, timm"],
}
BASELINE = 'python -c "import torch, timm"'
FAST = [name for name in CASES if name not in ("reparam zoo list", BASELINE)]


def run_case(argv):
    def run():
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        code = subprocess.call(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if code not in (0, 2):
            raise SystemExit(f"{' '.join(argv)} exited with {code}")
        return {"child_cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "cli_startup.json"))
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    facts = _common.machine_facts()
    times = _common.interleaved({name: run_case(cmd) for name, cmd in CASES.items()}, reps=args.reps, warmup=1)
    baseline = statistics.median(times[BASELINE]["wall"])
    rows = {}
    for name in CASES:
        wall = statistics.median(times[name]["wall"])
        rows[name] = {"median_wall_s": wall, "min_wall_s": min(times[name]["wall"]),
                      "median_child_cpu_s": statistics.median(times[name]["child_cpu"]),
                      "fraction_of_torch_timm_import": wall / baseline, "samples_wall_s": times[name]["wall"]}
    goals = {"help_version_and_usage_errors_under_0.5_s": all(rows[n]["median_wall_s"] < GOAL_S for n in FAST)}
    results = {"command": _common.command_line("cli_startup.py", argv), "environment": facts, "reps": args.reps,
               "goal_s": GOAL_S, "goals_met": goals, "cases": rows}
    _common.finish_run(results, args, "cli_startup", render, started)
    for name, row in rows.items():
        print(f"{name:50s} {row['median_wall_s']:7.3f} s  ({row['fraction_of_torch_timm_import']:.2f}x torch+timm)")


def render(results: dict) -> str:
    rows = [[f"`{name}`", f"{r['median_wall_s']:.3f}", f"{r['min_wall_s']:.3f}", f"{r['median_child_cpu_s']:.3f}",
             f"{r['fraction_of_torch_timm_import']:.2f}"] for name, r in results["cases"].items()]
    return "\n".join([
        "## Console script startup (`cli_startup.py`)",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"{_common.facts_line(results['environment'])}; median of {results['reps']} fresh processes per case, "
        "run interleaved. Goals: " + _common.goals_text(results["goals_met"]) + ".",
        "",
        _common.markdown_table(["case", "median wall s", "fastest wall s", "median CPU s (child)",
                                "x torch+timm import"], rows),
    ])


if __name__ == "__main__":
    main()
