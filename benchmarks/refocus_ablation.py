"""Does refocusing help? `reparam_zoo.ablate` (refocus, finetune, continue, random-base, paired over seeds) on
two data sets built from scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, no download):

* digits:        clean digits upsampled to 16x16, a small depthwise-separable CNN pretrained until it nearly
                 fits its training set (little left to learn: the case the earlier ablation measured);
* noisy-digits:  the same digits under heavy Gaussian noise and a random occluding bar, a narrower CNN
                 pretrained briefly (far from fitting its training set: headroom for any arm).

    python benchmarks/refocus_ablation.py [--seeds 2] [--epochs 3] [--sets digits,noisy-digits] [--no-readme]

Per data set: write the images as image folders (a fixed stratified split: train / val), pretrain the CNN
from scratch with `reparam_zoo.train(train_scope="all")` (ordinary training) at `--pretrain-lr`, record that
rate in the model (`reparam_extra["pretraining"]`, what `continue` reads), then `reparam_zoo.ablate` with
every arm. Learning rates: `--lr-grid` tried per arm on the validation split for `--grid-epochs` (continue
trains at the pretraining rate). Everything else is ablate's: same data order, augmentation, epochs,
schedule and validation per seed; the table is ablate's markdown. Results are written after each data set.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reparam_zoo  # noqa: E402
from reparam_zoo.ablate import ARMS  # noqa: E402

from benchmarks import _common  # noqa: E402

IMAGE_SIZE = 16  # digits are 8x8: 16x16 keeps every stroke and costs a quarter of 32x32
SETS = {
    # name: (noise std in [0, 1] intensity units, occluding bar, CNN width, pretraining epochs)
    "digits": dict(noise=0.0, occlude=False, width=8, pretrain_epochs=8),
    "noisy-digits": dict(noise=0.5, occlude=True, width=4, pretrain_epochs=6),
}


def write_image_folders(root: str, noise: float, occlude: bool, val_size: float = 0.4, seed: int = 0) -> dict:
    """root/{train,val}/<digit>/*.png, grey digits upsampled from 8x8, noise and an occluding bar baked in."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = nn.functional.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)[:, 0]
    g = torch.Generator().manual_seed(seed)
    if noise:
        images = images + noise * torch.randn(images.shape, generator=g)
    if occlude:  # a random horizontal or vertical bar, a fifth of the image wide, over each image
        bar = IMAGE_SIZE // 5
        for i in range(len(images)):
            at = int(torch.randint(0, IMAGE_SIZE - bar, (1,), generator=g))
            if torch.rand(1, generator=g) < 0.5:
                images[i, at:at + bar, :] = 0.5
            else:
                images[i, :, at:at + bar] = 0.5
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    train_idx, val_idx = train_test_split(np.arange(len(pixels)), test_size=val_size, stratify=digits.target,
                                          random_state=seed)
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for i in indices:
            folder = os.path.join(root, split, str(digits.target[i]))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(pixels[i]).convert("RGB").save(os.path.join(folder, f"{i:04d}.png"))
    return {"train": len(train_idx), "val": len(val_idx)}


def separable(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


def depthwise_net(width: int, classes: int = 10) -> nn.Sequential:
    """A small MobileNet-like CNN: a dense 3x3 stem, then five depthwise-separable blocks."""
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        separable(w, 2 * w, 2), separable(2 * w, 2 * w, 1),
        separable(2 * w, 4 * w, 2), separable(4 * w, 4 * w, 1),
        separable(4 * w, 8 * w, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, classes),
    )


def run_set(name: str, args, work: str) -> dict:
    spec = SETS[name]
    data_dir = os.path.join(work, name, "data")
    sizes = write_image_folders(data_dir, spec["noise"], spec["occlude"])
    torch.manual_seed(0)
    model = depthwise_net(spec["width"])
    common = dict(input_size=IMAGE_SIZE, batch_size=args.batch_size, workers=0, verbose=False)
    t0 = time.perf_counter()
    pretrained = reparam_zoo.train(model, data_dir, output_dir=os.path.join(work, name, "pretrain"),
                                   epochs=spec["pretrain_epochs"], lr=args.pretrain_lr, train_scope="all", **common)
    model = pretrained.model.eval()
    model.reparam_extra = {"pretraining": {"lr": args.pretrain_lr, "epochs": spec["pretrain_epochs"]}}
    start = {"val_acc": pretrained.final["val_acc"], "train_acc": pretrained.final["train_acc"],
             "seconds": time.perf_counter() - t0}
    print(f"[{name}] pretrained {spec['pretrain_epochs']} epochs: val {100 * start['val_acc']:.2f}%, train "
          f"{100 * start['train_acc']:.2f}% (augmented, during the last epoch) [{start['seconds']:.0f} s]", flush=True)
    out = os.path.join(args.keep or work, name, "ablation")
    result = reparam_zoo.ablate(model, data_dir, out, arms=list(ARMS), lr_grid=args.lr_grid,
                                grid_epochs=args.grid_epochs, seeds=args.seeds, epochs=args.epochs, **common)
    return {"data": {"name": name, **spec, **sizes, "image_size": IMAGE_SIZE,
                     "split": "stratified, val_size=0.4, random_state=0"},
            "model_params": sum(p.numel() for p in model.parameters()), "pretrained": start,
            "ablation": result.results, "report": open(result.files["report"]).read()}


def readme_block(results: dict) -> str:
    lines = ["## Refocusing ablation (`refocus_ablation.py`, a caller of `reparam ablate`)", "",
             "```", results["command"], "```", "",
             f"{_common.facts_line(results['environment'])}; ran {results['elapsed_s'] / 60:.1f} min on a shared "
             "machine whose load came from other jobs (times and memory are of this process under that load). "
             "Arms as `reparam ablate` defines them; learning rates chosen per arm on the validation split "
             f"from {', '.join(f'{lr:g}' for lr in results['lr_grid'])} ({results['grid_epochs']} epoch(s) each), "
             "continue at the pretraining rate.", ""]
    for name, r in results["sets"].items():
        d, p = r["data"], r["pretrained"]
        lines += [f"### {name}", "",
                  f"{d['train']} train / {d['val']} val images, noise std {d['noise']}"
                  + (", an occluding bar" if d["occlude"] else "")
                  + f"; a {r['model_params']:,}-parameter depthwise-separable CNN (width {d['width']}) pretrained "
                  f"{d['pretrain_epochs']} epochs from scratch: val {100 * p['val_acc']:.2f}%, train "
                  f"{100 * p['train_acc']:.2f}% (augmented).", ""]
        report = r["report"].split("\n", 2)[2]  # ablate's markdown without its title
        lines += [report.replace("\n# ", "\n#### "), ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every arm")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pretrain-lr", type=float, default=0.1)
    parser.add_argument("--lr-grid", default="0.01,0.1")
    parser.add_argument("--grid-epochs", type=int, default=1)
    parser.add_argument("--keep", metavar="DIR", help="keep the ablation folders under DIR (default: a temp dir)")
    _common.add_run_options(parser, "refocus_ablation.json")
    args = _common.parse_run_options(parser, argv, models_attr=None)
    args.lr_grid = [float(v) for v in args.lr_grid.split(",")]
    names = [n for n in args.sets.split(",") if n]
    unknown = [n for n in names if n not in SETS]
    if unknown or args.seeds < 2:
        parser.error(f"unknown set {unknown[0]}" if unknown else "--seeds must be at least 2 (a std is reported)")
    results = {"command": _common.command_line("refocus_ablation.py", argv), "environment": _common.machine_facts(),
               "lr_grid": args.lr_grid, "grid_epochs": args.grid_epochs, "seeds": args.seeds,
               "epochs": args.epochs, "sets": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            results["sets"][name] = run_set(name, args, work)
            print(results["sets"][name]["report"], flush=True)
            # the readings as they come out: a stopped run keeps the data sets it finished
            _common.finish_run(results, args, "refocus_ablation", readme_block, started)
    print(f"wrote {args.out} [{results['elapsed_s']:.0f} s]")
    return results


if __name__ == "__main__":
    main()
