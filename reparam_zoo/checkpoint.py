"""Reading weight files and fitting their key layouts to a model.

`load_checkpoint` is the single entry point: it reads a file (safetensors, or a torch file with
`weights_only=True`), unwraps the usual containers (`model`, `state_dict`, `module.` / `backbone.`
prefixes), lets the model's architecture adapt foreign layouts (official releases, timm), and loads
strictly. Architectures register their adapter with `register_checkpoint_adapter`.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .errors import CheckpointError, ReparamError, first_line, preview
from .model_info import timm_cfg

StateDict = Dict[str, torch.Tensor]
# An adapter gets the unwrapped state_dict and the target model and returns the state_dict in the
# model's own layout plus human-readable notes on what it changed (never silent).
Adapter = Callable[[StateDict, nn.Module], Tuple[StateDict, List[str]]]

_ADAPTERS: Dict[type, Adapter] = {}

# where training scripts keep the weights: timm's train.py, Lightning ("state_dict"), torchvision's references
# ("model", "model_ema"), and an EMA-only export of timm's ("state_dict_ema") last
_CONTAINER_KEYS = ("state_dict", "model", "model_state", "model_ema", "module", "state_dict_ema")
# wrappers' key prefixes: DDP/DataParallel, torch.compile, detection-style backbones, a LightningModule's
# `self.model` / `self.net`
_STRIPPABLE_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "net.")


def register_checkpoint_adapter(model_cls: type):
    """Decorator: `fn(state_dict, model) -> (state_dict, notes)` adapts foreign layouts for `model_cls`."""

    def wrap(fn: Adapter) -> Adapter:
        _ADAPTERS[model_cls] = fn
        return fn

    return wrap


def adapter_for(model: nn.Module) -> Optional[Adapter]:
    for cls in type(model).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


@dataclass
class LoadReport:
    """What `load_checkpoint` did to make the file fit."""

    path: Optional[str]
    num_tensors: int
    notes: List[str] = field(default_factory=list)
    metadata: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        where = self.path or "<state_dict>"
        lines = [f"loaded {self.num_tensors} tensors from {where}"]
        lines += [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


def read_state_dict(path: Union[str, os.PathLike], trust_pickle: bool = False) -> Tuple[StateDict, Dict[str, str]]:
    """Read tensors (and safetensors metadata) from a file without unpickling code, unless `trust_pickle`
    allows a full unpickle for a checkpoint that also holds other Python objects."""
    path = os.fspath(path)
    check_readable(path, "a weights file")
    if is_safetensors(path):
        return read_safetensors(path)
    return read_torch_file(path, trust_pickle=trust_pickle), {}


def read_safetensors(path: str) -> Tuple[StateDict, Dict[str, str]]:
    """A safetensors file's tensors and metadata, read in one open of the file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: _aligned(f.get_tensor(k)) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    return tensors, metadata


def read_torch_file(path: str, trust_pickle: bool = False) -> StateDict:
    """The state_dict in a `torch.save` file (not safetensors), read without unpickling code unless
    `trust_pickle`."""
    artifact = deployment_artifact_kind(path)
    if artifact is not None:
        raise CheckpointError(
            f"{path}: {artifact} deployment artifact, made for inference runtimes; reparam reads its own model "
            "files (.safetensors, what reparam fuse writes by default) and state_dict checkpoints"
        )
    try:
        # timm's and torchvision's training scripts save their argparse settings next to the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            # memory-mapped (zip format): the tensors' bytes stay in the file until used, so a file's claims
            # are checked against its storages before anything is read or built from them
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        msg = first_line(e)
        # torch's message always starts with "Weights only load failed": only a refused global means
        # pickled Python objects; anything else (bad opcodes) is a damaged file
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused or "Unsupported global" in str(e):
            if trust_pickle:
                return check_tensors(unwrap_state_dict(unpickle(path), source=path), path)
            what = f"pickled Python objects ({refused.group(1)})" if refused else "pickled Python objects"
            raise CheckpointError(
                f"{path}: contains {what}; loading it would run arbitrary code, refused (pass --trust-pickle / "
                "trust_pickle=True if you trust the file)"
            ) from None
        detail = str(e).split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in str(e) else msg
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first_line(detail)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first_line(e)})") from None
    return check_tensors(unwrap_state_dict(obj, source=path), path)


def check_tensors(state: StateDict, source: str) -> StateDict:
    """Refuse tensors whose storage does not back the shape they claim: sparse, quantized or non-CPU tensors,
    and views that overlap themselves (a zero-stride expanded tensor: a few bytes in the file claiming a
    500,000-row head) or reach past their storage. Checked before anything is sized or built from a shape."""
    for key, t in state.items():
        where = f"{source}: tensor '{key}'"
        if t.layout != torch.strided:
            raise CheckpointError(f"{where} is a {str(t.layout).replace('torch.', '')} tensor; model weights are "
                                  "dense tensors")
        if t.is_quantized:
            raise CheckpointError(f"{where} is a quantized tensor ({t.dtype}); reparam reads float weights")
        if t.numel() == 0:
            continue
        dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
        extent = 1
        for stride, size in dims:
            if stride < extent:
                raise CheckpointError(
                    f"{where} claims shape {tuple(t.shape)} with strides {tuple(t.stride())}: its elements overlap "
                    f"(an expanded or self-overlapping view, {t.untyped_storage().nbytes()} bytes of storage for "
                    f"{t.numel()} elements); refused")
            extent = stride * size
        needed = (t.storage_offset() + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1)
        if needed * t.element_size() > t.untyped_storage().nbytes():
            raise CheckpointError(f"{where} claims shape {tuple(t.shape)}, more than its storage of "
                                  f"{t.untyped_storage().nbytes()} bytes holds; refused")
    return state


def non_finite(state: Dict[str, torch.Tensor]) -> List[str]:
    """The names of the floating tensors in `state` that hold a NaN or Inf."""
    return [k for k, t in state.items()
            if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all())]


def check_finite(state: Dict[str, torch.Tensor], action: str = "save them") -> None:
    """Refuse NaN/Inf weights: a file holding them would silently poison whatever loads it."""
    bad = non_finite(state)
    if bad:
        raise ReparamError(f"non-finite (NaN/Inf) weights in {preview(bad, 3)}; refusing to {action}")


def unpickle(path: str):
    """A trusted pickle's object, fully unpickled (this runs the file's code): only after the user said so."""
    if deployment_artifact_kind(path) is not None:
        read_state_dict(path)  # raises the deployment-artifact error
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated file ({first_line(e)})") from None
    except (AttributeError, ModuleNotFoundError, ImportError) as e:
        raise CheckpointError(f"{path}: the pickle needs code that is not importable here ({first_line(e)})") from None


def deployment_artifact_kind(path: str) -> Optional[str]:
    """"an ONNX" / "a TorchScript" / "a pt2 (torch.export)" when `path` is such an export, else None."""
    if path.lower().endswith(".onnx"):
        return "an ONNX"
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    # both are torch zip archives under one top folder: pt2 marks itself, TorchScript carries its code
    if any(n.split("/", 1)[-1] == "archive_format" for n in names):
        return "a pt2 (torch.export)"
    if any(n.split("/", 1)[-1].startswith("code/") for n in names):
        return "a TorchScript"
    return None


def check_readable(path: str, expected: str = "a file") -> None:
    """Clear errors for the usual ways a path is not a usable file."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected {expected}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: file is empty")


def unwrap_state_dict(obj, source: str = "<object>") -> StateDict:
    """Find the tensor dict inside the common training-checkpoint containers."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    raise CheckpointError(f"{source}: no state_dict of tensors found (top-level keys: {_keys_preview(obj)})")


def strip_prefixes(state_dict: StateDict, model_keys) -> Tuple[StateDict, List[str]]:
    """Remove wrapper prefixes (`module.`, `_orig_mod.`, `backbone.`, `model.`, `net.`) the model does not use."""
    notes = []
    model_keys = set(model_keys)
    changed = True
    while changed:
        changed = False
        for prefix in _STRIPPABLE_PREFIXES:
            if state_dict and all(k.startswith(prefix) for k in state_dict) and not any(
                k.startswith(prefix) for k in model_keys
            ):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                notes.append(f"stripped key prefix '{prefix}'")
                changed = True
    return state_dict, notes


def fit_state_dict(model: nn.Module, state_dict: StateDict) -> Tuple[StateDict, List[str]]:
    """Bring a raw state_dict into `model`'s own key layout (prefixes, then the architecture adapter)."""
    state_dict, notes = strip_prefixes(state_dict, model.state_dict().keys())
    adapter = adapter_for(model)
    if adapter is not None:
        state_dict, more = adapter(state_dict, model)
        notes += more
    return state_dict, notes


def pretrained_filter(state_dict, model: nn.Module) -> StateDict:
    """timm's `pretrained_filter_fn` for the zoo: the weights out of their container, in `model`'s layout."""
    return fit_state_dict(model, unwrap_state_dict(state_dict))[0]


def load_checkpoint(
    model: nn.Module,
    checkpoint: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    *,
    strict: bool = True,
    source: Optional[str] = None,
) -> LoadReport:
    """Load weights into `model` in place; strict by default, with errors that name the keys.

    `checkpoint` is a path (safetensors, or torch file read with `weights_only=True`) or a state_dict
    (`source` names it in errors).
    """
    if isinstance(checkpoint, Mapping):
        path, metadata = None, {}
        state_dict = unwrap_state_dict(checkpoint)
    else:
        path = os.fspath(checkpoint)
        state_dict, metadata = read_state_dict(path)
    state_dict, notes = fit_state_dict(model, state_dict)
    check_compatible(model, state_dict, source=path or source or "state_dict", strict=strict)
    model.load_state_dict(state_dict, strict=strict)
    return LoadReport(path=path, num_tensors=len(state_dict), notes=notes, metadata=metadata)


def check_compatible(model: nn.Module, state_dict: StateDict, *, source: str, strict: bool = True) -> None:
    """Raise CheckpointError naming missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    for k in own:
        if k in state_dict:
            _check_kind(own[k], state_dict[k], k, source)
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing keys ({preview(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({preview(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({preview(mismatched)})")
    if problems:
        name = type(model).__name__
        hint = _head_size_hint(own, state_dict) if len(problems) == 1 and mismatched else ""
        raise CheckpointError(f"{source} does not fit {name}: " + "; ".join(problems) + hint)


def _kind(t: torch.Tensor) -> str:
    if t.layout != torch.strided:
        return "sparse"
    if t.is_quantized:
        return "quantized"
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "floating-point"
    return "boolean" if t.dtype == torch.bool else "integer"


def _check_kind(own: torch.Tensor, theirs: torch.Tensor, key: str, source: str) -> None:
    """A tensor of another kind than the model's would be cast on loading: a complex weight loses its imaginary
    part, an integer one its meaning. Refused with the key named."""
    expected, got = _kind(own), _kind(theirs)
    if expected != got:
        raise CheckpointError(f"{source}: '{key}' is {_a(got)} tensor ({theirs.dtype}), the model expects "
                              f"{_a(expected)} tensor ({own.dtype}); refused")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _head_size_hint(own: StateDict, state_dict: StateDict) -> str:
    n = _other_head_size(own, state_dict)
    return "" if n is None else f"; a {n}-class head? build the model with --num-classes {n} / num_classes={n}"


def _other_head_size(own: StateDict, state_dict: StateDict) -> Optional[int]:
    """N when the state_dict differs from the model only in the output size of a few tensors, all N
    instead of the same M: a classifier (and auxiliary heads) for N classes instead of M."""
    if own.keys() != state_dict.keys():
        return None
    mismatched = [k for k in own if own[k].shape != state_dict[k].shape]
    if not mismatched or len(mismatched) > 4:
        return None
    if any(own[k].dim() == 0 or own[k].shape[1:] != state_dict[k].shape[1:] for k in mismatched):
        return None
    sizes = {(state_dict[k].shape[0], own[k].shape[0]) for k in mismatched}
    return int(next(iter(sizes))[0]) if len(sizes) == 1 else None


def checkpoint_head_size(model: nn.Module, state_dict: StateDict) -> Optional[int]:
    """The class count of a checkpoint made for `model`'s architecture with another head size, or None
    when it fits `model` (or differs in more than its head)."""
    fitted, _ = fit_state_dict(model, dict(state_dict))
    return _other_head_size(model.state_dict(), fitted)


def checkpoint_in_chans(model: nn.Module, state_dict: StateDict) -> Optional[int]:
    """The input channel count of a checkpoint whose first conv (timm's `first_conv`) takes another
    number of channels than `model`'s, or None."""
    first = timm_cfg(model).get("first_conv")
    if not isinstance(first, str):
        return None
    key = first + ".weight"
    fitted, _ = fit_state_dict(model, dict(state_dict))
    ours, theirs = model.state_dict().get(key), fitted.get(key)
    if ours is None or theirs is None or ours.dim() != theirs.dim() or ours.dim() < 3:
        return None
    if theirs.shape[1] == ours.shape[1] or theirs.shape[0] != ours.shape[0] or theirs.shape[2:] != ours.shape[2:]:
        return None
    return int(theirs.shape[1])


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` in memory aligned as PyTorch allocates it. safetensors hands out tensors at their offset in the file
    (8-byte aligned at best), and MKL's matmuls round differently on such memory: a loaded model would not
    compute bit for bit what the saved one did."""
    return t if t.data_ptr() % _ALIGNMENT == 0 else t.clone()


_ALIGNMENT = 64  # bytes: c10's CPU allocator, an AVX-512 vector


def is_safetensors(path: str) -> bool:
    """Whether `path` is a safetensors file (by name, else by its first bytes): the one sniff of a file's kind."""
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object
    return len(head) == 9 and head[8:9] == b"{"


def _keys_preview(obj) -> str:
    if isinstance(obj, Mapping):
        return preview([str(k) for k in obj.keys()]) or "none"
    return type(obj).__name__

