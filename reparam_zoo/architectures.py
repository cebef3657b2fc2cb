"""Building models by name: timm and zoo names, `torchvision:<name>`, the zoo's detectors and segmenters.

`create_model` builds the model and tags it with its architecture (name, source, constructor arguments;
see `module_attrs.architecture_of`), which is what lets `modelfile.save` describe it and `modelfile.load`
rebuild it. `set_num_classes` changes a head and keeps that tag in step. The file format lives in
modelfile.py and what a MODEL argument can be in resolve.py; this module knows nothing about files except
how to build a model around a checkpoint's head size.
"""
from __future__ import annotations

import difflib
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from . import filemeta, torchvision_models
from .checkpoint import checkpoint_head_size, checkpoint_in_chans, load_checkpoint, read_state_dict, unwrap_state_dict
from .errors import ArchitectureError, ArgumentConflictError, CheckpointError, ReparamError, first_line
from .model_info import unwrap
from .module_attrs import ARCH_ATTR, architecture_of, set_architecture

__all__ = [
    "ARCH_ATTR", "ArchitectureError", "BOTH_WEIGHTS",
    "is_architecture", "create_model", "create_with_checkpoint", "architecture_of", "set_num_classes",
    "source_of", "unknown_architecture_message", "build_architecture", "check_json",
]

PathLike = Union[str, os.PathLike]

BOTH_WEIGHTS = ("--pretrained / pretrained= and --checkpoint / checkpoint= both give the weights; "
                "pass one of them")



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
        return create_with_checkpoint(name, checkpoint, num_classes=num_classes, pretrained=pretrained,
                                       **kwargs)[0]
    import timm

    if not is_architecture(name):
        raise ArchitectureError(unknown_architecture_message(name))
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ArchitectureError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        kwargs["num_classes"] = num_classes
    check_json("constructor arguments", kwargs)
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
    set_architecture(model, {"name": name, "source": source_of(name), "kwargs": arch_kwargs})
    return model


def create_with_checkpoint(name: str, checkpoint: Union[PathLike, Dict[str, torch.Tensor]], *,
                            num_classes: Optional[int], pretrained: bool = False, trust_pickle: bool = False,
                            source: Optional[str] = None, **kwargs):
    """`name` with `checkpoint`'s weights, its head sized by the checkpoint unless `num_classes` says
    otherwise; returns (model, load notes, tensor count). `source` names a state_dict already read from a
    file (for the messages)."""
    if pretrained:
        raise ArgumentConflictError(BOTH_WEIGHTS)
    if isinstance(checkpoint, Mapping):
        source = source or "state_dict"
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


def set_num_classes(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier for `num_classes` classes (timm's `reset_classifier`; torchvision models get
    the head modules of the architecture built for that many classes) and keep the architecture tag in
    step, so the saved file rebuilds the new head."""
    model = unwrap(model)
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
        set_architecture(model, {**arch, "kwargs": {**arch["kwargs"], "num_classes": num_classes}})
    return model


def source_of(name: str) -> str:
    import timm

    if torchvision_models.split_name(name) is not None:
        return "torchvision"
    if _is_dense(name):
        return "zoo-dense"
    module = getattr(timm.models.model_entrypoint(name.split(".")[0]), "__module__", "") or ""
    return "zoo" if module.startswith(__package__ + ".") else "timm"


def unknown_architecture_message(name: str) -> str:
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


def build_architecture(arch: Dict[str, Any], source: str) -> nn.Module:
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
    if arch.get("source", "timm") != source_of(name):
        raise CheckpointError(f"{source}: malformed reparam metadata (architecture {name} is a {source_of(name)} "
                              f"model, not {arch.get('source', 'timm')})")
    return create_model(name, **kwargs)


def check_json(what: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ReparamError(f"{what} must be JSON-serializable to be saved in a model file ({first_line(e)})") from None
