"""ReXNetV1 in the module layout of the authors' release.

Paper: `Rethinking Channel Dimensions for Efficient Model Design` (Han et al., CVPR 2021),
https://arxiv.org/abs/2007.00992

timm ships the same networks as `rexnet_*`, but with its own module names. This implementation
mirrors the official release instead (`features.{0..20}`, blocks as `features.{i}.out.{j}`, classifier
`output.1` as a 1x1 conv), so the official checkpoints load without renaming and a RefConv-converted
model folds back into exactly that layout. timm-layout weights (`stem.conv`, `features.0.conv_dw`,
`head.fc`, ...) are translated on load by the registered checkpoint adapter, which both timm's
`pretrained=True` (through `checkpoint_filter_fn`) and `reparam_zoo.checkpoint.load_checkpoint` use.

Registered with timm as `rexnetv1_090/100/130/150/200/300`; any other width or depth through kwargs,
e.g. `timm.create_model('rexnetv1_100', width_mult=1.2)`.

timm's model contract (its tests/test_models.py, checked by tests/test_timm_contract.py): pooling goes
through timm's `SelectAdaptivePool2d` with timm's names; the classifier is the release's 1x1 conv, so
`global_pool=''` with classes gives a map of logits (as timm's conv classifiers do), and without classes
the unpooled 4-D map. No postponed annotations here: fx copies them into code TorchScript must read.
"""
from math import ceil
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import math

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._efficientnet_builder import efficientnet_init_weights
from timm.models._features import feature_take_indices
from timm.models.rexnet import RexNet  # only as the reference for timm's key order

from ..checkpoint import pretrained_filter as checkpoint_filter_fn, register_checkpoint_adapter
from ..errors import CheckpointError, preview
from .drop import DropPath
from .pooling import select_global_pool

__all__ = ["ReXNetV1", "BlockConfig", "rexnet_block_configs", "checkpoint_filter_fn"]

# Stage layout of the paper: blocks per stage, stride of each stage's first block, SE per stage.
STAGE_DEPTHS = (1, 2, 2, 3, 3, 5)
STAGE_STRIDES = (1, 2, 2, 2, 1, 2)
STAGE_USES_SE = (False, False, True, True, True, True)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class BlockConfig(NamedTuple):
    in_chs: int
    out_chs: int
    exp_ratio: int
    stride: int
    use_se: bool


def rexnet_block_configs(
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        input_ch: int = 16,
        final_ch: int = 180,
        use_se: bool = True,
) -> Tuple[int, List[BlockConfig]]:
    """Stem width and per-block configs of ReXNetV1.

    Channels grow linearly block by block from `input_ch` by `final_ch` in total (the paper's point:
    every block expands its channels). Rounding is plain `int(round(.))`, no divisor, as in the release.
    """
    depths = [ceil(d * depth_mult) for d in STAGE_DEPTHS]
    num_blocks = sum(depths)
    strides, exp_ratios, se_flags = [], [], []
    for stage_idx, depth in enumerate(depths):
        strides += [STAGE_STRIDES[stage_idx]] + [1] * (depth - 1)
        exp_ratios += [1 if stage_idx == 0 else 6] * depth
        se_flags += [use_se and STAGE_USES_SE[stage_idx]] * depth

    # Below width 1 the stem and first block keep their absolute widths (32 and 16 channels).
    stem_base = STEM_CHANNELS / width_mult if width_mult < 1.0 else STEM_CHANNELS
    planes = input_ch / width_mult if width_mult < 1.0 else input_ch
    stem_chs = int(round(stem_base * width_mult))

    configs = []
    for i in range(num_blocks):
        if i == 0:
            in_chs = stem_chs
        else:
            in_chs = int(round(planes * width_mult))
            planes += final_ch / num_blocks
        out_chs = int(round(planes * width_mult))
        configs.append(BlockConfig(in_chs, out_chs, exp_ratios[i], strides[i], se_flags[i]))
    return stem_chs, configs


class SqueezeExcite(nn.Module):
    """Channel attention with a BN in the bottleneck; `fc.{0,1,3}` are the release's key names."""

    def __init__(self, channels: int, reduction: int = 12):
        super().__init__()
        reduced = channels // reduction
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Conv2d(channels, reduced, 1),
            nn.BatchNorm2d(reduced),
            nn.ReLU(),
            nn.Conv2d(reduced, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(self.pool(x))


class LinearBottleneck(nn.Module):
    """Inverted residual with a linear projection; the shortcut feeds the first `in_chs` outputs.

    Every layer sits in one `out` Sequential so its index is the release's key index:
    [expand conv, BN, SiLU,] dw conv, BN, [SE,] ReLU6, project conv, BN.
    """

    def __init__(self, cfg: BlockConfig, se_ratio: int = 12, drop_path_rate: float = 0.0):
        super().__init__()
        self.in_chs = cfg.in_chs
        self.out_chs = cfg.out_chs
        # Channels only ever grow in ReXNet, so the input always fits into the output's first channels.
        self.use_shortcut = cfg.stride == 1 and cfg.in_chs <= cfg.out_chs

        layers: List[nn.Module] = []
        mid_chs = cfg.in_chs
        if cfg.exp_ratio != 1:
            mid_chs = cfg.in_chs * cfg.exp_ratio
            layers += [nn.Conv2d(cfg.in_chs, mid_chs, 1, bias=False), nn.BatchNorm2d(mid_chs), nn.SiLU()]
        layers += [
            nn.Conv2d(mid_chs, mid_chs, 3, stride=cfg.stride, padding=1, groups=mid_chs, bias=False),
            nn.BatchNorm2d(mid_chs),
        ]
        if cfg.use_se:
            layers.append(SqueezeExcite(mid_chs, se_ratio))
        layers += [nn.ReLU6(), nn.Conv2d(mid_chs, cfg.out_chs, 1, bias=False), nn.BatchNorm2d(cfg.out_chs)]
        self.out = nn.Sequential(*layers)
        # Parameter-free, so the state_dict layout does not depend on it.
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.out(x)
        if self.use_shortcut:
            out = self.drop_path(out)
            # Out-of-place partial add (no slice assignment): autograd-, fx-, export- and script-safe.
            out = torch.cat([out[:, :self.in_chs] + x, out[:, self.in_chs:]], dim=1)
        return out


def _conv_bn_silu(in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1) -> List[nn.Module]:
    padding = kernel_size // 2
    return [
        nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.SiLU(),
    ]


class ReXNetV1(nn.Module):
    """ReXNetV1 with the official state_dict layout and timm's model interface.

    Args:
        width_mult: channel multiplier (0.9, 1.0, 1.3, 1.5, 2.0, 3.0 were released).
        depth_mult: block-count multiplier per stage (rounded up).
        num_classes: classifier outputs; 0 makes the classifier an Identity.
        in_chans: input image channels.
        input_ch: channels of the first block's output before width scaling.
        final_ch: channels added over all blocks before width scaling.
        use_se: squeeze-excite in stages 3 to 6.
        se_ratio: SE reduction divisor (`C -> C // se_ratio`).
        global_pool: timm's pool name ('avg', 'max', 'avgmax', 'catavgmax', 'fast'; '' for none).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth on residual blocks, rising linearly to this rate.
    """

    def __init__(
            self,
            width_mult: float = 1.0,
            depth_mult: float = 1.0,
            num_classes: int = 1000,
            in_chans: int = 3,
            input_ch: int = 16,
            final_ch: int = 180,
            use_se: bool = True,
            se_ratio: int = 12,
            global_pool: str = "avg",
            drop_rate: float = 0.2,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        select_global_pool(global_pool, flatten=False, model_name="ReXNetV1")  # fail before building
        self.width_mult = width_mult
        self.depth_mult = depth_mult
        self.use_se = use_se
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        stem_chs, block_cfgs = rexnet_block_configs(width_mult, depth_mult, input_ch, final_ch, use_se)
        self.block_configs = block_cfgs
        num_blocks = len(block_cfgs)

        layers: List[nn.Module] = _conv_bn_silu(in_chans, stem_chs, kernel_size=3, stride=2)
        self.feature_info = []
        reduction = 2
        prev_chs = stem_chs
        for i, cfg in enumerate(block_cfgs):
            if cfg.stride > 1:
                # Tap the last map at the current resolution: the previous block, or the stem.
                tap = f"features.{len(layers) - 1}"
                self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module=tap))
                reduction *= cfg.stride
            block_dpr = drop_path_rate * i / max(num_blocks - 1, 1)
            layers.append(LinearBottleneck(cfg, se_ratio=se_ratio, drop_path_rate=block_dpr))
            prev_chs = cfg.out_chs
        # Like timm's rexnet, the stride-32 tap is the last block, not the 1280-channel head conv.
        self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module=f"features.{len(layers) - 1}"))
        self.num_features = self.head_hidden_size = int(HEAD_CHANNELS * width_mult)
        layers += _conv_bn_silu(prev_chs, self.num_features)
        self.features = nn.Sequential(*layers)

        # Parameter-free and outside `features`, so forward_features returns the unpooled map. Not flattened:
        # the classifier is a 1x1 conv ('avg' is the release's AdaptiveAvgPool2d(1)).
        self.global_pool = select_global_pool(global_pool, flatten=False, model_name="ReXNetV1")
        self.output = nn.Sequential(nn.Dropout(drop_rate), self._make_classifier(num_classes))

        # Replaced by the registered cfg when built through timm.create_model.
        self.pretrained_cfg = _cfg(num_classes=num_classes, input_size=(in_chans, 224, 224))
        self._init_weights()

    def _make_classifier(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        # catavgmax pools to twice the channels
        return nn.Conv2d(self.num_features * self.global_pool.feat_mult(), num_classes, 1, bias=True)

    def _init_weights(self) -> None:
        # timm's ReXNet init: fan-out divided by groups, so depthwise layers keep the signal's scale; the
        # classifier is a 1x1 conv here and a Linear there, so it gets timm's Linear init explicitly
        efficientnet_init_weights(self)
        classifier = self.output[1]
        if isinstance(classifier, nn.Conv2d):
            bound = 1.0 / math.sqrt(classifier.out_channels)
            nn.init.uniform_(classifier.weight, -bound, bound)
            nn.init.zeros_(classifier.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        # The first match wins, so the stem pattern takes features.0/1 before the block pattern.
        return dict(stem=r"^features\.[0-2]\.", blocks=r"^features\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.output[1]

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's contract: `num_classes=0` removes the classifier (forward gives pooled features);
        `global_pool=''` also removes pooling (forward gives the 4-D map); other names pick timm's pooling."""
        if global_pool is not None:
            self.global_pool = select_global_pool(global_pool, flatten=False, model_name="ReXNetV1")
        self.num_classes = num_classes
        stem_weight = self.features[0].weight
        self.output[1] = self._make_classifier(num_classes).to(device=stem_weight.device, dtype=stem_weight.dtype)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The maps at the `feature_info` taps (strides 2 to 32), timm's feature API. `norm` changes
        nothing: there is no separate final norm, every tap is a block's (or the stem's) output."""
        if output_fmt != "NCHW":
            raise ValueError("ReXNetV1 features are NCHW only")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        tap_layers = {self._tap_layer(i): i for i in take_indices}
        last_layer = self._tap_layer(max_index) if stop_early or intermediates_only else len(self.features) - 1
        by_index = {}
        for layer_idx, layer in enumerate(self.features[: last_layer + 1]):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if layer_idx in tap_layers:
                by_index[tap_layers[layer_idx]] = x
        intermediates = [by_index[i] for i in take_indices]
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """For feature extraction: drop the layers after the last requested tap (and the classifier)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        self.features = self.features[: self._tap_layer(max_index) + 1]
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def _tap_layer(self, feature_index: int) -> int:
        return int(self.feature_info[feature_index]["module"].split(".")[1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.features, x)
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.output[0](self.global_pool(x))
        if not pre_logits:
            x = self.output[1](x)
        if self.global_pool.is_identity():
            return x  # no pooling: a 4-D map (of features, or of logits from the 1x1 conv classifier)
        # flatten, not squeeze: keeps the batch dimension at batch size 1
        return x.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# --- timm-layout weights -----------------------------------------------------------------------

def _is_timm_layout(state_dict: Dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("stem.", "head.")) for k in state_dict)


def _timm_reference_keys(model: ReXNetV1) -> List[str]:
    """timm's key order for the same depth/SE layout (names do not depend on width).

    Files do not keep module order (safetensors stores keys sorted), so the order comes from a
    timm RexNet built on the meta device rather than from the file.
    """
    with torch.device("meta"):
        ref = RexNet(
            num_classes=1,
            depth_mult=model.depth_mult,
            se_ratio=1 / 12 if model.use_se else 0.0,
        )
    return list(ref.state_dict().keys())


def _is_classifier_key(key: str) -> bool:
    return key.startswith(("head.fc.", "output.1."))


def _shape_fits(our_key: str, src: torch.Size, own: torch.Size) -> bool:
    if our_key == "features.0.weight":
        # The stem's input channels are the loader's business (timm adapts them, strict loading reports them).
        return src[:1] + src[2:] == own[:1] + own[2:]
    return src == own


def convert_timm_state_dict(
        state_dict: Dict[str, torch.Tensor], model: ReXNetV1
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map a timm `rexnet_*` state_dict onto `model`'s keys by position in module order.

    Both layouts hold the same tensors in the same order (as in the authors' release); each position's shape is checked so a
    checkpoint of another width fails here with both names instead of loading garbage.
    """
    name = f"ReXNetV1(width_mult={model.width_mult}, depth_mult={model.depth_mult}, use_se={model.use_se})"
    src_has_counters = any(k.endswith("num_batches_tracked") for k in state_dict)

    def body(keys):
        return [
            k for k in keys
            if not _is_classifier_key(k) and (src_has_counters or not k.endswith("num_batches_tracked"))
        ]

    ref_keys = body(_timm_reference_keys(model))
    src_keys = body(state_dict.keys())
    missing = [k for k in ref_keys if k not in state_dict]
    unexpected = [k for k in src_keys if k not in set(ref_keys)]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} timm keys missing ({preview(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({preview(unexpected)})")
        raise CheckpointError(
            f"timm ReXNet checkpoint does not have the block layout of {name} (other depth or SE setting?): "
            + "; ".join(problems)
        )

    own = model.state_dict()
    own_keys = body(own.keys())
    if len(own_keys) != len(ref_keys):  # cannot happen unless the two implementations drift apart
        raise CheckpointError(f"timm layout has {len(ref_keys)} tensors but {name} has {len(own_keys)}")

    converted: Dict[str, torch.Tensor] = {}
    mismatches = []
    for src_key, our_key in zip(ref_keys, own_keys):
        tensor = state_dict[src_key]
        if not _shape_fits(our_key, tensor.shape, own[our_key].shape):
            mismatches.append(f"{src_key} {tuple(tensor.shape)} -> {our_key} {tuple(own[our_key].shape)}")
        converted[our_key] = tensor
    if mismatches:
        raise CheckpointError(
            f"timm ReXNet checkpoint does not fit {name} (other width?): {len(mismatches)} shape mismatches "
            f"({preview(mismatches)})"
        )

    notes = [f"converted timm ReXNet layout ({len(state_dict)} keys, positional)"]
    if "head.fc.weight" in state_dict:
        weight = state_dict["head.fc.weight"]
        # timm's classifier is a Linear, the release's a 1x1 conv
        converted["output.1.weight"] = weight.reshape(*weight.shape, 1, 1) if weight.ndim == 2 else weight
        if "head.fc.bias" in state_dict:
            converted["output.1.bias"] = state_dict["head.fc.bias"]
        notes.append("reshaped classifier head.fc.weight [classes, C] -> output.1.weight [classes, C, 1, 1]")
    if not src_has_counters:
        counters = [k for k in own if k.endswith("num_batches_tracked")]
        for k in counters:
            converted[k] = torch.zeros((), dtype=torch.long)
        notes.append(f"file has no BatchNorm num_batches_tracked counters; set {len(counters)} to 0")
    return converted, notes




@register_checkpoint_adapter(ReXNetV1)
def _adapt_checkpoint(state_dict, model):
    notes: List[str] = []
    if _is_timm_layout(state_dict):
        state_dict, notes = convert_timm_state_dict(state_dict, model)
    # otherwise the release's own layout: strict loading reports anything that differs
    if isinstance(model.get_classifier(), nn.Identity):
        dropped = [k for k in state_dict if k.startswith("output.1.")]
        if dropped:
            state_dict = {k: v for k, v in state_dict.items() if k not in set(dropped)}
            notes.append(f"dropped the classifier ({len(dropped)} keys): the model has none (num_classes=0)")
    return state_dict, notes



# --- timm registration -------------------------------------------------------------------------

def _create_rexnetv1(variant: str, pretrained: bool = False, **kwargs) -> ReXNetV1:
    return build_model_with_cfg(
        ReXNetV1,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # FeatureListNet walks `features` child by child, so taps are named `features.N`
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )


def _cfg(hf_hub_id: Optional[str] = None, **kwargs) -> Dict[str, Any]:
    return {
        "hf_hub_id": hf_hub_id, "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "features.0", "classifier": "output.1",
        "license": "mit", "paper_ids": "arXiv:2007.00992",
        **kwargs,
    }


# The released ImageNet weights, as timm hosts them (timm layout, converted by checkpoint_filter_fn).
default_cfgs = generate_default_cfgs({
    "rexnetv1_090": _cfg(),  # in the paper's table; no released weights
    "rexnetv1_100.nav_in1k": _cfg(hf_hub_id="timm/rexnet_100.nav_in1k"),
    "rexnetv1_130.nav_in1k": _cfg(hf_hub_id="timm/rexnet_130.nav_in1k"),
    "rexnetv1_150.nav_in1k": _cfg(hf_hub_id="timm/rexnet_150.nav_in1k"),
    "rexnetv1_200.nav_in1k": _cfg(hf_hub_id="timm/rexnet_200.nav_in1k"),
    "rexnetv1_300.nav_in1k": _cfg(hf_hub_id="timm/rexnet_300.nav_in1k"),
})


@register_model
def rexnetv1_090(pretrained: bool = False, **kwargs) -> ReXNetV1:
    """ReXNetV1 0.9x (4.09M params, 0.35 GMACs)."""
    return _create_rexnetv1("rexnetv1_090", pretrained, **dict(dict(width_mult=0.9), **kwargs))


@register_model
def rexnetv1_100(pretrained: bool = False, **kwargs) -> ReXNetV1:
    """ReXNetV1 1.0x (4.80M params, 0.40 GMACs)."""
    return _create_rexnetv1("rexnetv1_100", pretrained, **dict(dict(width_mult=1.0), **kwargs))


@register_model
def rexnetv1_130(pretrained: bool = False, **kwargs) -> ReXNetV1:
    """ReXNetV1 1.3x (7.56M params, 0.66 GMACs)."""
    return _create_rexnetv1("rexnetv1_130", pretrained, **dict(dict(width_mult=1.3), **kwargs))


@register_model
def rexnetv1_150(pretrained: bool = False, **kwargs) -> ReXNetV1:
    """ReXNetV1 1.5x (9.73M params, 0.88 GMACs)."""
    return _create_rexnetv1("rexnetv1_150", pretrained, **dict(dict(width_mult=1.5), **kwargs))


@register_model
def rexnetv1_200(pretrained: bool = False, **kwargs) -> ReXNetV1:
    """ReXNetV1 2.0x (16.37M params, 1.53 GMACs)."""
    return _create_rexnetv1("rexnetv1_200", pretrained, **dict(dict(width_mult=2.0), **kwargs))


@register_model
def rexnetv1_300(pretrained: bool = False, **kwargs) -> ReXNetV1:
    """ReXNetV1 3.0x (34.71M params, 3.40 GMACs)."""
    return _create_rexnetv1("rexnetv1_300", pretrained, **dict(dict(width_mult=3.0), **kwargs))
