"""The built-in example: a generated image-folder data set and a briefly pretrained small model, so the
whole job (convert -> refocus-train -> fuse -> report) runs offline in a few minutes, beside the baseline a
user would otherwise run: fine-tuning the same model for the same epochs."""
from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .errors import ReparamError

PATTERNS = ("horizontal", "vertical", "checker", "dots")
DEMO_MODEL = "mobilenetv3_small_050"
DEMO_INPUT_SIZE = 32
PRETRAIN_LR = 0.01
# Not tuned (`reparam ablate --lr-grid` chooses rates on the user's data): transforms on a depthwise-heavy
# model want a low rate; fine-tuning every weight the usual tenth of the pretraining rate.
REFOCUS_LR, FINETUNE_LR = 5e-4, PRETRAIN_LR / 10


@dataclass
class DemoResult:
    output_dir: str
    files: Dict[str, str]
    pretrained_val_acc: float
    refocused_val_acc: float
    finetuned_val_acc: float
    comparison: object  # reparam_zoo.report.Comparison: training (RefConv) vs inference (fused)
    seconds: float
    history: list = field(default_factory=list)  # the refocus run's
    finetune_history: list = field(default_factory=list)
    verdict: str = ""  # the last line: what was measured, and nothing more


def run_demo(
    output_dir: str = "reparam-demo",
    *,
    model_name: str = DEMO_MODEL,
    input_size: int = DEMO_INPUT_SIZE,
    pretrain_epochs: int = 6,
    refocus_epochs: int = 4,
    images_per_class: int = 64,
    seed: int = 0,
    verbose: bool = True,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """The main job end to end on the built-in example, everything written under `output_dir`:

    data/ (generated textures), pretrained.safetensors (a briefly pretrained plain model; it records its
    pretraining rate for `reparam ablate`'s continue arm), refocus/ (the RefConv training run: log, metrics,
    plot, last/best RefConv models, the verified deploy model), finetune/ (the baseline: every weight of the
    plain model trained for the same epochs, with the same data order, augmentation and schedule),
    report.json (training vs inference).
    """
    from .architectures import create_model
    from .modelfile import save
    from .report import compare, report
    from .train import train

    start = time.perf_counter()
    with new_output_folder(output_dir):
        data_dir = make_pattern_dataset(os.path.join(output_dir, "data"), train_per_class=images_per_class,
                                        val_per_class=max(2, images_per_class // 4), seed=seed)
        echo(f"[1/5] generated a {len(PATTERNS)}-class texture data set in {data_dir}")

        torch.manual_seed(seed)
        model = create_model(model_name, num_classes=len(PATTERNS))
        pretrained_acc = pretrain(model, data_dir, epochs=pretrain_epochs, input_size=input_size, seed=seed,
                                  lr=PRETRAIN_LR, verbose=verbose)
        pretrained_path = os.path.join(output_dir, "pretrained.safetensors")
        save(model, pretrained_path, extra_metadata={"pretraining": {"lr": PRETRAIN_LR, "epochs": pretrain_epochs}})
        echo(f"[2/5] pretrained {model_name} for {pretrain_epochs} epochs: val acc {100 * pretrained_acc:.1f}% "
             f"-> {pretrained_path}")

        common = dict(epochs=refocus_epochs, batch_size=32, warmup_epochs=min(1, refocus_epochs - 1),
                      input_size=input_size, workers=0, seed=seed, fuse=True, verbose=verbose)
        echo(f"[3/5] RefConv: converting every spatial conv and training only the transforms (lr {REFOCUS_LR:g})")
        refocused = train(pretrained_path, data_dir, output_dir=os.path.join(output_dir, "refocus"), lr=REFOCUS_LR,
                          **common)
        echo(f"[4/5] baseline: fine-tuning every weight of the pretrained model for the same {refocus_epochs} epochs "
             f"(lr {FINETUNE_LR:g}, same data order, augmentation and schedule)")
        finetuned = train(pretrained_path, data_dir, output_dir=os.path.join(output_dir, "finetune"), lr=FINETUNE_LR,
                          train_scope="all", **common)
        from .modelfile import load

        deployed = load(refocused.files["deploy"])
        size = (3, input_size, input_size)
        comparison = compare(refocused.model, deployed, size, names=("training (RefConv)", "inference (fused)"))
        report_path = os.path.join(output_dir, "report.json")
        from .fileio import atomic_write_file

        text = comparison.render("json") + "\n"
        atomic_write_file(report_path, lambda f: f.write(text.encode()))
        baseline_cost = report(load(finetuned.files["deploy"]), size, depth=0).inference
        refocused_acc, finetuned_acc = refocused.best["val_acc"], finetuned.best["val_acc"]
        echo(f"[5/5] val acc after {refocus_epochs} epochs (best epoch): refocused {100 * refocused_acc:.1f}%, "
             f"fine-tuned {100 * finetuned_acc:.1f}% (pretrained {100 * pretrained_acc:.1f}%); verified deploy model -> "
             f"{refocused.files['deploy']}")
        echo("")
        echo(comparison.render("table"))
        echo("")
        verdict = _verdict(refocused.best, finetuned.best, comparison.reports[1].inference, baseline_cost)
        echo(verdict)
        files = {"data": data_dir, "pretrained": pretrained_path, "report": report_path, **refocused.files,
                 **{f"finetune_{k}": v for k, v in finetuned.files.items()}}
        return DemoResult(output_dir=output_dir, files=files, pretrained_val_acc=pretrained_acc,
                          refocused_val_acc=refocused_acc, finetuned_val_acc=finetuned_acc, comparison=comparison,
                          seconds=time.perf_counter() - start, history=refocused.history,
                          finetune_history=finetuned.history, verdict=verdict)


@contextlib.contextmanager
def new_output_folder(output_dir: str):
    """A demo's output folder: new or empty, made, and held by this demo alone while it writes (an exclusive
    lock on the folder), so that a second demo started into it at the same moment is refused instead of
    writing the same files."""
    from .fileio import FolderBusy, lock_folder

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ReparamError(f"{output_dir} exists and is not a folder; pass another output folder")
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise ReparamError(f"{output_dir} exists and is not empty; pass another output folder")
    os.makedirs(output_dir, exist_ok=True)
    try:
        fd = lock_folder(output_dir)
    except FolderBusy:
        raise ReparamError(f"{output_dir}: another demo is writing into this folder; pass another output "
                           "folder") from None
    try:
        if os.listdir(output_dir):  # another demo filled it between the check and the lock
            raise ReparamError(f"{output_dir} exists and is not empty; pass another output folder")
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _verdict(refocused: dict, finetuned: dict, refocused_cost: dict, finetuned_cost: dict) -> str:
    """The demo's last line, worded from what it measured: one seed on one small validation set."""
    images = refocused["val_images"]
    ahead = round((refocused["val_acc"] - finetuned["val_acc"]) * images)  # validation images
    if ahead == 0:
        outcome = "Refocusing and fine-tuning scored the same here"
    else:
        points = 100 * abs(refocused["val_acc"] - finetuned["val_acc"])
        outcome = (f"Refocusing scored {points:.1f} points {'above' if ahead > 0 else 'below'} fine-tuning here "
                   f"({abs(ahead)} of {images} validation images)")
    same_cost = all(refocused_cost[k] == finetuned_cost[k] for k in ("params", "macs"))
    cost = (f"both deploy at the same cost ({refocused_cost['params']:,} params, {refocused_cost['macs']:,} MACs)"
            if same_cost else
            f"deployed cost: refocused {refocused_cost['params']:,} params / {refocused_cost['macs']:,} MACs, fine-tuned "
            f"{finetuned_cost['params']:,} / {finetuned_cost['macs']:,}")
    return (f"{outcome}, on one seed and {images} validation images, at learning rates that were not tuned; {cost}. "
            "Whether refocusing beats fine-tuning on your model and data: reparam ablate MODEL --data DIR -o OUT "
            "--seeds 3 --lr-grid 1e-4,1e-3,1e-2")


def fit_one_cycle(model: nn.Module, optimizer: torch.optim.Optimizer, loader, *, epochs: int, lr: float,
                  loss_of: Callable[[object], torch.Tensor], verbose: bool = True) -> None:
    """`epochs` passes over `loader` (the loss of a batch: `loss_of(batch)`) with a one-cycle schedule up to `lr`,
    the loss on a progress bar; `model` is left in eval mode. The demos' pretraining."""
    steps = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    with tqdm(total=steps, desc="pretrain", disable=not verbose, leave=False) as bar:
        for _ in range(epochs):
            for batch in loader:
                loss = loss_of(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    model.eval()


def pretrain(model: nn.Module, data_dir: str, *, epochs: int, input_size: int, seed: int = 0,
             lr: float = PRETRAIN_LR, batch_size: int = 32, verbose: bool = True) -> float:
    """Ordinary training of all weights (the "pretrained model" a user would bring); returns val accuracy."""
    from .data import build_datasets

    splits = build_datasets(data_dir, model, input_size)
    # a brief pretraining fits better on whole images; augmentation is the refocus run's business
    splits.train.transform = splits.val.transform
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(_Pairs(splits.train), batch_size=batch_size, shuffle=True, generator=generator)
    val_loader = DataLoader(_Pairs(splits.val), batch_size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    fit_one_cycle(model, optimizer, train_loader, epochs=epochs, lr=lr, verbose=verbose,
                  loss_of=lambda batch: F.cross_entropy(model(batch[0]), batch[1]))
    correct = total = 0
    with torch.no_grad():
        for images, targets in val_loader:
            correct += (model(images).argmax(1) == targets).sum().item()
            total += len(targets)
    return correct / total


class _Pairs(torch.utils.data.Dataset):
    """(image, target) from the training data sets, which also return sample bookkeeping."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        return item[0], item[1]


def make_pattern_dataset(
    root: str,
    *,
    classes: Sequence[str] = PATTERNS,
    train_per_class: int = 64,
    val_per_class: int = 16,
    size: int = 32,
    seed: int = 0,
) -> str:
    """Write `root/{train,val}/<pattern>/*.png`, one random texture per image. Returns `root`."""
    rng = random.Random(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in classes:
            folder = os.path.join(root, split, label)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                _draw(label, size, rng).save(os.path.join(folder, f"{i:04d}.png"))
    return root


def _draw(pattern: str, size: int, rng: random.Random) -> Image.Image:
    """A striped, checked or dotted texture of random period, phase, thickness and colours, with speckle
    noise. Textures survive the random crops and flips of training augmentation, so a small net learns
    them within seconds."""
    background = tuple(rng.randint(0, 100) for _ in range(3))
    colour = tuple(rng.randint(130, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    period = rng.randint(5, 9)
    thickness = rng.randint(2, max(2, period // 2))
    phase_x, phase_y = rng.randrange(period), rng.randrange(period)
    if pattern == "horizontal":
        for y in range(-phase_y, size, period):
            draw.rectangle([0, y, size, y + thickness - 1], fill=colour)
    elif pattern == "vertical":
        for x in range(-phase_x, size, period):
            draw.rectangle([x, 0, x + thickness - 1, size], fill=colour)
    elif pattern == "checker":
        for y in range(-phase_y, size, period):
            for x in range(-phase_x, size, period):
                if ((x + phase_x) // period + (y + phase_y) // period) % 2 == 0:
                    draw.rectangle([x, y, x + period - 1, y + period - 1], fill=colour)
    elif pattern == "dots":
        for y in range(-phase_y, size, period):
            for x in range(-phase_x, size, period):
                draw.ellipse([x, y, x + thickness, y + thickness], fill=colour)
    else:
        raise ValueError(f"unknown pattern '{pattern}'")
    pixels = image.load()
    for _ in range(size * size // 10):  # speckle noise, so that the task is not trivially separable
        x, y = rng.randrange(size), rng.randrange(size)
        pixels[x, y] = tuple(rng.randint(0, 255) for _ in range(3))
    return image
