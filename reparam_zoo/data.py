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
import re
import signal
import stat
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data import ImageDataset, create_transform, resolve_data_config
from timm.data.readers.img_extensions import get_img_extensions
from timm.data.readers.reader import Reader
from timm.utils.misc import natural_key
from torch.utils.data import DataLoader, DistributedSampler, Sampler, default_collate

from .errors import ReparamError, preview
from .fileio import open_regular_file

__all__ = ["DataError", "ImageTooLargeError", "walk_files", "open_image", "open_regular_file", "DataSplits", "ImageFolderSplit", "EpochSampler", "ShardSampler", "build_datasets",
           "make_loader", "sample_seed"]

SPLITS = ("train", "val")
# A substituted training sample is the next readable file; give up after this many unreadable in a row.
MAX_CONSECUTIVE_UNREADABLE = 50
# What PIL raises for files it cannot decode (UnidentifiedImageError and truncation are OSErrors; some
# plugins raise SyntaxError/ValueError on corrupt headers).
UNREADABLE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
IGNORE_TARGET = -100  # torch's CrossEntropyLoss ignore_index: an unreadable validation image


class DataError(ReparamError):
    """The data folder cannot be used for training (missing, empty, inconsistent).

    Raised in a DataLoader worker, it reaches the training process re-made from PyTorch's report ("Caught
    DataError in DataLoader worker process 0." and the worker's traceback); it is given back its own one-line
    message there, so that the error names the file, as it does without workers."""

    def __init__(self, message: str = "", *args):
        if isinstance(message, str) and message.startswith("Caught ") and " in DataLoader worker" in message:
            message = _worker_message(message, type(self))
        super().__init__(message, *args)


def _worker_message(report: str, cls: type) -> str:
    prefix = f"{cls.__module__}.{cls.__qualname__}: "
    lines = [line[len(prefix):] for line in report.splitlines() if line.startswith(prefix)]
    return lines[-1] if lines else report.splitlines()[0]


class ImageTooLargeError(DataError):
    """An image whose header claims more pixels than PIL's `Image.MAX_IMAGE_PIXELS` (a decompression bomb)."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample in one epoch."""
    return (((seed * 1_000_003) + epoch) * 1_000_000_007 + index) % (2 ** 63)


@contextlib.contextmanager
def seeded_rng(seed: int):
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


def load_or_substitute(load: Callable[[int], Any], index: int, size: int, *, substitute: bool, folder: str,
                       filename: Callable[[int], str], readable: Callable[[Any], bool] = lambda x: x is not None,
                       ) -> Tuple[int, Any, List[int]]:
    """(index, `load(index)`, []) when that is `readable`; else, with `substitute`, the next readable sample
    (wrapping around a split of `size` samples): its index, what `load` gave, the unreadable indices before it;
    without, (index, None, [index]). More than MAX_CONSECUTIVE_UNREADABLE (or the whole split) unreadable in a
    row is a DataError."""
    unreadable: List[int] = []
    loaded = load(index)
    while not readable(loaded):
        unreadable.append(index)
        if not substitute:
            return index, None, unreadable
        if len(unreadable) >= min(MAX_CONSECUTIVE_UNREADABLE, size):
            raise DataError(f"{folder}: {len(unreadable)} unreadable images in a row (e.g. {filename(unreadable[0])})")
        index = (index + 1) % size
        loaded = load(index)
    return index, loaded, unreadable


class ImageFolderReader(Reader):
    """timm's image-folder reader, made safe for data folders that are not what they seem.

    A data folder is data: walking it must end, and reading it must not block. The walk follows a link to a
    folder only into a folder not visited yet (a link loop would repeat images forever, or never end), reads
    only regular files (a FIFO would block the read, a device could be endless), and leaves out hidden
    folders and files (`.ipynb_checkpoints`). What it leaves out besides hidden names is in `skipped`.
    Every image is labelled by the class folder right under the split folder, however deep it lies
    (`train/cat/2024/x.jpg` is a cat; timm's reader would make a class "2024"); classes and files are
    ordered as timm orders them.
    """

    def __init__(self, root: str):
        super().__init__()
        self.root = root
        scan = scan_image_folder(root)
        self.skipped = scan.skipped
        self.class_folders = scan.class_folders
        if scan.loose:
            raise DataError(f"{root}: {len(scan.loose)} image(s) directly in the split folder; images go in {root}/<class>/")
        if not scan.files:
            raise DataError(f"{root}: no images found (expected {root}/<class>/<image files>)")
        labels = {path: os.path.relpath(path, root).split(os.sep)[0] for path in scan.files}
        classes = sorted(set(labels.values()), key=natural_key)
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples = [(path, self.class_to_idx[labels[path]])
                        for path in sorted(scan.files, key=natural_key)]

    def __getitem__(self, index):
        path, target = self.samples[index]
        return open_regular_file(path), target

    def __len__(self):
        return len(self.samples)

    def _filename(self, index, basename=False, absolute=False):
        filename = self.samples[index][0]
        if basename:
            return os.path.basename(filename)
        return filename if absolute else os.path.relpath(filename, self.root)


@dataclass
class FolderScan:
    files: List[str]  # image files in class folders, as paths under the root (through the links followed)
    loose: List[str]  # image files directly in the root
    class_folders: List[str]  # the folders (or links to folders) right under the root that were walked
    skipped: List[str]  # one warning per kind of thing left out


def scan_image_folder(root: str) -> FolderScan:
    """The image files of a class-folder split (see `walk_files`)."""
    walk = walk_files(root, get_img_extensions(as_set=True))
    loose = [f for f in walk.files if os.path.dirname(f) == root]
    files = [f for f in walk.files if os.path.dirname(f) != root]
    return FolderScan(files=files, loose=loose, class_folders=walk.top_folders, skipped=walk.skipped)


@dataclass
class FolderWalk:
    files: List[str]  # paths under the root (through the links followed), in walk order
    top_folders: List[str]  # the folders (or links to folders) right under the root that were walked, sorted
    skipped: List[str]  # one warning per kind of thing left out


def walk_files(root: str, extensions) -> FolderWalk:
    """The regular files under `root` whose extension (lower-cased) is in `extensions`. A data folder is data:
    the walk enters no folder twice (by device and inode, so through any link: a link loop ends), lists only
    names and `stat`s (opens no file: a FIFO cannot block it), leaves out hidden names, and says in `skipped`
    what else it left out (links to folders already walked, non-regular files, broken links, unlistable
    folders)."""
    extensions = {e.lower() for e in extensions}
    files, class_folders = [], []
    repeated, special, broken, unreadable = [], [], [], []
    visited = {_identity(os.stat(root))}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            unreadable.append(os.path.relpath(folder, root))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = os.path.relpath(entry.path, root)
            try:
                info = os.stat(entry.path)  # through a link: what it points to
            except OSError:
                broken.append(rel)  # a dangling link, or a file gone since the listing
                continue
            if stat.S_ISDIR(info.st_mode):
                if _identity(info) in visited:
                    repeated.append(rel)
                    continue
                visited.add(_identity(info))
                stack.append(entry.path)
                if folder == root:
                    class_folders.append(entry.name)
            elif not stat.S_ISREG(info.st_mode):
                special.append(rel)
            elif os.path.splitext(entry.name)[1].lower() in extensions:
                files.append(entry.path)
    skipped = []
    for items, what in ((repeated, "link(s) to a folder already read (a link loop, or a second link to one folder)"),
                        (special, "non-regular file(s) (FIFOs, sockets, devices are never read)"),
                        (broken, "broken link(s)"), (unreadable, "folder(s) that cannot be listed")):
        if items:
            skipped.append(f"{root}: skipped {len(items)} {what}: {preview(sorted(items), 3)}")
    return FolderWalk(files=files, top_folders=sorted(class_folders), skipped=skipped)


def _identity(info: os.stat_result) -> Tuple[int, int]:
    return info.st_dev, info.st_ino


def open_image(path: str, fileobj=None) -> Image.Image:
    """The decoded image at `path`, read only if it is a regular file (never blocking), and only if its header
    asks for no more than PIL's `Image.MAX_IMAGE_PIXELS` pixels: `ImageTooLargeError` naming the file
    otherwise (PIL itself only warns up to twice its limit, and would allocate what the header asks). Other
    failures raise what PIL raises (`UNREADABLE_ERRORS`). `fileobj`: `path` opened already (it is closed)."""
    import warnings

    with fileobj if fileobj is not None else open_regular_file(path) as f:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, as an error
                img = Image.open(f)
        except Image.DecompressionBombError as e:
            check_image_size(path, None, refusal=str(e))
        check_image_size(path, img)
        img.load()  # decoded while the file is open; the image needs it no more
    return img


def check_image_size(path: str, img: Optional[Image.Image], refusal: str = "") -> None:
    """`ImageTooLargeError` when the header of `img` is over PIL's limit; img None: PIL refused it outright
    (`refusal` its message, which holds the pixel count)."""
    limit = Image.MAX_IMAGE_PIXELS
    if img is not None and (limit is None or img.size[0] * img.size[1] <= limit):
        return
    if img is not None:
        size = f"{img.size[0]}x{img.size[1]} = {img.size[0] * img.size[1]:,}"
    else:
        found = re.search(r"\((\d+) pixels\)", refusal)
        size = f"{int(found.group(1)):,}" if found else "more"
    raise ImageTooLargeError(f"{path}: image of {size} pixels, over PIL's limit of {limit:,} (a decompression bomb?); "
                             "raise PIL.Image.MAX_IMAGE_PIXELS in Python if it is genuine")


class ImageFolderSplit(ImageDataset):
    """One split (`DIR/train` or `DIR/val`) of an image-folder data set.

    Items are `(image, target, unreadable_indices)`. Index the dataset with `(index, seed)` (what
    `EpochSampler` yields) to augment with a fixed seed. An unreadable training image is replaced by the
    next readable one (the batch keeps its size, all ranks keep stepping together); an unreadable
    validation image yields a blank image with the ignored target, so it does not count. A class folder
    with no readable image at all is an error (its class could never be learnt or scored).
    """

    def __init__(self, root: str, transform, *, substitute_unreadable: bool):
        super().__init__(root, reader=ImageFolderReader(root), transform=transform)
        empty = sorted(set(self.reader.class_folders) - set(self.reader.class_to_idx))
        if empty:
            raise DataError(f"{root}: class folder(s) without images: {', '.join(empty)} (add images or remove them)")
        self.substitute_unreadable = substitute_unreadable
        self._blank: Optional[torch.Tensor] = None
        self._check_every_class_readable()

    @property
    def skipped(self) -> List[str]:
        """Warnings about what the folder walk left out."""
        return self.reader.skipped

    @property
    def class_to_idx(self) -> Dict[str, int]:
        return self.reader.class_to_idx

    @property
    def classes(self) -> List[str]:
        return sorted(self.class_to_idx, key=self.class_to_idx.get)

    def _check_every_class_readable(self) -> None:
        """Decode images of each class until one works (one per class when the data is sound)."""
        pending = dict.fromkeys(range(len(self.class_to_idx)))
        first: Dict[int, int] = {}
        for index, (_, target) in enumerate(self.reader.samples):
            if target not in pending:
                continue
            first.setdefault(target, index)
            if self._load(index)[0] is not None:
                del pending[target]
        if pending:
            names = [f"{self.classes[t]} (e.g. {os.path.basename(self.filename(first[t]))})" for t in sorted(pending)]
            raise DataError(f"{self.reader.root}: no readable image in class folder(s) {preview(names, 3)}")

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        index, loaded, unreadable = load_or_substitute(self._load, index, len(self),
                                                       substitute=self.substitute_unreadable, folder=self.reader.root,
                                                       filename=self.filename,
                                                       readable=lambda pair: pair[0] is not None)
        if loaded is None:
            return self._blank_image(), IGNORE_TARGET, unreadable
        image, target = loaded
        if seed is None:
            image = self.transform(image)
        else:
            with seeded_rng(seed):
                image = self.transform(image)
        return image, target, unreadable

    def _load(self, index: int):
        """(RGB image, target), or (None, target) when the file cannot be read or decoded."""
        try:
            fileobj, target = self.reader[index]  # a regular file, or OSError
        except OSError:
            return None, None
        try:
            with open_image(self.reader.samples[index][0], fileobj) as img:
                return img.convert(self.input_img_mode), target
        except ImageTooLargeError:
            raise  # an error naming the file, not an unreadable image to skip
        except UNREADABLE_ERRORS:
            return None, target

    def _blank_image(self) -> torch.Tensor:
        if self._blank is None:
            with seeded_rng(0):
                self._blank = torch.zeros_like(self.transform(Image.new("RGB", (8, 8))))
        return self._blank


@dataclass
class DataSplits:
    train: ImageFolderSplit
    val: ImageFolderSplit
    data_config: dict

    @property
    def classes(self) -> List[str]:
        return self.train.classes

    @property
    def skipped(self) -> List[str]:
        """Warnings about what walking the folders left out (see `ImageFolderReader`)."""
        return self.train.skipped + self.val.skipped


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


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _ignore_stop_signals(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group, and so does a SIGTERM sent to it (`kill -- -PGID`, a job
    # scheduler): the training process finishes its step, checkpoints and shuts the workers down; a worker
    # that died of the signal first would instead fail the batch being waited for. A worker whose training
    # process is gone exits by itself (PyTorch's worker watchdog). The signals were blocked since the fork
    # (see `StopSafeLoader`): one that came meanwhile is pending, and is ignored once unblocked here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class StopSafeLoader(DataLoader):
    """A DataLoader whose workers never die of a stop signal meant for the training process.

    A worker runs PyTorch's own set-up before `worker_init_fn` can ignore SIGINT/SIGTERM; a signal to the
    process group in that window would kill it. So the signals are blocked while the workers are forked
    (the mask is inherited) and unblocked in the worker once ignored, and in this process right after (a
    signal that came meanwhile is then handled here as usual).
    """

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def make_loader(dataset, sampler, *, batch_size: int, workers: int, drop_last: bool, pin_memory: bool = False,
                collate_fn=collate):
    return StopSafeLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
        drop_last=drop_last, pin_memory=pin_memory, worker_init_fn=_ignore_stop_signals if workers else None,
    )
