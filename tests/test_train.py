"""Refocus training: what trains and what stays frozen, the pre-training sanity check, exact resumption after
a signal, 2-process DDP under torchrun, bad input, and the `reparam train` command."""
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image, ImageDraw

import reparam_zoo
from reparam_zoo.checkpoint import read_state_dict
from reparam_zoo.data import DataError
from reparam_zoo.errors import ReparamError
from reparam_zoo.modelfile import read_info
from reparam_zoo.surgery import refconv_layers
from reparam_zoo.train import TrainError, resume, train

CLASSES = ("red", "green", "blue")
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}
TRAIN_PER_CLASS, VAL_PER_CLASS = 16, 8
FAST = dict(input_size=32, batch_size=8, workers=0, warmup_epochs=0, verbose=False)


def make_dataset(root, classes=CLASSES, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS, size=32):
    """Stripes of a class colour (period depends on the class) over a noisy dark background."""
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for k, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                noise = (torch.rand(size, size, 3, generator=g) * 60).to(torch.uint8).numpy()
                image = Image.fromarray(noise)
                draw = ImageDraw.Draw(image)
                period = 4 + 2 * k
                offset = int(torch.randint(0, period, (1,), generator=g))
                for x in range(offset - period, size, period):
                    draw.rectangle([x, 0, x + period // 2 - 1, size], fill=COLOURS.get(name, (200, 200, 40)))
                image.save(os.path.join(folder, f"{i:03d}.png"))
    return str(root)


class TinyNet(nn.Module):
    """A dense 3x3 conv, a depthwise 3x3 conv (both become RefConvs), a 1x1 conv, dropout, a linear head."""

    def __init__(self, num_classes=len(CLASSES)):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, num_classes)

    def get_classifier(self):
        return self.fc

    def reset_classifier(self, num_classes):
        self.fc = nn.Linear(self.fc.in_features, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.stem(x)))
        x = F.relu(self.bn2(self.dw(x)))
        x = F.relu(self.pw(x)).mean((2, 3))
        return self.fc(self.drop(x))


class SignalAt(TinyNet):
    """Sends itself `signum` during its `at`-th training forward (a Ctrl-C in the middle of an epoch)."""

    def __init__(self, at=None, signum=signal.SIGINT):
        super().__init__()
        self.at, self.signum, self.calls = at, signum, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), self.signum)
        return super().forward(x)


def tiny_net(seed=0, cls=TinyNet):
    torch.manual_seed(seed)
    return cls()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """One 3-epoch run of TinyNet in the default "transforms" scope."""
    model = tiny_net()
    before = snapshot(model)
    out = str(tmp_path_factory.mktemp("run") / "out")
    result = train(model, data_dir, output_dir=out, epochs=3, lr=2.0, **FAST)
    return model, before, result


# -- what trains -------------------------------------------------------------------------------------------

def test_transforms_scope_trains_only_transforms_and_bn_statistics_follow(trained):
    model, before, result = trained
    after = result.model.state_dict()
    assert snapshot(model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items()), "the caller's model was modified"
    assert sorted(n for n, _ in refconv_layers(result.model)) == ["dw", "stem"]
    for conv in ("stem", "dw"):
        assert torch.equal(after[f"{conv}.weight_base"], before[f"{conv}.weight"])
        assert after[f"{conv}.transform_weight"].abs().max() > 0  # zero-initialised, so it moved
    for frozen in ("bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", "pw.weight", "pw.bias", "fc.weight", "fc.bias"):
        assert torch.equal(after[frozen], before[frozen]), frozen
    for stat in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"):
        assert not torch.equal(after[stat], before[stat]), f"{stat} did not follow the refocused kernels"
    assert after["bn1.num_batches_tracked"] == 3 * (len(CLASSES) * TRAIN_PER_CLASS // 8)


def test_loss_decreases_and_metrics_files_match_history(trained):
    _, _, result = trained
    history = result.history
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]
    assert history[-1]["val_loss"] < 0.9 * history[0]["val_loss"]
    assert history[-1]["train_loss"] < history[1]["train_loss"]
    for row in history[1:]:
        assert row["train_images"] == len(CLASSES) * TRAIN_PER_CLASS
        assert row["val_images"] == len(CLASSES) * VAL_PER_CLASS
        assert 0.0 <= row["train_acc"] <= 1.0 and 0.0 <= row["val_acc"] <= 1.0
    assert history[-1]["lr"] == pytest.approx(0.0)  # cosine to zero
    with open(result.files["metrics"]) as f:
        assert [json.loads(line) for line in f] == history
    with open(result.files["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    best = max(history, key=lambda r: (r["val_acc"], -r["val_loss"]))
    assert result.best["epoch"] == best["epoch"]
    assert sorted(os.listdir(result.output_dir)) == sorted(
        ["config.json", "train.log", "metrics.jsonl", "metrics.png", "best.safetensors", "last.safetensors",
         "train_state.pt"])
    tensors, _ = read_state_dict(result.files["last"])
    assert all(torch.equal(tensors[k], v) for k, v in result.model.state_dict().items())


def test_sanity_check_matches_an_independent_evaluation_of_the_input_model(trained, data_dir):
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    model, _, result = trained
    assert result.sanity["checked"] and result.sanity["equal"]
    assert result.sanity["input"] == result.sanity["converted"]
    transform = create_transform(**resolve_data_config({"input_size": (3, 32, 32)}, model=model))
    val = ImageFolder(os.path.join(data_dir, "val"), transform=transform)
    images = torch.stack([img for img, _ in val])
    targets = torch.tensor([t for _, t in val])
    with torch.no_grad():
        logits = model.eval()(images)
    assert result.history[0]["val_loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    assert result.history[0]["val_acc"] == (logits.argmax(1) == targets).sum().item() / len(targets)
    with open(result.files["log"]) as f:
        assert "-> identical" in f.read()


def test_sanity_check_warns_loudly_when_conversion_is_not_exact(data_dir, tmp_path, monkeypatch):
    train_module = importlib.import_module("reparam_zoo.train.setup")  # where the model is converted

    real_convert = train_module.convert
    monkeypatch.setattr(train_module, "convert", lambda m, **kw: real_convert(m, init="xavier", **{
        k: v for k, v in kw.items() if k != "init"}))
    result = train(tiny_net(), data_dir, output_dir=str(tmp_path / "out"), epochs=1, lr=0.1, **FAST)
    assert result.sanity["equal"] is False and result.sanity["max_abs_logit_diff"] > 0
    with open(result.files["log"]) as f:
        assert "WARNING: the converted model does not score what the input model scores" in f.read()


def test_replaced_head_trains_with_the_transforms_and_is_reported(data_dir, tmp_path):
    result = train(tiny_net(cls=lambda: TinyNet(num_classes=5)), data_dir, output_dir=str(tmp_path / "out"),
                   epochs=1, lr=0.5, num_classes=3, **FAST)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == {"stem.transform_weight", "dw.transform_weight", "fc.weight", "fc.bias"}
    assert result.model.fc.out_features == 3
    assert any("head replaced: 5 -> 3 classes" in note for note in result.notes)


def test_torchvision_model_gets_a_new_head_that_trains(data_dir, tmp_path):
    torch.manual_seed(0)
    model = reparam_zoo.create_model("torchvision:squeezenet1_1")  # no reset_classifier: a conv classifier
    result = train(model, data_dir, output_dir=str(tmp_path / "out"), epochs=1, lr=0.05, num_classes=3, **FAST)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    transforms = {f"{name}.transform_weight" for name, _ in refconv_layers(result.model)}
    assert len(transforms) == 9 and trainable == transforms | {"classifier.1.weight", "classifier.1.bias"}
    assert any("head replaced: 1000 -> 3 classes; the new head (1,539 params)" in n for n in result.notes)
    reloaded = reparam_zoo.load(os.path.join(str(tmp_path / "out"), "last.safetensors"))
    assert reloaded.classifier[1].out_channels == 3


def test_already_converted_model_is_checked_against_its_folded_form(data_dir, tmp_path):
    converted = reparam_zoo.convert(tiny_net(), exclude=["dw"])
    result = train(converted, data_dir, output_dir=str(tmp_path / "out"), epochs=1, lr=0.5, **FAST)
    assert result.sanity["compared_with"] == "folded model"
    assert result.sanity["exact"] and result.sanity["equal"] and result.sanity["max_abs_logit_diff"] == 0.0
    assert [n for n, _ in refconv_layers(result.model)] == ["stem"]  # its own conversion is kept


def test_amp_channels_last_adamw_and_norm_scope(data_dir, tmp_path):
    model = tiny_net()
    before = snapshot(model)
    result = train(model, data_dir, output_dir=str(tmp_path / "out"), epochs=1, lr=1e-2, optimizer="adamw",
                   train_scope="transforms+norm", amp=True, channels_last=True, **FAST)
    after = result.model.state_dict()
    assert all(row["train_loss"] > 0 for row in result.history[1:])
    for changed in ("bn1.weight", "bn2.bias", "stem.transform_weight", "dw.transform_weight"):
        assert not torch.equal(after[changed], before.get(changed, torch.zeros_like(after[changed]))), changed
    for frozen in ("pw.weight", "fc.weight", "fc.bias"):
        assert torch.equal(after[frozen], before[frozen]), frozen
    assert torch.equal(after["stem.weight_base"], before["stem.weight"])


# -- resumption ------------------------------------------------------------------------------------------------

def test_interrupted_and_resumed_run_ends_bit_identical_to_an_uninterrupted_one(data_dir, tmp_path):
    settings = dict(epochs=2, lr=0.5, **{**FAST, "warmup_epochs": 1})
    straight = train(tiny_net(cls=SignalAt), data_dir, output_dir=str(tmp_path / "straight"), **settings)
    assert not straight.interrupted

    model = tiny_net(cls=SignalAt)
    model.at = 6 + 3  # 6 steps per epoch: Ctrl-C during step 3 of epoch 2
    stopped = train(model, data_dir, output_dir=str(tmp_path / "resumed"), **settings)
    assert stopped.interrupted and [r["epoch"] for r in stopped.history] == [0, 1]
    state = torch.load(stopped.files["state"], weights_only=True)
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 3, 9)

    model.at = None
    # two loader workers this time: augmentation is seeded per sample, so that must not matter
    resumed = resume(stopped.output_dir, model=model, workers=2, verbose=False)
    assert not resumed.interrupted
    a, _ = read_state_dict(straight.files["last"])
    b, _ = read_state_dict(resumed.files["last"])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert not torch.equal(a["stem.transform_weight"], torch.zeros_like(a["stem.transform_weight"]))
    timing = ("images_per_s", "epoch_time_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)


def test_sigterm_also_stops_with_a_checkpoint_and_handlers_are_restored(data_dir, tmp_path):
    model = tiny_net(cls=SignalAt)
    model.at, model.signum = 2, signal.SIGTERM
    handler = signal.getsignal(signal.SIGTERM)
    result = train(model, data_dir, output_dir=str(tmp_path / "out"), epochs=1, lr=0.1, **FAST)
    assert result.interrupted and signal.getsignal(signal.SIGTERM) is handler
    state = torch.load(result.files["state"], weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 2)
    assert "deploy" not in result.files and [r["epoch"] for r in result.history] == [0]


def test_resume_refuses_a_finished_run_and_a_folder_without_checkpoint(trained, tmp_path):
    _, _, result = trained
    with pytest.raises(TrainError, match="already finished its 3 epochs; pass a larger --epochs"):
        resume(result.output_dir, model=TinyNet(), verbose=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match="no checkpoint to resume from"):
        resume(str(tmp_path / "empty"), verbose=False)


# -- bad input ------------------------------------------------------------------------------------------------

def test_missing_and_empty_data_folders_are_clear_errors(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match="no such data folder") as error:
        train(TinyNet(), str(tmp_path / "nope"), output_dir=out, **FAST)
    assert isinstance(error.value, ReparamError)  # what the CLI turns into one line
    (tmp_path / "d" / "train" / "red").mkdir(parents=True)
    with pytest.raises(DataError, match="missing val folder"):
        train(TinyNet(), str(tmp_path / "d"), output_dir=out, **FAST)
    (tmp_path / "d" / "val" / "red").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train: no images found"):
        train(TinyNet(), str(tmp_path / "d"), output_dir=out, **FAST)


def test_classes_differing_between_train_and_val(tmp_path):
    root = make_dataset(tmp_path / "d", train_per_class=2, val_per_class=1)
    os.rename(os.path.join(root, "val", "blue"), os.path.join(root, "val", "yellow"))
    with pytest.raises(DataError, match=r"classes differ between train and val \(only in train: blue; only in val: yellow\)"):
        train(TinyNet(), root, output_dir=str(tmp_path / "out"), **FAST)


def test_head_mismatch_needs_num_classes(data_dir, tmp_path):
    with pytest.raises(TrainError, match=r"model has 5 outputs but .* has 3 classes; pass --num-classes 3"):
        train(TinyNet(num_classes=5), data_dir, output_dir=str(tmp_path / "out"), **FAST)
    with pytest.raises(TrainError, match="num-classes is 4 but .* has 3 classes"):
        train(TinyNet(), data_dir, output_dir=str(tmp_path / "out"), num_classes=4, **FAST)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 7))
    with pytest.raises(TrainError, match=r"model has 7 outputs"):  # no timm interface: found by a forward pass
        train(plain, data_dir, output_dir=str(tmp_path / "out"), **FAST)
    assert not os.path.exists(tmp_path / "out")


def test_non_empty_output_folder_is_refused_and_left_alone(data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "last.safetensors").write_bytes(b"from an earlier run")
    with pytest.raises(TrainError, match="output folder is not empty .* --resume"):
        train(TinyNet(), data_dir, output_dir=str(out), **FAST)
    assert os.listdir(out) == ["last.safetensors"]
    assert (out / "last.safetensors").read_bytes() == b"from an earlier run"


@pytest.mark.parametrize("settings, message", [
    (dict(epochs=2, warmup_epochs=2), r"warmup-epochs must be in \[0, epochs=2\)"),
    (dict(batch_size=100), "fewer than one batch of 100 per process; lower --batch-size / batch_size="),
    (dict(optimizer="lion"), "unknown optimizer 'lion', expected one of sgd, adamw"),
    (dict(train_scope="everything"), "unknown train-scope 'everything'"),
])
def test_bad_settings(data_dir, tmp_path, settings, message):
    with pytest.raises(TrainError, match=message):
        train(TinyNet(), data_dir, output_dir=str(tmp_path / "out"), **{**FAST, **settings})


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = make_dataset(tmp_path / "d", train_per_class=8, val_per_class=4)
    with open(os.path.join(root, "train", "red", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    with open(os.path.join(root, "val", "blue", "empty.jpg"), "wb"):
        pass
    result = train(tiny_net(), root, output_dir=str(tmp_path / "out"), epochs=1, lr=0.1, **FAST)
    assert result.unreadable_images == [os.path.join("train", "red", "broken.png"),
                                        os.path.join("val", "blue", "empty.jpg")]
    assert result.history[-1]["unreadable_images"] == 2
    assert result.history[-1]["val_images"] == 3 * 4  # the unreadable one does not count
    assert result.history[-1]["train_images"] == (3 * 8 + 1) // 8 * 8  # full batches, broken one substituted


# -- DDP ----------------------------------------------------------------------------------------------------------

# the installed console script, next to the interpreter running the tests
REPARAM_SCRIPT = os.path.join(os.path.dirname(sys.executable), "reparam")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_under_torchrun(data_dir, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "--no-python", REPARAM_SCRIPT, "train", "test_resnet", "--data", data_dir, "--num-classes", "3",
           "--input-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--warmup-epochs", "0",
           "--lr", "0.05", "-o", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == sorted(
        ["config.json", "train.log", "metrics.jsonl", "metrics.png", "best.safetensors", "last.safetensors",
         "train_state.pt"])
    assert proc.stdout.count("sanity:") == 1  # rank 0 speaks, rank 1 does not
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["world_size"] == 2
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["epoch"] for r in rows] == [0, 1]
    per_step = 8 * 2
    assert rows[1]["train_images"] == len(CLASSES) * TRAIN_PER_CLASS // per_step * per_step
    assert rows[0]["val_images"] == rows[1]["val_images"] == len(CLASSES) * VAL_PER_CLASS  # each image once
    assert all(0 <= r["val_acc"] <= 1 and r["val_loss"] > 0 for r in rows)
    assert rows[1]["train_loss"] > 0 and rows[1]["lr"] == pytest.approx(0.0)
    model = reparam_zoo.load(os.path.join(out, "last.safetensors"))
    assert len(refconv_layers(model)) > 0 and model.num_classes == 3


DDP_DRIVER = """
import os, signal, sys
import reparam_zoo
train_module = sys.modules["reparam_zoo.train.loop"]
if os.environ.get("STOP_AT"):
    stop_epoch, stop_step = map(int, os.environ["STOP_AT"].split(","))
    step_seed = train_module.step_seed

    def interrupting_step_seed(seed, epoch, step, rank):
        if (epoch, step) == (stop_epoch, stop_step):  # every rank, like Ctrl-C in a torchrun terminal
            os.kill(os.getpid(), signal.SIGINT)
        return step_seed(seed, epoch, step, rank)

    train_module.step_seed = interrupting_step_seed
from reparam_cli.main import main
main(sys.argv[1:])
"""


def test_two_process_ddp_interrupted_mid_epoch_resumes_bit_identical(data_dir, tmp_path):
    # mid-epoch the ranks' BatchNorm statistics and partial sums differ: each must get its own back
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)

    def torchrun(*args, stop_at=None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(driver), "train", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "STOP_AT": stop_at or ""}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)

    settings = ["test_resnet", "--data", data_dir, "--num-classes", "3", "--input-size", "32", "--epochs", "2",
                "--batch-size", "4", "--workers", "0", "--lr", "0.05", "-q"]
    straight = torchrun(*settings, "-o", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    stopped = torchrun(*settings, "-o", str(tmp_path / "resumed"), stop_at="0,2")
    assert stopped.returncode != 0  # interrupted
    state = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 3) and len(state["ranks"]) == 2
    assert any(not torch.equal(a, state["ranks"][1]["buffers"][k]) for k, a in state["ranks"][0]["buffers"].items())
    resumed = torchrun("--resume", str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, _ = read_state_dict(tmp_path / "straight" / "last.safetensors")
    b, _ = read_state_dict(tmp_path / "resumed" / "last.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    rows = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("straight", "resumed")]
    strip = [[{k: v for k, v in json.loads(r).items() if k not in ("images_per_s", "epoch_time_s")} for r in run]
             for run in rows]
    assert strip[0] == strip[1]


# -- CLI --------------------------------------------------------------------------------------------------------

def test_cli_train_resume_extend_and_fuse(data_dir, tmp_path, monkeypatch):
    from reparam_cli.main import main
    from reparam_zoo import processes

    kept = []
    monkeypatch.setattr(processes, "keep_freed_memory", lambda: kept.append(1) or True)
    runner = CliRunner()
    out = str(tmp_path / "run")
    args = ["train", "test_resnet", "--data", data_dir, "--num-classes", "3", "--input-size", "32", "--epochs", "1",
            "--batch-size", "8", "--workers", "0", "--warmup-epochs", "0", "--lr", "0.05", "-o", out, "-q"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert kept == [1]  # the command's process keeps freed memory for the next step
    assert os.path.exists(os.path.join(out, "last.safetensors")) and not os.path.exists(os.path.join(out, "deploy.safetensors"))

    again = runner.invoke(main, args)  # same OUTDIR without --resume: refused, in one line
    assert again.exit_code == 1
    assert again.output.strip().splitlines() == [again.output.strip()]
    assert "output folder is not empty" in again.output

    changed = runner.invoke(main, ["train", "--resume", out, "--lr", "0.5"])
    assert changed.exit_code == 2 and "--lr 0.5 differs from the run's 0.05" in changed.output

    # the data set moved: --data follows it, but only to the same images
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    stray = sorted((moved / "train" / "red").iterdir())[0]
    stray.rename(stray.with_name("renamed" + stray.suffix))
    other = runner.invoke(main, ["train", "--resume", out, "--epochs", "2", "--data", str(moved)])
    assert other.exit_code == 1 and "holds other images than the run started with" in other.output
    stray.with_name("renamed" + stray.suffix).rename(stray)

    extended = runner.invoke(main, ["train", "--resume", out, "--epochs", "2", "--fuse", "--data", str(moved)])
    assert extended.exit_code == 0, extended.output
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["data_dir"] == str(moved)
    assert "resuming" in extended.output and "wrote " + os.path.join(out, "deploy.safetensors") in extended.output
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1, 2]

    best = reparam_zoo.load(os.path.join(out, "best.safetensors")).eval()
    deployed = reparam_zoo.load(os.path.join(out, "deploy.safetensors")).eval()
    assert not refconv_layers(deployed) and not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    for name in ("best.safetensors", "last.safetensors", "deploy.safetensors"):  # what labels the outputs
        assert read_info(os.path.join(out, name)).extra["classes"] == ["blue", "green", "red"], name
    assert deployed.reparam_extra["classes"] == ["blue", "green", "red"]
    assert _log(out).count("classes (output index order): ") == 1  # not again when resumed
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), best(x), rtol=1e-4, atol=1e-5)


def test_cli_errors_are_one_line(tmp_path):
    from reparam_cli.main import main

    result = CliRunner().invoke(main, ["train", "test_resnet", "--data", str(tmp_path / "missing"), "-o",
                                       str(tmp_path / "out")])
    assert result.exit_code == 1
    missing = tmp_path / "missing"
    assert result.output.strip() == (
        f"error: {missing}: no such data folder (expected {missing}/train/<class>/* and {missing}/val/<class>/*)")
    assert not os.path.exists(tmp_path / "out")
    usage = CliRunner().invoke(main, ["train", "--data", str(tmp_path)])
    assert usage.exit_code == 2 and "missing MODEL (or --resume OUTDIR)" in usage.output
    for device, message in (("tpu", "unknown device 'tpu' (expected cpu, cuda or cuda:N)"),
                            ("cuda:x", "unknown device 'cuda:x'"), ("meta", "training runs on cpu or cuda")):
        bad = CliRunner().invoke(main, ["train", "test_resnet", "--data", str(tmp_path), "--device", device])
        assert bad.exit_code == 2 and message in bad.output, bad.output
    if not torch.cuda.is_available():
        bad = CliRunner().invoke(main, ["train", "test_resnet", "--data", str(tmp_path), "--device", "cuda"])
        assert bad.exit_code == 2 and "device 'cuda': no CUDA GPU is available here" in bad.output
        with pytest.raises(ReparamError, match="no CUDA GPU is available here"):
            train(TinyNet(), str(tmp_path), device="cuda:0", **FAST)
    assert not os.listdir(tmp_path)


# -- audit fixes: scope of a converted model, default warmup, pickled models, totals, data paths ----------------

NO_WARMUP = {k: v for k, v in FAST.items() if k != "warmup_epochs"}  # the default warmup applies
CLI_FAST = ["--input-size", "32", "--batch-size", "8", "--workers", "0", "-q"]


def _config(out):
    with open(os.path.join(str(out), "config.json")) as f:
        return json.load(f)


def _log(out):
    with open(os.path.join(str(out), "train.log")) as f:
        return f.read()


def test_converted_model_trains_in_its_own_scope_unless_one_is_given(data_dir, tmp_path):
    converted = reparam_zoo.convert(tiny_net(), train_scope="transforms+norm")
    before = snapshot(converted)
    own = train(converted, data_dir, output_dir=str(tmp_path / "own"), epochs=1, lr=0.5, **FAST)
    trainable = {n for n, p in own.model.named_parameters() if p.requires_grad}
    assert trainable == {"stem.transform_weight", "dw.transform_weight", "bn1.weight", "bn1.bias", "bn2.weight",
                         "bn2.bias"}
    assert not torch.equal(own.model.bn1.weight.detach(), before["bn1.weight"])  # the norms did train
    assert _config(own.output_dir)["train_scope"] == "transforms+norm"
    assert "training scope transforms+norm (the model's own)" in _log(own.output_dir)
    assert own.model.refconv_summary.train_scope == "transforms+norm"

    given = train(converted, data_dir, output_dir=str(tmp_path / "given"), epochs=1, lr=0.5, train_scope="transforms",
                  **FAST)
    assert {n for n, p in given.model.named_parameters() if p.requires_grad} == {"stem.transform_weight",
                                                                                "dw.transform_weight"}
    assert torch.equal(given.model.bn1.weight.detach(), before["bn1.weight"])
    assert _config(given.output_dir)["train_scope"] == "transforms"
    assert "training scope transforms (given; the model's own is transforms+norm)" in _log(given.output_dir)

    plain = train(tiny_net(), data_dir, output_dir=str(tmp_path / "plain"), epochs=1, lr=0.5, **FAST)
    assert _config(plain.output_dir)["train_scope"] == "transforms"  # converted here: the default
    assert not any(p.requires_grad for n, p in plain.model.named_parameters() if n.startswith("bn"))


def test_cli_keeps_the_scope_a_converted_file_was_saved_with_also_when_resumed(data_dir, tmp_path):
    from reparam_cli.main import main

    torch.manual_seed(0)
    path = str(tmp_path / "m.safetensors")  # what `reparam convert test_resnet --refconv --train-scope ...` writes
    reparam_zoo.save(reparam_zoo.convert(reparam_zoo.create_model("test_resnet", num_classes=3),
                                         train_scope="transforms+norm"), path)
    out = str(tmp_path / "run")
    runner = CliRunner()
    first = runner.invoke(main, ["train", path, "--data", data_dir, "--epochs", "1", "--lr", "0.05", "-o", out,
                                 *CLI_FAST])
    assert first.exit_code == 0, first.output
    assert _config(out)["train_scope"] == "transforms+norm"
    assert "training scope transforms+norm (the model's own)" in _log(out)

    def norms(file):
        model = reparam_zoo.load(file)
        return {n: p.detach().clone() for n, p in model.named_parameters()
                if isinstance(model.get_submodule(n.rsplit(".", 1)[0]), nn.BatchNorm2d)}

    start, after_one = norms(path), norms(os.path.join(out, "last.safetensors"))
    assert start and all(not torch.equal(start[n], after_one[n]) for n in start)
    extended = runner.invoke(main, ["train", "--resume", out, "--epochs", "2"])
    assert extended.exit_code == 0, extended.output
    assert _config(out)["train_scope"] == "transforms+norm"
    after_two = norms(os.path.join(out, "last.safetensors"))
    assert all(not torch.equal(after_one[n], after_two[n]) for n in start), "the resumed run froze the norms"
    assert reparam_zoo.load(os.path.join(out, "last.safetensors")).refconv_summary.train_scope == "transforms+norm"


def test_default_warmup_is_one_epoch_only_when_there_are_two(data_dir, tmp_path):
    one = train(tiny_net(), data_dir, output_dir=str(tmp_path / "one"), epochs=1, lr=0.5, **NO_WARMUP)
    assert _config(one.output_dir)["warmup_epochs"] == 0
    assert one.history[-1]["lr"] == pytest.approx(0.0)  # straight into the cosine, down to 0 in one epoch
    assert "warmup 0 epoch(s)" in _log(one.output_dir)

    two = train(tiny_net(), data_dir, output_dir=str(tmp_path / "two"), epochs=2, lr=0.5, **NO_WARMUP)
    assert _config(two.output_dir)["warmup_epochs"] == 1
    assert two.history[1]["lr"] == pytest.approx(0.5)  # the end of the warmup epoch: the peak
    assert two.history[2]["lr"] == pytest.approx(0.0)

    with pytest.raises(TrainError, match=r"warmup-epochs must be in \[0, epochs=1\), got 1"):
        train(TinyNet(), data_dir, output_dir=str(tmp_path / "bad"), epochs=1, **{**NO_WARMUP, "warmup_epochs": 1})
    assert not os.path.exists(tmp_path / "bad")


def test_cli_default_warmup_explicit_bad_warmup_and_too_few_epochs_to_extend(data_dir, tmp_path):
    from reparam_cli.main import main

    model = str(tmp_path / "whole.pt")
    torch.save(tiny_net(), model)
    runner = CliRunner()
    out = str(tmp_path / "run")
    common = [model, "--trust-pickle", "--data", data_dir, "--lr", "0.5", *CLI_FAST]

    bad = runner.invoke(main, ["train", *common, "--epochs", "1", "--warmup-epochs", "1", "-o", out])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [bad.output.strip()]  # one line, before any model is loaded
    assert "Invalid value for" in bad.output and "--warmup-epochs" in bad.output
    assert "must be less than --epochs (1), got 1" in bad.output
    assert not os.path.exists(out)

    one = runner.invoke(main, ["train", *common, "--epochs", "1", "-o", out])
    assert one.exit_code == 0, one.output
    assert _config(out)["warmup_epochs"] == 0
    two = runner.invoke(main, ["train", "--resume", out, "--epochs", "2", "--trust-pickle"])
    assert two.exit_code == 0, two.output
    shorter = runner.invoke(main, ["train", "--resume", out, "--epochs", "1"])
    assert shorter.exit_code == 1
    assert shorter.output.strip() == (f"error: {out}: the run already trained 2 epochs; --epochs / epochs= must be more than "
                                      "that to extend it, got 1")
    with pytest.raises(TrainError, match="already finished its 2 epochs; pass a larger --epochs / epochs="):
        resume(out, verbose=False)


def test_cli_pickled_model_writes_readable_pickles_and_resumes_exactly(data_dir, tmp_path):
    from reparam_cli.main import main

    runner = CliRunner()
    settings = ["--trust-pickle", "--data", data_dir, "--num-classes", "3", "--epochs", "2", "--lr", "0.5", "--fuse",
                *CLI_FAST]
    straight_model, stopped_model = tiny_net(cls=lambda: SignalAt()), tiny_net(cls=lambda: SignalAt(at=6 + 3))
    straight_model.reset_classifier(5)  # a head that has to be replaced
    stopped_model.reset_classifier(5)
    stopped_model.load_state_dict(straight_model.state_dict())
    torch.save(straight_model, tmp_path / "straight.pt")
    torch.save(stopped_model, tmp_path / "stopped.pt")  # Ctrl-C during step 3 of epoch 2

    straight = str(tmp_path / "straight")
    done = runner.invoke(main, ["train", str(tmp_path / "straight.pt"), *settings, "-o", straight])
    assert done.exit_code == 0, done.output
    names = ["config.json", "train.log", "metrics.jsonl", "metrics.png", "best.pt", "last.pt", "deploy.pt",
             "train_state.pt"]
    assert sorted(os.listdir(straight)) == sorted(names)
    assert _config(straight)["model_files"] == "pickle" and _config(straight)["warmup_epochs"] == 1
    for name in ("best.pt", "last.pt", "deploy.pt"):
        shown = runner.invoke(main, ["report", os.path.join(straight, name), "--trust-pickle", "--input-size", "32",
                                     "--depth", "0"])
        assert shown.exit_code == 0, shown.output
    best = reparam_zoo.load(os.path.join(straight, "best.pt"), trust_pickle=True).eval()
    deployed = reparam_zoo.load(os.path.join(straight, "deploy.pt"), trust_pickle=True).eval()
    assert len(refconv_layers(best)) == 2 and best.fc.out_features == 3 and not refconv_layers(deployed)
    assert best.reparam_extra["classes"] == deployed.reparam_extra["classes"] == ["blue", "green", "red"]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), best(x), rtol=1e-4, atol=1e-5)
    fused = runner.invoke(main, ["fuse", os.path.join(straight, "last.pt"), "--trust-pickle", "--input-size", "32",
                                 "-o", str(tmp_path / "last.fused.pt")])
    assert fused.exit_code == 0, fused.output

    stopped = str(tmp_path / "stopped")
    first = runner.invoke(main, ["train", str(tmp_path / "stopped.pt"), *settings, "-o", stopped])
    assert first.exit_code == 130, first.output
    assert runner.invoke(main, ["train", "--resume", stopped]).exit_code == 1  # pickles: only with --trust-pickle
    resumed = runner.invoke(main, ["train", "--resume", stopped, "--trust-pickle"])  # the CLI user has no model to pass
    assert resumed.exit_code == 0, resumed.output
    a = reparam_zoo.load(os.path.join(straight, "last.pt"), trust_pickle=True).state_dict()
    b = reparam_zoo.load(os.path.join(stopped, "last.pt"), trust_pickle=True).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert b["fc.weight"].shape == (3, 16)


def test_log_counts_training_params_as_report_does(trained):
    from reparam_zoo.report import report

    _, _, result = trained
    total = report(result.model, (3, 32, 32), depth=0).training["params"]
    assert total > sum(p.numel() for p in result.model.parameters())  # the base kernels are buffers
    transforms = sum(m.transform_weight.numel() for _, m in refconv_layers(result.model))
    assert (f"training transforms: {transforms:,} transform params of {total:,} training params, base kernels "
            "included") in _log(result.output_dir)


def test_data_given_as_a_file_says_so(tmp_path):
    from reparam_cli.main import main

    script = tmp_path / "somefile.py"
    script.write_text("print('not data')\n")
    with pytest.raises(DataError, match="somefile.py: is a file, expected a data folder"):
        train(TinyNet(), str(script), output_dir=str(tmp_path / "out"), **FAST)
    result = CliRunner().invoke(main, ["train", "test_resnet", "--data", str(script), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"error: {script}: is a file, expected a data folder ({script}/train/<class>/* and {script}/val/<class>/*)")
    assert not os.path.exists(tmp_path / "out")


# -- second audit: dtypes, outputs, folders, the resume API, class folders ----------------------------------------

class TupleOut(TinyNet):
    num_classes = len(CLASSES)  # announces its classes, so only running it shows the tuple

    def forward(self, x):
        return super().forward(x), x


def test_a_model_that_cannot_train_leaves_no_folder_and_half_precision_trains_in_float32(data_dir, tmp_path):
    with pytest.raises(TrainError, match=r"the model returns tuple, not \(batch, classes\) logits"):
        train(tiny_net(cls=TupleOut), data_dir, output_dir=str(tmp_path / "tuple"), epochs=1, **FAST)
    assert not os.path.exists(tmp_path / "tuple")  # the same command, corrected, can use the folder
    result = train(tiny_net().half(), data_dir, output_dir=str(tmp_path / "half"), epochs=1, lr=0.5, **FAST)
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    assert result.sanity["exact"] and result.sanity["equal"]
    log = (tmp_path / "half" / "train.log").read_text()
    assert "note: the model's weights are float16; training in float32 (--amp / amp=True for mixed precision)" in log
    assert log.index("sanity:") < log.index("epoch 1/1")  # lines logged before the folder existed are kept


def test_resume_is_exported_and_named_in_the_non_empty_folder_message(data_dir, tmp_path):
    assert reparam_zoo.resume is resume
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    with pytest.raises(TrainError, match=r"output folder is not empty \(notes.txt\).*reparam_zoo.resume\(\)"):
        train(tiny_net(), data_dir, output_dir=str(tmp_path / "busy"), **FAST)


def test_images_are_labelled_by_their_class_folder_at_any_depth(tmp_path):
    from reparam_zoo.data import build_datasets

    root = make_dataset(tmp_path / "d", train_per_class=4, val_per_class=2)
    for split in ("train", "val"):
        nested = tmp_path / "d" / split / "red" / "2024"
        nested.mkdir()
        Image.new("RGB", (32, 32), (220, 40, 40)).save(nested / "deep.png")
        hidden = tmp_path / "d" / split / ".ipynb_checkpoints"
        hidden.mkdir()
        Image.new("RGB", (32, 32)).save(hidden / "x.png")
    splits = build_datasets(root, TinyNet(), 32)
    assert splits.classes == list(sorted(CLASSES))
    red = splits.train.class_to_idx["red"]
    labels = {os.path.relpath(path, os.path.join(root, "train")): target for path, target in splits.train.reader.samples}
    assert labels[os.path.join("red", "2024", "deep.png")] == red and len(labels) == 3 * 4 + 1
    Image.new("RGB", (32, 32)).save(tmp_path / "d" / "train" / "loose.png")
    with pytest.raises(DataError, match=r"1 image\(s\) directly in the split folder; images go in .*/train/<class>/"):
        build_datasets(root, TinyNet(), 32)


def test_cli_trains_a_weights_only_checkpoint_whose_head_is_not_the_default(data_dir, tmp_path):
    from reparam_cli.main import main

    torch.manual_seed(0)
    source = reparam_zoo.create_model("test_resnet", num_classes=3)
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "l.ckpt")
    result = CliRunner().invoke(main, ["train", str(tmp_path / "l.ckpt"), "--arch", "test_resnet", "--data", data_dir,
                                       "--epochs", "1", "--lr", "1e-9", "-o", str(tmp_path / "run"), *CLI_FAST])
    assert result.exit_code == 0, result.output
    log = _log(tmp_path / "run")
    assert "head sized from the checkpoint: 3 classes (not 1000)" in log
    assert "stripped key prefix 'model.'" in log
    assert "sanity: input model" in log and "-> identical" in log
    finished = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "run"), "--fuse"])
    assert finished.exit_code == 1
    assert f"to deploy its best model: reparam fuse {tmp_path / 'run' / 'best.safetensors'}" in finished.output


def test_a_class_folder_without_images_is_an_error(tmp_path):
    from reparam_zoo.data import build_datasets

    root = make_dataset(tmp_path / "d", train_per_class=2, val_per_class=1)
    (tmp_path / "d" / "train" / "purple").mkdir()
    with pytest.raises(DataError, match=r"train: class folder\(s\) without images: purple"):
        build_datasets(root, TinyNet(), 32)


class CannotLearn(nn.Module):
    """Its conv trains, but the logits never depend on it: no epoch can beat the start."""

    num_classes = len(CLASSES)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.register_buffer("logits", torch.tensor([[0.3, 0.1, -0.2]]))

    def forward(self, x):
        return self.conv(x).mean((1, 2, 3))[:, None] * 0 + self.logits


def test_a_run_that_never_beats_its_start_says_so(data_dir, tmp_path):
    result = train(CannotLearn(), data_dir, output_dir=str(tmp_path / "run"), epochs=2, fuse=True, **FAST)
    assert result.best["epoch"] == 0
    assert ("warning: no epoch beat the model as it started, so the best model (and the deploy model) is the "
            "input model; try a lower --lr / lr= or more epochs") in _log(tmp_path / "run")


def test_momentum_with_adamw_is_a_usage_error(data_dir, tmp_path):
    from reparam_cli.main import main

    result = CliRunner().invoke(main, ["train", "test_resnet", "--data", data_dir, "--optimizer", "adamw",
                                       "--momentum", "0.5", "-o", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--momentum applies to --optimizer sgd, not adamw" in result.output
    assert not os.path.exists(tmp_path / "run")



# -- third audit: failed runs, batches of one, divergence, map_k, input size, class names, display -----------------

class PoisonAt(TinyNet):
    """Its `at`-th training forward makes bn1's running variance infinite: the loss stays finite (training uses
    the batch statistics), only the weights show the divergence."""

    def __init__(self, at=None):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                with torch.no_grad():
                    self.bn1.running_var.fill_(float("inf"))
        return super().forward(x)


class PooledBN(TinyNet):
    """BatchNorm after global pooling: one value per channel and image, so a training batch of 1 cannot work."""

    def __init__(self):
        super().__init__()
        self.bn3 = nn.BatchNorm1d(16)

    def forward(self, x):
        x = F.relu(self.bn1(self.stem(x)))
        x = F.relu(self.bn2(self.dw(x)))
        return self.fc(self.bn3(F.relu(self.pw(x)).mean((2, 3))))


def test_cli_batch_of_one_is_a_clear_error_and_the_failed_run_leaves_nothing(data_dir, tmp_path):
    from reparam_cli.main import main

    out = tmp_path / "runs" / "bs1"  # the run makes both folders, and removes both
    args = ["train", "test_resnet", "--num-classes", "3", "--data", data_dir, "--epochs", "1", "--input-size", "32",
            "--workers", "0", "-q", "-o", str(out)]
    failed = CliRunner().invoke(main, [*args, "--batch-size", "1"])
    assert failed.exit_code == 1
    assert failed.output.strip() == ("error: a batch of 1 image per process cannot train BatchNorm (it needs more "
                                     "than 1 value per channel); use --batch-size / batch_size= 2 or more")
    assert not os.path.exists(tmp_path / "runs")
    rerun = CliRunner().invoke(main, [*args, "--batch-size", "8", "--lr", "0.05"])  # the corrected command works
    assert rerun.exit_code == 0, rerun.output


def test_a_failed_run_removes_only_its_own_files_and_keeps_a_folder_it_did_not_make(data_dir, tmp_path):
    out = tmp_path / "given"
    out.mkdir()
    with pytest.raises(TrainError, match=r"training diverged in epoch 1: non-finite \(NaN/Inf\) values in "
                                         r"bn1.running_var; nothing was kept: run again with a lower --lr / lr=$"):
        train(tiny_net(cls=lambda: PoisonAt(at=2)), data_dir, output_dir=str(out), epochs=1, lr=0.1, **FAST)
    assert out.is_dir() and os.listdir(out) == []
    with pytest.raises(TrainError, match="a batch of 1 image per process cannot train BatchNorm"):
        train(tiny_net(cls=PooledBN), data_dir, output_dir=str(out), epochs=1, **{**FAST, "batch_size": 1})
    assert os.listdir(out) == []
    assert train(tiny_net(), data_dir, output_dir=str(out), epochs=1, lr=0.1, **FAST).history


def test_the_last_training_batch_is_never_a_single_image(tmp_path):
    root = make_dataset(tmp_path / "d", train_per_class=3, val_per_class=1)  # 9 images: 4 batches of 2, and 1 left
    result = train(tiny_net(cls=PooledBN), root, output_dir=str(tmp_path / "out"), epochs=1, lr=0.1,
                   **{**FAST, "batch_size": 2})
    assert result.history[-1]["train_images"] == 8


def test_divergence_is_caught_at_the_end_of_its_epoch_and_the_previous_epoch_is_kept(data_dir, tmp_path):
    out = str(tmp_path / "out")
    model = tiny_net(cls=lambda: PoisonAt(at=6 + 2))  # 6 steps per epoch: during step 2 of epoch 2
    with pytest.raises(TrainError) as error:
        train(model, data_dir, output_dir=out, epochs=2, lr=0.5, **FAST)
    assert str(error.value) == ("training diverged in epoch 2: non-finite (NaN/Inf) values in bn1.running_var; the "
                                "last good checkpoint is kept, but the learning rate cannot change on resume: start a "
                                "new run with a lower --lr / lr=")
    assert sorted(os.listdir(out)) == sorted(["config.json", "train.log", "metrics.jsonl", "best.safetensors",
                                              "last.safetensors", "train_state.pt"])
    state = torch.load(os.path.join(out, "train_state.pt"), weights_only=True)
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 0, 6)
    last, meta = read_state_dict(os.path.join(out, "last.safetensors"))
    assert json.loads(meta["extra"])["train"]["global_step"] == 6
    assert all(torch.isfinite(t).all() for t in last.values() if t.is_floating_point())
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]


def test_map_k_of_an_already_converted_model_cannot_change_and_config_records_the_real_one(data_dir, tmp_path):
    from reparam_cli.main import main

    converted = reparam_zoo.convert(tiny_net(), map_k=1)
    with pytest.raises(TrainError, match="map_k 5 was asked for, but the model's RefConv layers already have "
                                         "map_k=1; map_k applies to models converted here"):
        train(converted, data_dir, output_dir=str(tmp_path / "five"), epochs=1, map_k=5, **FAST)
    assert not os.path.exists(tmp_path / "five")
    own = train(converted, data_dir, output_dir=str(tmp_path / "own"), epochs=1, lr=0.5, **FAST)
    assert _config(own.output_dir)["map_k"] == 1
    assert {m.map_k for _, m in refconv_layers(own.model)} == {1}

    torch.manual_seed(0)
    path = str(tmp_path / "m.safetensors")
    reparam_zoo.save(reparam_zoo.convert(reparam_zoo.create_model("test_resnet", num_classes=3)), path)
    result = CliRunner().invoke(main, ["train", path, "--data", data_dir, "--map-k", "5", "-o",
                                       str(tmp_path / "cli"), *CLI_FAST])
    assert result.exit_code == 1
    assert "error: map_k 5 was asked for, but the model's RefConv layers already have map_k=3" in result.output
    assert not os.path.exists(tmp_path / "cli")


def test_a_model_without_a_timm_input_size_needs_input_size(data_dir, tmp_path):
    from reparam_cli.main import main

    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    no_size = {k: v for k, v in FAST.items() if k != "input_size"}
    with pytest.raises(TrainError, match=r"cannot tell the input size of Sequential \(no timm pretrained_cfg\); "
                                         "pass --input-size N"):
        train(plain, data_dir, output_dir=str(tmp_path / "lib"), epochs=1, **no_size)
    torch.save(plain, tmp_path / "plain.pt")
    result = CliRunner().invoke(main, ["train", str(tmp_path / "plain.pt"), "--trust-pickle", "--data", data_dir,
                                       "--epochs", "1", "--workers", "0", "-q", "-o", str(tmp_path / "cli")])
    assert result.exit_code == 1 and "pass --input-size N" in result.output, result.output
    assert not os.path.exists(tmp_path / "lib") and not os.path.exists(tmp_path / "cli")


def test_model_files_and_the_log_record_the_class_names(trained):
    _, _, result = trained
    assert result.classes == ["blue", "green", "red"]  # the output index order (sorted folder names)
    for key in ("best", "last"):  # an in-memory TinyNet: bare state_dicts, the same extra metadata
        _, meta = read_state_dict(result.files[key])
        assert json.loads(meta["extra"])["classes"] == result.classes, key
    assert _log(result.output_dir).count('classes (output index order): ["blue", "green", "red"]') == 1


def test_throughput_has_three_significant_digits(trained):
    from reparam_zoo.train.run_dir import sig3 as _sig3

    assert [_sig3(v) for v in (0.36, 0.0042, 12.345, 491.2, 5123.4, 0.0)] == ["0.360", "0.00420", "12.3", "491",
                                                                               "5123", "0"]
    _, _, result = trained
    rate = _sig3(result.history[1]["images_per_s"])
    epoch_line = next(line for line in _log(result.output_dir).splitlines() if " epoch 1/3: " in line)
    assert epoch_line.endswith(f"| {rate} img/s")


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_interrupted_run_says_how_to_resume_once(data_dir, tmp_path, quiet):
    from reparam_cli.main import main

    torch.save(tiny_net(cls=lambda: SignalAt(at=2)), tmp_path / "m.pt")
    out = str(tmp_path / "run")
    result = CliRunner().invoke(main, ["train", str(tmp_path / "m.pt"), "--trust-pickle", "--data", data_dir,
                                       "--epochs", "1", "--input-size", "32", "--batch-size", "8", "--workers", "0",
                                       "-o", out] + (["-q"] if quiet else []))
    assert result.exit_code == 130, result.output
    assert result.output.count(f"reparam train --resume {out}") == 1, result.output


def test_training_leaves_the_callers_random_streams_alone(data_dir, tmp_path):
    import random

    torch.manual_seed(123)
    random.seed(123)
    expected = (torch.rand(1).item(), random.random())
    torch.manual_seed(123)
    random.seed(123)
    train("test_resnet", data_dir, output_dir=str(tmp_path / "run"), num_classes=3, input_size=32, epochs=1,
          batch_size=8, workers=0, verbose=False)
    assert (torch.rand(1).item(), random.random()) == expected


REFAULT_PROBE = """
import resource, sys, torch
from reparam_zoo.processes import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults_of_a_step():  # a 64 MiB tensor made, written and freed, as activations are every step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_step()
print(applied, min(faults_of_a_step() for _ in range(3)))
"""


def test_keep_freed_memory_stops_every_step_from_faulting_its_pages_in_again():
    def probe(mode):
        out = subprocess.run([sys.executable, "-c", REFAULT_PROBE, mode], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        applied, faults = out.stdout.split()
        return applied, int(faults)

    _, default_faults = probe("default")
    applied, kept_faults = probe("keep")
    if applied != "True":
        pytest.skip("not glibc: mallopt is not available")
    assert default_faults > 8000  # 16384 pages of 4 KiB: glibc maps a fresh block each time
    assert kept_faults < 100
