"""Semantic segmentation: images with index masks (`reparam_zoo.segmentation_data`), per-pixel cross-entropy
with an ignore index (plus 0.5 x the auxiliary head's, as torchvision's reference recipe), and the metrics
segmentation users read, from one confusion matrix summed over the ranks: mIoU (the mean over the classes
that occur in the labels or the predictions), per-class IoU and pixel accuracy. The best model has the
highest validation mIoU (then the lowest loss); the sanity check compares the logits.

Models: torchvision's segmenters (`torchvision:lraspp_mobilenet_v3_large`, `deeplabv3_*`, `fcn_*`: a dict
with "out" and maybe "aux") or any model returning (batch, classes, H, W) logits.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...segmentation_data import build_segmentation_data, check_segmentation_dir, segmentation_collate
from ..config import TrainError
from . import Evaluator, Task, TaskData
from .classification import output_on_zeros

__all__ = ["SegmentationTask", "confusion_matrix", "scores_of_confusion", "segmentation_logits"]

AUX_WEIGHT = 0.5  # torchvision's references/segmentation weight of the auxiliary loss


class SegmentationTask(Task):
    name = "segmentation"
    best_metric = "val_miou"
    plot_panels = (("loss", "cross-entropy loss (per pixel)", 1.0), ("miou", "mIoU (%)", 100.0),
                   ("pixel_acc", "pixel accuracy (%)", 100.0))

    def __init__(self):
        self.ignore_index = 255
        self.classes: List[str] = []

    def configure(self, config) -> None:
        self.ignore_index = config.ignore_index

    def check_data_dir(self, data_dir: str) -> None:
        check_segmentation_dir(data_dir)

    def sample_name(self, dataset, index: int) -> str:
        return dataset.filename(index)

    def build_data(self, data_dir: str, model: nn.Module, input_size: Any, *, resuming: bool) -> TaskData:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        if input_size is None and getattr(model, "pretrained_cfg", None) is None and not resuming:
            require_input_size(model, how="pass --input-size N / input_size=N", error=TrainError)
        size = int(input_size) if input_size is not None else int(cfg["input_size"][-1])
        data = build_segmentation_data(data_dir, size=size, mean=cfg["mean"], std=cfg["std"],
                                       ignore_index=self.ignore_index)
        self.classes = data.classes
        return TaskData(train=data.train, val=data.val, classes=data.classes, input_size=data.input_size,
                        digest=data.digest, collate=segmentation_collate,
                        describe={"ignore_index": self.ignore_index}, warnings=data.skipped)

    def fit_model(self, model: nn.Module, data: TaskData, num_classes: Any, data_dir: str) -> Tuple[set, List[str]]:
        classes = len(data.classes)
        outputs = _num_outputs(model, data.input_size)
        if num_classes is None:
            if outputs != classes:
                raise TrainError(f"the model predicts {outputs} classes but {data_dir} has {classes} (classes.txt); "
                                 f"pass --num-classes {classes} / num_classes={classes} to replace the head")
            return set(), []
        if num_classes != classes:
            raise TrainError(f"num-classes is {num_classes} but {data_dir} has {classes} classes (classes.txt)")
        if num_classes == outputs:
            return set(), []
        head, count = self.replace_head(model, num_classes)
        return head, [f"head replaced: {outputs} -> {num_classes} classes; the new head ({count:,} params) "
                      "trains too"]

    def to_device(self, inputs, targets, device, channels_last: bool):
        masks, errors = targets
        if errors:
            from ...data import DataError

            raise DataError(errors[0])
        return super().to_device(inputs, masks, device, channels_last)

    def training_step(self, model: nn.Module, inputs, targets, autocast):
        with autocast():
            outputs = model(inputs)
        logits = segmentation_logits(outputs, targets.shape[-2:]).float()
        loss = F.cross_entropy(logits, targets, ignore_index=self.ignore_index)
        if isinstance(outputs, dict) and outputs.get("aux") is not None:
            aux = segmentation_logits({"out": outputs["aux"]}, targets.shape[-2:]).float()
            loss = loss + AUX_WEIGHT * F.cross_entropy(aux, targets, ignore_index=self.ignore_index)
        valid = targets != self.ignore_index
        pixels = int(valid.sum())
        if pixels == 0:  # every pixel ignored: cross_entropy's mean is NaN, and nothing is learnt
            loss = logits.sum() * 0.0
        sums = {"loss": loss.item() * pixels, "pixels": pixels}
        confusion = confusion_matrix(logits.argmax(1).detach(), targets, len(self.classes), self.ignore_index)
        sums["correct"] = float(confusion.diagonal().sum())
        for i in range(len(self.classes)):  # what train mIoU needs, as sums the ranks add up
            sums[f"tp{i}"] = float(confusion[i, i])
            sums[f"true{i}"] = float(confusion[i].sum())
            sums[f"pred{i}"] = float(confusion[:, i].sum())
        return loss, sums

    def train_metrics(self, sums: Dict[str, float]) -> Dict[str, float]:
        pixels = max(sums.get("pixels", 0), 1)
        ious = [_iou(sums.get(f"tp{i}", 0), sums.get(f"true{i}", 0), sums.get(f"pred{i}", 0))
                for i in range(len(self.classes))]
        present = [v for v in ious if v is not None]
        return {"train_loss": sums.get("loss", 0.0) / pixels, "train_pixel_acc": sums.get("correct", 0) / pixels,
                "train_miou": sum(present) / len(present) if present else 0.0}

    def progress(self, sums: Dict[str, float]) -> Dict[str, str]:
        if not sums.get("pixels"):
            return {}
        return {"loss": f"{sums['loss'] / sums['pixels']:.4f}", "pix_acc": f"{100 * sums['correct'] / sums['pixels']:.1f}%"}

    def predict(self, model: nn.Module, inputs, autocast) -> torch.Tensor:
        with autocast():
            outputs = model(inputs)
        return segmentation_logits(outputs, inputs.shape[-2:]).float()

    def evaluator(self) -> Evaluator:
        return _ConfusionEvaluator(self.classes, self.ignore_index)

    def headline(self, metrics: Dict[str, float]) -> str:
        return f"val mIoU {100 * metrics['val_miou']:.2f}%"

    def describe(self, metrics: Dict[str, float], split: str, digits: int = 4) -> str:
        return (f"{split} loss {metrics[f'{split}_loss']:.{digits}f} mIoU {100 * metrics[f'{split}_miou']:.2f}% "
                f"pixel acc {100 * metrics[f'{split}_pixel_acc']:.2f}%")


class _ConfusionEvaluator(Evaluator):
    def __init__(self, classes: Sequence[str], ignore_index: int):
        self.classes, self.ignore_index = list(classes), ignore_index
        n = len(self.classes)
        self.confusion = torch.zeros(n, n, dtype=torch.float64)
        self.loss = 0.0
        self.images = 0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        valid = targets != self.ignore_index
        if valid.any():
            self.loss += F.cross_entropy(outputs, targets, ignore_index=self.ignore_index, reduction="sum").item()
        self.confusion += confusion_matrix(outputs.argmax(1), targets, len(self.classes), self.ignore_index).cpu()
        self.images += int(valid.flatten(1).any(1).sum())  # a blank (unreadable) image does not count

    def result(self, procs) -> Dict[str, Any]:
        n = len(self.classes)
        summed = procs.sum(self.confusion.flatten().tolist() + [self.loss, float(self.images)])
        confusion = torch.tensor(summed[: n * n], dtype=torch.float64).view(n, n)
        scores = scores_of_confusion(confusion)
        pixels = max(float(confusion.sum()), 1.0)
        return {"val_loss": summed[n * n] / pixels, "val_miou": scores["miou"], "val_pixel_acc": scores["pixel_acc"],
                "val_iou": dict(zip(self.classes, scores["iou"])), "val_images": int(summed[n * n + 1])}


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """counts[true, predicted] over the pixels whose target is not `ignore_index`."""
    valid = target != ignore_index
    index = target[valid].long() * num_classes + predicted[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes).double()


def scores_of_confusion(confusion: torch.Tensor) -> Dict[str, Any]:
    """Per-class IoU (None for a class neither labelled nor predicted), their mean, and pixel accuracy."""
    confusion = confusion.double()
    iou = [_iou(float(confusion[i, i]), float(confusion[i].sum()), float(confusion[:, i].sum()))
           for i in range(confusion.shape[0])]
    present = [v for v in iou if v is not None]
    total = float(confusion.sum())
    return {"iou": iou, "miou": sum(present) / len(present) if present else 0.0,
            "pixel_acc": float(confusion.diagonal().sum()) / total if total else 0.0}


def _iou(tp: float, true: float, pred: float) -> Optional[float]:
    union = true + pred - tp
    return tp / union if union > 0 else None


def segmentation_logits(outputs, size) -> torch.Tensor:
    """(batch, classes, H, W) logits at `size` from a model's output (torchvision's dict, or a tensor)."""
    if isinstance(outputs, dict):
        outputs = outputs.get("out")
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 4:
        raise TrainError("the model does not return (batch, classes, H, W) logits (or torchvision's {'out': ...}); "
                         "cannot train it for segmentation")
    if tuple(outputs.shape[-2:]) != tuple(size):
        outputs = F.interpolate(outputs, size=tuple(size), mode="bilinear", align_corners=False)
    return outputs


def _num_outputs(model: nn.Module, input_size: Tuple[int, int, int]) -> int:
    return segmentation_logits(output_on_zeros(model, input_size), input_size[1:]).shape[1]
