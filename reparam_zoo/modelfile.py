"""The model file format: metadata, `save`, `load`.

A reparam model file is a safetensors file whose metadata says how to rebuild the module tree without
pickle: the timm/zoo architecture and its constructor arguments, the stage (`plain`, `refconv`,
`fused`) and what turned the architecture into that stage (the RefConv settings and converted layers,
the fuse structure). `load` rebuilds the architecture, re-applies that structure and loads the tensors
strictly, so a RefConv file resumes training and a fused file is the deployable model.

Metadata keys (every value a string; the structured ones are JSON):

    format           "reparam-zoo"
    format_version   "1"
    reparam_version  the package version that wrote the file
    torch_version    the torch version that wrote the file
    stage            "plain" | "refconv" | "fused"
    architecture     {"name", "source": "timm" | "zoo" | "torchvision", "kwargs": {..., "num_classes"}}
    refconv          {"map_k", "init", "train_scope", "converted": [layer names]}   (RefConv layers present)
    fuse             {"folded", "fused": [[conv, norm]], "reparameterized", "left_alone": [[norm, why]],
                      "verified", "max_abs_error", "max_rel_error", "rtol", "atol", "input_shapes",
                      "modules_verified", "compared_outputs"}
                                                                                   (fused structure present;
                      a model fused again, e.g. fused -> RefConv -> fused, lists every earlier pair and block too)
    extra            the caller's `extra_metadata` (JSON object), when given

A model without a rebuildable architecture (a custom module, or one unpickled from `torch.save(model)`)
can only be written as a whole-module pickle, and only when the caller says so (`trust_pickle=True`).

Neighbours: building a model by name is architectures.py, checking the metadata's values is filemeta.py,
atomic writes and output-path checks are fileio.py, and what a MODEL argument can be (a name, a reparam
file, a checkpoint, a pickle) is resolve.py. The names they used to import from here are re-exported.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn

from .architectures import (ARCH_ATTR, ArchitectureError, architecture_of, build_architecture, check_json,
                            create_model, is_architecture, set_num_classes)
from .checkpoint import (check_compatible, check_finite, check_readable, is_safetensors, read_safetensors,
                         read_torch_file, unpickle)
from .deploy import STAGES, apply_fuse_structure, model_stage
from .errors import ArchitectureUnknownError, CheckpointError, ReparamError, first_line
from .fileio import atomic_write, atomic_write_file, check_output_path, model_file_name_problem, same_file
from .filemeta import FORMAT, FORMAT_VERSION, ModelFileInfo, fuse_to_json, parse_metadata, register_architecture_kwargs
from .model_info import require_module, unwrap
from .module_attrs import fuse_report_of, refconv_summary_of, set_extra
from .surgery import convert, refconv_layers
from .version import __version__

__all__ = [
    "FORMAT", "FORMAT_VERSION", "STAGES", "ModelFileInfo", "ArchitectureUnknownError",
    "model_stage", "model_metadata", "parse_metadata", "read_info", "model_file_name_problem",
    "save", "load", "restore", "unpickled_module", "no_metadata_error", "bare_state_dict_error",
    # re-exported from their homes for callers of the one-module layout
    "ARCH_ATTR", "ArchitectureError", "create_model", "set_num_classes", "architecture_of", "is_architecture",
    "check_output_path", "check_finite", "atomic_write", "same_file", "register_architecture_kwargs",
]

PathLike = Union[str, os.PathLike]


# -- stages and metadata --------------------------------------------------------------------------------


def model_metadata(model: nn.Module, *, extra_metadata: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """The safetensors metadata `save` writes for `model` (see the module docstring)."""
    model = unwrap(model)
    arch = architecture_of(model)
    if arch is None:
        raise ReparamError(_no_architecture_message(model))
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "reparam_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "stage": model_stage(model),
        "architecture": _dumps(arch),
    }
    report = fuse_report_of(model)
    if report is not None:
        meta["fuse"] = _dumps(fuse_to_json(report))
    layers = refconv_layers(model)
    if layers:
        summary = refconv_summary_of(model)
        if summary is None:
            raise ReparamError(
                "model has RefConv layers but no refconv_summary; build it with reparam_zoo.convert so that "
                "its settings can be saved"
            )
        names = [n for n, _ in layers]
        if sorted(names) != sorted(summary.converted_names):
            raise ReparamError(
                "the model's RefConv layers differ from its refconv_summary (changed after convert?); "
                "cannot describe it"
            )
        meta["refconv"] = _dumps({
            "map_k": summary.map_k, "init": summary.init, "train_scope": summary.train_scope,
            "converted": summary.converted_names,
        })
    if extra_metadata is not None:
        if not isinstance(extra_metadata, dict):
            raise ReparamError("extra_metadata must be a dict")
        check_json("extra_metadata", extra_metadata)
        meta["extra"] = _dumps(extra_metadata)
    return meta


# -- saving -----------------------------------------------------------------------------------------------

def save(
    model: nn.Module,
    path: PathLike,
    *,
    extra_metadata: Optional[Dict[str, Any]] = None,
    trust_pickle: bool = False,
) -> str:
    """Write `model` to `path` atomically as a self-describing safetensors file; returns the path.

    Refuses non-finite weights, and checks before writing that the metadata rebuilds a module tree the
    tensors load into strictly. A model without a rebuildable architecture is pickled whole
    (`torch.save(model)`) only with `trust_pickle=True`.
    """
    require_module(model, "save")
    path = os.fspath(path)
    model = unwrap(model)
    check_output_path(path)
    state = model.state_dict()
    check_finite(state)
    has_architecture = architecture_of(model) is not None
    if not has_architecture and not trust_pickle:
        raise ReparamError(_no_architecture_message(model))
    wrong_name = model_file_name_problem(path, has_architecture)
    if wrong_name:
        raise ReparamError(f"{path}: {wrong_name}")
    if not has_architecture:
        if extra_metadata is not None:
            raise ReparamError("extra_metadata needs a safetensors model file (a rebuildable architecture)")
        atomic_write_file(path, lambda f: torch.save(model, f))
        return path

    meta = model_metadata(model, extra_metadata=extra_metadata)
    try:
        info = parse_metadata(meta, source="model")
    except CheckpointError as e:  # what load would refuse is never written
        raise ReparamError(f"cannot save: {e} (a model built with other arguments needs "
                           "reparam_zoo.filemeta.register_architecture_kwargs in the code that registers it)") from None
    _check_rebuilds(info, state)
    tensors = _storable(state)
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def _storable(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no storage shared between entries (safetensors refuses aliases, e.g. tied
    weights); an alias is stored as its own copy and loads back into both places."""
    out, seen = {}, set()
    for key, t in state.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        ptr = (t.untyped_storage().data_ptr(), t.device.type) if t.numel() else None
        if ptr is not None and ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        if ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def _check_rebuilds(info: ModelFileInfo, state: Dict[str, torch.Tensor]) -> None:
    """Rebuild the described structure on the meta device (no memory, no compute) and make sure the
    tensors would load into it strictly: a file that cannot be loaded is never written."""
    try:
        with torch.device("meta"):
            skeleton = _build_structure(info, source="model")
    except ReparamError as e:
        raise ReparamError(f"cannot save: the model cannot be rebuilt from its description ({e})") from None
    try:
        check_compatible(skeleton, state, source="the model", strict=True)
    except CheckpointError as e:
        raise ReparamError(
            f"cannot save: {e} (the model's structure no longer matches its architecture tag; change heads "
            "with reparam_zoo.modelfile.set_num_classes and stages with convert/fuse)"
        ) from None


def _no_architecture_message(model: nn.Module) -> str:
    return (
        f"{type(model).__name__} has no rebuildable architecture (it was not built by name with "
        "reparam_zoo.create_model or loaded from a reparam file), so it cannot be saved as a safetensors "
        "model file; pickling the whole module needs trust_pickle=True / --trust-pickle"
    )


# -- loading ----------------------------------------------------------------------------------------------

def read_info(path: PathLike) -> Optional[ModelFileInfo]:
    """The metadata of a reparam safetensors file without reading its tensors (None: not a reparam file)."""
    path = os.fspath(path)
    check_readable(path, "a model file")
    if not is_safetensors(path):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    return parse_metadata(meta, source=path)


def load(path: PathLike, *, trust_pickle: bool = False) -> nn.Module:
    """Rebuild a model saved by `save`, at the stage it was saved (never unpickling a safetensors file).

    A RefConv file comes back converted with the saved settings and training scope (`refconv_summary`), a
    fused file with the fused structure (`fuse_report`). A whole pickled module is loaded only with
    `trust_pickle=True` (unpickling runs code from the file).
    """
    path = os.fspath(path)
    check_readable(path, "a model file")
    if not is_safetensors(path):
        if trust_pickle:
            return unpickled_module(path)
        read_torch_file(path)  # raises for pickled objects without unpickling them
        raise bare_state_dict_error(path)
    tensors, meta = read_safetensors(path)
    info = parse_metadata(meta, source=path)
    if info is None:
        raise no_metadata_error(path)
    return restore(info, tensors, source=path)


def restore(info: ModelFileInfo, tensors: Dict[str, torch.Tensor], source: str) -> nn.Module:
    # Built on the meta device, the module tree costs neither memory nor the architecture's weight init
    # (minutes for the large RevCols); the file's tensors then become the parameters as they are.
    with torch.device("meta"):
        model = _build_structure(info, source=source)
    check_compatible(model, tensors, source=source, strict=True)
    if _assignable(model):
        model.load_state_dict(tensors, strict=True, assign=True)
    else:
        model = _build_structure(info, source=source)
        dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if len(dtypes) == 1 and dtypes != {torch.float32}:
            model.to(dtypes.pop())  # a half-precision file stays half precision
        model.load_state_dict(tensors, strict=True)
    set_extra(model, dict(info.extra))
    if info.stage == "fused":
        model.eval()
    return model


def _assignable(skeleton: nn.Module) -> bool:
    """Whether loading a state_dict with `assign=True` gives the skeleton every tensor it needs: not when
    a buffer is computed at init and not saved (non-persistent), nor when modules share a parameter
    (assigning would untie it)."""
    if any(m._non_persistent_buffers_set for m in skeleton.modules()):
        return False
    named = list(skeleton.named_parameters(remove_duplicate=False))
    return len({id(p) for _, p in named}) == len(named)


def _build_structure(info: ModelFileInfo, source: str) -> nn.Module:
    """The architecture, then the fuse structure and/or RefConv conversion the file describes."""
    model = build_architecture(info.architecture, source)
    if info.fuse is not None:
        apply_fuse_structure(model, info.fuse)
        model.train()  # the fused model is put in eval mode by the caller; a converted one trains on
    if info.refconv is not None:
        r = info.refconv
        names = [str(n) for n in r["converted"]]
        # every name must be a distinct conv of the architecture: checked in one pass, before the names
        # become include patterns (a file listing a million names must not cost a million pattern matches)
        convs = {n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
        strays = [n for n in names if n not in convs]
        if strays or len(set(names)) != len(names):
            what = f"no conv named {strays[0][:100]!r}" if strays else "a layer listed twice"
            raise CheckpointError(f"{source}: cannot re-apply the saved RefConv conversion ({what} in the architecture)")
        try:
            convert(model, map_k=int(r["map_k"]), init=str(r["init"]), train_scope=str(r["train_scope"]),
                    include=[glob.escape(n) for n in names], inplace=True)
        except ReparamError as e:
            raise CheckpointError(f"{source}: cannot re-apply the saved RefConv conversion ({e})") from None
        if sorted(refconv_summary_of(model).converted_names) != sorted(names):
            raise CheckpointError(f"{source}: the saved RefConv layers do not match the architecture")
    return model


def no_metadata_error(path: str) -> ArchitectureUnknownError:
    return ArchitectureUnknownError(f"{path}: a safetensors file without reparam metadata, which does not say its "
                                    "architecture; name it with --arch NAME / arch=")


def bare_state_dict_error(path: str) -> ArchitectureUnknownError:
    return ArchitectureUnknownError(f"{path}: a bare state_dict checkpoint, which does not say its architecture; "
                                    "name it with --arch NAME / arch=")


def unpickled_module(path: str) -> nn.Module:
    """The nn.Module in a trusted pickle: the file itself, or a training checkpoint's `model`/`module`/... entry."""
    obj = unpickle(path)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        for key in ("model", "module", "model_ema", "ema"):
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
        if any(isinstance(v, (torch.Tensor, dict)) for v in obj.values()):
            raise bare_state_dict_error(path)
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, neither a model nor a state_dict")


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False)
