"""What a model says about itself: its timm config (input size, architecture), its floating dtype, and the
model inside a training wrapper."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import ReparamError

__all__ = ["save_modes", "kept_modes", "timm_cfg", "cfg_input_size", "require_input_size", "device_and_dtype", "example_inputs", "require_module", "unwrap"]


def require_module(model, function: str) -> None:
    """A clear error when a name or path is passed where a built model is expected."""
    if not isinstance(model, nn.Module):
        hint = (f"; build it first with reparam_zoo.load_model({model!r})" if isinstance(model, (str, os.PathLike))
                else "")
        raise ReparamError(f"{function}() takes an nn.Module, got {type(model).__name__}{hint}")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / torch.compile wrappers, whose state_dict keys are the model's."""
    for _ in range(3):
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def timm_cfg(model: nn.Module) -> dict:
    """timm's `pretrained_cfg` (or the older `default_cfg`); empty for models timm did not build."""
    return getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}


def cfg_input_size(model: nn.Module, test: bool = False) -> Optional[Tuple[int, ...]]:
    """The input size (C, H, W) the config declares; `test` prefers the evaluation size where it differs."""
    cfg = timm_cfg(model)
    size = (cfg.get("test_input_size") if test else None) or cfg.get("input_size")
    return tuple(size) if size else None


def require_input_size(model: nn.Module, input_size: Optional[Sequence[int]] = None, *, test: bool = False,
                       how: str = "pass --input-size C,H,W / example_inputs=", error: type = ReparamError
                       ) -> Tuple[int, ...]:
    """`input_size` when given, else the one the model's timm config declares; the one error for a model that
    declares none (timm would silently use 224x224). `how` says what to pass, `error` is the caller's class."""
    size = tuple(input_size) if input_size is not None else cfg_input_size(model, test=test)
    if not size:
        raise error(f"cannot tell the input size of {type(model).__name__} (no timm pretrained_cfg); {how}")
    return size


def device_and_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Where and in which floating dtype the model computes (float32 on CPU for a model without floats)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def example_inputs(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Tuple[object, ...]:
    """One seeded random input of `input_size` (default: the config's evaluation size) in the model's dtype,
    as the model takes it: `(image_batch,)`, or `([image],)` for a torchvision detector."""
    size = require_input_size(model, input_size, test=True)
    device, dtype = device_and_dtype(model)
    x = torch.randn((1,) + size, generator=torch.Generator().manual_seed(0))
    from .torchvision_models import example_inputs as call_inputs

    return call_inputs(model, x.to(device=device, dtype=dtype))


def save_modes(*models: nn.Module) -> Callable[[], None]:
    """Remember the train/eval flag of every module of `models`; the returned function puts each one back.

    Per module, not `model.train(was_training)`: a model in train mode may hold submodules in eval (frozen
    BatchNorms), and those must come back as they were."""
    saved = [(m, m.training) for model in models for m in model.modules()]

    def restore() -> None:
        for module, training in saved:
            module.training = training

    return restore


@contextlib.contextmanager
def kept_modes(*models: nn.Module, train: Optional[bool] = None) -> Iterator[None]:
    """Within the block `models` are in `train` mode (True/False; None: as they are); after it every module
    is back in the mode it had, also when the block raises."""
    restore = save_modes(*models)
    try:
        if train is not None:
            for model in models:
                model.train(train)
        yield
    finally:
        restore()
