"""What a MODEL argument is: an architecture name, a reparam model file, a checkpoint, or a trusted pickle.

`resolve_model` decides once: the path's kind is sniffed once (`checkpoint.is_safetensors`), a safetensors
file is opened once (its metadata and tensors read together, then checked against `arch` / `num_classes`),
and what the argument turned out to be comes back with the model for a caller to print. Building by name
is architectures.py; the file format is modelfile.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch.nn as nn

from .architectures import BOTH_WEIGHTS, create_model, create_with_checkpoint, is_architecture, source_of, \
    unknown_architecture_message
from .checkpoint import check_readable, is_safetensors, read_safetensors, read_torch_file
from .errors import ArchitectureError, ArgumentConflictError, CheckpointError, ReparamError
from .filemeta import ModelFileInfo, parse_metadata
from .modelfile import bare_state_dict_error, no_metadata_error, restore, unpickled_module

__all__ = ["ResolvedModel", "resolve_model", "load_model"]

PathLike = Union[str, os.PathLike]


@dataclass
class ResolvedModel:
    """A model from a MODEL argument and how it was obtained (for printing)."""

    model: nn.Module
    kind: str  # "architecture" | "reparam-file" | "checkpoint" | "pickle"
    description: str
    path: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    info: Optional[ModelFileInfo] = None


def load_model(
    spec: PathLike,
    *,
    arch: Optional[str] = None,
    checkpoint: Optional[PathLike] = None,
    num_classes: Optional[int] = None,
    pretrained: bool = False,
    trust_pickle: bool = False,
) -> nn.Module:
    """A model from what a command-line MODEL argument can be:

    1. a timm, zoo or torchvision architecture name (`resnet18`, `revcol_tiny`, `torchvision:resnet50`), with `checkpoint` weights or `pretrained`;
    2. a reparam `.safetensors` file (`load`); a safetensors file without reparam metadata needs `arch`;
    3. a state_dict checkpoint (`.pth`/`.pt`, official RevCol/ReXNet layouts) with `arch`, read without pickle;
    4. a whole pickled `nn.Module`, only with `trust_pickle=True`.
    """
    return resolve_model(spec, arch=arch, checkpoint=checkpoint, num_classes=num_classes, pretrained=pretrained,
                         trust_pickle=trust_pickle).model


def resolve_model(
    spec: PathLike,
    *,
    arch: Optional[str] = None,
    checkpoint: Optional[PathLike] = None,
    num_classes: Optional[int] = None,
    pretrained: bool = False,
    trust_pickle: bool = False,
) -> ResolvedModel:
    """The model a MODEL argument names (see `load_model` for what it can be), with what the argument turned
    out to be (`kind`), a one-line description and the load notes, for a caller to show."""
    spec = os.fspath(spec)
    if pretrained and checkpoint is not None:
        raise ArgumentConflictError(BOTH_WEIGHTS)
    exists = os.path.exists(spec)
    if exists and (checkpoint is not None or pretrained):
        option = "--checkpoint / checkpoint=" if checkpoint is not None else "--pretrained / pretrained="
        raise ArgumentConflictError(f"MODEL {spec} is a file with weights already; {option} goes with an "
                                    "architecture name")
    if arch is not None and arch != spec and not exists and is_architecture(spec):
        raise ArgumentConflictError(f"MODEL is the architecture {spec}, but --arch / arch= says {arch}")
    if arch is not None and not is_architecture(arch):
        raise ArchitectureError(unknown_architecture_message(arch))
    if exists:
        return _resolve_file(spec, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
    if is_architecture(spec):
        notes: List[str] = []
        if checkpoint is not None:
            check_readable(os.fspath(checkpoint), "a weights file")
            model, notes, _ = create_with_checkpoint(spec, checkpoint, num_classes=num_classes,
                                                     trust_pickle=trust_pickle)
        else:
            model = create_model(spec, pretrained=pretrained, num_classes=num_classes)
        how = f"weights from {os.fspath(checkpoint)}" if checkpoint is not None else (
            "pretrained weights" if pretrained else "random init")
        return ResolvedModel(model, "architecture", f"{spec} ({source_of(spec)}, {how})",
                             path=None if checkpoint is None else os.fspath(checkpoint), notes=notes)
    if _looks_like_path(spec):
        raise CheckpointError(f"{spec}: no such file")
    raise ArchitectureError(unknown_architecture_message(spec))


def _resolve_file(path: str, *, arch: Optional[str], num_classes: Optional[int], trust_pickle: bool) -> ResolvedModel:
    check_readable(path, "a model file")
    if is_safetensors(path):  # the one sniff of the file's kind
        tensors, meta = read_safetensors(path)  # the one open of the file
        info = parse_metadata(meta, source=path)
        if info is not None:
            if arch is not None and arch != info.architecture["name"]:
                raise ArgumentConflictError(
                    f"{path} holds a {info.architecture['name']} model, but --arch / arch= says {arch}")
            if num_classes is not None and num_classes != info.num_classes:
                raise ArgumentConflictError(
                    f"{path} has a {info.num_classes}-class head; --num-classes {num_classes} does not fit it"
                )
            return ResolvedModel(restore(info, tensors, source=path), "reparam-file", f"{path}: {info.describe()}",
                                 path=path, info=info)
        if arch is None:
            raise no_metadata_error(path)
        model, notes, count = create_with_checkpoint(arch, tensors, num_classes=num_classes, source=path)
        return ResolvedModel(model, "checkpoint", f"{path}: {arch} weights ({count} tensors)", path=path, notes=notes)
    if trust_pickle and arch is None:
        if num_classes is not None:
            raise ReparamError(f"{path}: a whole pickled model's head is what it is; --num-classes cannot change it")
        model = unpickled_module(path)
        return ResolvedModel(model, "pickle", f"{path}: pickled {type(model).__name__} (trusted)", path=path)
    state = read_torch_file(path, trust_pickle=trust_pickle)  # refuses pickled objects without unpickling them
    if arch is None:
        raise bare_state_dict_error(path)
    model, notes, count = create_with_checkpoint(arch, state, num_classes=num_classes, source=path)
    return ResolvedModel(model, "checkpoint", f"{path}: {arch} weights ({count} tensors)", path=path, notes=notes)


def _looks_like_path(spec: str) -> bool:
    suffixes = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pt2", ".tar")
    return os.sep in spec or (os.altsep or os.sep) in spec or spec.lower().endswith(suffixes)
