"""notebooks/walkthrough.ipynb runs top to bottom in a fresh `python3` kernel, from a scratch folder, and shows
what its text claims: exact zero-init conversion, a verified fused model, the three figures, RevCol's
reversible memory, ReXNet's published sizes, models that reload at their stage, and nothing left behind."""
import base64
import json
import os
import re
import struct
import time
from pathlib import Path

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

import reparam_zoo  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"
FIGURE_CELLS = ("figure-layer-params", "figure-revcol-memory", "figure-rexnet")
MIB = 2 ** 20
CPU_RNG_STATE_BYTES = torch.get_rng_state().numel()  # the reversible RevCol keeps one per level and column
# The ReXNet paper's table, copied here independently of the notebook's table: params (M), GMACs at 224, top-1
REXNET_PUBLISHED = {0.9: (4.09, 0.35, 77.2), 1.0: (4.80, 0.40, 77.9), 1.3: (7.56, 0.66, 79.5),
                    1.5: (9.73, 0.88, 80.3), 2.0: (16.37, 1.53, 81.6), 3.0: (34.71, 3.40, 82.8)}

# Appended to the executed copy only: the notebook's key values, as data rather than parsed prose.
CHECK_CELL = """
import json as _json
print("@@checks@@" + _json.dumps({
    "zero_init_max_diff": zero_init_max_diff,
    "fold_gives_original": fold_gives_original,
    "sanity_exact": result.sanity["exact"],
    "epochs": [row["epoch"] for row in result.history],
    "fused_verified": fused_model.fuse_report.verified,
    "fused_max_abs_error": fused_model.fuse_report.max_abs_error,
    "comparison": comparison.rows(),
    "revcol_columns": list(COLUMNS),
    "revcol_memory_mib": revcol_memory_mib,
    "revcol_grad_max_diff": revcol_grad_max_diff,
    "revcol_largest_grad": largest_grad,
    "rexnet_published": {str(w): v for w, v in REXNET_PUBLISHED.items()},
    "rexnet_measured": {str(w): v for w, v in rexnet_measured.items()},
    "loaded_max_diff": loaded_stages,
    "benchmark_results": None if results_path is None else str(results_path),
    "work_dir_exists": WORK.exists(),
}))
"""


def test_committed_notebook_has_no_outputs_and_names_the_kernel():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_walkthrough_notebook(tmp_path):
    # One test, not one per claim: under pytest-xdist a shared fixture would run the notebook once per worker.
    executed = execute_notebook(tmp_path)
    print(f"notebook executed in {executed['seconds']:.1f} s")
    check_runs_without_errors_or_warnings(executed)
    check_figures_render(executed)
    check_conversion_is_exact_at_zero_init(executed)
    check_refocus_train_fuse_and_compare(executed)
    check_revcol_memory(executed)
    check_rexnet_matches_published(executed)
    check_saved_models_reload_at_their_stage(executed)
    check_leaves_nothing_behind(executed)


def execute_notebook(scratch: Path) -> dict:
    """The notebook executed in a fresh kernel (cwd and TMPDIR: empty scratch folders)."""
    cwd, tmp = scratch / "cwd", scratch / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL, metadata={"tags": ["test-checks"]}))
    # the package this test imported (so the kernel runs this checkout's code)
    package_root = str(Path(reparam_zoo.__file__).resolve().parents[1])
    env = {
        "OMP_NUM_THREADS": "1",  # two shared cores: one thread each for the kernel and a parallel worker
        "MKL_NUM_THREADS": "1",
        "TMPDIR": str(tmp),
        "IPYTHONDIR": str(scratch / "ipython"),  # no user profile or startup files
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    }
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300, startup_timeout=120,
                                     resources={"metadata": {"path": str(cwd)}})
    started = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this process's environment
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as e:
            pytest.fail(f"a notebook cell failed:\n{e}", pytrace=False)
    seconds = time.perf_counter() - started
    return {"nb": nb, "cwd": cwd, "tmp": tmp, "seconds": seconds, "checks": _checks(nb)}


def _checks(nb) -> dict:
    text = "".join(_stream(nb.cells[-1], "stdout"))
    match = re.search(r"@@checks@@(.*)", text)
    assert match, f"the check cell printed no values: {text!r}"
    return json.loads(match.group(1))


def _cell(nb, tag):
    cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _stream(cell, name):
    return [o.text for o in cell.get("outputs", []) if o.output_type == "stream" and o.name == name]


def _pngs(cell):
    return [base64.b64decode(o.data["image/png"]) for o in cell.get("outputs", [])
            if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]


def _markdown(cell):
    return "".join(o.data["text/markdown"] for o in cell.get("outputs", [])
                   if o.output_type in ("display_data", "execute_result") and "text/markdown" in o.get("data", {}))


def check_runs_without_errors_or_warnings(executed):
    nb = executed["nb"]
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    stderr = [(c.metadata.get("tags"), text) for c in nb.cells for text in _stream(c, "stderr")]
    assert not stderr, f"cells wrote to stderr: {stderr}"
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")


def check_figures_render(executed):
    nb = executed["nb"]
    all_pngs = [png for c in nb.cells for png in _pngs(c)]
    assert len(all_pngs) == len(FIGURE_CELLS)
    for tag in FIGURE_CELLS:
        (png,) = _pngs(_cell(nb, tag))
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
        width, height = struct.unpack(">II", png[16:24])
        assert width >= 400 and height >= 250, (tag, width, height)


def check_conversion_is_exact_at_zero_init(executed):
    nb, checks = executed["nb"], executed["checks"]
    assert "zero-init max |diff|: 0.0\n" in _stream(_cell(nb, "zero-init"), "stdout")[0]
    assert checks["zero_init_max_diff"] == 0.0
    assert checks["fold_gives_original"] is True
    summary = "".join(_stream(_cell(nb, "convert"), "stdout"))
    assert summary.startswith("RefConv: 12 layers converted (map_k=3, init=zero, train_scope=transforms)")
    # the largest depthwise layer's training size, from its printed channels: C*k^2 + C^2*9
    line = "".join(_stream(_cell(nb, "figure-layer-params"), "stdout"))
    c, k = map(int, re.search(r"depthwise (\d)x\d, C=(\d+)", line).group(2, 1))
    assert f"{c * k * k:,} params deployed, {c * k * k + c * c * 9:,} while training" in line


def check_refocus_train_fuse_and_compare(executed):
    nb, checks = executed["nb"], executed["checks"]
    assert checks["sanity_exact"] is True
    assert checks["epochs"] == [0, 1, 2, 3]
    assert "fused verified: True" in "".join(_stream(_cell(nb, "fuse"), "stdout"))
    assert checks["fused_verified"] is True and checks["fused_max_abs_error"] < 1e-4
    rows = {r["metric"]: r for r in checks["comparison"]}
    assert rows["trainable params"]["a"] > rows["inference params"]["a"]  # transforms outgrow the model
    assert rows["frozen params"]["b"] == 0 and rows["transform MACs / step"]["b"] == 0
    assert 0 < rows["inference params"]["b"] < rows["inference params"]["a"]  # BatchNorm fused away
    markdown = _markdown(_cell(nb, "compare"))
    assert "| training (RefConv) | inference (fused) |" in markdown and "| MACs / image |" in markdown


def check_revcol_memory(executed):
    checks = executed["checks"]
    columns = checks["revcol_columns"]
    ordinary, reversible = checks["revcol_memory_mib"]["ordinary"], checks["revcol_memory_mib"]["reversible"]
    assert len(columns) >= 3 and len(ordinary) == len(reversible) == len(columns)
    # ordinary backprop keeps every column: (nearly) linear growth, 2x the columns -> ~2x the memory
    for (c0, m0), (c1, m1) in zip(zip(columns, ordinary), zip(columns[1:], ordinary[1:])):
        assert 0.8 * c1 / c0 < m1 / m0 < 1.2 * c1 / c0
    # reversible: constant saved tensors; only the RNG snapshots (4 levels per column) are added
    for c, m in zip(columns, reversible):
        expected = reversible[0] + (c - columns[0]) * 4 * CPU_RNG_STATE_BYTES / MIB
        assert m == pytest.approx(expected, abs=1e-9)
    assert ordinary[-1] > 20 * reversible[-1]
    assert checks["revcol_grad_max_diff"] < 1e-4 * checks["revcol_largest_grad"]
    assert checks["benchmark_results"] is not None
    table = _markdown(_cell(executed["nb"], "revcol-benchmark"))
    assert all(f"| {v} |" in table for v in ("revcol_tiny", "revcol_small", "revcol_base"))


def check_rexnet_matches_published(executed):
    nb, checks = executed["nb"], executed["checks"]
    assert checks["rexnet_published"] == {str(w): list(v) for w, v in REXNET_PUBLISHED.items()}
    assert set(checks["rexnet_measured"]) == {str(w) for w in REXNET_PUBLISHED}
    for width, (params, macs) in checks["rexnet_measured"].items():
        published_params, published_gmacs, _ = REXNET_PUBLISHED[float(width)]
        assert params / 1e6 == pytest.approx(published_params, abs=0.006), width  # published to 0.01M
        assert macs / 1e9 == pytest.approx(published_gmacs, abs=0.006), width  # published to 0.01G
    # conv+linear MACs measured on the authors' model, more digits than the paper's table
    assert round(checks["rexnet_measured"]["1.0"][1] / 1e6) == 398
    assert round(checks["rexnet_measured"]["3.0"][1] / 1e6) == 3396
    printed = "".join(_stream(_cell(nb, "rexnet-measure"), "stdout"))
    extrapolated, direct = re.search(r"extrapolated ([\d,]+), counted directly ([\d,]+)", printed).groups()
    assert extrapolated == direct


def check_saved_models_reload_at_their_stage(executed):
    nb, checks = executed["nb"], executed["checks"]
    assert set(checks["loaded_max_diff"]) == {"refconv", "fused"}
    assert all(d <= 1e-6 for d in checks["loaded_max_diff"].values())
    printed = "".join(_stream(_cell(nb, "save-load"), "stdout"))
    assert "stage refconv; " in printed and "stage fused; " in printed


def check_leaves_nothing_behind(executed):
    assert executed["checks"]["work_dir_exists"] is False
    assert list(executed["cwd"].iterdir()) == []
    assert [p.name for p in executed["tmp"].iterdir() if p.name.startswith("reparam-walkthrough-")] == []
