"""Generated example data sets for detection and segmentation: coloured shapes (circles, squares, triangles)
on textured backgrounds, small enough to train on a CPU in minutes. Written in the formats real data comes
in, so that they go through the same readers: COCO JSON (`annotations/instances_{train,val}.json`, images in
`train/` and `val/`, category ids that are not 1..N, polygon masks) and index-PNG masks with a
`classes.txt` and an ignore band (255) around every shape, as Pascal VOC draws it."""
from __future__ import annotations

import json
import math
import os
import random
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["SHAPES", "CATEGORY_IDS", "make_detection_set", "make_segmentation_set"]

SHAPES = ("circle", "square", "triangle")
CATEGORY_IDS = {"circle": 3, "square": 7, "triangle": 12}  # COCO's ids have gaps too
IGNORE = 255


def _background(rng: random.Random, size: int) -> Image.Image:
    """Smoothed noise in a random tint, with a few stripes: texture for the shapes to stand out of."""
    nrng = np.random.default_rng(rng.randrange(2 ** 32))
    noise = nrng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize((size, size), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1))
    tint = np.array([rng.randint(60, 160) for _ in range(3)], dtype=np.float32)
    pixels = 0.5 * np.asarray(image, dtype=np.float32) + 0.5 * tint
    draw = ImageDraw.Draw(image := Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
    for _ in range(rng.randint(1, 3)):
        x = rng.randrange(size)
        draw.line([(x, 0), (x + rng.randint(-size, size), size)], fill=tuple(int(v) for v in tint * 0.7), width=2)
    return image


def _polygon(shape: str, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    if shape == "circle":
        return [(cx + r * math.cos(2 * math.pi * k / 24), cy + r * math.sin(2 * math.pi * k / 24)) for k in range(24)]
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]


def _scene(rng: random.Random, size: int, max_shapes: int):
    """An image and its shapes: (shape name, polygon), non-overlapping, each at least size/8 across."""
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    shapes, placed = [], []
    for _ in range(rng.randint(1, max_shapes)):
        for _attempt in range(20):
            r = rng.uniform(size / 10, size / 5)
            cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
            if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        shape = rng.choice(SHAPES)
        colour = {"circle": (220, 60, 60), "square": (60, 200, 60), "triangle": (70, 90, 230)}[shape]
        colour = tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in colour)
        polygon = _polygon(shape, cx, cy, r)
        draw.polygon(polygon, fill=colour)
        shapes.append((shape, polygon))
    return image, shapes


def make_detection_set(root: str, *, train: int = 48, val: int = 16, size: int = 128, seed: int = 0,
                       max_shapes: int = 3) -> Dict[str, str]:
    """COCO-format detection / instance-segmentation data under `root`: `train/`, `val/` and
    `annotations/instances_{train,val}.json` (boxes [x, y, w, h], polygon segmentations, area, iscrowd 0).
    Returns the paths of the two annotation files."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    categories = [{"id": CATEGORY_IDS[s], "name": s, "supercategory": "shape"} for s in SHAPES]
    files = {}
    ann_id = 1
    for split, count in (("train", train), ("val", val)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image, shapes = _scene(rng, size, max_shapes)
            name = f"{split}_{i:04d}.jpg"
            image.save(os.path.join(root, split, name), quality=92)
            images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
            for shape, polygon in shapes:
                xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
                box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                area = 0.5 * abs(sum(xs[k] * ys[k - 1] - xs[k - 1] * ys[k] for k in range(len(xs))))
                annotations.append({"id": ann_id, "image_id": i + 1, "category_id": CATEGORY_IDS[shape],
                                    "bbox": [round(v, 2) for v in box], "area": round(area, 2), "iscrowd": 0,
                                    "segmentation": [[round(v, 2) for p in polygon for v in p]]})
                ann_id += 1
        path = os.path.join(root, "annotations", f"instances_{split}.json")
        with open(path, "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
        files[split] = path
    return files


def make_segmentation_set(root: str, *, train: int = 48, val: int = 16, size: int = 128, seed: int = 0,
                          max_shapes: int = 3) -> List[str]:
    """Index-mask segmentation data under `root`: `classes.txt` (background + the shapes), and
    `{train,val}/images/*.jpg` with `{train,val}/masks/*.png` (palette PNGs, 255 on a 1-pixel band around every
    shape, as VOC marks uncertain borders). Returns the class names."""
    rng = random.Random(seed)
    classes = ["background", *SHAPES]
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    palette = [0, 0, 0, 220, 60, 60, 60, 200, 60, 70, 90, 230] + [0, 0, 0] * 251 + [255, 255, 255]
    for split, count in (("train", train), ("val", val)):
        for sub in ("images", "masks"):
            os.makedirs(os.path.join(root, split, sub), exist_ok=True)
        for i in range(count):
            image, shapes = _scene(rng, size, max_shapes)
            mask = Image.new("P", (size, size), 0)
            mask.putpalette(palette)
            draw = ImageDraw.Draw(mask)
            for shape, polygon in shapes:
                draw.polygon(polygon, fill=classes.index(shape), outline=IGNORE)
            image.save(os.path.join(root, split, "images", f"{i:04d}.jpg"), quality=92)
            mask.save(os.path.join(root, split, "masks", f"{i:04d}.png"))
    return classes
