"""Object detection and instance segmentation with torchvision's detectors (Faster/Mask R-CNN, RetinaNet,
FCOS, SSD) on COCO-format data (`reparam_zoo.coco_data`).

The loss is the detector's own: in train mode `model(images, targets)` returns its losses, summed here. The
metrics are COCO's, computed by the reference evaluator (pycocotools' COCOeval) on the predictions of every
rank gathered: mAP@[.5:.95] (`val_map`), @.5, @.75 and per object size, and for a model with a mask head the
same for masks (`val_mask_map`, ...). Images are evaluated at their own size (the detector maps its boxes
back). The best model has the highest box mAP. The sanity check compares the detections (boxes, scores,
labels) of the two models on the same images: identical for a zero-init conversion.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...coco_data import build_coco_data, detection_collate, find_coco_split
from ...data import DataError
from ..config import TrainError
from . import Evaluator, Task, TaskData

__all__ = ["DetectionTask", "coco_metrics", "STAT_NAMES"]

# COCOeval.stats[0:6]
STAT_NAMES = ("map", "map50", "map75", "map_small", "map_medium", "map_large")


def _has_masks(model: nn.Module) -> bool:
    return getattr(getattr(model, "roi_heads", None), "mask_predictor", None) is not None


class DetectionTask(Task):
    name = "detection"
    best_metric = "val_map"
    plot_panels = (("loss", "training loss (the detector's own)", 1.0), ("map", "mAP@[.5:.95] (%)", 100.0),
                   ("map50", "mAP@.5 (%)", 100.0))

    def __init__(self):
        self.val_coco: Dict[str, Any] = {}
        self.category_ids: List[Optional[int]] = []
        self.masks = False

    def check_data_dir(self, data_dir: str) -> None:
        import os

        if not os.path.isdir(data_dir):
            what = "is a file" if os.path.exists(data_dir) else "no such data folder"
            raise DataError(f"{data_dir}: {what} (expected COCO data: {data_dir}/annotations/instances_train.json, "
                            "instances_val.json and their images)")
        for split in ("train", "val"):
            find_coco_split(data_dir, split)

    def sample_name(self, dataset, index: int) -> str:
        return dataset.filename(index)

    def build_data(self, data_dir: str, model: nn.Module, input_size: Any, *, resuming: bool) -> TaskData:
        from ...torchvision_models import is_detector

        if not is_detector(model):
            raise TrainError(f"{type(model).__name__} is not a torchvision detector (Faster/Mask R-CNN, RetinaNet, "
                             "FCOS, SSD); detection trains those")
        size = _set_image_size(model, input_size)
        self.masks = _has_masks(model)
        data = build_coco_data(data_dir, masks=self.masks)
        self.val_coco, self.category_ids = data.val_coco, data.label_to_category_id
        return TaskData(train=data.train, val=data.val, classes=data.classes, input_size=(3, size, size),
                        digest=data.digest, collate=detection_collate,
                        describe={"notes": data.notes},
                        metadata={"label_to_category_id": data.label_to_category_id})

    def fit_model(self, model: nn.Module, data: TaskData, num_classes: Any, data_dir: str) -> Tuple[set, List[str]]:
        from ...torchvision_models import class_count_of

        notes = list(data.describe.get("notes", []))
        classes = len(data.classes)  # the background counts, as in torchvision's num_classes
        outputs = class_count_of(model)
        if num_classes is None:
            if outputs != classes:
                raise TrainError(f"the detector has {outputs} classes but {data_dir} has {classes - 1} categories + the "
                                 f"background; pass --num-classes {classes} / num_classes={classes} to replace its "
                                 "class heads")
            return set(), notes
        if num_classes != classes:
            raise TrainError(f"num-classes is {num_classes} but {data_dir} has {classes - 1} categories + the "
                             f"background = {classes}")
        if num_classes == outputs:
            return set(), notes
        head, count = self.replace_head(model, num_classes)
        return head, notes + [f"class heads replaced: {outputs} -> {num_classes} classes (background included); "
                              f"the new heads ({count:,} params) train too"]

    def to_device(self, inputs, targets, device, channels_last: bool):
        images = [image.to(device, non_blocking=True) for image in inputs]
        moved = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                 for t in targets]
        return images, moved

    def training_step(self, model: nn.Module, inputs, targets, autocast):
        targets = [{k: v for k, v in t.items() if k in ("boxes", "labels", "masks")} for t in targets]
        with autocast():
            losses = model(inputs, targets)
        losses = {k: v.float() for k, v in losses.items()}
        loss = sum(losses.values())
        n = len(inputs)
        sums = {"loss": loss.item() * n, "images": n}
        sums.update({f"part_{k}": v.item() * n for k, v in losses.items()})
        return loss, sums

    def train_metrics(self, sums: Dict[str, float]) -> Dict[str, float]:
        n = max(sums.get("images", 0), 1)
        out = {"train_loss": sums.get("loss", 0.0) / n, "train_images": int(sums.get("images", 0))}
        out.update({f"train_{k[5:]}": v / n for k, v in sums.items() if k.startswith("part_")})
        return out

    def progress(self, sums: Dict[str, float]) -> Dict[str, str]:
        return {"loss": f"{sums['loss'] / sums['images']:.4f}"} if sums.get("images") else {}

    def predict(self, model: nn.Module, inputs, autocast):
        with autocast():
            detections = model(inputs)
        return [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in d.items()} for d in detections]

    def evaluator(self) -> Evaluator:
        return _CocoEvaluator(self.val_coco, self.category_ids, self.masks)

    def compare(self, reference_outputs, outputs) -> Tuple[float, float]:
        diff, scale = 0.0, 0.0
        for a, b in zip(reference_outputs, outputs):
            for key in ("boxes", "scores"):
                scale = max(scale, a[key].abs().max().item() if a[key].numel() else 0.0)
                if a[key].shape != b[key].shape or not torch.equal(a["labels"], b["labels"]):
                    diff = math.inf  # other detections survived the thresholds and NMS
                elif a[key].numel():
                    diff = max(diff, (a[key] - b[key]).abs().max().item())
        return diff, scale

    def best_key(self, metrics: Dict[str, float]) -> Tuple:
        return metrics["val_map"], metrics["val_map50"]

    def headline(self, metrics: Dict[str, float]) -> str:
        return f"val mAP {100 * metrics['val_map']:.2f}%"

    def describe(self, metrics: Dict[str, float], split: str, digits: int = 4) -> str:
        if split == "train":
            return f"train loss {metrics['train_loss']:.{digits}f}"
        text = f"val mAP {100 * metrics['val_map']:.2f}% mAP50 {100 * metrics['val_map50']:.2f}%"
        if "val_mask_map" in metrics:
            text += f" mask mAP {100 * metrics['val_mask_map']:.2f}%"
        return text


class _CocoEvaluator(Evaluator):
    def __init__(self, coco: Dict[str, Any], category_ids: Sequence[Optional[int]], masks: bool):
        self.coco, self.category_ids, self.masks = coco, list(category_ids), masks
        self.results: List[Dict[str, Any]] = []
        self.image_ids: List[Any] = []

    def update(self, outputs, targets) -> None:
        for detections, target in zip(outputs, targets):
            if target.get("unreadable"):
                continue  # not evaluated (counted as unreadable)
            self.image_ids.append(target["image_id"])
            self.results += detections_to_coco(detections, target["image_id"], self.category_ids, self.masks)

    def result(self, procs) -> Dict[str, float]:
        gathered = procs.all_gather((self.image_ids, self.results))  # every rank's predictions
        image_ids = sorted({i for ids, _ in gathered for i in ids}, key=str)
        results = [r for _, part in gathered for r in part]
        # one evaluation, on rank 0, shared: COCOeval is deterministic, but there is no need to run it N times
        return procs.on_main(lambda: coco_metrics(self.coco, results, image_ids, self.masks))


def detections_to_coco(detections: Dict[str, torch.Tensor], image_id: Any, category_ids: Sequence[Optional[int]],
                       masks: bool) -> List[Dict[str, Any]]:
    """A detector's output for one image as COCO results (XYWH boxes, the category ids of the file, RLE masks)."""
    boxes = detections["boxes"].double()
    boxes[:, 2:] -= boxes[:, :2]
    out = []
    rles = None
    if masks and "masks" in detections:
        from pycocotools import mask as mask_utils
        import numpy as np

        binary = (detections["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
        rles = [mask_utils.encode(np.asfortranarray(m)) for m in binary]
    for i, (box, score, label) in enumerate(zip(boxes.tolist(), detections["scores"].tolist(),
                                                detections["labels"].tolist())):
        if not 0 < label < len(category_ids):
            continue  # the background, or a class the data does not have
        entry = {"image_id": image_id, "category_id": category_ids[label], "bbox": box, "score": score}
        if rles is not None:
            entry["segmentation"] = rles[i]
        out.append(entry)
    return out


def coco_metrics(coco: Dict[str, Any], results: List[Dict[str, Any]], image_ids: Sequence[Any],
                 masks: bool) -> Dict[str, float]:
    """COCOeval's stats of `results` on the images `image_ids` of the ground truth `coco` (a COCO dict):
    `val_map`, `val_map50`, ... (and `val_mask_*`); a metric COCO cannot compute (no ground truth of that size)
    is -1, as COCOeval reports it; no detections at all score 0."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    metrics: Dict[str, float] = {"val_images": len(image_ids)}
    kinds = [("bbox", "val_")] + ([("segm", "val_mask_")] if masks else [])
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # COCO prints its progress and tables
        truth = COCO()
        # labelling tools leave out what COCOeval reads: the area (for the size ranges) and iscrowd
        truth.dataset = {**coco, "annotations": [{**a, "area": a.get("area", a["bbox"][2] * a["bbox"][3]),
                                                  "iscrowd": a.get("iscrowd", 0)} for a in coco["annotations"]]}
        truth.createIndex()
        for iou_type, prefix in kinds:
            if not results or not image_ids:
                metrics.update({prefix + name: 0.0 for name in STAT_NAMES})
                continue
            if iou_type == "segm":
                with_masks = [r for r in results if "segmentation" in r]
                if not with_masks:
                    metrics.update({prefix + name: 0.0 for name in STAT_NAMES})
                    continue
                predictions = truth.loadRes([dict(r) for r in with_masks])
            else:
                predictions = truth.loadRes([{k: v for k, v in r.items() if k != "segmentation"} for r in results])
            evaluation = COCOeval(truth, predictions, iou_type)
            evaluation.params.imgIds = list(image_ids)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
            metrics.update({prefix + name: float(v) for name, v in zip(STAT_NAMES, evaluation.stats[:6])})
    return metrics


def _set_image_size(model: nn.Module, input_size: Optional[int]) -> int:
    """The square size the detector resizes images to (its transform's min_size); `input_size` sets min_size and
    max_size (kept in the architecture tag, so that the model files rebuild it)."""
    transform = model.transform
    fixed = getattr(transform, "fixed_size", None)
    if input_size is None:
        return int(fixed[0]) if fixed else int(transform.min_size[-1])
    size = int(input_size)
    if fixed:
        if tuple(fixed) != (size, size):
            raise TrainError(f"{type(model).__name__} resizes every image to {fixed[0]}x{fixed[1]} (its builder "
                             "fixes the size); leave out --input-size / input_size=")
        return size
    transform.min_size, transform.max_size = (size,), size
    from ...module_attrs import architecture_of, set_architecture

    arch = architecture_of(model)
    if arch is not None and arch.get("source") == "torchvision":
        set_architecture(model, {**arch, "kwargs": {**arch.get("kwargs", {}), "min_size": size, "max_size": size}})
    return size
