"""Semantic segmentation data: images with index masks (one class index per pixel), read resumably.

Layouts (`DIR` is the data folder; `classes.txt` names the classes, one per line, in index order):

    DIR/classes.txt
    DIR/train/images/**/<name>.{jpg,png,...}    DIR/train/masks/**/<name>.png
    DIR/val/images/**/<name>.*                  DIR/val/masks/**/<name>.png

or Pascal VOC's own (`DIR/JPEGImages/<id>.jpg`, `DIR/SegmentationClass/<id>.png`, the splits listed in
`DIR/ImageSets/Segmentation/{train,val}.txt`). A mask is matched to its image by its path under `masks/`
without the extension; Cityscapes' suffixes (`_leftImg8bit` on images, `_gtFine_labelTrainIds` on masks) are
left out of the match, so `leftImg8bit/` and `gtFine/` (trainIds) files can be linked in as they are. Masks
are single-channel PNGs (palette PNGs as VOC writes them: the palette index is the class); pixels with the
ignore index (255 by default) count neither in the loss nor in the metrics.

Augmentation is torchvision's transforms.v2 on the image and its `tv_tensors.Mask` together (random resized
crop and flip; colour jitter touches only the image); validation resizes both to the input size (the mask
with nearest neighbours), so metrics are computed at the input size. As with image folders
(`reparam_zoo.data`), sample `i` of epoch `e` is augmented from a seed of `(seed, e, i)` only, and
unreadable images are skipped and counted. A mask that does not fit its image or holds a value that is
neither a class nor the ignore index is an error naming the file: raised by the training process (not a
loader worker) when the batch arrives, so that it prints as one line.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .data import (UNREADABLE_ERRORS, DataError, ImageTooLargeError, check_image_size, load_or_substitute,
                   open_image, open_regular_file, seeded_rng, walk_files)

__all__ = ["SegmentationSplit", "SegmentationData", "build_segmentation_data", "read_class_names", "segmentation_collate",
           "IMAGE_EXTENSIONS", "CLASSES_FILE", "check_segmentation_dir"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
CLASSES_FILE = "classes.txt"
_IMAGE_SUFFIXES = ("_leftImg8bit",)  # Cityscapes
_MASK_SUFFIXES = ("_gtFine_labelTrainIds", "_gtCoarse_labelTrainIds")
VOC_LISTS = os.path.join("ImageSets", "Segmentation")


def read_class_names(path: str) -> List[str]:
    """Class names, one per line (blank lines and surrounding spaces ignored), index order."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no class-names file (one class name per line, in mask index order)")
    try:
        with open_regular_file(path) as f:
            names = [line.strip() for line in f.read(1 << 20).decode("utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable class-names file ({e})") from None
    if len(names) < 2:
        raise DataError(f"{path}: names {len(names)} class(es); segmentation needs at least 2 (background counts)")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"{path}: class names appear twice: {', '.join(dup)}")
    return names


def check_segmentation_dir(data_dir: str) -> None:
    layout = f"{data_dir}/{{train,val}}/{{images,masks}}/ and {data_dir}/{CLASSES_FILE}, or VOC's layout"
    if not os.path.isdir(data_dir):
        what = "is a file" if os.path.exists(data_dir) else "no such data folder"
        raise DataError(f"{data_dir}: {what} (expected {layout})")
    if os.path.isdir(os.path.join(data_dir, VOC_LISTS)):
        return
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            if not os.path.isdir(os.path.join(data_dir, split, sub)):
                raise DataError(f"{os.path.join(data_dir, split)}: missing {sub}/ folder (expected {layout})")


def _key(relative: str, suffixes: Sequence[str]) -> str:
    stem = os.path.splitext(relative)[0]
    for suffix in suffixes:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _files(root: str, extensions: Sequence[str], skipped: List[str]) -> List[str]:
    """Relative paths of the regular files under `root` with one of `extensions`, sorted; walked as image
    folders are (`reparam_zoo.data.walk_files`: no link loop, no FIFO), what was left out added to `skipped`."""
    walk = walk_files(root, extensions)
    skipped.extend(walk.skipped)
    return sorted(os.path.relpath(f, root) for f in walk.files)


def _pairs_of_folders(split_dir: str, skipped: List[str]) -> List[Tuple[str, str]]:
    images_dir, masks_dir = os.path.join(split_dir, "images"), os.path.join(split_dir, "masks")
    images = {_key(p, _IMAGE_SUFFIXES): p for p in _files(images_dir, IMAGE_EXTENSIONS, skipped)}
    masks = {_key(p, _MASK_SUFFIXES): p for p in _files(masks_dir, (".png",), skipped)}
    if not images:
        raise DataError(f"{images_dir}: no images found")
    missing = sorted(k for k in images if k not in masks)
    if missing:
        raise DataError(f"{os.path.join(images_dir, images[missing[0]])}: no mask for this image in {masks_dir} "
                        f"({len(missing)} image(s) without a mask)")
    orphans = sorted(k for k in masks if k not in images)
    if orphans:
        raise DataError(f"{os.path.join(masks_dir, masks[orphans[0]])}: a mask without an image in {images_dir} "
                        f"({len(orphans)} such mask(s))")
    return [(os.path.join(images_dir, images[k]), os.path.join(masks_dir, masks[k])) for k in sorted(images)]


def _pairs_of_voc(data_dir: str, split: str) -> List[Tuple[str, str]]:
    listing = os.path.join(data_dir, VOC_LISTS, f"{split}.txt")
    try:
        with open_regular_file(listing) as f:
            ids = [line.strip() for line in f.read(1 << 24).decode("utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{listing}: unreadable split list ({e})") from None
    if not ids:
        raise DataError(f"{listing}: lists no images")
    pairs = []
    for name in ids:
        if os.path.isabs(name) or ".." in name.split("/"):
            raise DataError(f"{listing}: '{name}' is not an image id")
        image = os.path.join(data_dir, "JPEGImages", name + ".jpg")
        mask = os.path.join(data_dir, "SegmentationClass", name + ".png")
        for path in (image, mask):
            if not os.path.isfile(path):
                raise DataError(f"{path}: listed in {listing} but missing")
        pairs.append((image, mask))
    return pairs


def _check_sizes(pairs: Sequence[Tuple[str, str]]) -> None:
    """A mask the size of its image, neither over PIL's pixel limit (read from the headers: no pixels are
    decoded here)."""
    for image, mask in pairs:
        try:
            with _header(image) as a, _header(mask) as b:
                if a.size != b.size:
                    raise DataError(f"{mask}: mask is {b.size[0]}x{b.size[1]} but its image {image} is "
                                    f"{a.size[0]}x{a.size[1]}")
        except UNREADABLE_ERRORS:
            continue  # counted as unreadable when it is loaded


class _header:
    """The header of an image file (a regular file only), checked against PIL's pixel limit."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> Image.Image:
        self.file = open_regular_file(self.path)
        try:
            self.img = Image.open(self.file)
        except Image.DecompressionBombError as e:
            self.file.close()
            check_image_size(self.path, None, refusal=str(e))
        except BaseException:
            self.file.close()
            raise
        try:
            check_image_size(self.path, self.img)
        except BaseException:
            self.__exit__()
            raise
        return self.img

    def __exit__(self, *exc) -> None:
        self.img.close()
        self.file.close()


def _mask_array(path: str) -> np.ndarray:
    with open_image(path) as img:
        if img.mode not in ("P", "L", "I", "I;16", "1"):
            raise DataError(f"{path}: a {img.mode} image; masks are single-channel index PNGs (one class index per "
                            "pixel, e.g. palette PNGs)")
        return np.array(img, dtype=np.int64)


class SegmentationSplit(torch.utils.data.Dataset):
    """One split. Items are `(image, mask, unreadable_indices, error)`; index with `(index, seed)` to augment
    with a fixed seed. An unreadable training image is replaced by the next readable one; an unreadable
    validation image gives a blank image whose mask is all ignore index (it does not count)."""

    def __init__(self, root: str, pairs: List[Tuple[str, str]], transform, *, num_classes: int, ignore_index: int,
                 size: int, substitute_unreadable: bool):
        self.root, self.pairs, self.transform = root, pairs, transform
        self.num_classes, self.ignore_index, self.size = num_classes, ignore_index, size
        self.substitute_unreadable = substitute_unreadable

    def __len__(self) -> int:
        return len(self.pairs)

    def filename(self, index: int) -> str:
        return os.path.relpath(self.pairs[index][0], self.root)

    def __getitem__(self, item):
        from torchvision import tv_tensors

        index, seed = item if isinstance(item, tuple) else (item, None)
        index, loaded, unreadable = load_or_substitute(self._load, index, len(self),
                                                       substitute=self.substitute_unreadable, folder=self.root,
                                                       filename=self.filename)
        if loaded is None:
            image = torch.zeros(3, self.size, self.size)
            return image, torch.full((self.size, self.size), self.ignore_index, dtype=torch.int64), unreadable, None
        image, mask, error = loaded
        if error is not None:  # raised where the batch arrives (one line, not a worker's traceback)
            blank = torch.zeros(3, self.size, self.size), torch.zeros(self.size, self.size, dtype=torch.int64)
            return (*blank, unreadable, error)
        sample = (tv_tensors.Image(image), tv_tensors.Mask(mask))
        if seed is None:
            image, mask = self.transform(*sample)
        else:
            with seeded_rng(seed):
                image, mask = self.transform(*sample)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor), unreadable, None

    def _load(self, index: int):
        """(image uint8 CHW, mask int64 HW, error message or None), or None when the image is unreadable."""
        image_path, mask_path = self.pairs[index]
        try:
            with open_image(image_path) as img:
                image = np.array(img.convert("RGB"))  # grayscale, palette, RGBA -> RGB
        except ImageTooLargeError as e:
            return None, None, str(e)
        except UNREADABLE_ERRORS:
            return None
        try:
            mask = _mask_array(mask_path)
        except DataError as e:
            return None, None, str(e)
        except UNREADABLE_ERRORS as e:
            return None, None, f"{mask_path}: unreadable mask ({e})"
        if mask.shape != image.shape[:2]:
            return None, None, (f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                                f"{image.shape[1]}x{image.shape[0]}")
        values = np.unique(mask)
        bad = values[(values >= self.num_classes) & (values != self.ignore_index) | (values < 0)]
        if bad.size:
            return None, None, (f"{mask_path}: mask value {int(bad[0])} is neither a class (0..{self.num_classes - 1}) "
                                f"nor the ignore index {self.ignore_index}")
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), torch.from_numpy(mask), None


@dataclass
class SegmentationData:
    train: SegmentationSplit
    val: SegmentationSplit
    classes: List[str]
    input_size: Tuple[int, int, int]
    digest: str
    skipped: List[str] = field(default_factory=list)  # warnings: what walking the folders left out


def build_segmentation_data(data_dir: str, *, size: int, mean: Sequence[float], std: Sequence[float],
                            ignore_index: int) -> SegmentationData:
    from torchvision.transforms import v2

    check_segmentation_dir(data_dir)
    classes = read_class_names(os.path.join(data_dir, CLASSES_FILE))
    if 0 <= ignore_index < len(classes):
        raise DataError(f"{data_dir}/{CLASSES_FILE}: the ignore index {ignore_index} is one of the "
                        f"{len(classes)} classes; choose another --ignore-index / ignore_index=")
    voc = os.path.isdir(os.path.join(data_dir, VOC_LISTS))
    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    # the mask follows every geometric transform (nearest neighbours); colour jitter leaves it alone
    train_tf = v2.Compose([v2.RandomResizedCrop((size, size), scale=(0.25, 1.0), antialias=True),
                           v2.RandomHorizontalFlip(), v2.ColorJitter(0.2, 0.2, 0.2), *normalize])
    val_tf = v2.Compose([v2.Resize((size, size), antialias=True), *normalize])
    splits, skipped = {}, []
    h = hashlib.sha256()
    for split, transform in (("train", train_tf), ("val", val_tf)):
        root = data_dir if voc else os.path.join(data_dir, split)
        pairs = _pairs_of_voc(data_dir, split) if voc else _pairs_of_folders(root, skipped)
        _check_sizes(pairs)
        for image, mask in pairs:
            h.update(f"{split}/{os.path.relpath(image, data_dir)}|{os.path.relpath(mask, data_dir)}\n".encode())
        splits[split] = SegmentationSplit(root, pairs, transform, num_classes=len(classes), ignore_index=ignore_index,
                                          size=size, substitute_unreadable=split == "train")
    return SegmentationData(train=splits["train"], val=splits["val"], classes=classes, input_size=(3, size, size),
                            digest=h.hexdigest(), skipped=skipped)


def segmentation_collate(batch):
    """-> (images, (masks, errors), unreadable indices)."""
    images = torch.stack([b[0] for b in batch])
    masks = torch.stack([b[1] for b in batch])
    errors = [b[3] for b in batch if b[3] is not None]
    return images, (masks, errors), [i for b in batch for i in b[2]]
