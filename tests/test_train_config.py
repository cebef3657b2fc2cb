"""The training settings' rules (reparam_zoo.train.config): torch-free, keyword messages the CLI respells; and
a task as a pluggable piece of the loop."""
import json
import os
import subprocess
import sys

import pytest

from reparam_zoo.checkpoint import read_state_dict
from reparam_zoo.train import SettingError, TrainConfig, TrainError
from reparam_zoo.train.config import (RESUMABLE_OVERRIDES, SGD_MOMENTUM, check_momentum, check_resume_overrides,
                                      check_warmup, default_warmup_epochs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# reparam_zoo/__init__ imports torch for the whole library: stand in for it with a bare package object, so only
# what the train package itself imports is loaded
IMPORT_PROBE = """
import os, sys, types
pkg = types.ModuleType("reparam_zoo")
pkg.__path__ = [os.path.join(sys.argv[1], "reparam_zoo")]
sys.modules["reparam_zoo"] = pkg
from reparam_zoo.train import config, TrainConfig, read_config, RESUMABLE_OVERRIDES
from reparam_zoo.train import run_dir, tasks
TrainConfig(model="m", data_dir="d")
print(sorted(m for m in ("torch", "timm", "tqdm", "numpy", "PIL") if m in sys.modules))
"""


def test_config_run_dir_and_task_registry_import_without_torch():
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE, ROOT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_setting_errors_speak_of_keywords_and_render_with_flags():
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    with pytest.raises(SettingError) as error:
        check_momentum("adamw", 0.5)
    assert str(error.value) == "momentum applies to optimizer sgd, not adamw"
    assert error.value.render(flag) == "--momentum applies to --optimizer sgd, not adamw"
    assert isinstance(error.value, TrainError) and error.value.setting == "momentum"
    assert check_momentum("sgd", None) == SGD_MOMENTUM and check_momentum("sgd", 0.5) == 0.5
    assert check_momentum("adamw", None) == SGD_MOMENTUM  # unused by adamw, recorded as the default

    with pytest.raises(SettingError) as error:
        check_warmup(3, 3)
    assert str(error.value) == "warmup-epochs must be in [0, epochs=3), got 3"
    assert error.value.problem(flag) == "must be less than --epochs (3), got 3"
    with pytest.raises(SettingError, match=r"warmup-epochs must be in \[0, epochs=3\), got -1"):
        check_warmup(-1, 3)
    check_warmup(2, 3)
    assert [default_warmup_epochs(n) for n in (1, 2, 10, True, "2")] == [0, 1, 1, 0, 0]


def test_which_settings_may_change_on_resume(tmp_path):
    saved = TrainConfig(model="resnet18", data_dir=str(tmp_path), epochs=2, lr=0.05)
    assert RESUMABLE_OVERRIDES == ("epochs", "workers", "fuse", "data_dir")
    allowed = check_resume_overrides(saved, {"epochs": 5, "workers": 0, "fuse": True, "lr": 0.05,
                                             "data_dir": str(tmp_path / ".")}, "run/config.json")
    assert allowed == {"epochs": 5, "workers": 0, "fuse": True, "data_dir": str(tmp_path / ".")}
    with pytest.raises(SettingError) as error:
        check_resume_overrides(saved, {"lr": 0.5}, "run/config.json")
    assert str(error.value) == ("lr 0.5 differs from the run's 0.05 (run/config.json); only epochs, workers, fuse, "
                                "data-dir may change")
    # the same MODEL file spelled another way is not a change
    (tmp_path / "m.safetensors").write_bytes(b"x")
    saved.model = str(tmp_path / "m.safetensors")
    check_resume_overrides(saved, {"model": str(tmp_path / "." / "m.safetensors")}, "c")
    with pytest.raises(SettingError, match="model other differs"):
        check_resume_overrides(saved, {"model": "other"}, "c")


@pytest.mark.parametrize("change, message", [
    (dict(epochs=0), "epochs must be a positive integer, got 0"),
    (dict(batch_size=True), "batch-size must be a positive integer, got True"),
    (dict(lr=float("nan")), "lr must be a positive number, got nan"),
    (dict(weight_decay=float("inf")), "weight-decay must be >= 0, got inf"),
    (dict(momentum=1.5), r"momentum must be in \[0, 1\], got 1.5"),
    (dict(workers=-1), "workers must be >= 0, got -1"),
    (dict(model_files="zip"), "unknown model-files 'zip', expected one of safetensors, pickle"),
    (dict(task="ocr"), "unknown task 'ocr', expected one of classification"),
])
def test_config_check(change, message):
    config = TrainConfig(model="m", data_dir="d", **change)
    with pytest.raises(SettingError, match=message):
        config.check()


def test_library_refuses_momentum_with_adamw_before_any_work(tmp_path):
    import torch.nn as nn
    from reparam_zoo import train

    with pytest.raises(SettingError, match="momentum applies to optimizer sgd, not adamw"):
        train(nn.Linear(2, 2), str(tmp_path / "no-data"), output_dir=str(tmp_path / "out"), optimizer="adamw",
              momentum=0.5, verbose=False)
    assert os.listdir(tmp_path) == []


# -- a task is a pluggable piece ---------------------------------------------------------------------------------

from reparam_zoo.train.tasks.classification import ClassificationTask  # noqa: E402


class WorstModelTask(ClassificationTask):
    """Classification whose "best" model is the one classification would rank last: whatever the loop saves as
    best can only come from the task's criterion."""

    name = "worst-model"

    def best_key(self, metrics):
        return -metrics["val_acc"], metrics["val_loss"]


def test_a_new_task_plugs_into_the_loop_resume_and_files(tmp_path, monkeypatch):
    from reparam_zoo.train import tasks
    from test_train import FAST, SignalAt, make_dataset, tiny_net

    monkeypatch.setitem(tasks.TASKS, "worst-model", f"{__name__}:WorstModelTask")
    root = make_dataset(tmp_path / "d", train_per_class=8, val_per_class=4)
    model = tiny_net(cls=lambda: SignalAt(at=3 + 2))  # 3 steps per epoch: stopped in epoch 2
    from reparam_zoo import resume, train

    stopped = train(model, root, output_dir=str(tmp_path / "run"), epochs=3, lr=2.0, task="worst-model", **FAST)
    assert stopped.interrupted
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["task"] == "worst-model"
    model.at = None
    done = resume(stopped.output_dir, model=model, verbose=False)
    worst = min(done.history, key=lambda r: (r["val_acc"], -r["val_loss"]))
    best = max(done.history, key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert worst["epoch"] != best["epoch"]  # the two criteria disagree in this run
    assert done.best["epoch"] == worst["epoch"] and done.best["val_loss"] == worst["val_loss"]
    _, meta = read_state_dict(done.files["best"])
    assert json.loads(meta["extra"])["train"]["epoch"] == worst["epoch"]
