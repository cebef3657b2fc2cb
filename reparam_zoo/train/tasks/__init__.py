"""Tasks: what a run learns from, and how it is scored. The loop, resume, DDP and the run folder are shared;
a task is one file here plus its entry in TASKS.

A task says
- what the data is: `build_data` returns the two splits (their loaders yield `(inputs, targets, unreadable)`
  batches; targets may be any structure `to_device` can move: a tensor of labels, a list of dicts of boxes
  or masks), the label names, the input size, and a digest of the file list (a resumed run must see the
  same files);
- how the model is fitted to the data before training (a classifier head of the right size) -> `fit_model`;
- what the training loss is -> `training_step` (the model is in train mode; a detector computes its own
  losses there from the targets, a classifier returns logits the task scores);
- what the metrics are -> `evaluator()` (per model, summed or gathered across ranks in `result`: mAP needs
  every prediction, accuracy only counts) and `train_metrics`; which one picks the best model -> `best_key`;
- what "the sanity check" compares -> `compare` (the converted model must score what the input model
  scores: the largest difference of the two models' outputs on the same validation batch).

Metric names follow one rule the loop and the plot rely on: a training metric `train_<name>`, the same on
the validation split `val_<name>`, `val_images` the number of validation samples that counted.
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

__all__ = ["Task", "TaskData", "Evaluator", "TASKS", "get_task", "infer_task"]

# name -> "module:class" (imported when a run uses it: this registry imports no torch)
TASKS = {"classification": "reparam_zoo.train.tasks.classification:ClassificationTask",
         "detection": "reparam_zoo.train.tasks.detection:DetectionTask",
         "segmentation": "reparam_zoo.train.tasks.segmentation:SegmentationTask"}


def get_task(name: str, config: Any = None) -> "Task":
    module, cls = TASKS[name].split(":")
    task = getattr(importlib.import_module(module), cls)()
    if config is not None:
        task.configure(config)
    return task


def infer_task(model: Any) -> str:
    """The task a model is made for: a torchvision detector (name `torchvision:<detector>` or a module) trains
    for detection, a torchvision segmenter for segmentation, anything else for classification."""
    from ...torchvision_models import split_name  # no torch at import

    name = split_name(model)
    if name is not None:
        from ...torchvision_models import kind_of

        return kind_of(name) or "classification"
    if isinstance(model, str):
        return "classification"
    from ...torchvision_models import is_detector, is_segmenter

    return "detection" if is_detector(model) else "segmentation" if is_segmenter(model) else "classification"


@dataclass
class TaskData:
    """The two splits of a data set, as a task prepared them."""

    train: Any  # a Dataset; items as the task's collate expects them
    val: Any
    classes: List[str]  # label names in output index order (recorded in every model file)
    input_size: Tuple[int, int, int]  # (C, H, W) the model sees
    digest: str  # identifies the files (their paths within the data folder), not where the folder lives
    collate: Callable  # list of dataset items -> (inputs, targets, unreadable indices)
    warnings: List[str] = field(default_factory=list)  # what was left out of the data, one line each
    describe: Dict[str, Any] = field(default_factory=dict)  # extra facts for the start line
    # extra metadata of every model file the run writes (a detector's label -> COCO category id map)
    metadata: Dict[str, Any] = field(default_factory=dict)


class Evaluator(abc.ABC):
    """Accumulates one model's validation outputs; `result` combines every rank's (a collective)."""

    @abc.abstractmethod
    def update(self, outputs: Any, targets: Any) -> None: ...

    @abc.abstractmethod
    def result(self, procs) -> Dict[str, float]:
        """`val_*` metrics over the whole split, the same on every rank; `val_images` among them."""


class Task(abc.ABC):
    name: str = ""
    # (metric, axis label, scale) per plot panel: train_<metric> and val_<metric> over the epochs
    plot_panels: Sequence[Tuple[str, str, float]] = ()
    # (label, display scale) of the first element of `best_key`: what `reparam ablate` compares arms by
    comparison_metric: Tuple[str, float] = ("validation metric", 1.0)
    # the `val_*` metric that picks the best model and that the sanity check compares
    best_metric: str = ""

    def configure(self, config) -> None:
        """Take the task's own settings from the run's TrainConfig (e.g. the ignore index)."""

    def check_data_dir(self, data_dir: str) -> None:
        """A quick look at the data folder's layout, before the model is loaded."""
        from ...data import check_data_dir

        check_data_dir(data_dir)

    def sample_name(self, dataset, index: int) -> str:
        """How warnings name sample `index` of a split (an unreadable file)."""
        return str(index)

    @abc.abstractmethod
    def build_data(self, data_dir: str, model, input_size: Any, *, resuming: bool) -> TaskData: ...

    @abc.abstractmethod
    def fit_model(self, model, data: TaskData, num_classes: Any, data_dir: str) -> Tuple[set, List[str]]:
        """Check (and, where `num_classes` says so, adapt) the model for the data. Returns the names of new
        parameters (they train too) and notes for the user."""

    def to_device(self, inputs, targets, device, channels_last: bool):
        import torch

        inputs = inputs.to(device, non_blocking=True)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, targets.to(device, non_blocking=True)

    @abc.abstractmethod
    def training_step(self, model, inputs, targets, autocast) -> Tuple[Any, Dict[str, float]]:
        """(the loss to backpropagate, this batch's contribution to the epoch's sums); `model` trains."""

    @abc.abstractmethod
    def train_metrics(self, sums: Dict[str, float]) -> Dict[str, float]:
        """`train_*` metrics from an epoch's sums (summed over ranks)."""

    def progress(self, sums: Dict[str, float]) -> Dict[str, str]:
        """What the progress bar shows during an epoch."""
        return {}

    @abc.abstractmethod
    def predict(self, model, inputs, autocast):
        """The model's outputs on a validation batch (eval mode, no grad), in float32."""

    @abc.abstractmethod
    def evaluator(self) -> Evaluator: ...

    def compare(self, reference_outputs, outputs) -> Tuple[float, float]:
        """(largest difference between two models' outputs on a batch, largest magnitude of the first); here for
        outputs that are one tensor per batch (logits)."""
        return (reference_outputs - outputs).abs().max().item(), reference_outputs.abs().max().item()

    def sanity_equal(self, before: Dict[str, float], after: Dict[str, float], diff: float, scale: float,
                     exact: bool) -> bool:
        """Whether the converted model scores what the reference scores (`exact`: bit for bit)."""
        if exact:
            return before == after and diff == 0.0
        # `fold` computes kernels in float64, so trained transforms agree closely, not bit for bit
        return before[self.best_metric] == after[self.best_metric] and diff <= 1e-4 * max(1.0, scale)

    def best_key(self, metrics: Dict[str, float]) -> Tuple:
        """Larger is better: the best model is the epoch with the largest key (here: `best_metric`, then the
        lower validation loss)."""
        return metrics[self.best_metric], -metrics["val_loss"]

    @staticmethod
    def replace_head(model, num_classes: int) -> Tuple[set, int]:
        """Give `model` a new head for `num_classes`: the names of its new parameters (they train too) and
        how many numbers they hold."""
        from ...architectures import set_num_classes

        before = {id(p) for p in model.parameters()}
        set_num_classes(model, num_classes)
        head = {n: p for n, p in model.named_parameters() if id(p) not in before}
        return set(head), sum(p.numel() for p in head.values())

    def headline(self, metrics: Dict[str, float]) -> str:
        """The metric that picks the best model, for the run's last line (e.g. "val acc 87.50%")."""
        return self.describe(metrics, "val")

    @abc.abstractmethod
    def describe(self, metrics: Dict[str, float], split: str, digits: int = 4) -> str:
        """`metrics` of `split` ("train" / "val") in a log line, e.g. "val loss 0.41 acc 87.5%"."""
