"""torchvision's classification models as architectures, named `torchvision:<name>` (`torchvision:resnet50`).

They build through `torchvision.models.get_model` and get what timm models carry and reparam relies on: a
`pretrained_cfg` with the input size and normalisation of the model's published weights (timm's data
config and the default report/verify input size read it). torchvision models have no
`reset_classifier`, so a head is changed by building the architecture for the new class count and
taking over the modules whose tensors changed shape (the classifier, and auxiliary heads where the
model has them).
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, List, Optional

import torch.nn as nn

__all__ = ["PREFIX", "split_name", "is_classifier", "close_matches", "create", "replace_heads"]

PREFIX = "torchvision:"
_TORCHVISION_DEFAULT_CLASSES = 1000


def split_name(name: Any) -> Optional[str]:
    """`resnet50` for `torchvision:resnet50`; None for a name without the prefix."""
    if isinstance(name, str) and name.startswith(PREFIX):
        return name[len(PREFIX):]
    return None


def _classifiers() -> List[str]:
    import torchvision.models as tvm

    return tvm.list_models(module=tvm)


def is_classifier(name: str) -> bool:
    """Whether `name` (without the prefix) is one of torchvision's classification models."""
    return name in _classifiers()


def close_matches(name: str) -> List[str]:
    return [PREFIX + n for n in difflib.get_close_matches(name, _classifiers(), n=3, cutoff=0.75)]


def create(name: str, *, pretrained: bool = False, **kwargs) -> nn.Module:
    """torchvision's `name` with `pretrained_cfg` set; with `pretrained`, the published weights (a download)
    and, when `num_classes` differs from theirs, a new head."""
    import torchvision.models as tvm

    num_classes = kwargs.get("num_classes", _TORCHVISION_DEFAULT_CLASSES)
    if pretrained:
        # torchvision refuses num_classes != the weights' classes; build theirs, then swap the head
        kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
        model = tvm.get_model(name, weights="DEFAULT", **kwargs)
        if num_classes != _TORCHVISION_DEFAULT_CLASSES:
            replace_heads(model, tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs))
    else:
        model = tvm.get_model(name, weights=None, **kwargs)
    model.pretrained_cfg = _data_config(name, num_classes)
    return model


def _data_config(name: str, num_classes: int) -> Dict[str, Any]:
    """timm-style data config from the preprocessing of the model's published weights."""
    import torchvision.models as tvm

    cfg: Dict[str, Any] = {
        "input_size": (3, 224, 224), "crop_pct": 224 / 256, "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "num_classes": num_classes,
    }
    try:
        preset = tvm.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, AttributeError, TypeError):
        return cfg  # no published weights: ImageNet defaults
    crop = preset.crop_size[0]
    cfg.update(
        input_size=(3, crop, crop), crop_pct=crop / preset.resize_size[0],
        interpolation=preset.interpolation.value, mean=tuple(preset.mean), std=tuple(preset.std),
    )
    return cfg


def replace_heads(model: nn.Module, fresh: nn.Module) -> List[str]:
    """Move into `model` every module of `fresh` (the same architecture built for another class count)
    whose parameters differ in shape from `model`'s: the heads. Returns their names.

    Only tensors both state_dicts have are compared, so a model that was converted or fused elsewhere
    keeps its other modules as they are.
    """
    own, new = model.state_dict(), fresh.state_dict()
    changed = sorted({key.rsplit(".", 1)[0] for key in own.keys() & new.keys() if own[key].shape != new[key].shape})
    reference = next(model.parameters())
    for name in changed:
        parent, _, child = name.rpartition(".")
        head = fresh.get_submodule(name).to(device=reference.device, dtype=reference.dtype)
        setattr(model.get_submodule(parent), child, head)
    if hasattr(model, "num_classes") and hasattr(fresh, "num_classes"):
        model.num_classes = fresh.num_classes
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and hasattr(fresh, "pretrained_cfg"):
        model.pretrained_cfg = {**cfg, "num_classes": fresh.pretrained_cfg["num_classes"]}
    return changed
