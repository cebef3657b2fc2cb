"""torchvision's models as architectures, named `torchvision:<name>`: classification (`torchvision:resnet50`),
detection, instance segmentation and keypoints (`torchvision:fasterrcnn_resnet50_fpn`, `retinanet_*`, `fcos_*`,
`ssd*`, `maskrcnn_*`, `keypointrcnn_*`) and semantic segmentation (`deeplabv3_*`, `fcn_*`, `lraspp_*`).

They build through `torchvision.models.get_model` (without weights, backbone weights included, unless
`pretrained`) and get what timm models carry and reparam relies on: a `pretrained_cfg` with the input size
and normalisation of the model's published weights (timm's data config and the default report/verify input
size read it; for a detector the image size is its own `min_size`, which its transform resizes to).
torchvision models have no `reset_classifier`, so a head is changed by building the architecture for the
new class count and taking over the modules whose tensors changed shape (the classifier, auxiliary heads,
a detector's box/mask predictors or classification head convs).

What the rest of reparam needs to know about dense models lives here too, for any model of these
torchvision classes (also one built around another backbone): how to call it (`example_inputs`,
`training_inputs` with made-up targets), which outputs are continuous (`continuous_output_modules`), and
how its modules group into backbone / neck / heads (`module_groups`).
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .options import TORCHVISION_PREFIX, split_torchvision_name

__all__ = ["PREFIX", "split_name", "is_classifier", "is_known", "kind_of", "close_matches", "create", "replace_heads",
           "checkpoint_kwargs", "is_detector", "example_inputs", "training_inputs", "continuous_output_modules",
           "module_groups", "resized_size"]

PREFIX = TORCHVISION_PREFIX
_DEFAULT_CLASSES = {"classification": 1000, "detection": 91, "segmentation": 21}
_KEYPOINT_CLASSES = 2  # keypointrcnn: background and person
FROZEN_BN = "frozen_batchnorm"  # our constructor argument: the backbone's BatchNorms frozen, as with backbone weights


split_name = split_torchvision_name  # `resnet50` for `torchvision:resnet50`; None without the prefix

def _models_by_kind() -> Dict[str, str]:
    import torchvision.models as tvm

    kinds = {n: "classification" for n in tvm.list_models(module=tvm)}
    kinds.update({n: "detection" for n in tvm.list_models(module=tvm.detection)})
    kinds.update({n: "segmentation" for n in tvm.list_models(module=tvm.segmentation)})
    return kinds


def kind_of(name: str) -> Optional[str]:
    """`classification`, `detection` (boxes, masks, keypoints) or `segmentation` for a torchvision model name
    (without the prefix); None for other names."""
    return _models_by_kind().get(name)


def is_classifier(name: str) -> bool:
    """Whether `name` (without the prefix) is one of torchvision's classification models."""
    return kind_of(name) == "classification"


def is_known(name: str) -> bool:
    """Whether `name` (without the prefix) is a torchvision classification, detection or segmentation model."""
    return kind_of(name) is not None


def close_matches(name: str) -> List[str]:
    return [PREFIX + n for n in difflib.get_close_matches(name, list(_models_by_kind()), n=3, cutoff=0.75)]


def _default_classes(name: str) -> int:
    return _KEYPOINT_CLASSES if name.startswith("keypointrcnn") else _DEFAULT_CLASSES[kind_of(name) or "classification"]


def create(name: str, *, pretrained: bool = False, **kwargs) -> nn.Module:
    """torchvision's `name` with `pretrained_cfg` set; with `pretrained`, the published weights (a download)
    and, when `num_classes` differs from theirs, a new head. Without `pretrained` nothing is downloaded (a
    detector's or segmenter's backbone weights neither). `frozen_batchnorm=True` (detectors) freezes the
    backbone's BatchNorms as torchvision does when it builds one on backbone weights, so that checkpoints
    trained that way (torchvision's reference scripts) load."""
    import torchvision.models as tvm

    kwargs = dict(kwargs)
    frozen = bool(kwargs.pop(FROZEN_BN, False))
    default = _default_classes(name)
    num_classes = kwargs.get("num_classes", default)
    dense = kind_of(name) != "classification"
    if pretrained:
        # torchvision refuses num_classes != the weights' classes; build theirs, then swap the head
        kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
        model = tvm.get_model(name, weights="DEFAULT", **kwargs)
        if num_classes != default:
            fresh = tvm.get_model(name, weights=None, num_classes=num_classes,
                                  **({"weights_backbone": None} if dense else {}), **kwargs)
            replace_heads(model, fresh)
    else:
        model = tvm.get_model(name, weights=None, **({"weights_backbone": None} if dense else {}), **kwargs)
        if frozen:
            _freeze_backbone_norms(model)
    model.pretrained_cfg = _data_config(name, num_classes, model)
    return model


def _freeze_backbone_norms(model: nn.Module) -> None:
    """torchvision's detection builders put FrozenBatchNorm2d in the backbone body when it has weights."""
    from torchvision.ops import FrozenBatchNorm2d

    body = getattr(getattr(model, "backbone", None), "body", None)
    if body is None:
        raise ValueError(f"{FROZEN_BN} is for detectors with a backbone body (torchvision's FPN backbones)")
    for parent in list(body.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                setattr(parent, child_name, frozen)


def _data_config(name: str, num_classes: int, model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """timm-style data config from the preprocessing of the model's published weights; for a detector its
    own transform's `min_size` and normalisation (it resizes and normalises inside the model)."""
    import torchvision.models as tvm

    cfg: Dict[str, Any] = {
        "input_size": (3, 224, 224), "crop_pct": 224 / 256, "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "num_classes": num_classes,
    }
    transform = getattr(model, "transform", None)
    if transform is not None and hasattr(transform, "min_size"):
        size = int(transform.min_size[-1])
        cfg.update(input_size=(3, size, size), crop_pct=1.0, mean=tuple(transform.image_mean),
                   std=tuple(transform.image_std), min_size=size, max_size=int(transform.max_size))
        return cfg
    try:
        preset = tvm.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, AttributeError, TypeError):
        return cfg  # no published weights: ImageNet defaults
    crop = getattr(preset, "crop_size", None) or getattr(preset, "resize_size", None)
    if crop is None:
        return cfg
    crop = crop[0]
    if not hasattr(preset, "crop_size"):  # segmentation presets resize and do not crop
        cfg.update(input_size=(3, crop, crop), crop_pct=1.0, interpolation=preset.interpolation.value,
                   mean=tuple(preset.mean), std=tuple(preset.std))
        return cfg
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
        _copy_class_counts(model, fresh, parent)
    if hasattr(model, "num_classes") and hasattr(fresh, "num_classes"):
        model.num_classes = fresh.num_classes
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and hasattr(fresh, "pretrained_cfg"):
        model.pretrained_cfg = {**cfg, "num_classes": fresh.pretrained_cfg["num_classes"]}
    return changed


# the attributes torchvision's heads reshape their outputs by (RetinaNet/FCOS `num_classes`, SSD `num_columns`)
_CLASS_COUNT_ATTRS = ("num_classes", "num_columns", "num_keypoints")


def _copy_class_counts(model: nn.Module, fresh: nn.Module, name: str) -> None:
    """Bring the class counts of `name` and its ancestors in step with `fresh` (the replaced convs alone would
    leave a head reshaping its logits by the old count)."""
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):
        path = ".".join(parts[:depth])
        ours, theirs = model.get_submodule(path), fresh.get_submodule(path)
        for attr in _CLASS_COUNT_ATTRS:
            value = getattr(theirs, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and isinstance(getattr(ours, attr, None), int):
                setattr(ours, attr, value)


def checkpoint_kwargs(name: str, state: Dict[str, torch.Tensor], skeleton: nn.Module) -> Dict[str, Any]:
    """Constructor arguments a checkpoint of torchvision model `name` implies: `frozen_batchnorm` when its
    backbone norms have no `num_batches_tracked` (trained on backbone weights, as torchvision's reference
    scripts do by default), and `num_classes` from a detector's or segmenter's class-dependent tensors."""
    out: Dict[str, Any] = {}
    if kind_of(name) == "detection":
        own = skeleton.state_dict()
        counters = [k for k in own if k.startswith("backbone.body.") and k.endswith("num_batches_tracked")]
        keys = {k.split("module.", 1)[-1] if k.startswith("module.") else k for k in state}
        if counters and not any(k in keys for k in counters) and any(
                k[: -len("num_batches_tracked")] + "running_var" in keys for k in counters):
            out[FROZEN_BN] = True
    if kind_of(name) in ("detection", "segmentation"):
        n = _class_count(skeleton, state)
        if n is not None:
            out["num_classes"] = n
    return out


def _class_count(skeleton: nn.Module, state: Dict[str, torch.Tensor]) -> Optional[int]:
    """The class count of a dense model's checkpoint, from the first class-dependent bias both have: the
    checkpoint's length over the length per class in `skeleton` (anchors per location, box coordinates)."""
    own = skeleton.state_dict()
    classes = (getattr(skeleton, "pretrained_cfg", None) or {}).get("num_classes")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    for key in ("roi_heads.box_predictor.cls_score.bias", "head.classification_head.cls_logits.bias",
                "head.classification_head.module_list.0.1.bias", "head.classification_head.module_list.0.bias",
                "classifier.4.bias", "classifier.high_classifier.bias"):
        if key in own and key in state and classes and own[key].dim() == 1 and state[key].dim() == 1:
            per_class, rest = divmod(own[key].shape[0], classes)
            if per_class and not rest and state[key].shape[0] % per_class == 0:
                return state[key].shape[0] // per_class
    return None


# -- what reparam needs to know about dense models ------------------------------------------------------------

def _detector_classes() -> Tuple[type, ...]:
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    return (GeneralizedRCNN, RetinaNet, FCOS, SSD)


def is_detector(model: nn.Module) -> bool:
    """A torchvision detector (any backbone): called with a list of images, and with targets in train mode."""
    return isinstance(model, _detector_classes())


def is_segmenter(model: nn.Module) -> bool:
    from torchvision.models.segmentation import LRASPP
    from torchvision.models.segmentation._utils import _SimpleSegmentationModel

    return isinstance(model, (_SimpleSegmentationModel, LRASPP))


def example_inputs(model: nn.Module, images: torch.Tensor) -> Tuple[Any, ...]:
    """The positional inputs that feed `images` (N, C, H, W) to `model`: a list of images for a detector."""
    return (list(images.unbind(0)),) if is_detector(model) else (images,)


def training_inputs(model: nn.Module, images: torch.Tensor, generator: torch.Generator) -> Tuple[Any, ...]:
    """Inputs of one training step of `model`: for a detector the images with made-up targets of the structure
    it trains on (two boxes per image, labels, and masks or keypoints where it predicts them)."""
    if not is_detector(model):
        return (images,)
    targets = []
    _, height, width = images.shape[1:]
    keypoints = _keypoint_count(model)
    for _ in range(images.shape[0]):
        corners = torch.rand(2, 2, generator=generator) * torch.tensor([width / 2, height / 2])
        sizes = (torch.rand(2, 2, generator=generator) * 0.4 + 0.1) * torch.tensor([width, height])
        boxes = torch.cat([corners, corners + sizes], 1).to(images.device)
        target = {"boxes": boxes, "labels": torch.full((2,), min(1, class_count_of(model) - 1), dtype=torch.int64,
                                                        device=images.device)}
        if getattr(getattr(model, "roi_heads", None), "mask_predictor", None) is not None:
            masks = torch.zeros(2, height, width, dtype=torch.uint8, device=images.device)
            for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                masks[i, y0:y1, x0:x1] = 1
            target["masks"] = masks
        if keypoints:
            points = corners.unsqueeze(1) + torch.rand(2, keypoints, 2, generator=generator) * sizes.unsqueeze(1)
            target["keypoints"] = torch.cat([points, torch.ones(2, keypoints, 1)], 2).to(images.device)
        targets.append(target)
    return (list(images.unbind(0)), targets)


def _keypoint_count(model: nn.Module) -> int:
    predictor = getattr(getattr(model, "roi_heads", None), "keypoint_predictor", None)
    return int(predictor.kps_score_lowres.out_channels) if predictor is not None else 0


def class_count_of(model: nn.Module) -> int:
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    if predictor is not None and hasattr(predictor, "cls_score"):
        return int(predictor.cls_score.out_features)
    head = getattr(getattr(model, "head", None), "classification_head", None)
    for attr in ("num_classes", "num_columns"):
        if isinstance(getattr(head, attr, None), int):
            return int(getattr(head, attr))
    return 2


def continuous_output_modules(model: nn.Module) -> Optional[List[str]]:
    """The modules whose outputs are a detector's continuous outputs (backbone features, and the dense heads'
    logits and box regressions before score thresholds, top-k and NMS); None for other models, whose own
    outputs are compared. The second-stage heads of two-stage detectors run on proposals chosen by NMS, so
    they are checked module by module instead (verify.py)."""
    if not is_detector(model):
        return None
    names = dict(model.named_modules())
    return [n for n in ("backbone", "rpn.head", "head") if n in names]


def module_groups(model: nn.Module) -> Optional[Dict[str, str]]:
    """Module name -> `backbone`, `neck` or `heads` for a detector or segmenter (None for other models)."""
    if not (is_detector(model) or is_segmenter(model)):
        return None
    names = dict(model.named_modules())
    groups = {}
    for name, group in (("backbone.body", "backbone"), ("backbone.features", "backbone"), ("backbone.fpn", "neck"),
                        ("backbone.extra", "neck"), ("rpn", "heads"), ("roi_heads", "heads"), ("head", "heads"),
                        ("classifier", "heads"), ("aux_classifier", "heads")):
        if names.get(name) is not None:
            groups[name] = group
    if "backbone" in names and not any(n.startswith("backbone.") for n in groups):
        groups["backbone"] = "backbone"  # a segmenter's backbone, or another backbone without an FPN split
    return groups


def resized_size(model: nn.Module, input_size: Sequence[int]) -> Optional[Tuple[int, ...]]:
    """The (C, H, W) a detector's own transform (min_size/max_size resize, then padding to its size
    divisibility) turns an image of `input_size` into: what its backbone sees. None for other models."""
    transform = getattr(model, "transform", None)
    if not is_detector(model) or transform is None:
        return None
    image = torch.zeros(tuple(input_size))
    from .model_info import kept_modes

    with kept_modes(transform, train=False), torch.no_grad():
        batch, _ = transform([image])
    return tuple(batch.tensors.shape[1:])
