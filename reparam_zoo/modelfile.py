"""Self-describing model files, and what a MODEL argument can be.

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
"""
from __future__ import annotations

import difflib
import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from .checkpoint import (check_compatible, check_finite, check_readable, checkpoint_head_size, checkpoint_in_chans, non_finite,
                         load_checkpoint, read_state_dict, unpickle, unwrap_state_dict, _is_safetensors)
from .deploy import STAGES, FuseReport, apply_fuse_structure, model_stage
from .errors import ArgumentConflictError, CheckpointError, ReparamError, first_line
from .surgery import convert, refconv_layers
from .model_info import require_module, unwrap as _unwrap
from . import filemeta, torchvision_models
from .filemeta import FORMAT, FORMAT_VERSION, ModelFileInfo, fuse_to_json, parse_metadata, register_architecture_kwargs
from .fileio import atomic_write, atomic_write_file, check_output_path, same_file

__all__ = [
    "FORMAT", "FORMAT_VERSION", "STAGES", "ARCH_ATTR",
    "ArchitectureError", "ModelFileInfo", "ResolvedModel",
    "create_model", "set_num_classes", "architecture_of", "is_architecture", "ArchitectureUnknownError",
    "model_stage", "model_metadata", "parse_metadata", "read_info",
    "save", "load", "load_model", "resolve_model",
    "check_output_path", "check_finite", "atomic_write", "same_file", "register_architecture_kwargs",
]

# The architecture tag lives on the module as a plain dict attribute: deepcopy (convert/fold/fuse
# all copy) carries it along, and it pickles with the module.
ARCH_ATTR = "reparam_arch"

PathLike = Union[str, os.PathLike]


class ArchitectureError(ReparamError):
    """An architecture name that timm does not know, or a model that cannot be rebuilt from its name."""


class ArchitectureUnknownError(CheckpointError):
    """A weights file that does not say its architecture (a bare state_dict, a safetensors file without
    reparam metadata): it needs `arch`."""


# -- architectures --------------------------------------------------------------------------------------

def is_architecture(name: str) -> bool:
    """Whether `name` is a timm or zoo model name (optionally with a pretrained tag, `resnet18.a1_in1k`) or
    a torchvision classification, detection or segmentation model as `torchvision:<name>`."""
    import timm

    tv_name = torchvision_models.split_name(name)
    if tv_name is not None:
        return torchvision_models.is_known(tv_name)
    if _is_dense(name):
        return True
    return isinstance(name, str) and bool(name) and timm.is_model(name)


def _dense():
    """The zoo's detectors and segmenters (`fasterrcnn_revcol_tiny_fpn`, ...; reparam_zoo/models/dense.py),
    imported on first use: torchvision's detection code is not needed for classifiers."""
    from .models import dense

    return dense


def _is_dense(name: Any) -> bool:
    return isinstance(name, str) and name.endswith("_fpn") and _dense().is_dense_name(name)


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: Optional[Union[PathLike, Dict[str, torch.Tensor]]] = None,
    num_classes: Optional[int] = None,
    **kwargs,
) -> nn.Module:
    """Build a timm, zoo or torchvision (`torchvision:<name>`) model tagged with its architecture, so that
    `save` can describe it.

    `checkpoint` (a path or state_dict) is loaded strictly through `load_checkpoint`; `num_classes` sets the
    head size of the built model. Without `num_classes` the head takes a checkpoint's class count; with it,
    a checkpoint whose head has another size is an error (`train(num_classes=...)` replaces and trains a
    head).
    """
    if checkpoint is not None:
        return _create_with_checkpoint(name, checkpoint, num_classes=num_classes, pretrained=pretrained,
                                       **kwargs)[0]
    import timm

    if not is_architecture(name):
        raise ArchitectureError(_unknown_architecture_message(name))
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ArchitectureError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        kwargs["num_classes"] = num_classes
    _check_json("constructor arguments", kwargs)
    tv_name = torchvision_models.split_name(name)
    dense = _is_dense(name)
    try:
        if tv_name is not None:
            model = torchvision_models.create(tv_name, pretrained=pretrained, **kwargs)
        elif dense:
            model = _dense().create(name, pretrained=pretrained, **kwargs)
        else:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ArchitectureError(f"cannot build {name}: {first_line(e)}") from None
    except ValueError as e:
        if not dense:
            raise
        raise ArchitectureError(f"cannot build {name}: {first_line(e)}") from None
    except Exception as e:
        if not pretrained:
            raise
        # Anything from the hub client (offline, no such file, no weights for this tag) lands here.
        raise CheckpointError(
            f"could not get pretrained weights for {name} ({first_line(e)}); on a machine without internet "
            "pass the weights file with --checkpoint / checkpoint="
        ) from None
    arch_kwargs = dict(kwargs)
    if tv_name is not None:
        arch_kwargs["num_classes"] = model.pretrained_cfg["num_classes"]
    elif dense:
        arch_kwargs.update(_dense().dense_config(model))  # every default resolved, so the file rebuilds it
    else:
        arch_kwargs["num_classes"] = getattr(model, "num_classes", kwargs.get("num_classes"))
        arch_kwargs.setdefault("in_chans", 3)  # timm's convention for every model
    setattr(model, ARCH_ATTR, {"name": name, "source": _source_of(name), "kwargs": arch_kwargs})
    return model


def _create_with_checkpoint(name: str, checkpoint: Union[PathLike, Dict[str, torch.Tensor]], *,
                            num_classes: Optional[int], pretrained: bool = False, trust_pickle: bool = False,
                            **kwargs):
    """`name` with `checkpoint`'s weights, its head sized by the checkpoint unless `num_classes` says
    otherwise; returns (model, load notes, tensor count)."""
    if pretrained:
        raise ArgumentConflictError(_BOTH_WEIGHTS)
    source = "state_dict"
    if isinstance(checkpoint, Mapping):
        state = unwrap_state_dict(checkpoint)
    else:
        source = os.fspath(checkpoint)
        state, _ = read_state_dict(source, trust_pickle=trust_pickle)
    # the head size is read off a weightless skeleton, so the real model is built (and initialised) once
    with torch.device("meta"):
        skeleton = create_model(name, num_classes=num_classes, **kwargs)
    notes: List[str] = []
    in_chans = None if "in_chans" in kwargs or torchvision_models.split_name(name) else checkpoint_in_chans(
        skeleton, state)
    if in_chans is not None:  # e.g. grayscale weights: timm builds the stem for them
        notes.append(f"input channels from the checkpoint: {in_chans} (not {kwargs.get('in_chans', 3)})")
        kwargs["in_chans"] = in_chans
        with torch.device("meta"):
            skeleton = create_model(name, num_classes=num_classes, **kwargs)
    tv_name = torchvision_models.split_name(name)
    implied = torchvision_models.checkpoint_kwargs(tv_name, state, skeleton) if tv_name else {}
    if implied.pop(torchvision_models.FROZEN_BN, False) and torchvision_models.FROZEN_BN not in kwargs:
        notes.append("backbone BatchNorms frozen, as in the checkpoint (trained on backbone weights)")
        kwargs[torchvision_models.FROZEN_BN] = True
        with torch.device("meta"):
            skeleton = create_model(name, num_classes=num_classes, **kwargs)
    if _is_dense(name):
        head = _dense().checkpoint_num_classes(skeleton, state)
    else:
        head = checkpoint_head_size(skeleton, state)
        if head is None and implied.get("num_classes") not in (None, skeleton.pretrained_cfg.get("num_classes")):
            head = implied["num_classes"]  # a torchvision detector's or segmenter's heads, read by their class count
    if head is not None:
        built = (getattr(skeleton, "num_classes", None)
                 or (getattr(skeleton, "pretrained_cfg", None) or {}).get("num_classes"))
        if num_classes is not None:
            raise ArgumentConflictError(
                f"{source} has a {head}-class head, but num_classes / --num-classes asks for {num_classes}: leave "
                f"it out to keep the checkpoint's head, or let training replace it (reparam train ... "
                f"--num-classes {num_classes} trains the new head)"
            )
        notes.append(f"head sized from the checkpoint: {head} classes" + (f" (not {built})" if built else ""))
    model = create_model(name, num_classes=head if head is not None else num_classes, **kwargs)
    report = load_checkpoint(model, state, strict=True, source=source)
    return model, report.notes + notes, report.num_tensors


def architecture_of(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The architecture tag `create_model` put on `model` (None for models it did not build)."""
    arch = getattr(_unwrap(model), ARCH_ATTR, None)
    return arch if isinstance(arch, dict) else None


def set_num_classes(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier for `num_classes` classes (timm's `reset_classifier`; torchvision models get
    the head modules of the architecture built for that many classes) and keep the architecture tag in
    step, so the saved file rebuilds the new head."""
    model = _unwrap(model)
    arch = architecture_of(model)
    if arch is not None and arch.get("source") == "zoo-dense":
        fresh = _dense().create(arch["name"], **{**arch["kwargs"], "num_classes": num_classes})
        _dense().set_num_classes(model, fresh, arch["name"])
    elif arch is not None and arch.get("source") == "torchvision":
        fresh = torchvision_models.create(torchvision_models.split_name(arch["name"]),
                                          **{**arch["kwargs"], "num_classes": num_classes})
        torchvision_models.replace_heads(model, fresh)
    elif hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
    else:
        raise ArchitectureError(f"{type(model).__name__} has no reset_classifier(); cannot change its head")
    if arch is not None:
        setattr(model, ARCH_ATTR, {**arch, "kwargs": {**arch["kwargs"], "num_classes": num_classes}})
    return model


def _source_of(name: str) -> str:
    import timm

    if torchvision_models.split_name(name) is not None:
        return "torchvision"
    if _is_dense(name):
        return "zoo-dense"
    module = getattr(timm.models.model_entrypoint(name.split(".")[0]), "__module__", "") or ""
    return "zoo" if module.startswith(__package__ + ".") else "timm"


def _unknown_architecture_message(name: str) -> str:
    import timm

    tv_name = torchvision_models.split_name(name)
    if tv_name is not None:
        close = torchvision_models.close_matches(tv_name)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"unknown architecture '{name}' (not a torchvision classification, detection or segmentation model){hint}"
    close = difflib.get_close_matches(str(name), timm.list_models(), n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    if not hint and isinstance(name, str) and name.endswith("_fpn"):
        close = difflib.get_close_matches(name, _dense().dense_names(), n=3, cutoff=0.75)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (f"unknown architecture '{name}' (not a timm, reparam-zoo or torchvision:NAME model name, nor an "
            f"existing file){hint}")


def _build_architecture(arch: Dict[str, Any], source: str) -> nn.Module:
    # checked here too: `save` rebuilds through this, so it never writes a file that `load` would refuse
    filemeta.check_architecture(arch, source)
    name, kwargs = arch["name"], arch.get("kwargs") or {}
    if not is_architecture(name):
        fix = {
            "timm": "a timm model; update timm",
            "torchvision": "a torchvision model; update torchvision",
            "zoo-dense": "a reparam-zoo detector or segmenter; update reparam-zoo",
        }.get(arch.get("source"), "a reparam-zoo model; import the module that registers it, or update reparam-zoo")
        raise ArchitectureError(f"{source}: architecture '{name}' is not available here ({fix})")
    if arch.get("source", "timm") != _source_of(name):
        raise CheckpointError(f"{source}: malformed reparam metadata (architecture {name} is a {_source_of(name)} "
                              f"model, not {arch.get('source', 'timm')})")
    return create_model(name, **kwargs)


# -- stages and metadata --------------------------------------------------------------------------------


def model_metadata(model: nn.Module, *, extra_metadata: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """The safetensors metadata `save` writes for `model` (see the module docstring)."""
    from . import __version__

    model = _unwrap(model)
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
    report = getattr(model, "fuse_report", None)
    if isinstance(report, FuseReport):
        meta["fuse"] = _dumps(fuse_to_json(report))
    layers = refconv_layers(model)
    if layers:
        summary = getattr(model, "refconv_summary", None)
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
        _check_json("extra_metadata", extra_metadata)
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
    model = _unwrap(model)
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


def model_file_name_problem(path: PathLike, has_architecture: bool) -> Optional[str]:
    """Why `path` is a wrong name for a model file, or None: the name must say what the file holds,
    `.safetensors` for a model with an architecture (a reparam model file), `.pt`/`.pth` for one without
    (a whole-module pickle)."""
    lower = os.fspath(path).lower()
    if has_architecture and not lower.endswith(".safetensors"):
        return "the model is written as a safetensors model file; name it <name>.safetensors"
    if not has_architecture and not lower.endswith((".pt", ".pth")):
        return "a model without a rebuildable architecture is written as a whole-module pickle; name it <name>.pt"
    return None


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
    if not _is_safetensors(path):
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
    if not _is_safetensors(path):
        if trust_pickle:
            return _unpickled_module(path)
        read_state_dict(path)  # raises for pickled objects without unpickling them
        raise ArchitectureUnknownError(_bare_state_dict_message(path))
    tensors, meta = read_state_dict(path)
    info = parse_metadata(meta, source=path)
    if info is None:
        raise ArchitectureUnknownError(_no_metadata_message(path))
    return _restore(info, tensors, source=path)


def _restore(info: ModelFileInfo, tensors: Dict[str, torch.Tensor], source: str) -> nn.Module:
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
    model.reparam_extra = dict(info.extra)
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
    model = _build_architecture(info.architecture, source)
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
        if sorted(model.refconv_summary.converted_names) != sorted(names):
            raise CheckpointError(f"{source}: the saved RefConv layers do not match the architecture")
    return model


def _no_metadata_message(path: str) -> str:
    return (f"{path}: a safetensors file without reparam metadata, which does not say its architecture; "
            "name it with --arch NAME / arch=")


def _bare_state_dict_message(path: str) -> str:
    return f"{path}: a bare state_dict checkpoint, which does not say its architecture; name it with --arch NAME / arch="


def _unpickled_module(path: str) -> nn.Module:
    """The nn.Module in a trusted pickle: the file itself, or a training checkpoint's `model`/`module`/... entry."""
    obj = unpickle(path)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        for key in ("model", "module", "model_ema", "ema"):
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
        if any(isinstance(v, (torch.Tensor, dict)) for v in obj.values()):
            raise ArchitectureUnknownError(_bare_state_dict_message(path))
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, neither a model nor a state_dict")



# -- what a MODEL argument is -------------------------------------------------------------------------------

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


_BOTH_WEIGHTS = ("--pretrained / pretrained= and --checkpoint / checkpoint= both give the weights; "
                 "pass one of them")


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
        raise ArgumentConflictError(_BOTH_WEIGHTS)
    if os.path.exists(spec) and (checkpoint is not None or pretrained):
        option = "--checkpoint / checkpoint=" if checkpoint is not None else "--pretrained / pretrained="
        raise ArgumentConflictError(f"MODEL {spec} is a file with weights already; {option} goes with an "
                                    "architecture name")
    if arch is not None and arch != spec and not os.path.exists(spec) and is_architecture(spec):
        raise ArgumentConflictError(f"MODEL is the architecture {spec}, but --arch / arch= says {arch}")
    if arch is not None and not is_architecture(arch):
        raise ArchitectureError(_unknown_architecture_message(arch))
    if os.path.exists(spec):
        return _resolve_file(spec, arch=arch, num_classes=num_classes, trust_pickle=trust_pickle)
    if is_architecture(spec):
        notes: List[str] = []
        if checkpoint is not None:
            check_readable(os.fspath(checkpoint), "a weights file")
            model, notes, _ = _create_with_checkpoint(spec, checkpoint, num_classes=num_classes,
                                                      trust_pickle=trust_pickle)
        else:
            model = create_model(spec, pretrained=pretrained, num_classes=num_classes)
        how = f"weights from {os.fspath(checkpoint)}" if checkpoint is not None else (
            "pretrained weights" if pretrained else "random init")
        return ResolvedModel(model, "architecture", f"{spec} ({_source_of(spec)}, {how})",
                             path=None if checkpoint is None else os.fspath(checkpoint), notes=notes)
    if _looks_like_path(spec):
        raise CheckpointError(f"{spec}: no such file")
    raise ArchitectureError(_unknown_architecture_message(spec))


def _resolve_file(path: str, *, arch: Optional[str], num_classes: Optional[int], trust_pickle: bool) -> ResolvedModel:
    check_readable(path, "a model file")
    if _is_safetensors(path):
        info = read_info(path)
        if info is not None:
            if arch is not None and arch != info.architecture["name"]:
                raise ArgumentConflictError(
                    f"{path} holds a {info.architecture['name']} model, but --arch / arch= says {arch}")
            if num_classes is not None and num_classes != info.num_classes:
                raise ArgumentConflictError(
                    f"{path} has a {info.num_classes}-class head; --num-classes {num_classes} does not fit it"
                )
            return ResolvedModel(load(path), "reparam-file", f"{path}: {info.describe()}", path=path, info=info)
    if arch is not None:
        model, notes, count = _create_with_checkpoint(arch, path, num_classes=num_classes, trust_pickle=trust_pickle)
        return ResolvedModel(model, "checkpoint", f"{path}: {arch} weights ({count} tensors)", path=path,
                             notes=notes)
    if trust_pickle and not _is_safetensors(path):
        if num_classes is not None:
            raise ReparamError(f"{path}: a whole pickled model's head is what it is; --num-classes cannot change it")
        model = _unpickled_module(path)
        return ResolvedModel(model, "pickle", f"{path}: pickled {type(model).__name__} (trusted)", path=path)
    if _is_safetensors(path):
        raise ArchitectureUnknownError(_no_metadata_message(path))
    read_state_dict(path)  # refuses pickled objects without unpickling them
    raise ArchitectureUnknownError(_bare_state_dict_message(path))


def _looks_like_path(spec: str) -> bool:
    suffixes = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pt2", ".tar")
    return os.sep in spec or (os.altsep or os.sep) in spec or spec.lower().endswith(suffixes)


# -- helpers ------------------------------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False)


def _check_json(what: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ReparamError(f"{what} must be JSON-serializable to be saved in a model file ({first_line(e)})") from None
