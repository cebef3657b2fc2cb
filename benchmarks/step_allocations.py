"""What one training step allocates, plain fine-tuning vs RefConv, counted independently of the allocator.

    python benchmarks/step_allocations.py [--model resnet18]

Every aten op's new output storage in one step (forward + backward + SGD step with momentum) is counted.
Views and in-place results share an input's storage, so they are not counted. The counts are split into
batch-sized tensors (activations) and the rest (weight-sized: kernels, gradients, optimizer
temporaries). The numbers are deterministic, so they do not depend on machine load. They are the
measurement behind issue 19's point 5: glibc returns large blocks (above its mmap threshold, 128 KiB
to 32 MiB) to the OS and faults them in again on the next step, so the bytes of large weight-sized
allocations per step are what a user's own loop pays for with the default allocator, unless a block is
freed before the next one is made (the allocator then hands the same block back): how long the blocks
live is not counted here; the page faults of the "own loop" rows of `refconv_overhead.py` measure it.

Three columns: plain fine-tuning, RefConv (its training path: one autograd Function, the kernel in a
buffer the layer keeps), and RefConv as separate differentiable ops (the layer's path under autocast and
graph capture, and its only path before).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "step_allocations.json")
LARGE = 128 * 1024  # glibc's initial mmap threshold
ROWS = ("activation", "weight-sized", "weight-sized >= 128 KiB")


class CountAllocations(TorchDispatchMode):
    def __init__(self, batch: int):
        super().__init__()
        self.batch = batch
        self.rows = {k: {"tensors": 0, "bytes": 0} for k in ROWS}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or not t.numel() or t.untyped_storage().data_ptr() in inputs:
                continue
            nbytes = t.untyped_storage().nbytes()
            kinds = ["activation"] if t.dim() and t.shape[0] == self.batch else ["weight-sized"]
            if kinds == ["weight-sized"] and nbytes >= LARGE:
                kinds.append("weight-sized >= 128 KiB")
            for kind in kinds:
                self.rows[kind]["tensors"] += 1
                self.rows[kind]["bytes"] += nbytes
        return out


def step_allocations(model, batch: int = 4, size: int = 64) -> dict:
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    step()  # momentum buffers exist from here on: the counted step is a steady-state one
    counter = CountAllocations(batch)
    with counter:
        step()
    return counter.rows


def as_separate_ops(model):
    """`model`'s RefConv layers forced onto their separate differentiable ops."""
    from reparam_zoo.layers.refconv import RefConvNd

    for module in model.modules():
        if isinstance(module, RefConvNd):
            module._runs_as_one_function = lambda *args: False
    return model


def main(argv=None) -> int:
    from reparam_zoo import convert, create_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    plain = create_model(args.model)
    results = {"command": "python benchmarks/step_allocations.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
               "model": args.model, "torch": torch.__version__, "batch": 4, "input": 64,
               "plain": step_allocations(plain), "refconv": step_allocations(convert(create_model(args.model))),
               "refconv_separate_ops": step_allocations(as_separate_ops(convert(create_model(args.model))))}
    columns = ("plain", "refconv", "refconv_separate_ops")
    print("| per step | " + " | ".join(f"{c.replace('_', ' ')} tensors | MiB" for c in columns) + " |")
    print("|---|" + "---:|---:|" * len(columns))
    for kind in ROWS:
        cells = [f"{results[c][kind]['tensors']} | {results[c][kind]['bytes'] / 2**20:.1f}" for c in columns]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
