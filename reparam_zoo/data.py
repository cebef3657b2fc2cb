"""Image-folder data for refocus training: timm's dataset and transforms, made resumable and robust.

Two things timm's own loader does not give us:
- the augmentation of sample `i` in epoch `e` depends only on `(seed, e, i)`, not on the worker count,
  the rank or the step a resumed run starts at, so that an interrupted run can continue bit-exactly;
- unreadable images are skipped *and counted* (timm only logs them), so the run can report them.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data import ImageDataset, create_transform, resolve_data_config
from torch.utils.data import DataLoader, DistributedSampler, Sampler, default_collate

from .errors import ReparamError, preview

__all__ = ["DataError", "DataSplits", "ImageFolderSplit", "EpochSampler", "ShardSampler", "build_datasets",
           "make_loader", "sample_seed"]

SPLITS = ("train", "val")
# A substituted training sample is the next readable file; give up after this many unreadable in a row.
MAX_CONSECUTIVE_UNREADABLE = 50
# What PIL raises for files it cannot decode (UnidentifiedImageError and truncation are OSErrors; some
# plugins raise SyntaxError/ValueError on corrupt headers).
UNREADABLE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
IGNORE_TARGET = -100  # torch's CrossEntropyLoss ignore_index: an unreadable validation image


class DataError(ReparamError):
    """The data folder cannot be used for training (missing, empty, inconsistent)."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch."""
    return (((seed * 1_000_003) + epoch) * 1_000_000_007 + index) % (2 ** 63)


@contextlib.contextmanager
def _seeded_rng(seed: int):
    """Seed the CPU generators transforms draw from (torch's default, Python's), restore them after:
    in the main process (workers=0) the same generators drive dropout and must not be disturbed."""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)


class ImageFolderSplit(ImageDataset):
    """One split (`DIR/train` or `DIR/val`) of an image-folder data set.

    Items are `(image, target, unreadable_indices)`. Index the dataset with `(index, seed)` (what
    `EpochSampler` yields) to augment with a fixed seed. An unreadable training image is replaced by the
    next readable one (the batch keeps its size, all ranks keep stepping together); an unreadable
    validation image yields a blank image with the ignored target, so it does not count.
    """

    def __init__(self, root: str, transform, *, substitute_unreadable: bool):
        try:
            super().__init__(root, transform=transform)
        except RuntimeError:  # timm's reader: "Found 0 images in subfolders of ..."
            raise DataError(f"{root}: no images found (expected {root}/<class>/<image files>)") from None
        _label_by_class_folder(self.reader, root)
        self.substitute_unreadable = substitute_unreadable
        self._blank: Optional[torch.Tensor] = None

    @property
    def class_to_idx(self) -> Dict[str, int]:
        return self.reader.class_to_idx

    @property
    def classes(self) -> List[str]:
        return sorted(self.class_to_idx, key=self.class_to_idx.get)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        unreadable = []
        image, target = self._load(index)
        while image is None:
            unreadable.append(index)
            if not self.substitute_unreadable:
                return self._blank_image(), IGNORE_TARGET, unreadable
            if len(unreadable) >= min(MAX_CONSECUTIVE_UNREADABLE, len(self)):
                raise DataError(
                    f"{self.reader.root}: {len(unreadable)} unreadable images in a row "
                    f"(e.g. {self.filename(unreadable[0])})"
                )
            index = (index + 1) % len(self)
            image, target = self._load(index)
        if seed is None:
            image = self.transform(image)
        else:
            with _seeded_rng(seed):
                image = self.transform(image)
        return image, target, unreadable

    def _load(self, index: int):
        """(RGB image, target), or (None, target) when the file cannot be read or decoded."""
        try:
            fileobj, target = self.reader[index]
        except OSError:
            return None, None
        try:
            with fileobj:
                return Image.open(fileobj).convert(self.input_img_mode), target  # convert() decodes pixels
        except UNREADABLE_ERRORS:
            return None, target

    def _blank_image(self) -> torch.Tensor:
        if self._blank is None:
            with _seeded_rng(0):
                self._blank = torch.zeros_like(self.transform(Image.new("RGB", (8, 8))))
        return self._blank


def _label_by_class_folder(reader, root: str) -> None:
    """Label every image by the class folder right under the split folder, however deep it lies
    (`train/cat/2024/x.jpg` is a cat; timm's reader would make a class "2024"), and leave out hidden
    folders and files (`.ipynb_checkpoints`). Classes are ordered as timm orders them."""
    from timm.utils.misc import natural_key

    kept, loose = [], 0
    for path, _ in reader.samples:
        parts = os.path.relpath(path, root).split(os.sep)
        if any(part.startswith(".") for part in parts):
            continue
        if len(parts) < 2:
            loose += 1
            continue
        kept.append((path, parts[0]))
    if loose:
        raise DataError(f"{root}: {loose} image(s) directly in the split folder; images go in {root}/<class>/")
    if not kept:
        raise DataError(f"{root}: no images found (expected {root}/<class>/<image files>)")
    found = {label for _, label in kept}
    empty = sorted(d for d in os.listdir(root)
                   if not d.startswith(".") and os.path.isdir(os.path.join(root, d)) and d not in found)
    if empty:
        raise DataError(f"{root}: class folder(s) without images: {', '.join(empty)} (add images or remove them)")
    classes = sorted({label for _, label in kept}, key=natural_key)
    reader.class_to_idx = {c: i for i, c in enumerate(classes)}
    reader.samples = [(path, reader.class_to_idx[label]) for path, label in kept]


@dataclass
class DataSplits:
    train: ImageFolderSplit
    val: ImageFolderSplit
    data_config: dict

    @property
    def classes(self) -> List[str]:
        return self.train.classes


def build_datasets(data_dir: str, model: torch.nn.Module, input_size: Optional[int] = None) -> DataSplits:
    """Both splits with timm's transforms for `model` (its mean/std, interpolation, crop_pct).

    Training: random-resized-crop + horizontal flip; validation: resize + center crop.
    """
    check_data_dir(data_dir)
    overrides = {} if input_size is None else {"input_size": (3, int(input_size), int(input_size))}
    data_config = resolve_data_config(overrides, model=model)
    train_tf = create_transform(**data_config, is_training=True, color_jitter=0.0)
    val_tf = create_transform(**data_config, is_training=False)
    train = ImageFolderSplit(os.path.join(data_dir, "train"), train_tf, substitute_unreadable=True)
    val = ImageFolderSplit(os.path.join(data_dir, "val"), val_tf, substitute_unreadable=False)
    for split in (train, val):
        if "" in split.class_to_idx:
            raise DataError(f"{split.reader.root}: images must be in class sub-folders (<split>/<class>/<image>)")
    if train.class_to_idx != val.class_to_idx:
        only_train = sorted(set(train.class_to_idx) - set(val.class_to_idx))
        only_val = sorted(set(val.class_to_idx) - set(train.class_to_idx))
        raise DataError(
            f"{data_dir}: classes differ between train and val ("
            + "; ".join(p for p in (_listing("only in train", only_train), _listing("only in val", only_val)) if p)
            + ")"
        )
    if len(train.class_to_idx) < 2:
        raise DataError(f"{data_dir}: found {len(train.class_to_idx)} class; classification needs at least 2")
    return DataSplits(train=train, val=val, data_config=data_config)


def image_list_digest(splits: DataSplits) -> str:
    """What identifies the images a run uses wherever the folder lives: their paths within it, in order."""
    h = hashlib.sha256()
    for name, split in (("train", splits.train), ("val", splits.val)):
        for path in split.filenames():
            h.update(f"{name}/{path}\n".encode())
    return h.hexdigest()


def check_data_dir(data_dir: str) -> None:
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: is a file, expected a data folder ({data_dir}/train/<class>/* and {data_dir}/val/<class>/*)")
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such data folder (expected {data_dir}/train/<class>/* and {data_dir}/val/<class>/*)")
    missing = [s for s in SPLITS if not os.path.isdir(os.path.join(data_dir, s))]
    if missing:
        found = ", ".join(sorted(os.listdir(data_dir))) or "nothing"
        raise DataError(f"{data_dir}: missing {' and '.join(missing)} folder (found: {found})")


def _listing(what: str, names: Sequence[str]) -> str:
    if not names:
        return ""
    return f"{what}: {preview(names)}"


class EpochSampler(Sampler):
    """Training order: DistributedSampler's shuffle of `(seed, epoch)` and shard of `rank`, each index paired
    with its augmentation seed; `skip` leaves out the first items of the epoch (a run resumed mid-epoch)."""

    def __init__(self, dataset, *, num_replicas: int, rank: int, seed: int):
        self.order = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.order.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices = list(self.order)[self.skip:]
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices])

    def __len__(self) -> int:
        return len(self.order) - self.skip


class ShardSampler(Sampler):
    """Validation order: every sample exactly once over all ranks (no padding, so metrics are exact)."""

    def __init__(self, dataset, *, num_replicas: int, rank: int):
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate(batch):
    images, targets = default_collate([(b[0], b[1]) for b in batch])
    return images, targets, [i for b in batch for i in b[2]]


def _ignore_sigint(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the training process finishes its step, checkpoints and shuts
    # the workers down; a worker that died of it first would instead fail the batch being waited for.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, sampler, *, batch_size: int, workers: int, drop_last: bool, pin_memory: bool = False,
                collate_fn=collate):
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
        drop_last=drop_last, pin_memory=pin_memory, worker_init_fn=_ignore_sigint if workers else None,
    )
