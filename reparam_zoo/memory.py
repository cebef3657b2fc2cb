"""What training a model holds in memory besides its weights: gradients, and the activations autograd
keeps from the forward for the backward.

Activations are measured, not estimated: one training-mode forward at batch 2 under
`torch.autograd.graph.saved_tensors_hooks`, each saved tensor's storage counted once (views share
one), the model's own parameters and buffers left out (a conv keeps its weight for the backward, but
that memory is the weight's; so are the base-kernel neighbourhoods RefConv caches). Batch 2 because BatchNorm cannot train on a single 1x1 map (SE blocks);
the per-image figure is half of what remains after the batch-independent part, the refocused kernels
that RefConv layers keep while their transforms train. Only what the model's `requires_grad` flags
make autograd record counts, so a RefConv model in `transforms` scope and the plain model it came from
show what each kind of training keeps; a RevCol with `save_memory=True` shows its reversible saving.
The model is left as it was: modes, buffers (BatchNorm statistics) and the RNG state are restored.
A detector trains on images with targets: it gets made-up ones of the structure it trains on (boxes and
labels, masks or keypoints where it predicts them; `torchvision_models.training_inputs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from .errors import first_line
from .layers.refconv import RefConvNd
from .model_info import device_and_dtype, save_modes
from .torchvision_models import is_detector, training_inputs

__all__ = ["TrainingMemory", "training_memory", "tensor_bytes", "MEASURE_BATCH"]

MEASURE_BATCH = 2


@dataclass
class TrainingMemory:
    weight_bytes: int  # parameters + buffers (RefConv base kernels included) + RefConv's step-invariant caches
    gradient_bytes: int  # one gradient per trainable parameter
    activation_bytes: Optional[int]  # per image, kept for the backward (None: the forward failed)
    error: Optional[str] = None  # why the activations could not be measured


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensors (a tensor listed twice counts once)."""
    seen = {}
    for t in tensors:
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def training_memory(model: nn.Module, input_size: Sequence[int], call=None) -> TrainingMemory:
    """What training `model` holds besides its weights, on random images of `input_size` at batch 2, or on
    random inputs of the structure of `call` (a `verify.CallInputs`) at batch 2."""
    weights = tensor_bytes(_held(model))
    gradients = tensor_bytes(p for p in model.parameters() if p.requires_grad)
    try:
        saved = _saved_bytes(model, (MEASURE_BATCH,) + tuple(input_size), call)
    except Exception as e:  # the user's model failed in training mode: report the rest
        return TrainingMemory(weights, gradients, None, f"{type(e).__name__}: {first_line(e)}")
    per_step = sum(  # most RefConv layers keep their kernel in a buffer of their own, not in the graph
        m.weight_base.numel() * m.weight_base.element_size()
        for m in model.modules()
        if isinstance(m, RefConvNd) and m.transform_weight.requires_grad and m.keeps_kernel_in_graph()
    )
    return TrainingMemory(weights, gradients, max(saved - per_step, 0) // MEASURE_BATCH)


def _held(model: nn.Module) -> list:
    """What the model holds from step to step: parameters, buffers and RefConv's step-invariant caches."""
    caches = [t for m in model.modules() if isinstance(m, RefConvNd) for t in m.step_invariant_tensors()]
    return list(model.parameters()) + list(model.buffers()) + caches


def _saved_bytes(model: nn.Module, shape: Sequence[int], call=None) -> int:
    own = {t.untyped_storage().data_ptr() for t in _held(model)}
    storages = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a storage hold no memory of their own
            return t
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    device, dtype = device_and_dtype(model)
    restore_modes = save_modes(model)
    buffers = [(b, b.detach().clone()) for n, b in model.named_buffers() if not n.endswith("weight_base")]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        x = torch.randn(tuple(shape), device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(0))
        if call is None or is_detector(model):
            args, kwargs = training_inputs(model, x, torch.Generator().manual_seed(0)), {}
        else:
            random = call.random(MEASURE_BATCH, torch.Generator().manual_seed(0))
            args, kwargs = random.args, random.kwargs
        model.train()
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(*args, **kwargs)
        finally:
            restore_modes()
            with torch.no_grad():
                for buffer, value in buffers:
                    buffer.copy_(value)
    return sum(storages.values())

