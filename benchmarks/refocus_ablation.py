"""Does refocusing help? Refocusing vs fine-tuning vs continued training vs a random frozen base, on a
real data set that ships with scikit-learn (8x8 handwritten digits, upsampled to 32x32).

    python benchmarks/refocus_ablation.py [--seeds 5] [--pretrain-epochs 20] [--epochs 12] [--no-readme]

Per seed: pretrain a small depthwise-separable CNN from scratch (SGD, momentum 0.9, weight decay 5e-4,
cosine schedule from `--lr`, batch 64, random +-2 pixel shifts), then start four runs from the same
pretrained weights, each for `--epochs` epochs with the same schedule shape, data order and augmentation:

* refocus:      `reparam_zoo.convert(model)` (default "transforms" scope: only the refocusing transforms
                train, BatchNorm statistics follow), at the pretraining learning rate (the paper's recipe:
                same configuration as the baseline).
* refocus_low_lr: the same at a tenth of the pretraining learning rate (an extra row: is refocusing
                held back by a learning rate meant for weights rather than transforms?).
* finetune:     all weights train at a tenth of the pretraining learning rate.
* continue:     all weights train at the pretraining learning rate (continued training with a restart).
* random_base:  as refocus, but every converted base kernel is first re-initialised randomly (PyTorch's
                default conv init): refocusing without the pretrained prior.

Reported: test accuracy (fixed stratified split, no model selection on the test set: the last epoch
counts) mean and sample standard deviation over seeds, the per-seed differences to `continue`, and the
training-set accuracy (how much there was left to learn). The
refocused models are also fused (`reparam_zoo.fuse`) and re-evaluated: the deployed model must score the
same.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reparam_zoo  # noqa: E402
from reparam_zoo.surgery import refconv_layers  # noqa: E402

from benchmarks import _common  # noqa: E402

METHODS = ("refocus", "refocus_low_lr", "finetune", "continue", "random_base")
# learning rate of each method as a multiple of the pretraining one
LR_SCALE = {"refocus": 1.0, "refocus_low_lr": 0.1, "finetune": 0.1, "continue": 1.0, "random_base": 1.0}
IMAGE_SIZE = 32
SHIFT = 2
BATCH = 64


def load_data(test_size: float, split_seed: int = 0):
    """Digits as (N, 1, 32, 32) float tensors, standardised with the training set's statistics."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=digits.target, random_state=split_seed
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return (images[train_idx], labels[train_idx]), (images[test_idx], labels[test_idx])


def separable(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


def depthwise_net(width: int = 8, classes: int = 10) -> nn.Sequential:
    """A small MobileNet-like CNN: a dense 3x3 stem, then five depthwise-separable blocks."""
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        separable(w, 2 * w, 2), separable(2 * w, 2 * w, 1),
        separable(2 * w, 4 * w, 2), separable(4 * w, 4 * w, 1),
        separable(4 * w, 8 * w, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, classes),
    )


def random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own random offset of up to SHIFT pixels (zero fill)."""
    n, c, h, w = x.shape
    windows = F.pad(x, (SHIFT,) * 4).unfold(2, h, 1).unfold(3, w, 1)  # (n, c, 2S+1, 2S+1, h, w), a view
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2, n), generator=generator)
    return windows[torch.arange(n), :, dy, dx]


def train(model: nn.Module, data, epochs: int, lr: float, seed: int) -> nn.Module:
    images, labels = data
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * -(-len(labels) // BATCH)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), BATCH):
            batch = order[start:start + BATCH]
            loss = F.cross_entropy(model(random_shift(images[batch], generator)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.eval()(images)


def accuracy(model: nn.Module, data) -> float:
    images, labels = data
    return (logits(model, images).argmax(1) == labels).float().mean().item()


def randomize_bases(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in refconv_layers(model):
            nn.init.kaiming_uniform_(layer.weight_base, a=5 ** 0.5, generator=generator)


@torch.no_grad()
def kernel_change(model: nn.Module) -> float:
    """How far refocusing moved the kernels: mean over RefConv layers of ||W_t - W_b|| / ||W_b||."""
    changes = [
        ((layer.refocused_weight() - layer.weight_base).norm() / layer.weight_base.norm()).item()
        for _, layer in refconv_layers(model)
    ]
    return statistics.mean(changes)


def run_seed(seed: int, args, train_data, test_data) -> dict:
    torch.manual_seed(seed)
    pretrained = train(depthwise_net(args.width), train_data, args.pretrain_epochs, args.lr, seed)
    result = {"pretrained": accuracy(pretrained, test_data), "pretrained_train": accuracy(pretrained, train_data)}
    run_seed_ = 1000 + seed  # the continuation's data order and augmentation, the same for every method
    for method in METHODS:
        if method in ("refocus", "refocus_low_lr", "random_base"):
            model = reparam_zoo.convert(pretrained)
            if method == "random_base":
                randomize_bases(model, seed=2000 + seed)
        else:
            model = copy.deepcopy(pretrained)
        lr = LR_SCALE[method] * args.lr
        train(model, train_data, args.epochs, lr, run_seed_)
        result[method] = accuracy(model, test_data)
        result[f"{method}_train"] = accuracy(model, train_data)
        if method in ("refocus", "refocus_low_lr", "random_base"):
            result[f"{method}_kernel_change"] = kernel_change(model)
        if method == "refocus":
            deployed = reparam_zoo.fuse(model, example_inputs=test_data[0][:2])
            result["refocus_deployed"] = accuracy(deployed, test_data)
            result["refocus_deployed_max_logit_diff"] = (
                (logits(deployed, test_data[0]) - logits(model, test_data[0])).abs().max().item()
            )
    return result


def summarize(per_seed: list) -> dict:
    keys = ("pretrained",) + METHODS + ("refocus_deployed",)
    summary = {}
    for key in keys:
        values = [r[key] for r in per_seed]
        summary[key] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        if f"{key}_train" in per_seed[0]:
            summary[key]["train_mean"] = statistics.mean(r[f"{key}_train"] for r in per_seed)
    for method in METHODS:
        if f"{method}_kernel_change" in per_seed[0]:
            summary[method]["kernel_change_mean"] = statistics.mean(r[f"{method}_kernel_change"] for r in per_seed)
        diffs = [r[method] - r["continue"] for r in per_seed]
        summary[method]["minus_continue_mean"] = statistics.mean(diffs)
        summary[method]["minus_continue_std"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        summary[method]["minus_pretrained_mean"] = statistics.mean(r[method] - r["pretrained"] for r in per_seed)
    return summary


def readme_block(results: dict) -> str:
    s = results["summary"]
    rows = [["pretrained (start)", f"{100 * s['pretrained']['mean']:.2f} ± {100 * s['pretrained']['std']:.2f}", "", "",
             " ".join(f"{100 * r['pretrained']:.1f}" for r in results["per_seed"]),
             f"{100 * s['pretrained']['train_mean']:.2f}"]]
    for method in METHODS:
        m = s[method]
        rows.append([
            f"{method} (lr {results['lrs'][method]:g})", f"**{100 * m['mean']:.2f} ± {100 * m['std']:.2f}**",
            f"{100 * m['minus_pretrained_mean']:+.2f}",
            "—" if method == "continue" else
            f"{100 * m['minus_continue_mean']:+.2f} ± {100 * m['minus_continue_std']:.2f}",
            " ".join(f"{100 * r[method]:.1f}" for r in results["per_seed"]),
            f"{100 * m['train_mean']:.2f}",
        ])
    data = results["data"]
    return "\n".join([
        "## Refocusing ablation on real data (`refocus_ablation.py`)",
        "",
        "```", results["command"], "```", "",
        f"{_common.facts_line(results['environment'])}; ran {results['elapsed_s'] / 60:.1f} min. scikit-learn digits "
        f"(8x8, upsampled to {IMAGE_SIZE}x{IMAGE_SIZE}), stratified split {data['train']} train / {data['test']} "
        f"test (fixed), a {results['model_params']:,}-parameter depthwise-separable CNN ({results['refconv_layers']} "
        f"RefConv layers, {results['transform_params']:,} transform params), pretrained {results['pretrain_epochs']} "
        f"epochs, then {results['epochs']} epochs per method; {len(results['per_seed'])} seeds. Test accuracy in %, "
        "mean ± sample std over seeds; the difference to `continue` is paired by seed.",
        "",
        _common.markdown_table(
            ["method", "test acc %", "vs pretrained", "vs continue (paired)", "per seed", "train acc % (mean)"], rows
        ),
        "",
        "Kernel change by refocusing, ||W_t - W_b|| / ||W_b|| averaged over the RefConv layers and seeds: "
        + ", ".join(f"{m} {s[m]['kernel_change_mean']:.2f}" for m in METHODS if "kernel_change_mean" in s[m])
        + ".",
        "",
        f"Deployed (fused) refocused models: {100 * s['refocus_deployed']['mean']:.2f} % mean test accuracy, largest "
        f"logit difference to the unfused model {results['max_deploy_logit_diff']:.1e}.",
    ])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=12, help="epochs of every method after pretraining")
    parser.add_argument("--lr", type=float, default=0.1, help="pretraining learning rate")
    parser.add_argument("--width", type=int, default=8, help="channels of the stem; blocks use 2x, 4x, 8x")
    parser.add_argument("--test-size", type=float, default=0.4)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (default 1: the model is tiny, more threads only add overhead)")
    parser.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "refocus_ablation.json"))
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (a standard deviation is reported)")
    torch.set_num_threads(args.threads)

    train_data, test_data = load_data(args.test_size)
    probe = reparam_zoo.convert(depthwise_net(args.width))
    results = {
        "command": _common.command_line("refocus_ablation.py", argv),
        "environment": _common.machine_facts(),
        "data": {"name": "sklearn.datasets.load_digits", "train": len(train_data[1]), "test": len(test_data[1]),
                 "image_size": IMAGE_SIZE, "split": f"stratified, test_size={args.test_size}, random_state=0"},
        "model_params": sum(p.numel() for p in depthwise_net(args.width).parameters()),
        "refconv_layers": len(probe.refconv_summary.converted),
        "transform_params": probe.refconv_summary.transform_params,
        "pretrain_epochs": args.pretrain_epochs, "epochs": args.epochs,
        "lrs": {"pretrain": args.lr, **{m: LR_SCALE[m] * args.lr for m in METHODS}},
        "recipe": "SGD momentum 0.9, weight decay 5e-4, batch 64, cosine to 0, random +-2 px shifts",
        "per_seed": [],
    }
    started = time.perf_counter()
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        r = run_seed(seed, args, train_data, test_data)
        results["per_seed"].append(r)
        print(
            f"seed {seed}: pretrained {100 * r['pretrained']:.2f}; "
            + ", ".join(f"{m} {100 * r[m]:.2f}" for m in METHODS)
            + f"; deployed refocus {100 * r['refocus_deployed']:.2f} [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
    results["summary"] = summarize(results["per_seed"])
    results["max_deploy_logit_diff"] = max(r["refocus_deployed_max_logit_diff"] for r in results["per_seed"])
    _common.finish_run(results, args, "refocus_ablation", readme_block, started)
    for key, v in results["summary"].items():
        print(f"{key}: {100 * v['mean']:.2f} ± {100 * v['std']:.2f}")
    print(f"wrote {args.out} [{results['elapsed_s']:.0f} s]")
    return results


if __name__ == "__main__":
    main()
