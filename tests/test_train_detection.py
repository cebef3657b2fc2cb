"""Refocus training for detection and instance segmentation (--task detection): COCO data, COCO mAP, resume,
bad data, CLI."""
import contextlib
import io
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from PIL import Image

from reparam_zoo.checkpoint import read_state_dict
from reparam_zoo.data import DataError
from reparam_zoo.dense_examples import CATEGORY_IDS, make_detection_set
from reparam_zoo.train import resume, train
from reparam_zoo.train.tasks.detection import coco_metrics

FAST = dict(batch_size=2, workers=0, verbose=False, task="detection")


def tiny_detector(seed=0, masks=False, at=None):
    """A Faster (Mask) R-CNN small enough for tests: a 2-conv backbone, one feature map, 64 px images."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    backbone.out_channels = 16
    common = dict(min_size=64, max_size=64, rpn_anchor_generator=AnchorGenerator(((8, 16, 32),), ((0.5, 1.0, 2.0),)),
                  box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(16 * 49, 32),
                  box_predictor=FastRCNNPredictor(32, 4), rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
                  box_detections_per_img=20)
    if masks:
        model = MaskRCNN(backbone, mask_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), mask_head=MaskRCNNHeads(16, (16,), 1),
                         mask_predictor=MaskRCNNPredictor(16, 16, 4), **common)
    else:
        model = FasterRCNN(backbone, **common)
    if at is not None:  # Ctrl-C during the `at`-th training forward
        calls = [0]

        def hook(module, args):
            if module.training:
                calls[0] += 1
                if calls[0] == at:
                    os.kill(os.getpid(), signal.SIGINT)
        model.register_forward_pre_hook(hook)
    return model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("det"))
    make_detection_set(root, train=6, val=4, size=64, seed=1)
    return root


# -- the evaluator: perfect predictions, a hand-computed case, crowds --------------------------------------------

def _truth(boxes_by_image, crowd=()):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in boxes_by_image]
    anns, k = [], 1
    for image_id, boxes in boxes_by_image.items():
        for box in boxes:
            anns.append({"id": k, "image_id": image_id, "category_id": 7, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": 0})
            k += 1
    for image_id, box in crowd:
        anns.append({"id": k, "image_id": image_id, "category_id": 7, "bbox": box, "area": box[2] * box[3],
                     "iscrowd": 1})
        k += 1
    return {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "thing"}]}


def test_coco_map_of_perfect_predictions_is_one_and_a_crowd_region_is_ignored():
    gt = {1: [[10, 10, 40, 40]], 2: [[5, 5, 60, 30], [70, 70, 20, 20]]}
    truth = _truth(gt, crowd=[(1, [50, 50, 40, 40])])
    perfect = [{"image_id": i, "category_id": 7, "bbox": b, "score": 0.9} for i, boxes in gt.items() for b in boxes]
    # a detection inside the crowd region matches the crowd: neither a true nor a false positive
    inside_crowd = {"image_id": 1, "category_id": 7, "bbox": [52, 52, 30, 30], "score": 0.95}
    metrics = coco_metrics(truth, perfect + [inside_crowd], [1, 2], masks=False)
    for key in ("val_map", "val_map50", "val_map75"):
        assert metrics[key] == pytest.approx(1.0, abs=1e-12)
    assert metrics["val_images"] == 2
    assert coco_metrics(truth, [], [1, 2], masks=False)["val_map"] == 0.0


def test_coco_map_of_a_hand_computed_case():
    # two ground-truth boxes; the best-scored detection hits one exactly, the next one hits nothing:
    # precision 1 up to recall 0.5, recall never reaches 1, so 51 of COCO's 101 recall points have precision 1
    truth = _truth({1: [[10, 10, 20, 20], [60, 60, 20, 20]]})
    results = [{"image_id": 1, "category_id": 7, "bbox": [10, 10, 20, 20], "score": 0.9},
               {"image_id": 1, "category_id": 7, "bbox": [35, 60, 20, 20], "score": 0.8}]
    metrics = coco_metrics(truth, results, [1], masks=False)
    assert metrics["val_map"] == pytest.approx(51 / 101) and metrics["val_map50"] == pytest.approx(51 / 101)
    # 20x20 boxes are small (area < 32^2): no medium or large ground truth, which COCO reports as -1
    assert metrics["val_map_small"] == pytest.approx(51 / 101) and metrics["val_map_large"] == -1.0


# -- a run ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    model = tiny_detector()
    out = str(tmp_path_factory.mktemp("run") / "out")
    return model, train(model, data_dir, output_dir=out, epochs=2, lr=0.02, fuse=True, **FAST)


def _independent_map(model, data_dir):
    """COCOeval run directly on the annotation file with the model's detections on the val images."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    labels_to_ids = [None, *sorted(CATEGORY_IDS.values())]
    path = os.path.join(data_dir, "annotations", "instances_val.json")
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(path)
        results = []
        model.eval()
        for image in truth.dataset["images"]:
            x = torch.from_numpy(np.asarray(Image.open(os.path.join(data_dir, "val", image["file_name"])).convert("RGB"),
                                            dtype=np.float32) / 255).permute(2, 0, 1)
            with torch.no_grad():
                d = model([x])[0]
            for (x0, y0, x1, y1), s, label in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
                results.append({"image_id": image["id"], "category_id": labels_to_ids[label],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "score": s})
        if not results:
            return 0.0
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


def test_run_files_label_map_and_map_match_an_independent_evaluation(trained, data_dir):
    model, result = trained
    assert result.sanity["equal"] and result.sanity["exact"] and result.sanity["max_abs_logit_diff"] == 0.0
    assert result.classes == ["__background__", "circle", "square", "triangle"]
    assert {"best", "last", "deploy", "metrics", "plot", "state"} <= set(result.files)
    assert result.history[0]["val_map"] == pytest.approx(_independent_map(model, data_dir), abs=1e-12)
    assert result.final["val_map"] == pytest.approx(_independent_map(result.model.cpu(), data_dir), abs=1e-12)
    rows = [json.loads(line) for line in open(result.files["metrics"])]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all({"val_map", "val_map50", "val_map75", "val_map_small", "val_map_medium", "val_map_large"} <= set(r)
               for r in rows)
    assert all({"train_loss", "train_loss_classifier", "train_loss_objectness"} <= set(r) for r in rows[1:])
    assert result.best["epoch"] == max(rows, key=lambda r: (r["val_map"], r["val_map50"]))["epoch"]
    for key in ("best", "last", "deploy"):  # label -> COCO category id, for whoever deploys it
        _, meta = read_state_dict(result.files[key])
        assert json.loads(meta["extra"])["label_to_category_id"] == [None, 3, 7, 12]
    assert [n for n, p in result.model.named_parameters() if p.requires_grad] == [
        "backbone.0.transform_weight", "backbone.3.transform_weight", "rpn.head.conv.0.0.transform_weight"]
    assert json.load(open(result.files["config"]))["task"] == "detection"


def test_interrupted_mid_epoch_and_resumed_ends_bit_identical(data_dir, tmp_path):
    settings = dict(epochs=2, lr=0.02, **FAST)
    straight = train(tiny_detector(), data_dir, output_dir=str(tmp_path / "straight"), **settings)
    model = tiny_detector(at=3 + 2)  # 3 steps per epoch: Ctrl-C during step 2 of epoch 2
    stopped = train(model, data_dir, output_dir=str(tmp_path / "resumed"), **settings)
    assert stopped.interrupted
    state = torch.load(stopped.files["state"], weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2)
    resumed = resume(stopped.output_dir, model=tiny_detector(), verbose=False)
    a, _ = read_state_dict(straight.files["last"])
    b, _ = read_state_dict(resumed.files["last"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_time_s")} for r in rows]  # noqa
    assert strip(resumed.history) == strip(straight.history)


def test_mask_rcnn_reports_mask_map_beside_box_map(tmp_path):
    root = str(tmp_path / "data")
    make_detection_set(root, train=4, val=2, size=64, seed=3)
    result = train(tiny_detector(masks=True), root, output_dir=str(tmp_path / "out"), epochs=1, **FAST)
    assert result.sanity["equal"]
    assert {"val_mask_map", "val_mask_map50", "val_map"} <= set(result.final)
    assert "train_loss_mask" in result.final


# -- what real files contain ------------------------------------------------------------------------------------

def _edit(path, change):
    data = json.load(open(path))
    change(data)
    json.dump(data, open(path, "w"))


def test_real_world_files_degenerate_boxes_crowds_empty_images_grayscale_and_rgba(tmp_path):
    root = str(tmp_path / "data")
    files = make_detection_set(root, train=4, val=2, size=64, seed=4)

    def change(data):
        data["annotations"][0]["bbox"][2] = 0  # zero width
        data["annotations"][1]["iscrowd"] = 1
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 4]  # an image without boxes
    _edit(files["train"], change)
    Image.open(os.path.join(root, "train", "train_0001.jpg")).convert("L").save(os.path.join(root, "train", "train_0001.jpg"))
    rgba = Image.open(os.path.join(root, "train", "train_0002.jpg")).convert("RGBA")
    os.remove(os.path.join(root, "train", "train_0002.jpg"))
    rgba.save(os.path.join(root, "train", "train_0002.png"))
    _edit(files["train"], lambda d: d["images"][2].update(file_name="train_0002.png"))
    # a labelling tool's export: no area, no iscrowd (COCOeval reads both)
    _edit(files["val"], lambda d: [(a.pop("area"), a.pop("iscrowd")) for a in d["annotations"]])
    result = train(tiny_detector(), root, output_dir=str(tmp_path / "out"), epochs=1, **FAST)
    assert result.final["train_images"] == 4 and result.final["val_images"] == 2
    assert 0.0 <= result.final["val_map"] <= 1.0
    assert "instances_train.json: dropped 1 degenerate box(es)" in open(result.files["log"]).read()


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("categories"), r"instances_train.json: not a COCO annotation file \(no 'categories' list\)$"),
    (lambda d: d["annotations"][0].update(category_id=5),
     r"instances_train.json: annotation 1 has category_id 5, which is not in 'categories'$"),
    (lambda d: d["annotations"][0].update(image_id=99),
     r"instances_train.json: annotation 1 is of image_id 99, which is not in 'images'$"),
    (lambda d: d["images"][1].update(file_name="gone.jpg"),
     r"instances_train.json: 1 listed image\(s\) missing from .*/train \(e.g. gone.jpg\)$"),
    (lambda d: d["images"][0].update(file_name="../x.jpg"),
     r"instances_train.json: image 1 has file_name '../x.jpg', not a path inside the data folder$"),
])
def test_bad_coco_files_are_one_line_errors_naming_the_file_and_leave_nothing(tmp_path, change, message):
    root = str(tmp_path / "data")
    files = make_detection_set(root, train=2, val=2, size=64, seed=5)
    _edit(files["train"], change)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        train(tiny_detector(), root, output_dir=str(out), epochs=1, **FAST)
    assert not out.exists()


def test_a_json_that_is_not_coco_and_a_missing_split(tmp_path):
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r"no annotation file for the val split"):
        train(tiny_detector(), str(root), output_dir=str(tmp_path / "o"), epochs=1, **FAST)
    (root / "annotations" / "instances_val.json").write_text("{}")
    with pytest.raises(DataError, match=r"instances_train.json: not a COCO annotation file \(a JSON list"):
        train(tiny_detector(), str(root), output_dir=str(tmp_path / "o"), epochs=1, **FAST)


def test_roboflow_export_layout(tmp_path):
    src = str(tmp_path / "coco")
    files = make_detection_set(src, train=2, val=2, size=64, seed=6)
    root = tmp_path / "rf"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for name in os.listdir(os.path.join(src, split)):
            os.link(os.path.join(src, split, name), root / split / name)
        os.link(files[split], root / split / "_annotations.coco.json")
    result = train(tiny_detector(), str(root), output_dir=str(tmp_path / "out"), epochs=1, **FAST)
    assert result.final["val_images"] == 2


# -- command line ------------------------------------------------------------------------------------------------

def test_cli_infers_detection_from_a_torchvision_detector(data_dir, tmp_path):
    from reparam_cli.main import main

    out = str(tmp_path / "out")
    result = CliRunner().invoke(main, ["train", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "--data", data_dir,
                                       "--num-classes", "4", "--input-size", "64", "--epochs", "1",
                                       "--batch-size", "2", "--workers", "0", "-o", out])
    assert result.exit_code == 0, result.output
    assert "best: epoch " in result.output and "val mAP " in result.output
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["task"] == "detection"
    assert "-> identical" in open(os.path.join(out, "train.log")).read()
    # the model file rebuilds the detector at the size it trained at
    import reparam_zoo

    model = reparam_zoo.load(os.path.join(out, "last.safetensors"))
    assert model.transform.min_size == (64,) and model.transform.max_size == 64


DDP_SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from test_train_detection import tiny_detector
from reparam_zoo.train import train
torch.set_num_threads(1)
r = train(tiny_detector(), {data!r}, output_dir={out!r}, epochs=1, batch_size=2, workers=0, verbose=False,
          task="detection")
"""


def test_two_processes_gather_every_prediction_for_the_same_map_as_one(tmp_path):
    import socket
    import subprocess
    import sys

    root = str(tmp_path / "data")
    make_detection_set(root, train=8, val=5, size=64, seed=7)  # 5 val images: shards of 3 and 2
    single = train(tiny_detector(), root, output_dir=str(tmp_path / "one"), epochs=1, **FAST)
    script = tmp_path / "ddp.py"
    out = str(tmp_path / "two")
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), data=root, out=out))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert json.load(open(os.path.join(out, "config.json")))["world_size"] == 2
    # epoch 0 is the same input model: two ranks' gathered predictions score exactly what one process scores
    assert rows[0] == single.history[0]
    assert rows[0]["val_images"] == rows[1]["val_images"] == 5 and rows[1]["train_images"] == 8


def test_unreadable_images_are_skipped_counted_and_not_evaluated(tmp_path):
    root = str(tmp_path / "data")
    make_detection_set(root, train=4, val=3, size=64, seed=8)
    for split in ("train", "val"):
        with open(os.path.join(root, split, f"{split}_0001.jpg"), "wb") as f:
            f.write(b"not an image")
    result = train(tiny_detector(), root, output_dir=str(tmp_path / "out"), epochs=1, **FAST)
    assert result.unreadable_images == ["train_0001.jpg", "val_0001.jpg"]
    assert result.final["val_images"] == 2 and result.final["train_images"] == 4
