"""Issue 20: a model file, checkpoint or output folder is data, never instructions; failures leave nothing behind.

Every hostile input is built here on the fly. Pickle payloads would create a marker file when unpickled; each
test asserts the marker is absent. Each test runs under an alarm (and subprocesses under a timeout), so a
regression to a hang fails instead of blocking.
"""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import reparam_zoo
from reparam_zoo import CheckpointError, ReparamError
from reparam_zoo import modelfile as mf
from reparam_zoo import resolve
from reparam_zoo.errors import OutputError
from reparam_zoo.export import export
from reparam_zoo.fileio import TEMP_MARK, atomic_write

from helpers import Payload

ALARM_S = 300  # generous: the suite runs on shared, loaded CPUs; a hang still fails instead of blocking
SUBPROCESS_TESTS_S = 600  # the tests that start Python with torch several times


pytestmark = pytest.mark.alarm(ALARM_S)


def evil_pickle(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload(marker)}, tmp_path / "evil.pth")
    return tmp_path / "evil.pth", marker


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    return mf.save(mf.create_model("test_resnet", num_classes=3), path)


def rewrite(src, dst, **changes):
    """A copy of a model file with metadata fields replaced (None: removed)."""
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value if isinstance(value, str) else json.dumps(value)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def arch_with(good_file, **kwargs):
    meta = json.loads(dict(safe_open(str(good_file), framework="pt").metadata())["architecture"])
    meta["kwargs"].update(kwargs)
    return meta


# -- 1. metadata is untrusted --------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("checkpoint", "EVIL"), ("trust_pickle", True), ("pretrained", True), ("pretrained_cfg_overlay", {"file": "EVIL"}),
    ("pretrained_cfg", {"url": "http://example.invalid/w.pth"}), ("cache_dir", "/tmp"), ("file", "EVIL"),
    ("url", "http://example.invalid"), ("weights", "DEFAULT"),
])
def test_architecture_kwargs_that_load_or_fetch_are_refused_by_name(tmp_path, good_file, key, value):
    evil, marker = evil_pickle(tmp_path)
    value = str(evil) if value == "EVIL" else value
    if isinstance(value, dict):
        value = {k: str(evil) if v == "EVIL" else v for k, v in value.items()}
    hostile = rewrite(good_file, tmp_path / "m.safetensors", architecture=arch_with(good_file, **{key: value}))
    for read in (mf.load, mf.read_info, resolve.load_model, lambda p: mf.load(p, trust_pickle=True)):
        with pytest.raises(CheckpointError, match=rf"m.safetensors: the architecture argument '{key}' would load, "
                                                  r"fetch or trust something.*refused"):
            read(hostile)
    assert not marker.exists()


@pytest.mark.parametrize("kwargs,message", [
    ({"act_layer": "relu"}, r"argument 'act_layer' is not one reparam accepts from a file for a timm model"),
    ({"width_mult": 2.0}, r"argument 'width_mult' is not one reparam accepts from a file for a timm model"),
    ({"num_classes": "3"}, r"argument 'num_classes' = '3' is not an integer in \[0, 1000000\]"),
    ({"num_classes": 500_000_000}, r"'num_classes' = 500000000 is not an integer in \[0, 1000000\]"),
    ({"num_classes": True}, r"'num_classes' = True is not an integer"),
    ({"in_chans": 0}, r"'in_chans' = 0 is not an integer in \[1, 65536\]"),
    ({"drop_rate": 1.0}, r"'drop_rate' = 1.0 is not a number in \[0, 1\)"),
    ({"drop_rate": -0.5}, r"'drop_rate' = -0.5 is not a number in \[0, 1\)"),
    ({"global_pool": "os.system"}, r"'global_pool' = 'os.system' is not one of ''"),
])
def test_architecture_kwargs_are_allow_listed_with_types_and_ranges(tmp_path, good_file, kwargs, message):
    hostile = rewrite(good_file, tmp_path / "m.safetensors", architecture=arch_with(good_file, **kwargs))
    with pytest.raises(CheckpointError, match=message):
        mf.load(hostile)


def test_architecture_name_source_and_fields_are_checked(tmp_path, good_file):
    arch = json.loads(dict(safe_open(str(good_file), framework="pt").metadata())["architecture"])
    cases = [
        ({**arch, "name": "hf-hub:timm/resnet18"}, r"architecture name: 'hf-hub:timm/resnet18' is not a model name"),
        ({**arch, "name": "local-dir:/tmp"}, r"'local-dir:/tmp' is not a model name"),
        ({**arch, "source": "torchvision"}, r"architecture source: 'torchvision' does not go with the name"),
        ({**arch, "source": "zoo"}, r"test_resnet is a timm model, not zoo"),
        ({**arch, "source": "pip"}, r"architecture source: 'pip', expected one of timm, zoo, zoo-dense, torchvision"),
        ({**arch, "loader": "x"}, r"unknown architecture metadata field 'loader'"),
        ({**arch, "kwargs": [1]}, r"architecture kwargs: not a JSON object"),
        ([arch], r"architecture: not a JSON object"),
        ({**arch, "kwargs": {**arch["kwargs"], "drop_rate": float("nan")}}, r"architecture: not valid JSON"),
        ('{"name": "test_resnet", "kwargs": {"num_classes": ' + "9" * 5000 + "}}", r"architecture: not valid JSON"),
        # a skeleton that would take minutes to build, weightless as it is
        ({"name": "revcol_tiny", "source": "zoo", "kwargs": {"layers": [64] * 4}},
         r"architecture arguments ask for 1024 RevCol blocks \(layers x columns\), more than 256; refused"),
        ({"name": "revcol_tiny", "source": "zoo", "kwargs": {"channels": [65536] * 4}},
         r"'channels' = \[65536, .* is not a list of at most 4 integers in \[1, 8192\]"),
    ]
    for value, message in cases:
        text = value if isinstance(value, str) else json.dumps(value)  # (NaN: Python writes it, JSON has none)
        with pytest.raises(CheckpointError, match=message):
            mf.load(rewrite(good_file, tmp_path / "m.safetensors", architecture=text))


def test_the_cli_refuses_a_hostile_file_in_one_line_and_runs_nothing(tmp_path, good_file):
    evil, marker = evil_pickle(tmp_path)
    hostile = rewrite(good_file, tmp_path / "m.safetensors",
                      architecture=arch_with(good_file, checkpoint=str(evil), trust_pickle=True))
    result = subprocess.run([sys.executable, "-m", "reparam_cli.main", "report", str(hostile), "--depth", "0"],
                            capture_output=True, text=True, timeout=ALARM_S)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {hostile}: the architecture argument 'checkpoint' would load, fetch or trust something named by "
        "the file; refused (a model file is data)")
    assert "Traceback" not in result.stderr and not marker.exists()


def test_refconv_fuse_and_extra_metadata_are_checked(tmp_path):
    model = mf.create_model("test_resnet", num_classes=3).eval()
    refconv_file = mf.save(reparam_zoo.convert(model), tmp_path / "r.safetensors")
    fused_file = mf.save(reparam_zoo.fuse(model, example_inputs=torch.randn(1, 3, 32, 32)), tmp_path / "f.safetensors")
    refconv = json.loads(dict(safe_open(str(refconv_file), framework="pt").metadata())["refconv"])
    fuse = json.loads(dict(safe_open(str(fused_file), framework="pt").metadata())["fuse"])
    cases = [
        (refconv_file, {"refconv": {**refconv, "map_k": "3"}}, r"\(refconv map_k: '3' is not an odd integer"),
        (refconv_file, {"refconv": {**refconv, "map_k": 4}}, r"\(refconv map_k: 4 is not an odd integer"),
        (refconv_file, {"refconv": {**refconv, "converted": "conv1"}}, r"\(refconv converted: not a list of names"),
        (refconv_file, {"refconv": {**refconv, "init": "evil"}}, r"\(refconv init: 'evil', expected one of zero"),
        (refconv_file, {"refconv": {**refconv, "hook": "x"}}, r"unknown refconv metadata field 'hook'"),
        (refconv_file, {"refconv": [1, 2]}, r"\(refconv: not a JSON object"),
        (refconv_file, {"refconv": {**refconv, "converted": ["*"]}},
         r"cannot re-apply the saved RefConv conversion \(no conv named '\*' in the architecture\)"),
        (refconv_file, {"refconv": {**refconv, "converted": refconv["converted"] + [f"x{i}" for i in range(99_000)]}},
         r"\(no conv named 'x0' in the architecture\)"),  # at once: no 99,000 include patterns
        (refconv_file, {"refconv": {**refconv, "converted": refconv["converted"] * 2}}, r"\(a layer listed twice"),
        (fused_file, {"fuse": {**fuse, "fused": [["conv1"]]}}, r"\(fuse fused: not a list of \[name, name\] pairs"),
        (fused_file, {"fuse": {**fuse, "rtol": "x"}}, r"\(fuse rtol: 'x' is not a finite non-negative number"),
        (fused_file, {"fuse": {**fuse, "rtol": 1e999}}, r"\(fuse: not valid JSON"),  # Infinity
        (fused_file, {"fuse": {**fuse, "verified": "yes"}}, r"\(fuse verified: 'yes' is not true or false"),
        (fused_file, {"fuse": {**fuse, "input_shapes": [[1, -3]]}}, r"\(fuse input_shapes: not a list of shapes"),
        (fused_file, {"fuse": {**fuse, "run": "x"}}, r"unknown fuse metadata field 'run'"),
        (fused_file, {"extra": {"classes": [1, 2]}}, r"\(extra classes: not a list of names"),
        (fused_file, {"extra": {"train": {"global_step": "7"}}}, r"\(extra train 'global_step': '7' is not a non-negative integer count\)"),
        (fused_file, {"extra": {"train": {"val_iou": {"cat": "x"}}}}, r"\(extra train 'val_iou': not an object of class"),
        (fused_file, {"extra": {"train": {"val_acc": [[0.5]]}}}, r"\(extra train 'val_acc': \[\[0.5\]\] is not a finite"),
        (fused_file, {"extra": [1]}, r"\(extra: not a JSON object"),
        (fused_file, {"extra": json.loads("[" * 40 + "]" * 40)}, r"\(extra: not a JSON object"),
        (fused_file, {"extra": {"a": json.loads("[" * 40 + "]" * 40)}}, r"\(extra: nested deeper than 32 levels"),
        (fused_file, {"format_version": "-1"}, r"\(format_version -1; versions start at 1\)"),
        (fused_file, {"format_version": "0"}, r"\(format_version 0; versions start at 1\)"),
        (fused_file, {"loader": "x"}, r"unknown reparam metadata field 'loader'"),
    ]
    for source, changes, message in cases:
        hostile = rewrite(source, tmp_path / "m.safetensors", **changes)
        with pytest.raises(CheckpointError, match=message):
            mf.load(hostile)
    # the untouched files load (the checks refuse only what is wrong)
    assert mf.load(refconv_file).refconv_summary.map_k == refconv["map_k"]
    assert mf.load(fused_file).fuse_report.fused == [tuple(p) for p in fuse["fused"]]


def test_deeply_nested_metadata_is_a_precise_error_not_a_recursion_error(tmp_path, good_file):
    deep = "[" * 200_000 + "]" * 200_000
    for field in ("architecture", "refconv", "fuse", "extra"):
        hostile = rewrite(good_file, tmp_path / "m.safetensors", **{field: deep})
        with pytest.raises(CheckpointError, match=rf"\({field}: JSON nested too deeply\)"):
            mf.load(hostile)


def test_saving_refuses_what_loading_would_refuse(tmp_path):
    model = mf.create_model("test_resnet", num_classes=3, act_layer="relu")  # the trusted caller may build it
    with pytest.raises(ReparamError, match=r"cannot save: model: the architecture argument 'act_layer' is not one"):
        mf.save(model, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="checkpoint: arguments that load or fetch are never accepted"):
        mf.register_architecture_kwargs("test_resnet", checkpoint=lambda v: True)


# -- 6. OS errors while writing ------------------------------------------------------------------------------

_WRITE_ALL = textwrap.dedent("""
    import os, resource, signal, sys
    from reparam_cli.main import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    runs = [
        ["fuse", "test_resnet", "--input-size", "3,32,32", "-o", "m.fused.safetensors"],
        ["fuse", "test_resnet", "--input-size", "3,32,32", "-o", "m.torchscript.pt"],
        ["fuse", "test_resnet", "--input-size", "3,32,32", "-o", "m.pt2"],
        ["fuse", "test_resnet", "--input-size", "3,32,32", "-o", "m.onnx"],
        ["convert", "test_resnet", "--refconv", "-o", "m.refconv.safetensors"],
    ]
    for args in runs:
        try:
            main(args)
        except SystemExit as e:
            print("exit", e.code, flush=True)
    # a report to a full disk: standard output is /dev/full
    os.dup2(os.open("/dev/full", os.O_WRONLY), 1)
    try:
        main(["report", "test_resnet", "--depth", "0", "--format", "json"])
    except SystemExit as e:
        sys.stderr.write(f"exit {e.code}\\n")
""")


@pytest.mark.alarm(SUBPROCESS_TESTS_S)
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_no_temp_file(tmp_path):
    result = subprocess.run([sys.executable, "-c", _WRITE_ALL], cwd=tmp_path, capture_output=True, text=True,
                            timeout=SUBPROCESS_TESTS_S - 30)
    assert result.returncode == 0, result.stderr[-2000:]  # no abort (SIGABRT) on the way
    assert result.stdout.split("\n").count("exit 1") == 5, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot write {name}: File too large" for name in
                      ("m.fused.safetensors", "m.torchscript.pt", "m.pt2", "m.onnx", "m.refconv.safetensors")] + [
        "error: cannot write to standard output: No space left on device"]
    assert result.stderr.strip().endswith("exit 1")
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []  # neither outputs nor temporary files


def test_os_errors_from_every_kind_of_writer_become_one_output_error(tmp_path, monkeypatch):
    target = tmp_path / "out.safetensors"

    def python_writer(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    def rust_writer(tmp):  # what safetensors raises: its own type, the OS error inside the text
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    for writer in (python_writer, rust_writer):
        with pytest.raises(OutputError, match=rf"^cannot write {target}: No space left on device$"):
            atomic_write(target, writer)
        assert os.listdir(tmp_path) == []
    # save() on a full disk: safetensors' writer patched to fail as above
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, tmp, metadata=None: rust_writer(tmp))
    with pytest.raises(OutputError, match="No space left on device"):
        mf.save(mf.create_model("test_resnet", num_classes=3), target)
    assert os.listdir(tmp_path) == []
    # a writer's own bug is not dressed up as a disk problem
    with pytest.raises(ZeroDivisionError):
        atomic_write(target, lambda tmp: 1 / 0)
    assert os.listdir(tmp_path) == []


# -- 7. signals during a write, and a crash's leftovers -------------------------------------------------------

_SLOW_WRITE = textwrap.dedent("""
    import sys, time, safetensors.torch
    from reparam_cli.main import main

    def slow_save_file(tensors, path, metadata=None):  # writes part of the file, then waits to be signalled
        with open(path, "wb") as f:
            f.write(b"x" * 1_000_000)
        open("writing", "w").close()
        time.sleep(60)

    safetensors.torch.save_file = slow_save_file
    main(["convert", "test_resnet", "--refconv", "-o", "out.safetensors"])
""")


def _kill_mid_write(folder, sig):
    process = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE], cwd=folder, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (folder / "writing").exists():
            assert process.poll() is None, process.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.1)
        temps = [n for n in os.listdir(folder) if TEMP_MARK in n]
        assert len(temps) == 1 and temps[0].startswith(".out.safetensors.reparam-tmp-")  # the naming rule
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    os.remove(folder / "writing")
    return process.returncode, stderr


@pytest.mark.alarm(SUBPROCESS_TESTS_S)
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_signal_during_a_write_removes_the_temp_file(tmp_path, sig, code):
    returncode, stderr = _kill_mid_write(tmp_path, sig)
    assert returncode == code, stderr[-2000:]
    if sig == signal.SIGINT:
        assert stderr.strip().splitlines()[-1] == "error: interrupted"
    assert os.listdir(tmp_path) == []


@pytest.mark.alarm(SUBPROCESS_TESTS_S)
def test_a_crash_leaves_a_recognised_temp_file_that_the_next_write_removes(tmp_path):
    returncode, _ = _kill_mid_write(tmp_path, signal.SIGKILL)  # nothing can clean up after SIGKILL
    assert returncode == -signal.SIGKILL
    [leftover] = os.listdir(tmp_path)
    legacy = tmp_path / ".out.safetensors.ab12cd34.tmp.safetensors"  # what earlier versions named theirs
    legacy.write_bytes(b"x")
    alive = tmp_path / f".out.safetensors{TEMP_MARK}{os.getppid()}-00ff00ff.safetensors"
    alive.write_bytes(b"x")  # a running process's write in progress: left alone
    other = tmp_path / f".other.safetensors{TEMP_MARK}1-00ff00ff.safetensors"
    other.write_bytes(b"x")  # another output's: left alone
    with pytest.warns(UserWarning, match=rf"removed 2 temporary file\(s\) left next to .*out.safetensors by an "
                                         rf"interrupted earlier write: .*{leftover}"):
        mf.save(mf.create_model("test_resnet", num_classes=3), tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, other.name, "out.safetensors"])


# -- 8. storage sizes against claimed shapes -----------------------------------------------------------------

def test_a_tiny_checkpoint_cannot_claim_a_huge_head(tmp_path):
    import resource

    state = mf.create_model("test_resnet", num_classes=3).state_dict()
    features = state["fc.weight"].shape[1]
    state["fc.weight"] = torch.zeros(1, features).expand(500_000, features)  # 384 bytes claiming 192 MB
    state["fc.bias"] = torch.zeros(1).expand(500_000)
    torch.save(state, tmp_path / "expanded.pth")
    assert os.path.getsize(tmp_path / "expanded.pth") < 2_000_000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=r"expanded.pth: tensor 'fc.(weight|bias)' claims shape \(500000.*"
                                              r"its elements overlap.*refused"):
        resolve.load_model("test_resnet", checkpoint=tmp_path / "expanded.pth")
    with pytest.raises(CheckpointError, match="its elements overlap"):
        resolve.load_model(tmp_path / "expanded.pth", arch="test_resnet")
    # nothing of the claimed size was built: the peak grew by less than the 192 MB head would take
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 150_000  # kB

    overlapping = dict(mf.create_model("test_resnet", num_classes=3).state_dict())
    w = overlapping["fc.weight"]
    overlapping["fc.weight"] = torch.zeros(w.numel()).as_strided(w.shape, (1, 1))  # rows sharing elements
    torch.save(overlapping, tmp_path / "overlap.pth")
    with pytest.raises(CheckpointError, match=r"'fc.weight' claims shape \(3, \d+\) with strides \(1, 1\)"):
        resolve.load_model(tmp_path / "overlap.pth", arch="test_resnet")


# -- 9. precise errors ---------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: quantized tensors deprecated, sparse checks slow
def test_tensors_of_the_wrong_kind_are_refused_by_name(tmp_path):
    base = mf.create_model("test_resnet", num_classes=3).state_dict()
    w = base["fc.weight"]
    kinds = {
        "complex": (torch.complex(w, w), r"'fc.weight' is a complex tensor \(torch.complex64\), the model expects a "
                                         r"floating-point tensor \(torch.float32\)"),
        "integer": (w.to(torch.int32), r"'fc.weight' is an integer tensor \(torch.int32\)"),
        "sparse": (w.to_sparse(), r"tensor 'fc.weight' is a sparse_coo tensor; model weights are dense"),
        "quantized": (torch.quantize_per_tensor(w, 0.1, 0, torch.qint8), r"'fc.weight' is a quantized tensor"),
    }
    for kind, (tensor, message) in kinds.items():
        torch.save({**base, "fc.weight": tensor}, tmp_path / f"{kind}.pth")
        with pytest.raises(CheckpointError, match=message):
            resolve.load_model(tmp_path / f"{kind}.pth", arch="test_resnet")
    # a complex weight in a reparam file (safetensors) is refused, not cast to its real part
    good = mf.save(mf.create_model("test_resnet", num_classes=3), tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    tensors["fc.weight"] = torch.complex(tensors["fc.weight"], tensors["fc.weight"])
    save_file(tensors, str(tmp_path / "complex.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"'fc.weight' is a complex tensor"):
        mf.load(tmp_path / "complex.safetensors")


def test_tolerances_must_be_finite_and_non_negative(tmp_path):
    model = mf.create_model("test_resnet", num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    for rtol, atol in ((-1e-4, 0.0), (math.nan, 0.0), (math.inf, 0.0), (1e-4, -1.0), (1e-4, math.nan)):
        bad = "rtol" if not (math.isfinite(rtol) and rtol >= 0) else "atol"
        with pytest.raises(ReparamError, match=rf"{bad} must be a finite number >= 0, got"):
            reparam_zoo.fuse(model, example_inputs=x, rtol=rtol, atol=atol)
        with pytest.raises(ReparamError, match=rf"{bad} must be a finite number >= 0"):
            export(model, tmp_path / "m.onnx", "onnx", example_inputs=(x,), rtol=rtol, atol=atol)
    assert os.listdir(tmp_path) == []


def test_convert_refuses_nan_weights_in_the_api():
    model = mf.create_model("test_resnet", num_classes=3)
    name, weight = next((n, p) for n, p in model.named_parameters() if p.dim() == 4)
    with torch.no_grad():
        weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ReparamError, match=rf"non-finite \(NaN/Inf\) weights in {name}; refusing to convert them"):
        reparam_zoo.convert(model)


def test_cli_usage_errors_for_bad_tolerances_and_an_empty_output(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from reparam_cli.main import main

    runner = CliRunner()
    monkeypatch.chdir(tmp_path)
    cases = [
        (["fuse", "test_resnet", "--rtol", "nan"], "Invalid value for '--rtol': must be a finite number >= 0, got nan"),
        (["fuse", "test_resnet", "--atol", "inf"], "Invalid value for '--atol': must be a finite number >= 0, got inf"),
        (["fuse", "test_resnet", "--rtol", "-1"], "Invalid value for '--rtol': must be a finite number >= 0, got -1"),
        (["fuse", "test_resnet", "-o", ""], "Invalid value for '-o' / '--output': the path is empty"),
        (["convert", "test_resnet", "--refconv", "-o", ""], "Invalid value for '-o' / '--output': the path is empty"),
    ]
    for args, message in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == 2, result.output
        assert message in result.output
    assert os.listdir(tmp_path) == []
    with pytest.raises(ReparamError, match="the output path is empty"):
        mf.save(mf.create_model("test_resnet", num_classes=3), "")
