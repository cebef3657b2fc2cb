"""`reparam --help`, `reparam CMD --help`, `--version` and usage errors answer without importing torch, timm or
the library's heavy modules (cli/lazy.py), and still show the library's own defaults and choices."""
import json
import subprocess
import sys

import pytest

from reparam_zoo.options import DEFAULT_MAP_K, EXPORT_FORMATS, INITS
from reparam_zoo.train.config import TrainConfig
from reparam_zoo.version import __version__

HEAVY = ("torch", "timm", "numpy", "torchvision", "reparam_zoo", "reparam_zoo.models", "reparam_zoo.deploy")

# runs the console script's entry point in a fresh interpreter and reports, at exit, which modules it imported
DRIVER = """
import atexit, json, sys
def report():
    sys.__stderr__.write("\\nMODULES " + json.dumps(sorted(sys.modules)) + "\\n")
atexit.register(report)
sys.argv = ["reparam"] + json.loads(sys.argv[1])
from reparam_cli import run
run()
"""


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(list(args))], capture_output=True, text=True,
                          timeout=120)
    head, _, modules = proc.stderr.rpartition("\nMODULES ")
    return proc.returncode, proc.stdout, head, set(json.loads(modules))


@pytest.mark.parametrize("args, code, expected", [
    (["--help"], 0, "Typical flow:"),
    (["--version"], 0, f"reparam {__version__}"),
    (["convert", "--help"], 0, f"[default: {DEFAULT_MAP_K}]"),
    (["fuse", "--help"], 0, "|".join(EXPORT_FORMATS)),
    (["train", "--help"], 0, f"[default: {TrainConfig(model='', data_dir='').epochs}; x>=1]"),
    (["ablate", "--help"], 0, "refocus, finetune, continue, random-base"),
    (["report", "--help"], 0, "--latency"),
    (["zoo", "list", "--help"], 0, "--format"),
    (["convert", "--bogus"], 2, "error: No such option '--bogus'. (see 'reparam convert --help')"),
    (["convert", "resnet18", "--init", "nope"], 2, f"'nope' is not one of {', '.join(repr(i) for i in INITS)}"),
    (["fuse"], 2, "error: Missing argument 'MODEL'"),
    (["convert", "resnet18", "--refconv", "--map-k", "4"], 2, "'--map-k': must be a positive odd integer, got 4"),
    (["train", "resnet18", "--data", ".", "--optimizer", "adamw", "--momentum", "0.5"], 2,
     "error: --momentum applies to --optimizer sgd, not adamw"),
    (["frobnicate"], 2, "error: No such command 'frobnicate'"),
    (["zoo", "report", "nope"], 2,
     "error: Invalid value for NAME: 'nope' is not a zoo variant; one of: rexnetv1_090, rexnetv1_100,"),
    (["zoo", "report", "revcol_tny"], 2, "'revcol_tny' is not a zoo variant; did you mean revcol_tiny? one of:"),
])
def test_help_version_and_usage_errors_import_no_torch(args, code, expected):
    returncode, stdout, stderr, modules = run_cli(*args)
    assert returncode == code, (stdout, stderr)
    assert expected in " ".join((stdout if code == 0 else stderr).split()), (stdout, stderr)  # help text wraps
    assert "Traceback" not in stderr
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_leaves_are_the_library_modules_once_the_library_is_imported(tmp_path):
    # a leaf loaded by the CLI first and the library imported after: one module object, one class
    code = ("import sys; sys.argv = ['reparam']; import reparam_cli.main, reparam_cli.train; "
            "from reparam_cli.lazy import leaf; cfg = leaf('reparam_zoo.train.config'); "
            "assert 'torch' not in sys.modules; from reparam_zoo.train import SettingError, TrainConfig; import reparam_zoo.options as o; "
            "assert TrainConfig is cfg.TrainConfig and SettingError is cfg.SettingError; "
            "assert sys.modules['reparam_cli.train'].TrainConfig is cfg.TrainConfig and o is leaf('reparam_zoo.options'); "
            "import reparam_zoo.errors as e; assert issubclass(cfg.SettingError, e.ArgumentConflictError); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_zoo_variants_the_cli_checks_without_torch_are_the_registrys():
    # the torch-free copy `reparam zoo report NAME` checks against, and timm's registry it stands for
    from reparam_zoo.options import ZOO_VARIANTS
    from reparam_zoo.zoo import zoo_names

    assert list(ZOO_VARIANTS) == zoo_names()
    # one line: the usage error names the variants and nothing else
    returncode, _, stderr, _ = run_cli("zoo", "report", "revcol_tny")
    assert returncode == 2 and len(stderr.strip().splitlines()) == 1
