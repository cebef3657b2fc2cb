"""Image classification: image folders (`reparam_zoo.data`), cross-entropy, top-1 accuracy; the best model
has the highest validation accuracy (then the lowest loss); the sanity check compares logits."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from ...data import IGNORE_TARGET, build_datasets, collate, image_list_digest
from ...errors import first_line
from ...model_info import kept_modes, require_input_size
from ..config import TrainError
from . import Evaluator, Task, TaskData

__all__ = ["ClassificationTask", "num_outputs", "logits_of", "output_on_zeros"]


class ClassificationTask(Task):
    name = "classification"
    best_metric = "val_acc"
    plot_panels = (("loss", "cross-entropy loss", 1.0), ("acc", "top-1 accuracy (%)", 100.0))
    comparison_metric = ("top-1 %", 100.0)

    def build_data(self, data_dir: str, model: nn.Module, input_size: Any, *, resuming: bool) -> TaskData:
        if input_size is None and not resuming:  # (a resumed run goes on as it started)
            require_input_size(model, how="pass --input-size N / input_size=N", error=TrainError)
        splits = build_datasets(data_dir, model, input_size)
        return TaskData(train=splits.train, val=splits.val, classes=splits.classes,
                        input_size=tuple(splits.data_config["input_size"]), digest=image_list_digest(splits),
                        collate=collate, warnings=splits.skipped)

    def sample_name(self, dataset, index: int) -> str:
        return os.path.join(os.path.basename(dataset.reader.root), dataset.filename(index))

    def fit_model(self, model: nn.Module, data: TaskData, num_classes: Any, data_dir: str) -> Tuple[set, List[str]]:
        """Check the head against the data's classes; replace it when `num_classes` says so."""
        classes = len(data.classes)
        outputs = num_outputs(model, data.input_size)
        if num_classes is None:
            if outputs != classes:
                raise TrainError(
                    f"the model has {outputs} outputs but {data_dir} has {classes} classes; "
                    f"pass --num-classes {classes} / num_classes={classes} to replace the head"
                )
            return set(), []
        if num_classes != classes:
            raise TrainError(f"num-classes is {num_classes} but {data_dir} has {classes} classes")
        if num_classes == outputs:
            return set(), []
        head, count = self.replace_head(model, num_classes)
        return head, [f"head replaced: {outputs} -> {num_classes} classes; the new head ({count:,} params) "
                      "trains too"]

    def training_step(self, model: nn.Module, inputs, targets, autocast) -> Tuple[torch.Tensor, Dict[str, float]]:
        with autocast():
            logits = logits_of(model(inputs))
            loss = nn.functional.cross_entropy(logits.float(), targets)
        n = targets.numel()
        return loss, {"loss": loss.item() * n, "correct": (logits.argmax(1) == targets).sum().item(), "images": n}

    def train_metrics(self, sums: Dict[str, float]) -> Dict[str, float]:
        count = sums["images"]
        return {"train_loss": sums["loss"] / count, "train_acc": sums["correct"] / count, "train_images": int(count)}

    def progress(self, sums: Dict[str, float]) -> Dict[str, str]:
        if not sums.get("images"):
            return {}
        return {"loss": f"{sums['loss'] / sums['images']:.4f}", "acc": f"{100 * sums['correct'] / sums['images']:.1f}%"}

    def predict(self, model: nn.Module, inputs, autocast) -> torch.Tensor:
        with autocast():
            out = logits_of(model(inputs))
        return out.float()

    def evaluator(self) -> Evaluator:
        return _AccuracyEvaluator()

    def headline(self, metrics: Dict[str, float]) -> str:
        return f"val acc {100 * metrics['val_acc']:.2f}%"

    def describe(self, metrics: Dict[str, float], split: str, digits: int = 4) -> str:
        return f"{split} loss {metrics[f'{split}_loss']:.{digits}f} acc {100 * metrics[f'{split}_acc']:.2f}%"


class _AccuracyEvaluator(Evaluator):
    def __init__(self):
        self.loss = self.correct = self.count = 0.0

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        valid = targets != IGNORE_TARGET  # an unreadable validation image does not count
        self.loss += nn.functional.cross_entropy(outputs, targets, reduction="sum", ignore_index=IGNORE_TARGET).item()
        self.correct += (outputs.argmax(1)[valid] == targets[valid]).sum().item()
        self.count += valid.sum().item()

    def result(self, procs) -> Dict[str, float]:
        loss, correct, count = procs.sum([self.loss, self.correct, self.count])
        return {"val_loss": loss / max(count, 1), "val_acc": correct / max(count, 1), "val_images": int(count)}


def logits_of(outputs) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2:
        what = type(outputs).__name__ if not isinstance(outputs, torch.Tensor) else f"a {outputs.dim()}-d tensor"
        raise TrainError(f"the model returns {what}, not (batch, classes) logits; cannot train it")
    return outputs


def num_outputs(model: nn.Module, input_size: Tuple[int, ...]) -> int:
    """How many classes `model` predicts."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for attr in ("out_features", "out_channels"):
        if isinstance(getattr(head, attr, None), int):
            return getattr(head, attr)
    out = output_on_zeros(model, input_size)  # no timm interface: ask the model itself
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise TrainError(f"{type(model).__name__} does not output (batch, classes) logits; cannot train it")
    return out.shape[1]


def output_on_zeros(model: nn.Module, input_size: Tuple[int, ...]) -> Any:
    """What `model` returns in eval mode for one all-zero input (its modes are restored); a model that fails on
    the input size is a one-line TrainError."""
    try:
        with kept_modes(model, train=False), torch.no_grad():
            return model(torch.zeros(1, *input_size))
    except Exception as e:
        raise TrainError(f"{type(model).__name__} fails on a {'x'.join(map(str, input_size))} input "
                         f"({first_line(e)}); check --input-size / input_size=") from None
