"""The zoo as dense-prediction backbones: RevCol and ReXNetV1 under torchvision's detectors and a
DeepLabV3-style segmenter, with a feature pyramid (FPN) between them.

Names read like torchvision's own (`fasterrcnn_resnet50_fpn`): `{head}_{backbone}_fpn`, where head is
one of `fasterrcnn`, `maskrcnn`, `retinanet`, `fcos`, `deeplabv3` and backbone any registered RevCol or
ReXNetV1 variant, e.g. `fasterrcnn_revcol_tiny_fpn`, `maskrcnn_revcol_base_fpn`,
`retinanet_rexnetv1_100_fpn`, `deeplabv3_revcol_small_fpn`. They are MODEL names everywhere a timm name
is (`reparam_zoo.create_model`, the CLI, model files).

Structure and keys follow torchvision's FPN models: `backbone.body` is the zoo model itself (its own
keys, so `backbone.body.subnet0.level1...` are the official RevCol names), read through its timm
feature API (`forward_intermediates` at its `feature_info` taps of strides 4-32); `backbone.fpn` is
torchvision's `FeaturePyramidNetwork`; the heads are torchvision's `FasterRCNN`, `MaskRCNN`,
`RetinaNet` and `FCOS` (their default anchors and sizes; the extra pyramid levels of torchvision's
ResNet-50 versions: max-pool P6 for the R-CNNs, P6/P7 from P5 for RetinaNet and FCOS, which read the
strides 8-32) and `DeepLabHead` for the segmenter. The segmenter reads one map, the pyramid's stride-8
level, so its FPN (`FinestLevelFPN`) takes the strides 8-32 and builds and runs only what that level
needs: the lateral convs of every level (the top-down path) and the one output conv of stride 8. Every
parameter of every dense model is used by its forward (tests/test_dense_backbones.py checks it).

Architecture arguments (all shape arguments, recorded in model files): `num_classes` (detectors 91 as
torchvision's COCO models, segmenter 21), `trainable_layers` (torchvision's `trainable_backbone_layers`:
how many of the backbone's 5 stages train, counted from the top; the stem is stage 0 and stage k the
modules that produce the stride 2^(k+1) map, for RevCol level k-1 of *every* column with its alpha;
frozen stages get `requires_grad=False` and, for BatchNorm backbones, frozen statistics through
timm's `freeze`; default 5, all), and for the detectors `min_size` / `max_size` (torchvision's resize).

RevCol trains reversibly inside the detector by default (`save_memory=True`, the zoo default); switch
with `model.backbone.body.save_memory = False`. Its gradients are those of ordinary backprop, frozen
stages included (tests/test_dense_backbones.py checks this in float64).

Checkpoints: a file in the model's own layout loads as is; an official RevCol detection or segmentation
checkpoint (mmdet/mmseg: `backbone.*` weights next to `neck.*`, `rpn_head.*`, `roi_head.*`,
`decode_head.*`, `auxiliary_head.*`, usually under `state_dict`) and a classification checkpoint of the
backbone load into `backbone.body`, the rest keeping its initialisation; the load notes say which keys
were ignored and how many tensors kept theirs.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchvision.models import detection
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from ..checkpoint import StateDict, check_compatible, fit_state_dict, register_checkpoint_adapter

__all__ = [
    "HEADS", "BACKBONE_FAMILIES", "NUM_STAGES", "ZooBackboneWithFPN", "FinestLevelFPN", "DenseModel",
    "FasterRCNN", "MaskRCNN", "RetinaNet", "FCOS", "FPNSegmenter",
    "split_name", "is_dense_name", "dense_names", "backbone_names", "create", "dense_config",
    "class_modules", "set_num_classes", "checkpoint_num_classes",
]

NUM_STAGES = 5  # stem + the stages ending at strides 4, 8, 16, 32 (torchvision's trainable_backbone_layers range)
FPN_CHANNELS = 256
SEGMENTER_FEATURE_STRIDE = 8  # DeepLabV3's output stride in torchvision (dilated ResNet)
DETECTOR_MIN_SIZE, DETECTOR_MAX_SIZE = 800, 1333  # torchvision's detectors' resize
SEGMENTER_INPUT_SIZE = 520  # torchvision's segmentation evaluation size
SIZE_DIVISIBLE = 32  # RevCol's up-fusions need maps that halve exactly: inputs are padded to this


# -- the builder table ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadSpec:
    """One dense-prediction architecture over an FPN backbone."""

    builder: str  # class in this module (a thin subclass of torchvision's)
    strides: Tuple[int, ...]  # backbone strides fed to the FPN
    extra_levels: Optional[str]  # "maxpool" (P6 by max-pooling), "p6p7" (from P5), None
    default_classes: int
    task: str  # "detection" | "segmentation"
    class_modules: Tuple[str, ...]  # the modules whose shape depends on num_classes
    class_count_key: str  # the tensor whose first dimension is num_classes (times anchors per location)
    finest_level_only: bool = False  # the head reads the pyramid's finest level alone (FinestLevelFPN)


@dataclass(frozen=True)
class BackboneFamily:
    """A zoo family usable as a backbone: its timm name prefix and how its parameters map to stages."""

    prefix: str
    module: str  # the module that registers it with timm
    stage_modules: Callable[[nn.Module, int], List[str]]  # (body, stage) -> module names of that stage
    stage_parameters: Callable[[nn.Module, int], List[str]]  # parameters of the stage outside those modules


def _revcol_stage_modules(body: nn.Module, stage: int) -> List[str]:
    if stage == 0:
        return ["stem"]
    return [f"subnet{j}.level{stage - 1}" for j in range(body.num_columns)]


def _revcol_stage_parameters(body: nn.Module, stage: int) -> List[str]:
    return [] if stage == 0 else [f"subnet{j}.alpha{stage - 1}" for j in range(body.num_columns)]


def _rexnet_stage_modules(body: nn.Module, stage: int) -> List[str]:
    # Stage boundaries are the feature taps of strides 2, 4, 8, 16 (`features.N` of feature_info): stage 0
    # is the stem and the stride-2 block, stage k ends at the stride 2^(k+1) tap.
    taps = [int(info["module"].split(".")[1]) for info in body.feature_info]
    bounds = [-1] + taps[:NUM_STAGES - 1] + [len(body.features) - 1]
    return [f"features.{n}" for n in range(bounds[stage] + 1, bounds[stage + 1] + 1)]


BACKBONE_FAMILIES: Dict[str, BackboneFamily] = {
    "revcol": BackboneFamily("revcol_", "reparam_zoo.models.revcol", _revcol_stage_modules, _revcol_stage_parameters),
    "rexnetv1": BackboneFamily("rexnetv1_", "reparam_zoo.models.rexnet", _rexnet_stage_modules,
                               lambda body, stage: []),
}

HEADS: Dict[str, HeadSpec] = {
    "fasterrcnn": HeadSpec("FasterRCNN", (4, 8, 16, 32), "maxpool", 91, "detection",
                           ("roi_heads.box_predictor",), "roi_heads.box_predictor.cls_score.weight"),
    "maskrcnn": HeadSpec("MaskRCNN", (4, 8, 16, 32), "maxpool", 91, "detection",
                         ("roi_heads.box_predictor", "roi_heads.mask_predictor.mask_fcn_logits"),
                         "roi_heads.box_predictor.cls_score.weight"),
    "retinanet": HeadSpec("RetinaNet", (8, 16, 32), "p6p7", 91, "detection",
                          ("head.classification_head.cls_logits",), "head.classification_head.cls_logits.weight"),
    "fcos": HeadSpec("FCOS", (8, 16, 32), "p6p7", 91, "detection", ("head.classification_head.cls_logits",),
                     "head.classification_head.cls_logits.weight"),
    # the stride-8 map alone: a stride-4 level would feed no output (the top-down path runs coarse to fine)
    "deeplabv3": HeadSpec("FPNSegmenter", (SEGMENTER_FEATURE_STRIDE, 16, 32), None, 21, "segmentation",
                          ("classifier.4",), "classifier.4.weight", finest_level_only=True),
}

_NAME = re.compile(r"^(?P<head>[a-z0-9]+?)_(?P<backbone>.+)_fpn$")


def backbone_names() -> List[str]:
    """Every registered zoo variant that can be a backbone (RevCol and ReXNetV1), family by family."""
    import timm

    from . import revcol, rexnet  # noqa: F401  (registration)

    names = []
    for family in BACKBONE_FAMILIES.values():
        names += [n for n in timm.list_models(family.prefix + "*")
                  if getattr(timm.models.model_entrypoint(n), "__module__", "") == family.module]
    return names


def split_name(name: Any) -> Optional[Tuple[str, str]]:
    """(head, backbone) for a dense zoo name (`fasterrcnn_revcol_tiny_fpn` -> ("fasterrcnn", "revcol_tiny")),
    None for any other string."""
    if not isinstance(name, str):
        return None
    match = _NAME.match(name)
    if match is None or match["head"] not in HEADS:
        return None
    backbone = match["backbone"]
    if not any(backbone.startswith(f.prefix) for f in BACKBONE_FAMILIES.values()) or backbone not in backbone_names():
        return None
    return match["head"], backbone


def is_dense_name(name: Any) -> bool:
    return split_name(name) is not None


def dense_names() -> List[str]:
    return [f"{head}_{backbone}_fpn" for head in HEADS for backbone in backbone_names()]


def _family(backbone: str) -> BackboneFamily:
    return next(f for f in BACKBONE_FAMILIES.values() if backbone.startswith(f.prefix))


# -- the backbone -------------------------------------------------------------------------------------

class ZooBackboneWithFPN(nn.Module):
    """torchvision's `BackboneWithFPN` for a model with timm's feature API.

    torchvision's own class reads features with `IntermediateLayerGetter`, which runs the children one
    after another; a RevCol's maps come out of its columns, so the body is read through
    `forward_intermediates` instead. Attributes (`body`, `fpn`, `out_channels`) and output (an
    OrderedDict "0".."n" plus the extra levels) are those of torchvision's class; with `finest_level_only`
    the FPN is a `FinestLevelFPN` and the output its one level "0".
    """

    def __init__(self, body: nn.Module, indices: Sequence[int], out_channels: int = FPN_CHANNELS,
                 extra_blocks: Optional[nn.Module] = None, finest_level_only: bool = False):
        super().__init__()
        self.body = body
        self.indices = list(indices)
        in_channels = [body.feature_info[i]["num_chs"] for i in self.indices]
        if finest_level_only:
            if extra_blocks is not None:
                raise ValueError("a finest-level FPN has no extra levels")
            self.fpn = FinestLevelFPN(in_channels, out_channels)
        else:
            self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        maps = self.body.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return self.fpn(OrderedDict((str(k), m) for k, m in enumerate(maps)))


class FinestLevelFPN(FeaturePyramidNetwork):
    """torchvision's FPN computing its finest output level only, for a head that reads that one map.

    torchvision's class computes every level's 3x3 output conv; a single-map head would leave all but one
    of them computed and unused, weights a deployed model carries for nothing. This one keeps the lateral
    1x1 convs of every input level (the coarser levels reach the finest through the top-down path, as in
    torchvision's forward) and the output conv of the finest level alone (`layer_blocks.0`), and returns
    {first input name: that map}. Same initialisation and arithmetic as torchvision's class for that level.
    """

    def __init__(self, in_channels_list: List[int], out_channels: int):
        super().__init__(in_channels_list, out_channels)
        del self.layer_blocks[1:]

    def forward(self, x: Dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        names, maps = list(x), list(x.values())
        last_inner = self.inner_blocks[-1](maps[-1])
        for idx in range(len(maps) - 2, -1, -1):
            lateral = self.inner_blocks[idx](maps[idx])
            last_inner = lateral + F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
        return OrderedDict([(names[0], self.layer_blocks[0](last_inner))])


def _feature_indices(body: nn.Module, strides: Sequence[int]) -> List[int]:
    reductions = [info["reduction"] for info in body.feature_info]
    missing = [s for s in strides if s not in reductions]
    if missing:
        raise ValueError(f"{type(body).__name__} has no feature map at stride {missing} (it has {reductions})")
    return [reductions.index(s) for s in strides]


def _freeze_stages(body: nn.Module, family: BackboneFamily, trainable_layers: int) -> None:
    """torchvision's trainable_backbone_layers: the first NUM_STAGES - trainable_layers stages are frozen,
    their BatchNorms become FrozenBatchNorm2d (timm's `freeze`), so a frozen stage also keeps its statistics."""
    from timm.utils.model import freeze

    frozen = range(NUM_STAGES - trainable_layers)
    modules = [name for stage in frozen for name in family.stage_modules(body, stage)]
    if modules:  # freeze() with no names freezes the whole model
        freeze(body, modules, include_bn_running_stats=True)
    for stage in frozen:
        for name in family.stage_parameters(body, stage):
            body.get_parameter(name).requires_grad_(False)


# -- the models -----------------------------------------------------------------------------------------

class DenseModel:
    """Mixin of the dense zoo models: marks them for the checkpoint adapter below and records their
    architecture arguments (`dense_config`)."""

    dense_config: Dict[str, Any]


# Thin subclasses: torchvision's classes as they are, marked for the checkpoint adapter.
class FasterRCNN(DenseModel, detection.FasterRCNN):
    pass


class MaskRCNN(DenseModel, detection.MaskRCNN):
    pass


class RetinaNet(DenseModel, detection.RetinaNet):
    pass


class FCOS(DenseModel, detection.FCOS):
    pass


class FPNSegmenter(DenseModel, DeepLabV3):
    """DeepLabV3 over an FPN: torchvision's `DeepLabHead` (ASPP) on the pyramid's stride-8 map (DeepLabV3's
    output stride in torchvision; the FPN computes that level alone, from the strides 8-32), logits
    upsampled bilinearly to the input, output `{"out": logits}` as torchvision's segmenters. Inputs are
    zero-padded to a multiple of 32 and the logits cropped back, so any image size works (RevCol's
    up-fusions need maps that halve exactly)."""

    def __init__(self, backbone: ZooBackboneWithFPN, num_classes: int, feature: str):
        super().__init__(backbone, DeepLabHead(backbone.out_channels, num_classes), None)
        self.feature = feature

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        padded = F.pad(x, (0, -width % SIZE_DIVISIBLE, 0, -height % SIZE_DIVISIBLE))
        logits = self.classifier(self.backbone(padded)[self.feature])
        logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return OrderedDict(out=logits[..., :height, :width])


_BUILDERS = {cls.__name__: cls for cls in (FasterRCNN, MaskRCNN, RetinaNet, FCOS, FPNSegmenter)}


def _extra_blocks(kind: Optional[str]) -> Optional[nn.Module]:
    if kind == "maxpool":
        return LastLevelMaxPool()
    if kind == "p6p7":
        return LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS)  # from P5, as torchvision's RetinaNet/FCOS
    return None


def _check_int(what: str, value: Any, low: int, high: Optional[int] = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{what} must be an integer {bound}, got {value!r}")
    return value


def create(name: str, *, pretrained: bool = False, num_classes: Optional[int] = None,
           trainable_layers: int = NUM_STAGES, min_size: Optional[int] = None,
           max_size: Optional[int] = None) -> nn.Module:
    """Build a dense zoo model by name (see the module docstring). `pretrained` loads the backbone's
    ImageNet weights through timm (a download), as torchvision's `weights_backbone`."""
    import timm

    parts = split_name(name)
    if parts is None:
        raise ValueError(f"not a dense zoo model name: {name!r}")
    head_name, backbone_name = parts
    head = HEADS[head_name]
    num_classes = head.default_classes if num_classes is None else _check_int("num_classes", num_classes, 1)
    trainable_layers = _check_int("trainable_layers", trainable_layers, 0, NUM_STAGES)
    config: Dict[str, Any] = dict(num_classes=num_classes, trainable_layers=trainable_layers)
    if head.task == "detection":
        min_size = DETECTOR_MIN_SIZE if min_size is None else _check_int("min_size", min_size, 1)
        max_size = DETECTOR_MAX_SIZE if max_size is None else _check_int("max_size", max_size, 1)
        config.update(min_size=min_size, max_size=max_size)
    elif (min_size, max_size) != (None, None):
        raise ValueError(f"{head_name} is a segmenter: min_size / max_size apply to detectors only")

    body = timm.create_model(backbone_name, pretrained=pretrained, num_classes=0)
    indices = _feature_indices(body, head.strides)
    body.prune_intermediate_layers(indices, prune_head=True)
    _freeze_stages(body, _family(backbone_name), trainable_layers)
    backbone = ZooBackboneWithFPN(body, indices, extra_blocks=_extra_blocks(head.extra_levels),
                                  finest_level_only=head.finest_level_only)
    cls = _BUILDERS[head.builder]
    if head.task == "detection":
        model = cls(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size)
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # images in [0, 1]: the detector normalises them itself
        size = min_size
    else:
        feature = str(head.strides.index(SEGMENTER_FEATURE_STRIDE))
        model = cls(backbone, num_classes, feature)
        mean, std = body.pretrained_cfg["mean"], body.pretrained_cfg["std"]  # torchvision's convention
        size = SEGMENTER_INPUT_SIZE
    model.dense_config = config
    # timm-style data config, as the other architectures carry (report/verify read the input size)
    model.pretrained_cfg = {
        "input_size": (3, size, size), "mean": tuple(mean), "std": tuple(std), "num_classes": num_classes,
        "interpolation": "bilinear", "crop_pct": 1.0, "task": head.task, "backbone": backbone_name,
    }
    return model


def dense_config(model: nn.Module) -> Dict[str, Any]:
    """The architecture arguments `create` resolved for `model` (what a model file records)."""
    return dict(model.dense_config)


def class_modules(name: str) -> Tuple[str, ...]:
    """The modules of `name`'s architecture whose shapes depend on the class count."""
    parts = split_name(name)
    if parts is None:
        raise ValueError(f"not a dense zoo model name: {name!r}")
    return HEADS[parts[0]].class_modules


def set_num_classes(model: nn.Module, fresh: nn.Module, name: str) -> None:
    """Move the class-dependent modules of `fresh` (the architecture built for the new class count) into
    `model`, and the class count attributes the heads keep (RetinaNet's/FCOS's classification head)."""
    reference = next(model.parameters())
    for path in class_modules(name):
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child,
                fresh.get_submodule(path).to(device=reference.device, dtype=reference.dtype))
        holder = model.get_submodule(parent)
        if hasattr(holder, "num_classes"):
            holder.num_classes = fresh.get_submodule(parent).num_classes
    model.dense_config = {**model.dense_config, "num_classes": fresh.dense_config["num_classes"]}
    model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": fresh.dense_config["num_classes"]}


def checkpoint_num_classes(model: nn.Module, state_dict: StateDict) -> Optional[int]:
    """The class count of a checkpoint in `model`'s own layout whose heads are sized for another number of
    classes, else None (torchvision's heads: the classifier's rows, divided by the anchors per location
    for RetinaNet and FCOS; the box regressor and mask logits follow the same count)."""
    spec = next(h for h in HEADS.values() if h.builder == type(model).__name__)
    fitted, _ = fit_state_dict(model, dict(state_dict))
    theirs, ours = fitted.get(spec.class_count_key), model.state_dict()[spec.class_count_key]
    if theirs is None or theirs.dim() == 0 or theirs.shape[0] == ours.shape[0]:
        return None
    per_location = getattr(getattr(model, "head", None), "classification_head", None)
    per_location = getattr(per_location, "num_anchors", 1)
    if theirs.shape[0] % per_location:
        return None
    return theirs.shape[0] // per_location


# -- checkpoints ------------------------------------------------------------------------------------------

_BODY = "backbone.body."
# what mmdet/mmseg keep next to `backbone.`: the source model's neck and heads
_MM_PREFIX = "backbone."


@register_checkpoint_adapter(DenseModel)
def adapt_dense_checkpoint(state_dict: StateDict, model: nn.Module) -> Tuple[StateDict, List[str]]:
    """Fit backbone-only weights: an mmdet/mmseg checkpoint (`backbone.*` plus the source model's neck and
    heads, which are ignored and named) or a classification checkpoint of the backbone (its own adapter
    applies: RevCol's supervision heads, timm-layout ReXNet). The backbone part must fit `backbone.body`
    strictly; the FPN and heads keep their current tensors, and the notes say so. A file in the model's
    own layout passes unchanged."""
    own = model.state_dict()
    if any(k.startswith(_BODY) for k in state_dict) or not state_dict:
        return state_dict, []
    notes: List[str] = []
    backbone = {k[len(_MM_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_MM_PREFIX)}
    if backbone:
        ignored = sorted(k for k in state_dict if not k.startswith(_MM_PREFIX))
        groups = sorted({k.split(".")[0] + ".*" for k in ignored})
        notes.append(f"mmdet/mmseg layout: took the {len(backbone)} 'backbone.' tensors"
                     + (f"; ignored {len(ignored)} tensors of the source model's neck and heads ({', '.join(groups)})"
                        if ignored else ""))
    else:
        backbone = dict(state_dict)
        notes.append(f"backbone weights ({len(backbone)} tensors) loaded into backbone.body")
    body = model.backbone.body
    backbone, body_notes = fit_state_dict(body, backbone)
    notes += body_notes
    body_keys = body.state_dict().keys()
    # FrozenBatchNorm2d (frozen stages) has no batch counter; BatchNorm checkpoints do
    counters = [k for k in backbone if k.endswith(".num_batches_tracked") and k not in body_keys]
    if counters:
        backbone = {k: v for k, v in backbone.items() if k not in counters}
        notes.append(f"dropped {len(counters)} BatchNorm batch counters of frozen stages "
                     "(FrozenBatchNorm2d keeps none)")
    check_compatible(body, backbone, source="the checkpoint's backbone weights", strict=True)
    rest = {k: v for k, v in own.items() if not k.startswith(_BODY)}
    notes.append(f"the FPN and heads keep their initialisation ({len(rest)} tensors): "
                 "the file has backbone weights only")
    return {**rest, **{_BODY + k: v for k, v in backbone.items()}}, notes
