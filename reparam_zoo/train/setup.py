"""Setting a run up: the model (loaded, converted or adopted, with what trains), the data, the loaders and
the optimizer. Functions that return what they build; the order is the caller's (`run.py`)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..data import EpochSampler, ShardSampler, make_loader
from ..deploy import fold
from ..module_attrs import refconv_summary_of
from ..surgery import TRAIN_SCOPES, apply_train_scope, convert, refconv_layers
from .config import DEFAULT_MAP_K, OPTIMIZERS, PLAIN_SCOPE, TrainConfig, TrainError
from .tasks import TaskData

__all__ = ["Reference", "load_input_model", "prepare_model", "Loaders", "build_loaders", "Optimization",
           "build_optimizer", "float32", "describe_start"]


@dataclass
class Reference:
    """What the sanity check compares the model that trains with."""

    model: nn.Module
    name: str = "input model"
    exact: bool = True  # bit-identical scores expected (a zero-init conversion)


def load_input_model(config: TrainConfig, given: Optional[nn.Module], log) -> nn.Module:
    """The MODEL of the run: a copy of the caller's module (never modified), or what the MODEL argument names."""
    if given is not None:
        log(f"model: {config.model}")
        return copy.deepcopy(given)
    if config.model.startswith("<in-memory"):
        raise TrainError(f"this run trained an in-memory model ({config.model}); pass it again to resume()")
    from ..resolve import resolve_model

    resolved = resolve_model(config.model, arch=config.arch, checkpoint=config.checkpoint,
                             pretrained=config.pretrained, trust_pickle=config.trust_pickle)
    log(f"model: {resolved.description}")
    for note in resolved.notes:
        log(f"  - {note}")
    return resolved.model


def prepare_model(model: nn.Module, config: TrainConfig, head: set, *, fresh: bool, log) -> Tuple[nn.Module, Reference]:
    """The RefConv model that trains, with its training scope applied (`config.train_scope` and `map_k` are
    settled here and recorded), and what its sanity check compares with: the input model itself, or the
    folded form of an already converted one. `head`: parameters that train besides the scope's.
    `train_scope` "all" (PLAIN_SCOPE) is ordinary training: the plain model as it is, every weight trains."""
    if config.train_scope == PLAIN_SCOPE:
        return _plain(model, log)
    if refconv_layers(model):
        summary = refconv_summary_of(model)
        own = getattr(summary, "train_scope", None)
        own = own if own in TRAIN_SCOPES else None
        if config.train_scope is None:  # not given: the model's own, recorded in config.json from now on
            config.train_scope = own or "transforms"
            how = "the model's own" if own else "default; the model does not record one"
        elif not fresh:
            how = "as the run started"
        else:
            how = "given" + (f"; the model's own is {own}" if own and own != config.train_scope else "")
        apply_train_scope(model, config.train_scope)
        if summary is not None:
            summary.train_scope = config.train_scope
        config.map_k = _adopted_map_k(model, config.map_k if fresh else None)
        log(f"model is already converted ({len(refconv_layers(model))} RefConv layers); "
            f"training scope {config.train_scope} ({how})")
        # its plain form is what it has to agree with: exactly while the transforms are still zero
        exact = all(not bool(m.transform_weight.any()) for _, m in refconv_layers(model))
        reference = Reference(fold(model), "folded model", exact) if fresh else Reference(model)
        converted = model
    else:
        if config.train_scope is None:
            config.train_scope = "transforms"
        if config.map_k is None:
            config.map_k = DEFAULT_MAP_K
        converted = convert(model, map_k=config.map_k, train_scope=config.train_scope)
        log(f"converted with default settings (map_k={config.map_k}, zero init): "
            + str(refconv_summary_of(converted)).splitlines()[0].removeprefix("RefConv: "))
        reference = Reference(model)
    for name, p in converted.named_parameters():
        if name in head:
            p.requires_grad_(True)
    return converted, reference


def _plain(model: nn.Module, log) -> Tuple[nn.Module, Reference]:
    """Ordinary training of every weight: no conversion. A RefConv model has no plain weights to train (its
    base kernels are frozen buffers)."""
    layers = refconv_layers(model)
    if layers:
        raise TrainError(f"train scope {PLAIN_SCOPE} trains a plain model's weights, but the model has {len(layers)} "
                         f"RefConv layers; fold it first (reparam fuse --fold-only), or choose a RefConv scope "
                         f"({', '.join(TRAIN_SCOPES)})")
    for p in model.parameters():
        p.requires_grad_(True)
    log(f"plain training: every weight trains (train scope {PLAIN_SCOPE}, no RefConv conversion)")
    # a copy: the sanity check moves its reference back to the CPU afterwards
    return model, Reference(copy.deepcopy(model))


def _adopted_map_k(model: nn.Module, wanted: Optional[int]) -> int:
    """An already converted model trains with its own transform kernel, and config.json records that one."""
    own = sorted({m.map_k for _, m in refconv_layers(model)})
    if wanted is not None and own != [wanted]:
        raise TrainError(f"map_k {wanted} was asked for, but the model's RefConv layers already have map_k="
                         f"{', '.join(map(str, own))}; map_k applies to models converted here (leave it out, "
                         "or train the unconverted model)")
    return own[0]


def float32(model: nn.Module, reference: Optional[nn.Module], log) -> None:
    """The optimizer and BatchNorm statistics need float32 weights; --amp computes in low precision."""
    low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                  if p.is_floating_point() and p.dtype != torch.float32})
    if low:
        model.float()
        if reference is not None:
            reference.float()
        log(f"note: the model's weights are {', '.join(low)}; training in float32 (--amp / amp=True for mixed precision)")


@dataclass
class Loaders:
    train: Any
    val: Any
    sampler: EpochSampler  # set_epoch(epoch, skip) before each epoch
    steps_per_epoch: int


def build_loaders(data: TaskData, config: TrainConfig, procs) -> Loaders:
    sampler = EpochSampler(data.train, num_replicas=procs.world_size, rank=procs.rank, seed=config.seed)
    steps = len(sampler) // config.batch_size
    if steps == 0:
        raise TrainError(f"{config.data_dir}/train has {len(data.train)} images, fewer than one batch of "
                         f"{config.batch_size} per process; lower --batch-size / batch_size=")
    pin = procs.device.type == "cuda"
    train = make_loader(data.train, sampler, batch_size=config.batch_size, workers=config.workers, drop_last=True,
                        pin_memory=pin, collate_fn=data.collate)
    val_sampler = ShardSampler(data.val, num_replicas=procs.world_size, rank=procs.rank)
    val = make_loader(data.val, val_sampler, batch_size=config.batch_size, workers=config.workers, drop_last=False,
                      pin_memory=pin, collate_fn=data.collate)
    return Loaders(train=train, val=val, sampler=sampler, steps_per_epoch=steps)


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm scheduler, stepped per update with the global step
    scaler: torch.amp.GradScaler
    autocast: Callable[[], Any]  # a fresh autocast context (disabled without amp)
    trainable: List[str]  # names of the parameters that train (saved in the checkpoint)


def build_optimizer(model: nn.Module, config: TrainConfig, steps_per_epoch: int, device: torch.device) -> Optimization:
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # timm's factory: only parameters that require grad, no weight decay on biases and norms
    optimizer = create_optimizer_v2(model, opt=OPTIMIZERS[config.optimizer], lr=config.lr,
                                    weight_decay=config.weight_decay, momentum=config.momentum)
    warmup = config.warmup_epochs * steps_per_epoch
    total = config.epochs * steps_per_epoch
    # Stepped per update: the LR is a function of the update count alone (timm schedulers are stateless), so
    # resuming only needs that count.
    scheduler = CosineLRScheduler(optimizer, t_initial=total - warmup, warmup_t=warmup, warmup_prefix=True,
                                  warmup_lr_init=config.lr / max(1, warmup), lr_min=0.0, t_in_epochs=False)
    cuda_half = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda_half)
    dtype = torch.float16 if cuda_half else torch.bfloat16
    return Optimization(optimizer=optimizer, scheduler=scheduler, scaler=scaler, trainable=trainable,
                        autocast=lambda: torch.autocast(device.type, dtype=dtype, enabled=config.amp))


def describe_start(model: nn.Module, data: TaskData, config: TrainConfig, steps_per_epoch: int, procs, *,
                   fresh: bool, log) -> None:
    counts: Dict[str, int] = {}
    transforms = {id(m.transform_weight) for _, m in refconv_layers(model)}
    for p in model.parameters():
        if p.requires_grad:
            key = "transforms" if id(p) in transforms else "other"
            counts[key] = counts.get(key, 0) + p.numel()
    # the same total as `reparam report`'s training params: every parameter plus the frozen base kernels
    # (buffers, not parameters)
    base_kernels = sum(m.weight_base.numel() for _, m in refconv_layers(model))
    total = sum(p.numel() for p in model.parameters()) + base_kernels
    size = data.input_size
    what = (f"{counts.get('other', 0):,} params" if config.train_scope == PLAIN_SCOPE else
            f"{counts.get('transforms', 0):,} transform params" + (f" + {counts['other']:,} other" if counts.get("other") else ""))
    log(f"training {config.train_scope}: {what}"
        + f" of {total:,} training params, base kernels included | {len(data.train)} train / {len(data.val)} val "
        f"images, {len(data.classes)} classes, input {size[1]}x{size[2]}")
    if fresh:  # the run's log says once which output index is which class
        import json

        log(f"classes (output index order): {json.dumps(data.classes)}", console=False)
    log(f"{config.epochs} epochs x {steps_per_epoch} steps, batch {config.batch_size} x {procs.world_size} "
        f"process(es) on {procs.device}, {config.optimizer} lr {config.lr} wd {config.weight_decay}, warmup "
        f"{config.warmup_epochs} epoch(s) then cosine" + (", amp" if config.amp else "")
        + (", channels_last" if config.channels_last else ""))
