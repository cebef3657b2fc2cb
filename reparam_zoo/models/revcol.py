"""RevCol: Reversible Column Networks (Cai et al., ICLR 2023, arXiv:2212.11696).

A stem, then N columns of the same structure. Each column has one *level* per feature scale
(1/4, 1/8, 1/16, 1/32); level l of column j fuses the new map of the level below (2x2 stride-2 conv,
or the stem output for level 0) with the previous column's map one level up (linear + nearest 2x
upsample), runs ConvNeXt blocks, and updates the column state reversibly,
`c_l <- alpha_l * c_l + Level_l(...)`. With `save_memory=True` training keeps no activations inside
the columns (see `reversible.py`); the gradients are those of ordinary backprop.

Module and parameter names follow the authors' release, so their checkpoints load unchanged:
`stem.{0,1}`, `subnet{j}.alpha{l}`, `subnet{j}.level{l}.fusion.{down,up,up2}`,
`subnet{j}.level{l}.blocks.{b}.{dwconv,norm,pwconv1,pwconv2,gamma}`, `cls.classifier.{0,1}`, and for
pre-training with intermediate supervision `cls_blocks.{0..3}` and `decoder_blocks.{0..2}`.

timm's model contract (its tests/test_models.py, checked by tests/test_timm_contract.py):
- `torch.jit.script` compiles `forward` with a scripting path of its own (`Column.forward`,
  `RevCol._run_columns_scripted`), because TorchScript cannot call the column list builders or the
  reversible autograd Function; a scripted `save_memory=True` model trains with ordinary backprop
  (same values and gradients, activations kept). At most `MAX_SCRIPTABLE_LEVELS` levels script.
- `torch.fx` records the same ordinary path; the alpha clamp is a leaf (data-dependent check).
- The level maps pass through `level_maps.{l}` (parameter-free Identity taps, after the columns), which
  feature_info names: hook-based features (`feature_cls='hook'`, fx) then read the same differentiable
  tensors as the getter (`forward_intermediates`, the default), also in reversible mode.
- `feature_cls='list'` (FeatureListNet) is refused with a clear error: it runs the model's top-level
  children as one sequence, and the columns each take the stem output and the previous column's state.
- Pooling goes through timm's `SelectAdaptivePool2d`; `''` gives the head's unpooled, normed map.
  `catavgmax` is refused, as timm's NormMlpClassifierHead refuses it: the head's LayerNorm has C weights.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm, LayerNorm2d, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..checkpoint import pretrained_filter as checkpoint_filter_fn, register_checkpoint_adapter
from .drop import DropPath
from .pooling import select_global_pool
from .reversible import ReversibleColumn, clamp_magnitude_, level_update, run_columns

# plain torch.fx.symbolic_trace keeps the clamp (data-dependent control flow) as one call node
torch.fx.wrap("clamp_magnitude_")

__all__ = ["RevCol", "RevColSupervisionLoss", "REVCOL_VARIANTS"]

# Variant table (RevCol paper and the authors' release): level channels, blocks per level, columns, default drop path rate.
REVCOL_VARIANTS: Dict[str, dict] = {
    "revcol_tiny": dict(channels=(64, 128, 256, 512), layers=(2, 2, 4, 2), num_columns=4, drop_path_rate=0.1),
    "revcol_small": dict(channels=(64, 128, 256, 512), layers=(2, 2, 4, 2), num_columns=8, drop_path_rate=0.3),
    "revcol_base": dict(channels=(72, 144, 288, 576), layers=(1, 1, 3, 2), num_columns=16, drop_path_rate=0.4),
    "revcol_large": dict(channels=(128, 256, 512, 1024), layers=(1, 2, 6, 2), num_columns=8, drop_path_rate=0.5),
    "revcol_xlarge": dict(channels=(224, 448, 896, 1792), layers=(1, 2, 6, 2), num_columns=8, drop_path_rate=0.5),
    # H adds one edge (level 0 also reads the previous column's top level); its drop path rate is the
    # default of the authors' constructor (the paper gives none).
    "revcol_huge": dict(
        channels=(360, 720, 1440, 2880), layers=(1, 2, 6, 2), num_columns=8, drop_path_rate=0.5,
        top_to_bottom_fusion=True,
    ),
}

# Alphas divide the state during reconstruction: their magnitude is kept away from zero.
ALPHA_MIN_MAGNITUDE = 1e-3
ALPHA_INIT = 0.5
LAYER_SCALE_INIT = 1e-6
NORM_EPS = 1e-6
NUM_SUPERVISION_HEADS = 4
# TorchScript cannot look attributes up by computed name: `Column.alpha_list` names alpha0..alpha7.
MAX_SCRIPTABLE_LEVELS = 8


class ConvNextBlock(nn.Module):
    """Depthwise conv, LayerNorm, MLP (GELU), layer scale, drop path, residual.

    Hand-written rather than timm's ConvNeXtBlock because the official checkpoints name the layers
    `dwconv`, `norm`, `pwconv1`, `pwconv2`, `gamma` (timm: `conv_dw`, `mlp.fc1`, ...).
    """

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int = 3, drop_path: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = LayerNorm(dim, eps=NORM_EPS)
        self.pwconv1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(hidden_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)  # MLP runs channels-last
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        x = (self.gamma * x).permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class UpSample(nn.Module):
    """Linear channel change + channels-last LayerNorm, then nearest upsampling by `scale` (SPEC), or to
    `size`, the map the result is added to. The stride-2 downsamplings floor odd sizes, so on inputs that
    are not multiples of 32 a fixed `scale` misses the target (25x17 -> 12x8 -> 24x16); the authors'
    segmentation code interpolates to the target size. For multiples of 32 the size is exactly
    `scale` times the input, and nearest upsampling to it picks the same pixels as the fixed scale."""

    def __init__(self, in_chs: int, out_chs: int, scale: int):
        super().__init__()
        self.scale = scale
        self.channel_reschedule = nn.Sequential(nn.Linear(in_chs, out_chs), LayerNorm(out_chs, eps=NORM_EPS))

    def forward(self, x: torch.Tensor, size: Optional[List[int]] = None) -> torch.Tensor:
        x = self.channel_reschedule(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if size is None:
            return F.interpolate(x, scale_factor=float(self.scale), mode="nearest")
        return F.interpolate(x, size=size, mode="nearest")


class Fusion(nn.Module):
    """Input of level l: down(new c_{l-1} or stem output) [+ up(previous c_{l+1})] [+ up2(previous c_top)]."""

    def __init__(self, level: int, channels: Sequence[int], first_column: bool, top_to_bottom: bool):
        super().__init__()
        top = len(channels) - 1
        if level == 0:
            self.down = nn.Identity()
        else:
            self.down = nn.Sequential(
                nn.Conv2d(channels[level - 1], channels[level], kernel_size=2, stride=2),
                LayerNorm2d(channels[level], eps=NORM_EPS),
            )
        # The first column has no previous column; the top level has nothing above it.
        self.up = UpSample(channels[level + 1], channels[level], 2) if not first_column and level < top else None
        # RevCol-H only: level 0 also reads the top level of the previous column (8x for 4 levels).
        with_up2 = top_to_bottom and not first_column and level == 0 and top > 1
        self.up2 = UpSample(channels[top], channels[level], 2 ** top) if with_up2 else None

    def forward(self, down_input: torch.Tensor, upper_states: List[Optional[torch.Tensor]]) -> torch.Tensor:
        x = self.down(down_input)
        size = [x.shape[-2], x.shape[-1]]
        if self.up is not None:
            upper = upper_states[0]
            assert upper is not None, "the first column has no upper states"
            x = x + self.up(upper, size)
        if self.up2 is not None:
            top = upper_states[-1]
            assert top is not None, "the first column has no upper states"
            x = x + self.up2(top, size)
        return x


class Level(nn.Module):
    def __init__(
        self,
        level: int,
        channels: Sequence[int],
        layers: Sequence[int],
        kernel_size: int,
        first_column: bool,
        drop_path_rates: Sequence[float],
        top_to_bottom: bool,
    ):
        super().__init__()
        first_block = sum(layers[:level])
        dim = channels[level]
        self.fusion = Fusion(level, channels, first_column, top_to_bottom)
        self.blocks = nn.Sequential(*[
            ConvNextBlock(dim, 4 * dim, kernel_size, drop_path_rates[first_block + b]) for b in range(layers[level])
        ])

    def forward(self, down_input: torch.Tensor, upper_states: List[Optional[torch.Tensor]]) -> torch.Tensor:
        return self.blocks(self.fusion(down_input, upper_states))


class Column(ReversibleColumn):
    """One column (`subnet{j}` in the official checkpoints): `level{l}` modules and `alpha{l}` scales."""

    def __init__(
        self,
        channels: Sequence[int],
        layers: Sequence[int],
        kernel_size: int,
        first_column: bool,
        drop_path_rates: Sequence[float],
        top_to_bottom: bool,
    ):
        super().__init__()
        self.num_levels = len(channels)
        for level, dim in enumerate(channels):
            self.register_parameter(f"alpha{level}", nn.Parameter(torch.full((1, dim, 1, 1), ALPHA_INIT)))
        for level in range(self.num_levels):
            self.add_module(
                f"level{level}",
                Level(level, channels, layers, kernel_size, first_column, drop_path_rates, top_to_bottom),
            )

    @torch.jit.unused
    def level_modules(self) -> List[nn.Module]:
        return [getattr(self, f"level{level}") for level in range(self.num_levels)]

    @torch.jit.unused
    def level_alphas(self) -> List[torch.Tensor]:
        return [getattr(self, f"alpha{level}") for level in range(self.num_levels)]

    def alpha_list(self) -> List[torch.Tensor]:
        """`level_alphas` for TorchScript, which resolves `hasattr` on a module at compile time."""
        alphas = [self.alpha0]
        if hasattr(self, "alpha1"):
            alphas.append(self.alpha1)
        if hasattr(self, "alpha2"):
            alphas.append(self.alpha2)
        if hasattr(self, "alpha3"):
            alphas.append(self.alpha3)
        if hasattr(self, "alpha4"):
            alphas.append(self.alpha4)
        if hasattr(self, "alpha5"):
            alphas.append(self.alpha5)
        if hasattr(self, "alpha6"):
            alphas.append(self.alpha6)
        if hasattr(self, "alpha7"):
            alphas.append(self.alpha7)
        return alphas

    def forward(self, x: torch.Tensor, states: List[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
        """One column with ordinary autograd, as `reversible.column_forward`, in a form TorchScript
        compiles: the levels are this module's only children, iterated in order."""
        alphas = self.alpha_list()
        new_states: List[Optional[torch.Tensor]] = []
        down = x
        level_index = 0
        for level in self.children():
            level_output = level(down, states[level_index + 1:])
            down = level_update(alphas[level_index], states[level_index], level_output)
            new_states.append(down)
            level_index += 1
        return new_states


def _head_pool(pool_type: str) -> nn.Module:
    # The authors' average is a mean over H and W: timm's 'fast' pool, the same values as 'avg'
    # (AdaptiveAvgPool2d) but no pooling MACs for fvcore, so the published MAC counts stay exact.
    return select_global_pool(
        "fast" if pool_type == "avg" else pool_type, flatten=True, model_name="RevCol", same_width=True
    )


class Classifier(nn.Module):
    """Global pool, LayerNorm, Linear (keys `classifier.0`, `classifier.1`).

    The authors' head is an average pool; `pool_type` takes timm's other names. With `''` (no pooling)
    the LayerNorm and the Linear act on every position of the map, as timm's NormMlpClassifierHead does.
    """

    def __init__(self, in_chs: int, num_classes: int, drop_rate: float = 0.0, pool_type: str = "avg"):
        super().__init__()
        self.in_chs = in_chs
        self.global_pool = _head_pool(pool_type)
        self.classifier = nn.Sequential(
            nn.LayerNorm(in_chs, eps=NORM_EPS),
            nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity(),
        )
        # outside the Sequential so that `classifier.1` stays the Linear of the official layout
        self.head_drop = nn.Dropout(drop_rate)

    def reset(self, num_classes: int, pool_type: Optional[str] = None) -> None:
        if pool_type is not None:
            self.global_pool = _head_pool(pool_type)
        like = dict(device=self.classifier[0].weight.device, dtype=self.classifier[0].weight.dtype)
        self.classifier[1] = nn.Linear(self.in_chs, num_classes, **like) if num_classes > 0 else nn.Identity()
        self.classifier[1].apply(_init_weights)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        unpooled = self.global_pool.is_identity()
        if unpooled:
            x = x.permute(0, 2, 3, 1)  # channels-last: norm and Linear per position
        x = self.classifier[0](x)
        if not pre_logits:
            x = self.classifier[1](self.head_drop(x))
        return x.permute(0, 3, 1, 2) if unpooled else x


class Decoder(nn.Module):
    """Pre-training image reconstruction from the top level.

    Per stage s: 1x1 conv dims[s] -> dims[s+1] + channels-first LN + GELU (`proj_layers.s`), bilinear 2x
    upsampling (align_corners=True), one ConvNeXt block with hidden width dims[s+1] (`normal_layers.s.0`).
    Then a 1x1 conv to 16 * out_chans and PixelShuffle(4) back to the input resolution (`projback.0`).
    """

    def __init__(self, dims: Sequence[int], kernel_size: int = 3, out_chans: int = 3):
        super().__init__()
        self.proj_layers = nn.ModuleList()
        self.normal_layers = nn.ModuleList()
        for in_dim, out_dim in zip(dims[:-1], dims[1:]):
            self.proj_layers.append(nn.Sequential(
                nn.Conv2d(in_dim, out_dim, kernel_size=1), LayerNorm2d(out_dim, eps=NORM_EPS), nn.GELU()
            ))
            self.normal_layers.append(nn.Sequential(ConvNextBlock(out_dim, out_dim, kernel_size)))
        self.projback = nn.Sequential(nn.Conv2d(dims[-1], 4 ** 2 * out_chans, kernel_size=1), nn.PixelShuffle(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for proj, blocks in zip(self.proj_layers, self.normal_layers):
            x = F.interpolate(proj(x), scale_factor=2.0, mode="bilinear", align_corners=True)
            x = blocks(x)
        return self.projback(x)


class SimpleDecoder(nn.Module):
    """Reconstruction used with more than 1000 classes: LN, 1x1 conv, PixelShuffle(stride)."""

    def __init__(self, in_chs: int, stride: int, out_chans: int = 3):
        super().__init__()
        self.projback = nn.Sequential(
            LayerNorm2d(in_chs, eps=NORM_EPS),
            nn.Conv2d(in_chs, stride ** 2 * out_chans, kernel_size=1),
            nn.PixelShuffle(stride),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projback(x)


def supervision_columns(num_columns: int) -> List[int]:
    """Columns after which the 4 supervision heads read the top level.

    The authors' rule, `(j + 1) % (N // 4) == 0`, gives j = N/4 - 1, 2N/4 - 1, ...; written as
    `(k + 1) * N // 4 - 1` it also gives 4 distinct columns when N is not a multiple of 4.
    """
    if num_columns < NUM_SUPERVISION_HEADS:
        raise ValueError(f"intermediate supervision needs at least {NUM_SUPERVISION_HEADS} columns, got {num_columns}")
    return [(k + 1) * num_columns // NUM_SUPERVISION_HEADS - 1 for k in range(NUM_SUPERVISION_HEADS)]


class RevCol(nn.Module):
    """Reversible Column Network.

    Args:
        channels: channels per level (the default 4 levels give strides 4, 8, 16, 32).
        layers: ConvNeXt blocks per level, the same in every column.
        num_columns: number of columns.
        kernel_size: depthwise kernel size of the blocks.
        in_chans, num_classes: input channels, classes (0: no classifier).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth; block b of level l uses linspace(0, rate, sum(layers))[sum(layers[:l]) + b]
            in every column.
        save_memory: reversible training (no activations kept inside the columns).
        inter_supv: the pre-training layout with 4 classifier heads and 3 image decoders
            (`forward_with_supervision`, `RevColSupervisionLoss`); `forward` returns the last head's logits.
        head_init_scale: multiplies the initial classifier weight and bias (the authors use 0.001 when fine-tuning).
        top_to_bottom_fusion: RevCol-H's extra edge from the previous column's top level to level 0.
    """

    def __init__(
        self,
        channels: Sequence[int] = (64, 128, 256, 512),
        layers: Sequence[int] = (2, 2, 4, 2),
        num_columns: int = 4,
        kernel_size: int = 3,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        save_memory: bool = True,
        inter_supv: bool = False,
        head_init_scale: float = 1.0,
        top_to_bottom_fusion: bool = False,
    ):
        super().__init__()
        if len(channels) != len(layers) or not channels:
            raise ValueError(f"channels {tuple(channels)} and layers {tuple(layers)} must name the same levels")
        if num_columns < 1:
            raise ValueError("RevCol needs at least one column")
        _head_pool(global_pool)  # fail before building
        self.channels = tuple(channels)
        self.layers = tuple(layers)
        self.num_columns = num_columns
        self.num_levels = len(channels)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.save_memory = save_memory
        self.inter_supv = inter_supv
        self.grad_checkpointing = False
        self.num_features = self.head_hidden_size = channels[-1]
        self.alpha_min_magnitude = ALPHA_MIN_MAGNITUDE  # an attribute: TorchScript reads no float globals

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, channels[0], kernel_size=4, stride=4), LayerNorm2d(channels[0], eps=NORM_EPS)
        )
        # explicit CPU device: the schedule is plain numbers even when building on the meta device
        drop_path_rates = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()
        for j in range(num_columns):
            self.add_module(
                f"subnet{j}",
                Column(channels, layers, kernel_size, j == 0, drop_path_rates, top_to_bottom_fusion),
            )

        self.supervised_columns = []  # no instance annotation: TorchScript refuses those on empty lists
        if inter_supv:
            self.supervised_columns = supervision_columns(num_columns)
            self.cls_blocks = nn.ModuleList([
                Classifier(channels[-1], num_classes, drop_rate, global_pool) for _ in range(NUM_SUPERVISION_HEADS)
            ])
            stride = 4 * 2 ** (self.num_levels - 1)

            def decoder() -> nn.Module:
                if num_classes <= 1000:
                    return Decoder(channels[::-1], kernel_size=3, out_chans=in_chans)
                return SimpleDecoder(channels[-1], stride, in_chans)

            self.decoder_blocks = nn.ModuleList([decoder() for _ in range(NUM_SUPERVISION_HEADS - 1)])
        else:
            self.cls = Classifier(channels[-1], num_classes, drop_rate, global_pool)

        # Parameter-free taps of the last column's level maps (the state, not the level module's output):
        # hook-based feature extraction and fx return nodes read them; the state_dict does not change.
        self.level_maps = nn.ModuleList([nn.Identity() for _ in channels])
        self.feature_info = [
            dict(num_chs=c, reduction=4 * 2 ** level, module=f"level_maps.{level}")
            for level, c in enumerate(channels)
        ]
        self.apply(_init_weights)
        if head_init_scale != 1.0:
            for head in self._heads():
                if isinstance(head.classifier[1], nn.Linear):
                    with torch.no_grad():
                        head.classifier[1].weight.mul_(head_init_scale)
                        head.classifier[1].bias.mul_(head_init_scale)

    # ---- structure

    def columns(self) -> List[Column]:
        return [getattr(self, f"subnet{j}") for j in range(self.num_columns)]

    def alphas(self) -> List[torch.Tensor]:
        return [alpha for column in self.columns() for alpha in column.level_alphas()]

    def _heads(self) -> List[Classifier]:
        if hasattr(self, "cls_blocks"):
            return list(self.cls_blocks)
        return [self.cls] if hasattr(self, "cls") else []

    def _final_head(self) -> Optional[Classifier]:
        heads = self._heads()
        return heads[-1] if heads else None

    # ---- timm interface

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r"^stem",
            blocks=r"^subnet(\d+)" if coarse else [(r"^subnet(\d+)\.(?:alpha|level)(\d+)", None)],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # Only the ordinary path uses it: the reversible path already keeps no column activations.
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        head = self._final_head()
        return head.classifier[1] if head is not None else nn.Identity()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's contract: `num_classes=0` removes the Linear (forward gives pooled, normed features);
        `global_pool=''` also removes pooling (forward gives the normed 4-D map). Every head changes alike."""
        if global_pool is not None:
            _head_pool(global_pool)
        self.num_classes = num_classes
        for head in self._heads():
            head.reset(num_classes, global_pool)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The last column's level maps (strides 4, 8, 16, 32). `norm` and `stop_early` change nothing:
        there is no per-level norm, and every column is needed for the last column's maps."""
        if output_fmt != "NCHW":
            raise ValueError("RevCol features are NCHW only")
        take_indices, _ = feature_take_indices(self.num_levels, indices)
        states = self._forward_levels(x)
        intermediates = [states[i] for i in take_indices]
        if intermediates_only:
            return intermediates
        return states[-1], intermediates

    def prune_intermediate_layers(
        self,
        indices: Union[int, List[int]] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> List[int]:
        """For feature extraction: drop the classifier heads and decoders. The columns all stay, since
        every level of a column feeds the next column."""
        take_indices, _ = feature_take_indices(self.num_levels, indices)
        if prune_head:
            for name in ("cls", "cls_blocks", "decoder_blocks"):
                if hasattr(self, name):
                    delattr(self, name)
            self.inter_supv = False
            self.supervised_columns = []
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_levels(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # hasattr, not _final_head(): TorchScript resolves it at compile time
        if hasattr(self, "cls"):
            return self.cls(x, pre_logits=pre_logits)
        if hasattr(self, "cls_blocks"):
            return self.cls_blocks[-1](x, pre_logits=pre_logits)
        return x.mean((2, 3))  # pruned for feature extraction: pooled features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_supervision(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Pre-training outputs: logits of the 4 heads and the 3 image reconstructions (early columns first)."""
        if not self.inter_supv:
            raise RuntimeError("forward_with_supervision needs a model built with inter_supv=True")
        top = self.num_levels - 1
        _, tapped = self._run_columns(self.stem(x), taps=[(j, top) for j in self.supervised_columns])
        logits = [head(c) for head, c in zip(self.cls_blocks, tapped)]
        reconstructions = [decoder(c) for decoder, c in zip(self.decoder_blocks, tapped)]
        return logits, reconstructions

    def _forward_levels(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The last column's level maps, each through its `level_maps` tap."""
        x = self.stem(x)
        if torch.jit.is_scripting():
            states = self._run_columns_scripted(x)
        else:
            states = list(self._run_columns(x)[0])
        maps: List[torch.Tensor] = []
        for level, tap in enumerate(self.level_maps):
            maps.append(tap(states[level]))
        return maps

    @torch.jit.unused
    def _run_columns(self, x: torch.Tensor, taps: Sequence[Tuple[int, int]] = ()):
        # the clamp's data-dependent check can be neither jit-traced nor exported (fx keeps it as a leaf)
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            clamp_magnitude_(self.alphas(), ALPHA_MIN_MAGNITUDE)
        return run_columns(
            self.columns(), x, reversible=self.save_memory, taps=taps, grad_checkpointing=self.grad_checkpointing
        )

    def _run_columns_scripted(self, x: torch.Tensor) -> List[torch.Tensor]:
        """`_run_columns` as TorchScript compiles it: the ordinary path (no reversible Function, no
        gradient checkpointing), the same clamp first. Iterating `children()` with a static isinstance
        check reaches the columns without computed attribute names."""
        alphas: List[torch.Tensor] = []
        for module in self.children():
            if hasattr(module, "alpha0"):  # a column (isinstance misses columns of a mangled TorchScript type)
                alphas.extend(module.alpha_list())
        clamp_magnitude_(alphas, self.alpha_min_magnitude)
        states: List[Optional[torch.Tensor]] = []
        for _ in range(self.num_levels):
            states.append(None)
        for module in self.children():
            if hasattr(module, "alpha0"):  # a column (isinstance misses columns of a mangled TorchScript type)
                states = module(x, states)
        maps: List[torch.Tensor] = []
        for state in states:
            assert state is not None
            maps.append(state)
        return maps

    def __prepare_scriptable__(self) -> "RevCol":
        # torch.jit.script calls this first: a clear error instead of a wrong compile
        if self.num_levels > MAX_SCRIPTABLE_LEVELS:
            raise ValueError(f"TorchScript supports RevCol with at most {MAX_SCRIPTABLE_LEVELS} levels, got {self.num_levels}")
        return self


def _init_weights(module: nn.Module) -> None:
    # a model built on the meta device has no values to initialise; timm's trunc_normal_ there still runs
    # torch's Python decompositions of clamp_/erfinv_ (9 of the 12 s `reparam zoo list` took for the zoo)
    if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.is_meta:
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class RevColSupervisionLoss(nn.Module):
    """Loss of intermediate-supervision pre-training (RevCol paper, section 3).

    For the reconstructions i = 0..n-1 (n = 3) with head logits i:
    `BCEWithLogits(rec_i, image) * (1 - i/n) * reconstruction_weight`
    `+ CE(logits_i) * (i+1)/(n+1) * classification_weight`, plus `CE(logits_last)`.
    `image` is the normalised input mapped back to [0, 1] (`x * std + mean`) and clamped to [0.01, 0.99].
    Targets are class indices or per-class probabilities (mixup).
    """

    def __init__(
        self,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        reconstruction_weight: float = 3.0,
        classification_weight: float = 0.7,
        label_smoothing: float = 0.0,
        target_range: Tuple[float, float] = (0.01, 0.99),
    ):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.reconstruction_weight = reconstruction_weight
        self.classification_weight = classification_weight
        self.label_smoothing = label_smoothing
        self.target_range = target_range

    def classification_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.is_floating_point() and targets.shape == logits.shape:
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def image_target(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(images), self.std.to(images)
        return (images * std + mean).clamp(*self.target_range)

    def forward(
        self,
        logits: Sequence[torch.Tensor],
        reconstructions: Sequence[torch.Tensor],
        images: torch.Tensor,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        n = len(reconstructions)
        if len(logits) != n + 1:
            raise ValueError(f"expected one more head than reconstructions, got {len(logits)} and {n}")
        image_target = self.image_target(images)
        loss = self.classification_loss(logits[-1], targets)
        for i, (reconstruction, head_logits) in enumerate(zip(reconstructions, logits)):
            reconstruction_loss = F.binary_cross_entropy_with_logits(reconstruction, image_target)
            classification_loss = self.classification_loss(head_logits, targets)
            loss = loss + reconstruction_loss * (1 - i / n) * self.reconstruction_weight
            loss = loss + classification_loss * (i + 1) / (n + 1) * self.classification_weight
        return loss


# ----------------------------------------------------------------------------------------------------
# Checkpoints


@register_checkpoint_adapter(RevCol)
def adapt_revcol_checkpoint(state_dict: Dict[str, torch.Tensor], model: nn.Module):
    """Fit the authors' layouts: a pre-training file (4 heads + 3 decoders) into a single-head model
    keeps the last head as `cls` and drops the rest; a file with a classifier into a model without one
    (num_classes=0, features) drops the classifier. Every change is reported in the notes."""
    notes: List[str] = []
    own = model.state_dict().keys()
    state_dict = dict(state_dict)
    model_has_cls = any(k.startswith("cls.") for k in own)
    model_has_heads = any(k.startswith("cls_blocks.") for k in own)
    file_heads = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("cls_blocks.")})

    if file_heads and not model_has_heads:
        last = file_heads[-1]
        prefix = f"cls_blocks.{last}."
        head = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        dropped_heads = [k for k in state_dict if k.startswith("cls_blocks.") and not k.startswith(prefix)]
        dropped_decoders = [k for k in state_dict if k.startswith("decoder_blocks.")]
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("cls_blocks.", "decoder_blocks."))}
        if model_has_cls:
            state_dict.update({"cls." + k: v for k, v in head.items()})
            notes.append(
                f"pre-training checkpoint: took the last supervision head cls_blocks.{last} as the classifier 'cls'"
            )
        else:
            dropped_heads += [prefix + k for k in head]
        if dropped_heads:
            notes.append(
                f"dropped {len(dropped_heads)} keys of supervision heads the model does not have (cls_blocks.*)"
            )
        if dropped_decoders:
            notes.append(f"dropped {len(dropped_decoders)} keys of the reconstruction decoders (decoder_blocks.*)")

    if not model_has_cls and not model_has_heads:
        dropped = [k for k in state_dict if k.startswith("cls.")]
        if dropped:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("cls.")}
            notes.append(f"dropped the classifier ({len(dropped)} keys): the model has none")
    elif not any(k.startswith("cls.classifier.1.") for k in own):
        dropped = [k for k in state_dict if k.startswith("cls.classifier.1.")]
        if dropped:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("cls.classifier.1.")}
            notes.append("dropped the classifier Linear cls.classifier.1 (the model has num_classes=0)")
    return state_dict, notes




# ----------------------------------------------------------------------------------------------------
# Registry

_RELEASE = "https://github.com/megvii-research/RevCol/releases/download/checkpoint/"
_HF_HUGE = "https://huggingface.co/LarryTsai/RevCol/resolve/main/revcol_models/classification/"


def _cfg(url: str = "", **kwargs) -> dict:
    return {
        "url": url,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0", "classifier": "cls.classifier.1",
        "license": "apache-2.0", "paper_ids": "arXiv:2212.11696",
        "paper_name": "Reversible Column Networks", "origin_url": "https://github.com/megvii-research/RevCol",
        **kwargs,
    }


# The 1k files of T/S/B are intermediate-supervision checkpoints (4 heads + decoders): the checkpoint
# adapter keeps their last head. The 22k files have 21841 classes.
default_cfgs = generate_default_cfgs({
    "revcol_tiny.in1k": _cfg(url=_RELEASE + "revcol_tiny_1k.pth"),
    "revcol_small.in1k": _cfg(url=_RELEASE + "revcol_small_1k.pth"),
    "revcol_base.in1k": _cfg(url=_RELEASE + "revcol_base_1k.pth"),
    "revcol_base.in22k_ft_in1k": _cfg(url=_RELEASE + "revcol_base_22k_1kft_224.pth"),
    "revcol_base.in22k_ft_in1k_384": _cfg(
        url=_RELEASE + "revcol_base_22k_1kft_384.pth", input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0
    ),
    "revcol_base.in22k": _cfg(url=_RELEASE + "revcol_base_22k.pth", num_classes=21841),
    "revcol_large.in22k_ft_in1k": _cfg(url=_RELEASE + "revcol_large_22k_1kft_224.pth"),
    "revcol_large.in22k_ft_in1k_384": _cfg(
        url=_RELEASE + "revcol_large_22k_1kft_384.pth", input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0
    ),
    "revcol_large.in22k": _cfg(url=_RELEASE + "revcol_large_22k.pth", num_classes=21841),
    "revcol_xlarge.untrained": _cfg(),
    "revcol_huge.megdata_ft_in1k_640": _cfg(
        url=_HF_HUGE + "revcol_huge_megdata_in1k.pth",
        input_size=(3, 640, 640), pool_size=(20, 20), crop_pct=1.0,
    ),
})


def _check_feature_cls(variant: str, kwargs: dict) -> None:
    """FeatureListNet/FeatureDictNet run the model's top-level children as one sequence; RevCol's columns
    each take two inputs (the stem output and the previous column's state), so that cannot work."""
    feature_cls = kwargs.get("feature_cls", (kwargs.get("feature_cfg") or {}).get("feature_cls"))
    name = feature_cls.lower() if isinstance(feature_cls, str) else getattr(feature_cls, "__name__", "")
    if kwargs.get("features_only") and name in ("list", "dict", "FeatureListNet", "FeatureDictNet"):
        raise ValueError(
            f"{variant}: feature_cls={feature_cls!r} needs a model whose top-level children run in sequence, "
            "which RevCol's columns do not; use feature_cls='getter' (the default), 'hook' or 'fx'"
        )


def _create_revcol(variant: str, pretrained: bool = False, **kwargs) -> RevCol:
    _check_feature_cls(variant, kwargs)
    model_args = {**REVCOL_VARIANTS[variant], **kwargs}
    return build_model_with_cfg(
        RevCol,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # features come from forward_intermediates: the last column's level maps
        feature_cfg=dict(out_indices=tuple(range(len(model_args["channels"]))), feature_cls="getter"),
        **model_args,
    )


@register_model
def revcol_tiny(pretrained: bool = False, **kwargs) -> RevCol:
    return _create_revcol("revcol_tiny", pretrained, **kwargs)


@register_model
def revcol_small(pretrained: bool = False, **kwargs) -> RevCol:
    return _create_revcol("revcol_small", pretrained, **kwargs)


@register_model
def revcol_base(pretrained: bool = False, **kwargs) -> RevCol:
    return _create_revcol("revcol_base", pretrained, **kwargs)


@register_model
def revcol_large(pretrained: bool = False, **kwargs) -> RevCol:
    return _create_revcol("revcol_large", pretrained, **kwargs)


@register_model
def revcol_xlarge(pretrained: bool = False, **kwargs) -> RevCol:
    return _create_revcol("revcol_xlarge", pretrained, **kwargs)


@register_model
def revcol_huge(pretrained: bool = False, **kwargs) -> RevCol:
    return _create_revcol("revcol_huge", pretrained, **kwargs)
