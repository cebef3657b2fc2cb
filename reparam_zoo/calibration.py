"""Images for calibrating and checking a quantized model: found in a folder, preprocessed the way the model
expects (timm's evaluation transform for its data config), split into a calibration and a held-out set.

The folder is data: only regular image files are opened, each with PIL alone; an unreadable one is
skipped and counted, never fatal unless nothing is left.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from PIL import Image

from .data import UNREADABLE_ERRORS
from .errors import ReparamError

__all__ = ["CalibrationError", "CalibrationImages", "calibration_images", "find_images", "preprocess"]

SHUFFLE_SEED = 0  # the calibration / held-out split is the same on every run for the same folder


class CalibrationError(ReparamError):
    """The calibration folder cannot provide images (missing, empty, all unreadable)."""


@dataclass
class CalibrationImages:
    """Preprocessed images (N, C, H, W) for calibration and for the held-out check, and where they came from."""

    calibration: torch.Tensor
    held_out: torch.Tensor
    source: str
    layout: str  # "train/val", "train" (held out of train), "folder"
    unreadable: int = 0
    data_config: Optional[dict] = None

    def describe(self) -> str:
        skipped = f", {self.unreadable} unreadable skipped" if self.unreadable else ""
        return (f"{len(self.calibration)} calibration and {len(self.held_out)} held-out images from {self.source} "
                f"({self.layout}{skipped})")


def find_images(folder: str) -> List[str]:
    """Image files (timm's extensions) under `folder`, recursively, hidden files and folders left out,
    sorted; only regular files (a FIFO or device named x.jpg would block or never end)."""
    from timm.data.readers.img_extensions import get_img_extensions

    extensions = tuple(get_img_extensions())
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = os.path.join(root, name)
            if not name.startswith(".") and name.lower().endswith(extensions) and os.path.isfile(path):
                found.append(path)
    return sorted(found)


def _split(folder: str, calib_count: int, held_count: int) -> Tuple[List[str], List[str], str]:
    """(calibration files, held-out files, layout): `train` and `val` of the training layout when both
    are there, else a seeded shuffle of all images cut into a held-out part and a calibration part."""
    if not os.path.isdir(folder):
        what = "is a file" if os.path.exists(folder) else "no such folder"
        raise CalibrationError(f"{folder}: {what}; --calib takes a folder of images (or a data folder with train/)")
    train, val = os.path.join(folder, "train"), os.path.join(folder, "val")
    if os.path.isdir(train) and os.path.isdir(val) and find_images(val):
        calib, held, layout = find_images(train), find_images(val), "train/val"
        random.Random(SHUFFLE_SEED).shuffle(calib)
        random.Random(SHUFFLE_SEED + 1).shuffle(held)
        if not calib:
            raise CalibrationError(f"{train}: no images found ({', '.join(_extensions())} files)")
        return calib[:calib_count], held[:held_count], layout
    pool_dir, layout = (train, "train") if os.path.isdir(train) else (folder, "folder")
    pool = find_images(pool_dir)
    if len(pool) < 2:
        raise CalibrationError(f"{pool_dir}: found {len(pool)} image(s); calibration and its held-out check need at "
                               f"least 2 ({', '.join(_extensions())} files, in the folder or its sub-folders)")
    random.Random(SHUFFLE_SEED).shuffle(pool)
    # enough for both: each gets what it asked for; too few: a quarter (at least one image) is held out
    held_n = held_count if len(pool) >= calib_count + held_count else max(1, min(held_count, len(pool) // 4))
    return pool[held_n:held_n + calib_count], pool[:held_n], layout


def _extensions() -> Sequence[str]:
    from timm.data.readers.img_extensions import get_img_extensions

    return sorted(get_img_extensions())


def preprocess(model: nn.Module, input_size: Optional[Sequence[int]] = None):
    """timm's evaluation transform for `model` (its mean/std, interpolation, crop) and the config it used."""
    from timm.data import create_transform, resolve_data_config

    overrides = {} if input_size is None else {"input_size": tuple(int(s) for s in input_size)}
    config = resolve_data_config(overrides, model=model)
    return create_transform(**config, is_training=False), config


def _load(paths: Sequence[str], transform, what: str, progress: bool) -> Tuple[torch.Tensor, int]:
    from tqdm import tqdm

    images, unreadable = [], 0
    for path in tqdm(paths, desc=f"reading {what} images", unit="img", disable=not progress or None, leave=False):
        try:
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))  # convert() decodes the pixels
        except UNREADABLE_ERRORS:
            unreadable += 1
    return (torch.stack(images) if images else torch.empty(0)), unreadable


def calibration_images(model: nn.Module, folder: str, *, calib_images: int = 256, held_out_images: int = 256,
                       input_size: Optional[Sequence[int]] = None, progress: bool = True) -> CalibrationImages:
    """Calibration and held-out images from `folder` with `model`'s own preprocessing.

    Layouts: a data folder (`train/<class>/...` calibrates, `val/` is held out; without `val/` part of
    `train/` is held out), or any folder of images (flat or in sub-folders), split by a seeded shuffle.
    """
    for name, value in (("calib_images", calib_images), ("held_out_images", held_out_images)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ReparamError(f"{name} must be a positive integer, got {value!r}")
    folder = os.fspath(folder)
    calib_paths, held_paths, layout = _split(folder, calib_images, held_out_images)
    transform, config = preprocess(model, input_size)
    calibration, bad_c = _load(calib_paths, transform, "calibration", progress)
    held_out, bad_h = _load(held_paths, transform, "held-out", progress)
    for tensor, paths, what in ((calibration, calib_paths, "calibration"), (held_out, held_paths, "held-out")):
        if not len(tensor):
            raise CalibrationError(f"{folder}: none of the {len(paths)} {what} images could be read")
    return CalibrationImages(calibration, held_out, folder, layout, bad_c + bad_h, config)
