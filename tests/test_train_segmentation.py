"""Refocus training for semantic segmentation (--task segmentation): data, metrics, resume, errors, CLI."""
import json
import os
import re
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from PIL import Image

from reparam_zoo.checkpoint import read_state_dict
from reparam_zoo.data import DataError
from reparam_zoo.dense_examples import make_segmentation_set
from reparam_zoo.train import resume, train
from reparam_zoo.train.tasks.segmentation import confusion_matrix, scores_of_confusion

FAST = dict(batch_size=4, workers=0, verbose=False, input_size=32, task="segmentation")


class TinySeg(nn.Module):
    """(batch, 4, H, W) logits: two 3x3 conv blocks and a 1x1 classifier."""

    def __init__(self, classes=4, at=None):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.classifier = nn.Conv2d(8, classes, 1)
        self.at, self.calls = at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.at:  # Ctrl-C during this training step
                os.kill(os.getpid(), signal.SIGINT)
        return self.classifier(self.body(x))


def tiny_seg(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinySeg(**kwargs)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("seg"))
    make_segmentation_set(root, train=12, val=4, size=32, seed=1)
    return root


# -- metrics against hand-computed numbers ------------------------------------------------------------------

def test_confusion_matrix_and_scores_match_a_hand_computed_case():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    confusion = confusion_matrix(predicted, target, 3, 255)
    # rows: true class, columns: predicted; the 255 pixel does not count
    expected = torch.tensor([[1, 1, 0], [0, 2, 1], [1, 0, 1]], dtype=torch.float64)
    assert torch.equal(confusion, expected)
    scores = scores_of_confusion(confusion)
    # IoU = tp / (true + predicted - tp): class 0: 1/(2+2-1), class 1: 2/(3+3-2), class 2: 1/(2+2-1)
    assert scores["iou"] == pytest.approx([1 / 3, 2 / 4, 1 / 3])
    assert scores["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert scores["pixel_acc"] == pytest.approx(4 / 7)
    # a class neither labelled nor predicted is left out of the mean, not counted as 0
    four = torch.zeros(4, 4, dtype=torch.float64)
    four[:3, :3] = expected
    assert scores_of_confusion(four)["iou"][3] is None
    assert scores_of_confusion(four)["miou"] == pytest.approx(scores["miou"])
    assert scores_of_confusion(torch.eye(3) * 5)["miou"] == 1.0


# -- a run ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    model = tiny_seg()
    out = str(tmp_path_factory.mktemp("run") / "out")
    result = train(model, data_dir, output_dir=out, epochs=2, lr=0.5, fuse=True, **FAST)
    return model, result


def _independent_scores(model, data_dir, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """Confusion matrix of `model` over the val split, computed with numpy from the files (32 px: no resize)."""
    confusion = np.zeros((4, 4), dtype=np.int64)
    folder = os.path.join(data_dir, "val")
    for name in sorted(os.listdir(os.path.join(folder, "images"))):
        image = np.asarray(Image.open(os.path.join(folder, "images", name)).convert("RGB"), dtype=np.float32) / 255
        mask = np.asarray(Image.open(os.path.join(folder, "masks", name.replace(".jpg", ".png"))), dtype=np.int64)
        x = torch.from_numpy(((image - mean) / std).transpose(2, 0, 1).astype(np.float32))[None]
        with torch.no_grad():
            pred = model.eval()(x).argmax(1)[0].numpy()
        valid = mask != 255
        np.add.at(confusion, (mask[valid], pred[valid]), 1)
    iou = [confusion[i, i] / (confusion[i].sum() + confusion[:, i].sum() - confusion[i, i])
           for i in range(4) if confusion[i].sum() + confusion[:, i].sum() > 0]
    return float(np.mean(iou)), confusion.trace() / confusion.sum()


def test_run_writes_files_metrics_match_an_independent_computation_and_best_is_by_miou(trained, data_dir):
    model, result = trained
    assert result.sanity["equal"] and result.sanity["exact"] and result.sanity["max_abs_logit_diff"] == 0.0
    assert result.classes == ["background", "circle", "square", "triangle"]
    assert {"best", "last", "deploy", "metrics", "plot", "state", "log", "config"} <= set(result.files)
    # the input model (epoch 0) scored independently: the sanity check's numbers
    miou0, acc0 = _independent_scores(model, data_dir)
    assert result.history[0]["val_miou"] == pytest.approx(miou0, abs=1e-12)
    assert result.history[0]["val_pixel_acc"] == pytest.approx(acc0, abs=1e-12)
    # the trained model: its own forward, numpy confusion matrix
    miou, acc = _independent_scores(result.model.cpu(), data_dir)
    assert result.final["val_miou"] == pytest.approx(miou, abs=1e-12)
    assert result.final["val_pixel_acc"] == pytest.approx(acc, abs=1e-12)
    assert set(result.final["val_iou"]) == set(result.classes)
    rows = [json.loads(line) for line in open(result.files["metrics"])]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all({"train_loss", "train_miou", "train_pixel_acc"} <= set(r) for r in rows[1:])
    best_epoch = max(rows, key=lambda r: (r["val_miou"], -r["val_loss"]))["epoch"]
    assert result.best["epoch"] == best_epoch
    _, meta = read_state_dict(result.files["best"])
    assert json.loads(meta["extra"])["train"]["epoch"] == best_epoch
    assert "deploy model (best" in open(result.files["log"]).read()
    config = json.load(open(result.files["config"]))
    assert (config["task"], config["ignore_index"]) == ("segmentation", 255)


def test_transforms_scope_trains_only_the_transforms(trained):
    model, result = trained
    after = result.model.state_dict()
    assert [n for n, p in result.model.named_parameters() if p.requires_grad] == ["body.0.transform_weight",
                                                                                   "body.3.transform_weight"]
    assert all(after[n].abs().sum() > 0 for n in ("body.0.transform_weight", "body.3.transform_weight"))
    for name, value in model.state_dict().items():  # the caller's model is left as it was; base kernels frozen
        key = name.replace(".weight", ".weight_base") if name in ("body.0.weight", "body.3.weight") else name
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(after[key].cpu(), value), name


def test_interrupted_mid_epoch_and_resumed_ends_bit_identical(data_dir, tmp_path):
    settings = dict(epochs=2, lr=0.5, **FAST)
    straight = train(tiny_seg(), data_dir, output_dir=str(tmp_path / "straight"), **settings)
    model = tiny_seg(at=3 + 2)  # 3 steps per epoch: Ctrl-C during step 2 of epoch 2
    stopped = train(model, data_dir, output_dir=str(tmp_path / "resumed"), **settings)
    assert stopped.interrupted
    state = torch.load(stopped.files["state"], weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)
    model.at = None
    resumed = resume(stopped.output_dir, model=model, verbose=False)
    a, _ = read_state_dict(straight.files["last"])
    b, _ = read_state_dict(resumed.files["last"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_time_s")} for r in rows]  # noqa
    assert strip(resumed.history) == strip(straight.history)


# -- bad data ----------------------------------------------------------------------------------------------------

def _copy_set(tmp_path, **kwargs):
    root = str(tmp_path / "data")
    make_segmentation_set(root, train=4, val=4, size=32, seed=2, **kwargs)
    return root


def test_a_mask_of_another_size_names_the_file_and_leaves_nothing(tmp_path):
    root = _copy_set(tmp_path)
    bad = os.path.join(root, "val", "masks", "0002.png")
    Image.new("L", (30, 32)).save(bad)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=rf"^{bad}: mask is 30x32 but its image .*0002.jpg is 32x32$"):
        train(tiny_seg(), root, output_dir=str(out), epochs=1, **FAST)
    assert not out.exists()


def test_a_mask_value_neither_class_nor_ignore_names_the_file(tmp_path):
    root = _copy_set(tmp_path)
    bad = os.path.join(root, "val", "masks", "0001.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[3, 4] = 9
    Image.fromarray(mask).save(bad)
    with pytest.raises(DataError, match=rf"^{bad}: mask value 9 is neither a class \(0\.\.3\) nor the ignore index 255$"):
        train(tiny_seg(), root, output_dir=str(tmp_path / "out"), epochs=1, **FAST)
    # with another ignore index, the 255 bands around the shapes are bad values (the first file sampled)
    first = os.path.join(root, "val", "masks", "0000.png")
    with pytest.raises(DataError, match=rf"^{first}: mask value 255 is neither a class \(0\.\.3\) nor the ignore index 9$"):
        train(tiny_seg(), root, output_dir=str(tmp_path / "out2"), epochs=1, **{**FAST, "ignore_index": 9})


def test_layout_errors_name_what_is_missing(tmp_path):
    root = _copy_set(tmp_path)
    os.remove(os.path.join(root, "train", "masks", "0003.png"))
    with pytest.raises(DataError, match=r"0003.jpg: no mask for this image in .*train/masks \(1 image"):
        train(tiny_seg(), root, output_dir=str(tmp_path / "o1"), epochs=1, **FAST)
    os.remove(os.path.join(root, "classes.txt"))
    with pytest.raises(DataError, match=r"classes.txt: no class-names file"):
        train(tiny_seg(), root, output_dir=str(tmp_path / "o2"), epochs=1, **FAST)
    with pytest.raises(DataError, match=r"missing images/ folder"):
        train(tiny_seg(), str(tmp_path), output_dir=str(tmp_path / "o3"), epochs=1, **FAST)


def test_voc_layout_with_imagesets_lists(tmp_path):
    src = _copy_set(tmp_path)
    voc = tmp_path / "voc"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for split in ("train", "val"):
        ids = []
        for name in sorted(os.listdir(os.path.join(src, split, "images"))):
            stem = f"{split}_{name[:-4]}"
            ids.append(stem)
            os.link(os.path.join(src, split, "images", name), voc / "JPEGImages" / f"{stem}.jpg")
            os.link(os.path.join(src, split, "masks", name[:-4] + ".png"), voc / "SegmentationClass" / f"{stem}.png")
        (voc / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    os.link(os.path.join(src, "classes.txt"), voc / "classes.txt")
    result = train(tiny_seg(), str(voc), output_dir=str(tmp_path / "out"), epochs=1, **FAST)
    assert result.final["val_images"] == 4 and result.sanity["equal"]


def test_head_mismatch_needs_num_classes(data_dir, tmp_path):
    from reparam_zoo.train import TrainError

    with pytest.raises(TrainError, match=r"predicts 5 classes but .* has 4 \(classes.txt\); pass --num-classes 4"):
        train(tiny_seg(classes=5), data_dir, output_dir=str(tmp_path / "o"), epochs=1, **FAST)


# -- command line ------------------------------------------------------------------------------------------------

def test_cli_infers_the_task_from_a_torchvision_segmenter(data_dir, tmp_path):
    from reparam_cli.main import main

    out = str(tmp_path / "out")
    result = CliRunner().invoke(main, ["train", "torchvision:lraspp_mobilenet_v3_large", "--data", data_dir,
                                       "--num-classes", "4", "--input-size", "32", "--epochs", "1",
                                       "--batch-size", "4", "--workers", "0", "-o", out])
    assert result.exit_code == 0, result.output
    assert "best: epoch " in result.output and "val mIoU " in result.output
    assert json.load(open(os.path.join(out, "config.json")))["task"] == "segmentation"
    assert "-> identical" in open(os.path.join(out, "train.log")).read()


def test_cli_bad_ignore_index_is_a_usage_error(data_dir, tmp_path):
    from reparam_cli.main import main

    result = CliRunner().invoke(main, ["train", "m", "--data", data_dir, "--task", "segmentation",
                                       "--ignore-index", "-1"])
    assert result.exit_code == 2 and "--ignore-index" in result.output


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_cli_dense_demo_runs_end_to_end_at_a_tiny_size(task, tmp_path, monkeypatch):
    import dataclasses

    from reparam_cli.main import main
    from reparam_zoo import demo_dense

    # SSDlite resizes every image to its fixed 320 px; the segmenter takes a smaller size. The detector gets
    # a few steps at a high rate: after 1-2 steps its extra layers' activations are still tiny, and with their
    # BatchNorm statistics recomputed the fused model's float32 rounding comes close to the verifier's rtol.
    settings = dict(train_images=4, val_images=2, pretrain_epochs=1, refocus_epochs=1, batch_size=2, size=32)
    if task == "detection":
        settings.update(size=320, pretrain_epochs=3, pretrain_lr=1e-2)
    tiny = dataclasses.replace(demo_dense.DENSE_DEMOS[task], **settings)
    monkeypatch.setitem(demo_dense.DENSE_DEMOS, task, tiny)
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--task", task, "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    metric = "mAP@[.5:.95]" if task == "detection" else "mIoU"
    assert f"[4/4] val {metric}: pretrained " in result.output and "inference (fused)" in result.output
    log = (out / "refocus" / "train.log").read_text()
    assert "-> identical" in log and "verified" in log
    assert {"pretrained.safetensors", "report.json", "data", "refocus"} <= set(os.listdir(out))
    # the metric printed before/after is the run's own epoch 0 and best
    rows = [json.loads(line) for line in (out / "refocus" / "metrics.jsonl").read_text().splitlines()]
    key = "val_map" if task == "detection" else "val_miou"
    assert f"pretrained {100 * rows[0][key]:.1f}%" in result.output
    # the last line states the change to the best epoch the run chose, from its own metrics
    best = rows[int(re.search(r"\(best, epoch (\d+)\)", result.output).group(1))]
    change = (f"by {100 * (best[key] - rows[0][key]):+.1f} points" if best["epoch"] else
              "No refocus epoch beat the pretrained model")
    assert f"{change} here, on one seed and 2 validation images, beside no baseline" in result.output


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = _copy_set(tmp_path)
    for split in ("train", "val"):
        with open(os.path.join(root, split, "images", "0001.jpg"), "wb") as f:
            f.write(b"not an image")
    result = train(tiny_seg(), root, output_dir=str(tmp_path / "out"), epochs=1, **FAST)
    assert result.unreadable_images == [os.path.join("images", "0001.jpg")]
    assert result.final["val_images"] == 3  # the blank stand-in does not count
    assert "skipped 1 unreadable image(s)" in open(result.files["log"]).read()
