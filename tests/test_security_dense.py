"""Security of the detection and segmentation surfaces (issue 20): their data folders, annotation files, model-file
metadata and demo output folders are data. Every hostile input is built here on the fly; each test runs under an
alarm, so a regression to a hang (a FIFO read, a link loop walked forever) fails instead of blocking."""
import json
import os
import signal

import pytest
import torch
import torch.nn as nn
from PIL import Image

from reparam_zoo import coco_data
from reparam_zoo.coco_data import build_coco_data, read_coco
from reparam_zoo.data import DataError, ImageTooLargeError, build_datasets, open_image
from reparam_zoo.dense_examples import make_detection_set, make_segmentation_set
from reparam_zoo.errors import CheckpointError, ReparamError
from reparam_zoo.filemeta import check_extra
from reparam_zoo.segmentation_data import build_segmentation_data

ALARM_S = 60
SEG = dict(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), ignore_index=255)


@pytest.fixture(autouse=True)
def deadline():
    def expired(signum, frame):
        raise TimeoutError(f"test still running after {ALARM_S} s (a hang?)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(ALARM_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seg_dir(tmp_path, **kwargs):
    root = str(tmp_path / "seg")
    make_segmentation_set(root, train=kwargs.get("train", 4), val=kwargs.get("val", 2), size=32, seed=1)
    return root


def _det_dir(tmp_path):
    root = str(tmp_path / "det")
    make_detection_set(root, train=3, val=2, size=32, seed=1)
    return root


def _rewrite_json(path, change):
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f)


# -- segmentation folders: walked as image folders are --------------------------------------------------------------

def test_segmentation_walk_skips_link_loops_and_fifos_and_says_so(tmp_path):
    root = _seg_dir(tmp_path)
    images, masks = os.path.join(root, "train", "images"), os.path.join(root, "train", "masks")
    os.symlink(images, os.path.join(images, "loop"))  # a link back into the folder: a loop
    os.symlink(os.path.join(masks, "nested"), os.path.join(masks, "nested2"))
    os.makedirs(os.path.join(masks, "nested"))
    os.symlink(masks, os.path.join(masks, "nested", "back"))  # a loop two levels deep
    os.mkfifo(os.path.join(images, "zz_fifo.jpg"))  # a FIFO with its "mask": opening either would block
    os.mkfifo(os.path.join(masks, "zz_fifo.png"))
    data = build_segmentation_data(root, **SEG)
    assert len(data.train) == 4 and len(data.val) == 2
    assert all("zz_fifo" not in image and "loop" not in image for image, _ in data.train.pairs)
    text = "\n".join(data.skipped)
    assert f"{images}: skipped 1 link(s) to a folder already read" in text and "loop" in text
    assert f"{masks}: skipped 2 link(s) to a folder already read" in text  # nested/back and nested2 -> nested
    assert f"{images}: skipped 1 non-regular file(s) (FIFOs, sockets, devices are never read): zz_fifo.jpg" in text
    assert f"{masks}: skipped 1 non-regular file(s) (FIFOs, sockets, devices are never read): zz_fifo.png" in text
    image, mask, unreadable, error = data.train[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and error is None


def test_segmentation_training_prints_what_the_walk_skipped(tmp_path):
    from reparam_zoo.train import train

    root = _seg_dir(tmp_path)
    os.mkfifo(os.path.join(root, "val", "images", "fifo.png"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    train(model, root, output_dir=str(tmp_path / "run"), task="segmentation", epochs=1, batch_size=2, workers=0,
          verbose=False, input_size=32, fuse=False)
    log = open(tmp_path / "run" / "train.log").read()
    assert "skipped 1 non-regular file(s) (FIFOs, sockets, devices are never read): fifo.png" in log


def test_voc_split_list_and_class_names_that_are_fifos_do_not_block(tmp_path):
    root = tmp_path / "voc"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "classes.txt").write_text("background\nthing\n")
    os.mkfifo(root / "ImageSets" / "Segmentation" / "train.txt")
    with pytest.raises(DataError, match=r"train\.txt: unreadable split list \(.*not a regular file\)"):
        build_segmentation_data(str(root), **SEG)
    os.remove(root / "classes.txt")
    os.mkfifo(root / "classes.txt")
    with pytest.raises(DataError, match=r"classes\.txt: no class-names file"):
        build_segmentation_data(str(root), **SEG)


def test_a_mask_with_the_wrong_mode_is_a_one_line_error_naming_it(tmp_path):
    from reparam_zoo.train import train

    root = _seg_dir(tmp_path)
    masks = os.path.join(root, "train", "masks")
    name = sorted(os.listdir(masks))[0]
    Image.open(os.path.join(masks, name)).convert("RGB").save(os.path.join(masks, name))  # 3 channels
    data = build_segmentation_data(root, **SEG)
    index = [os.path.basename(m) for _, m in data.train.pairs].index(name)
    _, _, _, error = data.train[index]
    assert error == (f"{os.path.join(masks, name)}: a RGB image; masks are single-channel index PNGs (one class index "
                     "per pixel, e.g. palette PNGs)")
    torch.manual_seed(0)
    with pytest.raises(DataError) as info:
        train(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), root, output_dir=str(tmp_path / "run"),
              task="segmentation", epochs=1, batch_size=4, workers=0, verbose=False, input_size=32, fuse=False)
    assert str(info.value) == error


# -- decompression bombs: one line naming the file, in all three tasks ----------------------------------------------

def _png(path, size):
    Image.new("RGB", size, (10, 20, 30)).save(path)


@pytest.mark.parametrize("limit", [3000, 1000])  # 64x64 = 4096: PIL only warns over 3000, refuses over 2 x 1000
def test_open_image_refuses_more_pixels_than_pils_limit(tmp_path, monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    _png(tmp_path / "bomb.png", (64, 64))
    _png(tmp_path / "fine.png", (16, 16))
    with pytest.raises(ImageTooLargeError) as info:
        open_image(str(tmp_path / "bomb.png"))
    size = "64x64 = 4,096 pixels" if limit == 3000 else "4,096 pixels"
    assert str(info.value) == (f"{tmp_path / 'bomb.png'}: image of {size}, over PIL's limit of {limit:,} (a "
                               "decompression bomb?); raise PIL.Image.MAX_IMAGE_PIXELS in Python if it is genuine")
    assert open_image(str(tmp_path / "fine.png")).size == (16, 16)


def test_classification_bomb_is_an_error_not_a_skipped_image(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            os.makedirs(tmp_path / split / cls)
            _png(tmp_path / split / cls / "1.png", (32, 32))
    _png(tmp_path / "train" / "b" / "0.png", (64, 64))  # the first of its class: decoded by the readability check
    with pytest.raises(ImageTooLargeError, match=r"/train/b/0\.png: image of 64x64 = 4,096 pixels, over PIL's limit"):
        build_datasets(str(tmp_path), nn.Conv2d(3, 3, 1), input_size=32)


def test_segmentation_bomb_is_refused_from_its_header_before_training(tmp_path, monkeypatch):
    root = _seg_dir(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # the 32x32 images are fine; PIL refuses 64x64 itself
    images = os.path.join(root, "val", "images")
    name = sorted(os.listdir(images))[0]
    _png(os.path.join(images, name), (64, 64))
    with pytest.raises(ImageTooLargeError, match=rf"{name}: image of 4,096 pixels, over PIL's limit of 2,000"):
        build_segmentation_data(root, **SEG)


@pytest.mark.parametrize("workers", [0, 1])
def test_detection_bomb_is_a_one_line_error_naming_the_file_also_from_a_worker(tmp_path, monkeypatch, workers):
    root = _det_dir(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # PIL would only warn about 64x64
    data = build_coco_data(root, masks=False)
    name = data.train.filename(1)
    _png(os.path.join(data.train.folder, name), (64, 64))
    loader = torch.utils.data.DataLoader(data.train, batch_size=3, num_workers=workers,
                                         collate_fn=coco_data.detection_collate)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    assert str(info.value) == (f"{os.path.join(data.train.folder, name)}: image of 64x64 = 4,096 pixels, over PIL's "
                               "limit of 3,000 (a decompression bomb?); raise PIL.Image.MAX_IMAGE_PIXELS in Python if "
                               "it is genuine")


# -- COCO annotation files are data ----------------------------------------------------------------------------------

def test_coco_file_names_stay_in_the_image_folder(tmp_path):
    root = _det_dir(tmp_path)
    annotations = os.path.join(root, "annotations", "instances_train.json")
    original = open(annotations).read()
    secret = tmp_path / "secret.png"
    _png(secret, (32, 32))
    os.symlink(secret, os.path.join(root, "train", "link.png"))
    for name, message in (("../secret.png", "not a path inside the data folder"),
                          (str(secret), "not a path inside the data folder"),
                          ("a/../../secret.png", "not a path inside the data folder"),
                          ("link.png", "lead out of .*/train through a link \\(e\\.g\\. 'link\\.png'\\); not read")):
        with open(annotations, "w") as f:
            f.write(original)
        _rewrite_json(annotations, lambda d: d["images"].append({"id": 999, "file_name": name, "width": 32,
                                                                 "height": 32}))
        with pytest.raises(DataError, match=message):
            build_coco_data(root, masks=False)


def test_coco_annotation_file_that_is_a_fifo_does_not_block(tmp_path):
    root = _det_dir(tmp_path)
    os.mkfifo(os.path.join(root, "train", "pipe.png"))
    _rewrite_json(os.path.join(root, "annotations", "instances_train.json"),
                  lambda d: d["images"].append({"id": 999, "file_name": "pipe.png", "width": 32, "height": 32}))
    with pytest.raises(DataError, match=r"1 listed image\(s\) in .*/train are not regular files \(e\.g\. 'pipe\.png': "
                                        r"a folder, FIFO or device is never read\)"):
        build_coco_data(root, masks=False)
    root = _det_dir(tmp_path / "again")
    path = os.path.join(root, "annotations", "instances_val.json")
    os.remove(path)
    os.mkfifo(path)
    with pytest.raises(DataError, match=r"instances_val\.json: not a readable JSON file \(.*not a regular file\)"):
        build_coco_data(root, masks=False)


def test_coco_json_size_nesting_and_types_are_bounded(tmp_path, monkeypatch):
    root = _det_dir(tmp_path)
    path = os.path.join(root, "annotations", "instances_train.json")
    original = open(path).read()
    monkeypatch.setattr(coco_data, "MAX_JSON_BYTES", len(original) - 1)
    with pytest.raises(DataError, match=rf"instances_train\.json: larger than {len(original) - 1:,} bytes; not read"):
        read_coco(path)
    monkeypatch.setattr(coco_data, "MAX_JSON_BYTES", 2 << 30)
    deep = tmp_path / "deep.json"
    deep.write_text('{"images": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(DataError, match=r"deep\.json: not a readable JSON file \(nested too deeply\)$"):
        read_coco(str(deep))
    cases = [
        (lambda d: d["images"][0].update(id=[1]), r"images\[0\] has id \[1\], not an integer"),
        (lambda d: d["annotations"][0].update(category_id="1"), r"annotations\[0\] has category_id '1', not an integer"),
        (lambda d: d["categories"][0].update(name={"a": 1}), r"categories\[0\] has name \{'a': 1\}, not a string"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, True, 4]), r"has bbox \[1, 2, True, 4\], not \[x, y"),
        (lambda d: d["annotations"][0].update(segmentation=[["a"] * 6]), r"segmentation that is neither polygons"),
        (lambda d: d["annotations"][0].update(segmentation={"counts": "x"}), r"segmentation that is neither polygons"),
        (lambda d: d["annotations"][0].update(area=float("nan")), r"not a readable JSON file \(NaN is not JSON\)"),
        (lambda d: d["annotations"][0].update(area="big"), r"annotations\[0\] has area 'big', not a number >= 0"),
        (lambda d: d["annotations"][0].update(iscrowd=[1]), r"annotations\[0\] has iscrowd \[1\], not 0 or 1"),
        (lambda d: d["images"][0].update(height=10**9), r"images\[0\] has height 1000000000, not an integer in \[1, "),
        (lambda d: d["categories"].append(dict(d["categories"][0])), r"category ids appear twice"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), r"annotation ids appear twice"),
    ]
    for change, message in cases:
        with open(path, "w") as f:
            f.write(original)
        _rewrite_json(path, change)
        with pytest.raises(DataError, match=message):
            read_coco(path)


# -- model files of detection / segmentation runs: extra metadata checked field by field --------------------------

def test_dense_extra_metadata_is_checked_field_by_field():
    good = {"classes": ["__background__", "a", "b"], "label_to_category_id": [None, 3, 7],
            "train": {"epoch": 2, "step": 0, "global_step": 9, "val_loss": 0.5, "val_miou": 0.25, "val_images": 4,
                      "val_iou": {"a": 0.5, "b": None}, "val_map": -1.0}}
    check_extra(good, "f")
    cases = [
        ({"label_to_category_id": ["3"]}, r"\(extra label_to_category_id: not a list of COCO category ids"),
        ({"label_to_category_id": [None, -1]}, r"\(extra label_to_category_id: not a list"),
        ({"label_to_category_id": {"1": 3}}, r"\(extra label_to_category_id: not a list"),
        ({"classes": ["a", "b"], "label_to_category_id": [None, 1, 2]},
         r"\(extra label_to_category_id: 3 entries for 2 classes\)"),
        ({"train": {"epoch": -1}}, r"\(extra train 'epoch': -1 is not a non-negative integer count\)"),
        ({"train": {"val_images": 1.5}}, r"\(extra train 'val_images': 1\.5 is not a non-negative integer count\)"),
        ({"train": {"val_loss": "0.5"}}, r"\(extra train 'val_loss': '0\.5' is not a finite number or null\)"),
        ({"train": {"val_loss": [0.5]}}, r"\(extra train 'val_loss': \[0\.5\] is not a finite number or null\)"),
        ({"train": {"val_iou": {"a": "x"}}}, r"\(extra train 'val_iou': not an object of class name -> finite"),
        ({"train": {"val_iou": {"a": {"b": 1}}}}, r"\(extra train 'val_iou': not an object of class name"),
        ({"train": {f"m{i}": 0.0 for i in range(300)}}, r"\(extra train: not an object of at most 256 fields\)"),
    ]
    for extra, message in cases:
        with pytest.raises(CheckpointError, match=message):
            check_extra(extra, "f")


def test_a_detector_model_file_with_a_hostile_label_map_is_refused_on_load(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    import reparam_zoo
    from reparam_zoo import modelfile

    model = modelfile.create_model("test_resnet", num_classes=3)
    path = modelfile.save(model, tmp_path / "m.safetensors",
                          extra_metadata={"classes": ["bg", "a", "b"], "label_to_category_id": [None, 1, 2]})
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    assert reparam_zoo.load(path).reparam_extra["label_to_category_id"] == [None, 1, 2]
    meta["extra"] = json.dumps({"classes": ["bg", "a", "b"], "label_to_category_id": [None, "../../x", 2]})
    save_file(tensors, str(tmp_path / "h.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"h\.safetensors: malformed reparam metadata \(extra "
                                              r"label_to_category_id: not a list of COCO category ids"):
        reparam_zoo.load(tmp_path / "h.safetensors")


# -- the dense demos never write into a folder they did not make -----------------------------------------------------

@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_dense_demo_refuses_a_non_empty_or_file_output(tmp_path, task):
    from click.testing import CliRunner

    from reparam_zoo.demo_dense import run_dense_demo
    from reparam_cli.main import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("mine")
    with pytest.raises(ReparamError, match=rf"{out} exists and is not empty; pass another output folder"):
        run_dense_demo(task, str(out), verbose=False)
    assert os.listdir(out) == ["report.json"] and (out / "report.json").read_text() == "mine"
    result = CliRunner().invoke(main, ["demo", "--task", task, "-o", str(out), "--quiet"])
    assert result.exit_code == 1 and "exists and is not empty" in result.output
    assert os.listdir(out) == ["report.json"] and (out / "report.json").read_text() == "mine"
    file = tmp_path / "file"
    file.write_text("mine")
    with pytest.raises(ReparamError, match=rf"{file} exists and is not a folder"):
        run_dense_demo(task, str(file), verbose=False)
    assert file.read_text() == "mine"


# -- run folders of dense runs: resume reads JSON and weights_only tensors, nothing else ---------------------------

class Payload:
    """Unpickling it creates `marker`: proof that a file's pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_resuming_a_hostile_segmentation_run_folder_runs_nothing(tmp_path):
    from reparam_zoo.train import resume, train
    from reparam_zoo.train.config import TrainError

    root = _seg_dir(tmp_path)
    out = str(tmp_path / "run")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    train(model, root, output_dir=out, task="segmentation", epochs=1, batch_size=4, workers=0, verbose=False,
          input_size=32)
    marker = tmp_path / "payload-ran"
    state = os.path.join(out, "train_state.pt")
    good_state = open(state, "rb").read()
    torch.save({"version": 2, "epoch": 0, "step": 1, "global_step": Payload(marker)}, state)
    with pytest.raises(CheckpointError, match=r"train_state\.pt: unreadable training state"):
        resume(out, model=model, epochs=2, verbose=False)
    assert not marker.exists()
    with open(state, "wb") as f:
        f.write(good_state)
    config_path = os.path.join(out, "config.json")
    good_config = open(config_path).read()
    for change, message in ((dict(task="os:system"), r"unknown task 'os:system', expected one of classification, "),
                            (dict(ignore_index=-1), r"ignore.index must be an integer in \[0, 65535\], got -1"),
                            (dict(task=["segmentation"]), r"unknown task '\['segmentation'\]', expected one of")):
        _rewrite_json(config_path, lambda c: c.update(change))
        with pytest.raises((TrainError, ReparamError), match=message):
            resume(out, model=model, epochs=2, verbose=False)
        with open(config_path, "w") as f:
            f.write(good_config)
    os.remove(os.path.join(out, "last.safetensors"))
    os.mkfifo(os.path.join(out, "last.safetensors"))  # a FIFO where the weights were: never opened
    with pytest.raises(ReparamError):
        resume(out, model=model, epochs=2, verbose=False)
    assert not marker.exists()


def test_instance_masks_cannot_ask_for_more_than_their_image(tmp_path):
    root = _det_dir(tmp_path)
    path = os.path.join(root, "annotations", "instances_train.json")

    def hostile(data):  # on two images
        anns = data["annotations"]
        other = next(a for a in anns if a["image_id"] != anns[0]["image_id"])
        anns[0]["segmentation"] = {"size": [100_000, 100_000], "counts": "PPYo1"}  # 10 GB if decoded
        other["segmentation"] = {"size": [32, 32], "counts": [0, 5000]}  # more pixels than 32x32

    _rewrite_json(path, hostile)
    data = build_coco_data(root, masks=True)
    with open(path) as f:
        anns = json.load(f)["annotations"]
    first = anns[0]
    second = next(a for a in anns if a["image_id"] != first["image_id"])
    index_of = {img["id"]: i for i, img in enumerate(data.train.images)}
    with pytest.raises(DataError) as info:
        data.train[index_of[first["image_id"]]]
    assert str(info.value) == (f"{path}: annotation {first['id']} has an RLE of size [100000, 100000], but its image "
                               "is 32x32")
    with pytest.raises(DataError) as info:
        data.train[index_of[second["image_id"]]]
    assert str(info.value).startswith(f"{path}: annotation {second['id']} has an undecodable segmentation (")
