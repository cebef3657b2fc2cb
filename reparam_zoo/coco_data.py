"""COCO-format detection data (boxes, and instance masks for Mask R-CNN), read resumably and checked.

Layouts found in `DIR` (per split `train` / `val`):

    DIR/annotations/instances_<split>*.json   images in DIR/<name after "instances_">/, DIR/images/<...>/,
                                              DIR/images/ or DIR/ (COCO's own: instances_train2017.json and
                                              train2017/; labelling-tool exports: a file_name under images/)
    DIR/<split>/_annotations.coco.json        images beside it (Roboflow's export)

The first image of the file decides which folder is the image folder; every other image must be there.

Category ids need not be 1..N: they are mapped to contiguous labels in id order, label 0 is the background
(torchvision's detectors reserve it), and the map (`label_to_category_id`) goes into the model files.
Images without annotations are kept (they teach the background). `iscrowd` annotations are left out of the
training targets and given to the evaluator, as COCO does. Boxes with zero (or negative) width or height,
(under 1 pixel) are dropped and counted; boxes are clipped to the image. Grayscale, palette and RGBA images become RGB.

A file that is not COCO, an annotation of an image that is not listed or a category that is not in
`categories`, a listed image that is not in the image folder: errors naming the file, before any training.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .data import (UNREADABLE_ERRORS, DataError, ImageTooLargeError, load_or_substitute, open_image,
                   open_regular_file, seeded_rng)

__all__ = ["CocoSplit", "CocoData", "build_coco_data", "find_coco_split", "read_coco", "detection_collate",
           "BACKGROUND"]

BACKGROUND = "__background__"
MAX_JSON_BYTES = 2 << 30  # COCO's train2017 instances file is 0.45 GiB


def find_coco_split(data_dir: str, split: str) -> str:
    """The annotation file of `split` in one of the layouts above."""
    pattern = os.path.join(data_dir, "annotations", f"instances_{split}*.json")
    found = sorted(glob.glob(pattern))
    roboflow = os.path.join(data_dir, split, "_annotations.coco.json")
    if os.path.isfile(roboflow):
        found.append(roboflow)
    if len(found) != 1:
        what = "no annotation file" if not found else f"{len(found)} annotation files ({', '.join(found)})"
        raise DataError(f"{data_dir}: {what} for the {split} split (expected {data_dir}/annotations/"
                        f"instances_{split}.json, or {roboflow})")
    return found[0]


def read_coco(path: str) -> Dict[str, Any]:
    """The JSON of a COCO annotation file, its structure checked (one-line errors naming the file)."""
    try:
        with open_regular_file(path) as f:  # a FIFO must not block; a growing file is read only up to the bound
            text = f.read(MAX_JSON_BYTES + 1)
        if len(text) > MAX_JSON_BYTES:
            raise DataError(f"{path}: larger than {_size(MAX_JSON_BYTES)}; not read (an annotation file is data)")
        data = json.loads(text.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise DataError(f"{path}: not a readable JSON file (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a COCO annotation file (a JSON {type(data).__name__}, not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: not a COCO annotation file (no '{key}' list)")
    for kind, required in (("images", ("id", "file_name")), ("categories", ("id", "name")),
                           ("annotations", ("id", "image_id", "category_id", "bbox"))):
        for i, entry in enumerate(data[kind]):
            if not isinstance(entry, dict) or any(k not in entry for k in required):
                raise DataError(f"{path}: {kind}[{i}] is not a COCO {kind[:-1]} (needs {', '.join(required)})")
            for key in ("id", "image_id", "category_id"):  # COCO ids are integers (and must be hashable here)
                if key in required and not _is_int(entry[key]):
                    raise DataError(f"{path}: {kind}[{i}] has {key} {_short(entry[key])}, not an integer")
            if kind == "categories" and not isinstance(entry["name"], str):
                raise DataError(f"{path}: categories[{i}] has name {_short(entry['name'])}, not a string")
            for key, check, what in _OPTIONAL_FIELDS.get(kind, ()):  # what the evaluator reads
                if key in entry and not check(entry[key]):
                    raise DataError(f"{path}: {kind}[{i}] has {key} {_short(entry[key])}, not {what}")
            if kind == "annotations" and "segmentation" in entry and not _is_segmentation(entry["segmentation"]):
                raise DataError(f"{path}: annotation {entry['id']} has a segmentation that is neither polygons "
                                "(lists of numbers) nor an RLE ({'size': [h, w], 'counts': ...})")
    images = {img["id"]: img for img in data["images"]}
    if len(images) != len(data["images"]):
        raise DataError(f"{path}: image ids appear twice")
    categories = {c["id"] for c in data["categories"]}
    if len(categories) != len(data["categories"]):
        raise DataError(f"{path}: category ids appear twice")
    if len({a["id"] for a in data["annotations"]}) != len(data["annotations"]):
        raise DataError(f"{path}: annotation ids appear twice")
    for ann in data["annotations"]:
        if ann["image_id"] not in images:
            raise DataError(f"{path}: annotation {ann['id']} is of image_id {ann['image_id']}, which is not in 'images'")
        if ann["category_id"] not in categories:
            raise DataError(f"{path}: annotation {ann['id']} has category_id {ann['category_id']}, which is not in "
                            "'categories'")
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise DataError(f"{path}: annotation {ann['id']} has bbox {_short(box)}, not [x, y, width, height]")
    for img in data["images"]:
        name = img["file_name"]
        if not isinstance(name, str) or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            raise DataError(f"{path}: image {img['id']} has file_name {_short(name)}, not a path inside the data "
                            "folder")
    return data


MAX_IMAGE_SIDE = 1 << 16
_OPTIONAL_FIELDS = {
    "images": [(k, lambda v: _is_int(v) and 1 <= v <= MAX_IMAGE_SIDE, f"an integer in [1, {MAX_IMAGE_SIDE}]")
               for k in ("width", "height")],
    "annotations": [("area", lambda v: _is_number(v) and v >= 0, "a number >= 0"),
                    ("iscrowd", lambda v: v in (0, 1) and not isinstance(v, float), "0 or 1")],
}


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_segmentation(value: Any) -> bool:
    """Polygons `[[x, y, ...], ...]` or an RLE `{"size": [h, w], "counts": str or [int, ...]}` (or empty)."""
    if isinstance(value, list):
        return all(isinstance(p, list) and all(_is_number(v) for v in p) for p in value)
    if isinstance(value, dict):
        size, counts = value.get("size"), value.get("counts")
        return (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size)
                and (isinstance(counts, str) or (isinstance(counts, list) and all(_is_int(v) and v >= 0
                                                                                   for v in counts))))
    return False


def _short(value: Any, n: int = 80) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _size(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n:,} bytes"


def _inside(folder: str, name: str) -> bool:
    """Whether `folder/name`, links resolved, is still in `folder` (links resolved): a file_name is data, and
    a link in the image folder must not lead a listed image out of it."""
    root = os.path.realpath(folder)
    return os.path.commonpath([root, os.path.realpath(os.path.join(folder, name))]) == root


def _image_folder(data_dir: str, annotation_file: str, split: str, data: Dict[str, Any]) -> str:
    """Where the file's images are: the first candidate folder that holds its first image; every image must be
    there."""
    if not data["images"]:
        raise DataError(f"{annotation_file}: lists no images")
    stem = os.path.basename(annotation_file)
    named = stem[len("instances_"):-len(".json")] if stem.startswith("instances_") else split
    here = os.path.dirname(annotation_file)
    candidates = [os.path.join(data_dir, named), os.path.join(data_dir, "images", named),
                  os.path.join(data_dir, "images"), data_dir, here]
    first = data["images"][0]["file_name"]
    folder = next((c for c in candidates if os.path.isfile(os.path.join(c, first))), None)
    if folder is None:
        raise DataError(f"{annotation_file}: its image {first} is not in {', '.join(dict.fromkeys(candidates))}")
    outside = [img["file_name"] for img in data["images"] if not _inside(folder, img["file_name"])]
    if outside:
        raise DataError(f"{annotation_file}: {len(outside)} listed image(s) lead out of {folder} through a link "
                        f"(e.g. {_short(outside[0])}); not read")
    special = [img["file_name"] for img in data["images"] if os.path.exists(os.path.join(folder, img["file_name"]))
               and not os.path.isfile(os.path.join(folder, img["file_name"]))]
    if special:
        raise DataError(f"{annotation_file}: {len(special)} listed image(s) in {folder} are not regular files "
                        f"(e.g. {_short(special[0])}: a folder, FIFO or device is never read)")
    missing = [img["file_name"] for img in data["images"] if not os.path.isfile(os.path.join(folder, img["file_name"]))]
    if missing:
        raise DataError(f"{annotation_file}: {len(missing)} listed image(s) missing from {folder} "
                        f"(e.g. {missing[0]})")
    return folder


def _instance_mask(segmentation: Any, height: int, width: int) -> Optional[np.ndarray]:
    """A polygon list or an RLE (compressed or not) as an (H, W) uint8 mask; None for what is neither."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list) and segmentation:
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = segmentation
        if isinstance(rle["counts"], list):
            rle = mask_utils.frPyObjects(rle, height, width)
    else:
        return None
    import warnings

    with warnings.catch_warnings():  # pycocotools' own numpy-2 deprecation, nothing the user can act on
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


class CocoSplit(torch.utils.data.Dataset):
    """One split. Items are `(image, target, unreadable_indices)`, `target` a dict of `boxes` (XYXY, in pixels
    of the image as read), `labels`, `image_id` (the COCO id) and with `masks` the instance masks. Index with
    `(index, seed)` to augment with a fixed seed. An unreadable training image is replaced by the next readable
    one; an unreadable validation image gives a blank image whose target says `unreadable` (not evaluated)."""

    def __init__(self, annotation_file: str, folder: str, data: Dict[str, Any], label_of: Dict[int, int], transform,
                 *, masks: bool, substitute_unreadable: bool):
        self.annotation_file, self.folder, self.transform = annotation_file, folder, transform
        self.masks, self.substitute_unreadable = masks, substitute_unreadable
        self.images = sorted(data["images"], key=lambda img: img["id"])
        self.label_of = label_of
        by_image: Dict[Any, List[dict]] = {img["id"]: [] for img in self.images}
        self.degenerate = 0
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                continue  # not a training target; the evaluator reads it from the annotation file
            x, y, w, h = ann["bbox"]
            if w < 1 or h < 1:  # what SanitizeBoundingBoxes would drop anyway, counted here
                self.degenerate += 1
                continue
            by_image[ann["image_id"]].append(ann)
        self.annotations = by_image

    def __len__(self) -> int:
        return len(self.images)

    def filename(self, index: int) -> str:
        return self.images[index]["file_name"]

    def __getitem__(self, item):
        from torchvision import tv_tensors

        index, seed = item if isinstance(item, tuple) else (item, None)
        index, image, unreadable = load_or_substitute(self._load, index, len(self),
                                                      substitute=self.substitute_unreadable, folder=self.folder,
                                                      filename=self.filename)
        if image is None:
            return (torch.zeros(3, 32, 32), {"image_id": self.images[index]["id"], "unreadable": True,
                                              "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
                    unreadable)
        height, width = image.shape[-2:]
        anns = self.annotations[self.images[index]["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
        target: Dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
        }
        if self.masks:
            masks = [self._mask(a, height, width) for a in anns]
            empty = np.zeros((height, width), dtype=np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(np.stack([m if m is not None else empty for m in masks])
                                                               if masks else np.zeros((0, height, width), np.uint8)))
        sample = (tv_tensors.Image(image), target)
        # boxes leaving the image are clipped; boxes left without width or height are dropped (with their
        # labels and masks) by SanitizeBoundingBoxes at the end of the transform
        if seed is None:
            image, target = self.transform(*sample)
        else:
            with seeded_rng(seed):
                image, target = self.transform(*sample)
        out = {k: v.as_subclass(torch.Tensor) for k, v in target.items()}
        out["image_id"] = self.images[index]["id"]
        return image.as_subclass(torch.Tensor), out, unreadable

    def _mask(self, ann: Dict[str, Any], height: int, width: int) -> Optional[np.ndarray]:
        """The instance mask of `ann`; an RLE must be the size of its image (its `size` is what pycocotools
        would allocate) and decode (a DataError naming the annotation otherwise: raised in a loader worker, it
        reaches the training process as this one line)."""
        segmentation = ann.get("segmentation")
        if isinstance(segmentation, dict) and list(segmentation.get("size", [])) != [height, width]:
            raise DataError(f"{self.annotation_file}: annotation {ann['id']} has an RLE of size "
                            f"{_short(segmentation.get('size'))}, but its image is {height}x{width}")
        try:
            return _instance_mask(segmentation, height, width)
        except (ValueError, TypeError, OverflowError) as e:
            raise DataError(f"{self.annotation_file}: annotation {ann['id']} has an undecodable segmentation "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None

    def _load(self, index: int) -> Optional[torch.Tensor]:
        try:
            with open_image(os.path.join(self.folder, self.images[index]["file_name"])) as img:
                return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()
        except ImageTooLargeError:
            raise  # an error naming the file, not an unreadable image to skip
        except UNREADABLE_ERRORS:
            return None


@dataclass
class CocoData:
    train: CocoSplit
    val: CocoSplit
    classes: List[str]  # label order: the background first, then the categories in id order
    label_to_category_id: List[Optional[int]]
    val_coco: Dict[str, Any]  # the validation annotations, for the evaluator (iscrowd included)
    digest: str
    notes: List[str] = field(default_factory=list)


def build_coco_data(data_dir: str, *, masks: bool) -> CocoData:
    from torchvision.transforms import v2

    train_file, val_file = find_coco_split(data_dir, "train"), find_coco_split(data_dir, "val")
    train_json, val_json = read_coco(train_file), read_coco(val_file)
    categories = sorted(train_json["categories"], key=lambda c: c["id"])
    if [(c["id"], c["name"]) for c in categories] != sorted((c["id"], c["name"]) for c in val_json["categories"]):
        raise DataError(f"{val_file}: its categories differ from {train_file}'s")
    if not categories:
        raise DataError(f"{train_file}: no categories")
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    classes = [BACKGROUND] + [str(c["name"]) for c in categories]
    ids: List[Optional[int]] = [None] + [c["id"] for c in categories]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()]
    train_tf = v2.Compose([v2.RandomPhotometricDistort(p=0.5), v2.RandomHorizontalFlip(0.5), *tail])
    val_tf = v2.Compose([v2.ToDtype(torch.float32, scale=True)])
    splits, notes = {}, []
    h = hashlib.sha256()
    for split, path, data, transform in (("train", train_file, train_json, train_tf), ("val", val_file, val_json, val_tf)):
        folder = _image_folder(data_dir, path, split, data)
        splits[split] = CocoSplit(path, folder, data, label_of, transform, masks=masks,
                                  substitute_unreadable=split == "train")
        if splits[split].degenerate:
            notes.append(f"{path}: dropped {splits[split].degenerate} degenerate box(es) (width or height under 1 "
                         "pixel)")
        with open_regular_file(path) as f:
            h.update(f"{split}/{os.path.relpath(path, data_dir)}\n".encode() + hashlib.sha256(f.read()).digest())
    if masks:
        _check_masks(train_file, train_json)
    val_coco = {**val_json, "annotations": [a for a in val_json["annotations"] if a["bbox"][2] >= 1 and a["bbox"][3] >= 1]}
    return CocoData(train=splits["train"], val=splits["val"], classes=classes, label_to_category_id=ids,
                    val_coco=val_coco, digest=h.hexdigest(), notes=notes)


def _check_masks(path: str, data: Dict[str, Any]) -> None:
    without = [a["id"] for a in data["annotations"] if not a.get("iscrowd", 0) and not a.get("segmentation")]
    if without:
        raise DataError(f"{path}: {len(without)} annotation(s) without a 'segmentation' (e.g. id {without[0]}); "
                        "an instance-segmentation model trains on polygon or RLE masks")


def detection_collate(batch):
    """-> (list of images, list of targets, unreadable indices): images keep their own sizes (the detector
    resizes and batches them itself)."""
    return [b[0] for b in batch], [b[1] for b in batch], [i for b in batch for i in b[2]]
