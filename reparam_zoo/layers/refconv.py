"""RefConv: a frozen pretrained kernel refocused by a learnable, zero-initialised transform.

For a conv with weight `W_b` of shape `(C_out, C_in/g, *K)` the layer computes `conv(x, W_b + T(W_b))`,
where `T` is a conv of the layer's dimensionality applied to `W_b` seen as a one-sample image with
`N = C_out*C_in/g` channels, kernel `map_k`, "same" zero padding and `N/g` groups (each group mixes `g`
consecutive kernel slices). Folding computes `W_t` once and puts it into a plain conv of the original
class, so the deployed model keeps the original structure and cost.
"""
from __future__ import annotations

import copy
import itertools
import math
import weakref
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConversionError
from ..options import DEFAULT_MAP_K, INITS, check_map_k
from .refocused_conv import ConvCall, RefocusedConv, kernel_buffer_fits, refocus_into

__all__ = ["RefConv1d", "RefConv2d", "RefConv3d", "RefConvNd", "refconv_class_for", "refocus_kernel", "INITS",
           "clear_kernel_caches"]


_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def refocus_kernel(base: torch.Tensor, transform_weight: torch.Tensor, patches: Optional[torch.Tensor] = None):
    """`W_b + T(W_b)`: the refocused kernel, differentiable w.r.t. `transform_weight`.

    `transform_weight` has shape `(N, g, *map_k)`. The same math in the formulation that is fastest for
    the shape: a dense layer's transform (g == 1) is depthwise over the N slices, a grouped conv when a
    gradient is needed and a sum of shifted copies otherwise (PyTorch's grouped conv is very slow in
    float64, where folding happens); for grouped and depthwise layers each of the N/g groups is a small
    dense mix, one batched matmul over the base kernel's neighbourhoods (`patches`, see `kernel_patches`;
    cacheable because the base is frozen).
    """
    n, g = transform_weight.shape[:2]
    map_k = transform_weight.shape[2:]
    kernel = base.shape[2:]
    if g == 1:
        if torch.is_grad_enabled() and transform_weight.requires_grad:
            conv = _CONV_FNS[len(kernel)]
            image = base.reshape(1, n, *kernel)
            mixed = conv(image, transform_weight, padding=[k // 2 for k in map_k], groups=n)
            return base + mixed.reshape(base.shape)
        return _shifted_sum(base, transform_weight)
    if patches is None:
        patches = kernel_patches(base, map_k, g)
    groups = n // g
    mix = transform_weight.reshape(groups, g, g * math.prod(map_k))
    if torch.is_grad_enabled() and mix.requires_grad and not patches.requires_grad and not _capturing():
        mixed = _MixNeighbourhoods.apply(mix, patches)  # (a base that needs a gradient takes autograd's way)
    else:
        mixed = _mix_neighbourhoods(mix, patches)
    return base + mixed.reshape(base.shape)


def _mix_neighbourhoods(mix: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """`mix @ patches^T`, (groups, g, prod(K)), computed as `(patches @ mix^T)^T`: with a few kernel
    positions against thousands of slice offsets this orientation is the one MKL's GEMM runs fast (3-4x
    on an AMD EPYC for a depthwise layer's 960 x 8640 mix)."""
    return torch.bmm(patches, mix.transpose(1, 2)).transpose(1, 2)


class _MixNeighbourhoods(torch.autograd.Function):
    """`_mix_neighbourhoods` with the gradient as `grad @ patches`, contiguous in the transform's layout:
    autograd's own backward of the transposed product is several times slower (a transposed GEMM output
    plus a strided copy into the transform's gradient)."""

    @staticmethod
    def forward(ctx, mix, patches):
        ctx.save_for_backward(patches)
        return _mix_neighbourhoods(mix, patches)

    @staticmethod
    def backward(ctx, grad):
        (patches,) = ctx.saved_tensors
        return torch.bmm(grad, patches), None


@torch.no_grad()
def _shifted_sum(base: torch.Tensor, transform_weight: torch.Tensor) -> torch.Tensor:
    """The depthwise transform of a dense layer as `sum_q w[:, q] * shift_q(W_b)`, in place, no autograd."""
    n = transform_weight.shape[0]
    map_k = transform_weight.shape[2:]
    kernel = base.shape[2:]
    flat = base.reshape(n, *kernel)
    padded = F.pad(flat, _same_padding(map_k))
    weights = transform_weight.reshape(n, -1)
    out = flat.clone()
    for q, offset in enumerate(_offsets(map_k)):
        index = (slice(None),) + tuple(slice(o, o + k) for o, k in zip(offset, kernel))
        scale = weights[:, q].reshape((n,) + (1,) * len(kernel))
        out.addcmul_(scale, padded[index])
    return out.reshape(base.shape)


def kernel_patches(base: torch.Tensor, map_k: Tuple[int, ...], g: int) -> torch.Tensor:
    """Zero-padded neighbourhoods of every kernel position, laid out for `refocus_kernel`'s matmul.

    Returns `(N/g, prod(K), g*prod(map_k))`: for each group, kernel position p and column `j*prod(map_k) + q`
    (slice j of the group, transform offset q: the order of a conv weight `(N, g, *map_k)` flattened).
    """
    n = base.shape[0] * base.shape[1]
    kernel = base.shape[2:]
    padded = F.pad(base.reshape(n, *kernel), _same_padding(map_k))
    shifts = []
    for offset in _offsets(map_k):
        index = tuple(slice(o, o + k) for o, k in zip(offset, kernel))
        shifts.append(padded[(slice(None),) + index])
    stacked = torch.stack(shifts, dim=1)  # (N, M, *K)
    return stacked.reshape(n // g, g * math.prod(map_k), math.prod(kernel)).transpose(1, 2).contiguous()


def _same_padding(map_k) -> list:
    """`F.pad`'s argument (last dim first) for "same" zero padding of a `map_k` conv."""
    return [k // 2 for k in reversed(map_k) for _ in range(2)]


def _offsets(map_k):
    """Every transform offset, in the order of a conv weight's flattened kernel dims."""
    return itertools.product(*(range(k) for k in map_k))


class RefConvNd(nn.Module):
    """Shared implementation of RefConv1d/2d/3d; build one with `from_conv`.

    Without autograd (evaluation) the refocused kernel is computed once and reused until the transform
    or the base kernel changes, as PyTorch's version counters see it: optimizer steps, `copy_`,
    `load_state_dict`, assignment. Writes through `.data` bypass those counters; after them call
    `clear_kernel_caches(model)`.

    While the transform trains, a layer whose conv is a plain nn.Conv1d/2d/3d runs as one autograd
    Function (`refocused_conv.RefocusedConv`): the kernel is computed into a buffer the layer keeps
    between steps instead of new tensors each step, so a step costs the same allocations with any
    allocator. Conv classes with their own forward (timm's Conv2dSame), autocast, torch.func transforms
    and graph capture (jit trace, torch.compile, torch.export) take the differentiable kernel instead.
    """

    dims: int = 0

    def __init__(self, conv: nn.modules.conv._ConvNd, map_k: int = DEFAULT_MAP_K, init: str = "zero"):
        super().__init__()
        if not self.dims:
            raise ConversionError("RefConvNd is the shared base class: build a layer with "
                                  "RefConvNd.from_conv(conv), or RefConv1d/2d/3d")
        check_convertible(conv, map_k, expected_dims=self.dims)
        if init not in INITS:
            raise ConversionError(f"unknown init '{init}', expected one of {', '.join(INITS)}")
        weight = conv.weight.detach()
        groups = conv.groups
        n_slices = weight.shape[0] * weight.shape[1]
        self.map_k = map_k
        self.init = init
        self.register_buffer("weight_base", weight.clone())
        self.transform_weight = nn.Parameter(
            torch.empty((n_slices, groups) + (map_k,) * self.dims, dtype=weight.dtype, device=weight.device)
        )
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        # The original conv, kept outside the module tree with weightless tensors: it supplies the exact
        # forward (padding modes, subclasses such as timm's same-padding conv) and is the template for
        # the plain conv that folding produces.
        object.__setattr__(self, "_template", _weightless_copy(conv))
        self._overrides_forward = type(conv).forward is not _base_forward(conv)
        self._conv_call: Optional[ConvCall] = None if self._overrides_forward else ConvCall(conv)
        # (key, kernel, reusable): key = (transform's and base's version keys, what computed it: "no_grad",
        # "inference" or the training forward's token); reusable = no one but the layer holds the kernel, so the next
        # training kernel may be written into it
        self._kernel_cache: Optional[Tuple[tuple, torch.Tensor, bool]] = None
        self._patch_cache: Optional[Tuple[tuple, torch.Tensor]] = None
        self.reset_transform(init)
        self.train(conv.training)

    @classmethod
    def from_conv(cls, conv: nn.modules.conv._ConvNd, map_k: int = DEFAULT_MAP_K, init: str = "zero") -> "RefConvNd":
        """The RefConv of `conv` (of its dimensionality when called on RefConvNd): `conv`'s weight becomes
        the frozen base, a `map_k` transform starts with `init` ("zero": exactly `conv`). `conv` is not
        changed."""
        if cls is RefConvNd:
            cls = refconv_class_for(conv)
        return cls(conv, map_k=map_k, init=init)

    # -- the conv's own attributes, so code reading them keeps working -----------------------------
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _CONV_ATTRIBUTES:
                return getattr(self.__dict__["_template"], name)
            raise

    @property
    def weight(self) -> torch.Tensor:
        """The refocused kernel (differentiable); the plain conv's weight after folding."""
        return self.refocused_weight()

    # -- math ---------------------------------------------------------------------------------------
    def reset_transform(self, init: str = "zero") -> None:
        """Re-initialise the transform: "zero" (the layer computes exactly its base conv), "xavier", or
        "kaiming" (PyTorch's default conv init, as in the authors' script)."""
        if init not in INITS:
            raise ConversionError(f"unknown init '{init}', expected one of {', '.join(INITS)}")
        self.init = init
        with torch.no_grad():
            if init == "zero":
                self.transform_weight.zero_()
            elif init == "xavier":
                nn.init.xavier_uniform_(self.transform_weight)
            else:  # PyTorch's default conv init
                nn.init.kaiming_uniform_(self.transform_weight, a=math.sqrt(5))
        self._kernel_cache = None

    def refocused_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """`W_b + T(W_b)`, computed in `dtype` (default: the layer's dtype, also under autocast: the conv
        that uses the kernel is what autocast lowers, and a cached kernel must not depend on it)."""
        base, transform = self.weight_base, self.transform_weight
        with torch.autocast(base.device.type, enabled=False):
            if dtype is not None and dtype != base.dtype:
                return refocus_kernel(base.to(dtype), transform.to(dtype))
            return refocus_kernel(base, transform, self._patches())

    def _patches(self) -> Optional[torch.Tensor]:
        g = self.transform_weight.shape[1]
        if g == 1:
            return None
        base = self.weight_base
        cacheable = not _capturing() and not base.is_inference()
        if not cacheable or self._patch_cache is None or not _unchanged(self._patch_cache[0], base):
            with torch.no_grad():
                patches = kernel_patches(base, self.transform_weight.shape[2:], g)
            if not cacheable:
                return patches
            self._patch_cache = (_version_key(base), patches)
        return self._patch_cache[1]

    def step_invariant_tensors(self) -> List[torch.Tensor]:
        """What this layer keeps between training steps besides its weights: the frozen base kernel's
        neighbourhoods that grouped and depthwise transforms multiply (computed now if not yet)."""
        patches = self._patches()
        return [] if patches is None else [patches]

    def clear_cache(self) -> None:
        """Forget the cached kernel and neighbourhoods (needed only after writes through `.data`)."""
        self._kernel_cache = None
        self._patch_cache = None

    def _kernel(self) -> torch.Tensor:
        # Hot path of every forward: read the tensors from the registries directly, as nn.Module's
        # attribute fallback (and ours on top of it) costs more than the cache check itself at batch 1.
        transform, base = self._parameters["transform_weight"], self._buffers["weight_base"]
        if torch.is_grad_enabled() and transform.requires_grad:
            self._kernel_cache = None
            return self.refocused_weight()
        if _capturing():
            return self.refocused_weight()  # a captured graph computes the kernel, it does not bake in a cache
        # Without autograd the kernel only changes when the transform or the base does. A kernel made in
        # inference mode is an inference tensor, which autograd outside that mode must not see.
        if transform.is_inference() or base.is_inference():  # inference tensors have no version counter
            with torch.no_grad():
                return self.refocused_weight()
        mode = "inference" if torch.is_inference_mode_enabled() else "no_grad"
        cache = self._kernel_cache
        if (cache is None or cache[0][2] != mode or not _unchanged(cache[0][0], transform)
                or not _unchanged(cache[0][1], base)):
            with torch.no_grad():
                cache = ((_version_key(transform), _version_key(base), mode), self.refocused_weight(),
                         mode == "no_grad")
        if cache[2] and torch.is_grad_enabled():
            cache = cache[:2] + (False,)  # autograd may keep it (a frozen layer, an input that needs a gradient)
        self._kernel_cache = cache
        return cache[1]

    def _training_kernel(self, transform: torch.Tensor, base: torch.Tensor, forward: object) -> torch.Tensor:
        """`W_b + T(W_b)` for the current values of `transform` and `base`, without autograd, in the layer's
        kernel buffer (reused from step to step while nothing else holds it). `forward` identifies the
        training forward it is for: its backward reuses the kernel if no other forward overwrote it, every
        forward computes it anew (writes through `.data`, e.g. gradcheck's, are invisible to versions)."""
        cache = self._kernel_cache
        if (cache is not None and cache[0][2] is forward and _unchanged(cache[0][0], transform)
                and _unchanged(cache[0][1], base)):
            return cache[1]
        kernel = cache[1] if cache is not None and cache[2] and kernel_buffer_fits(cache[1], base) else None
        if kernel is None:
            kernel = torch.empty(base.shape, dtype=base.dtype, device=base.device)
        with torch.autocast(base.device.type, enabled=False):
            refocus_into(kernel, base, transform, self._patches())
        self._kernel_cache = ((_version_key(transform), _version_key(base), forward), kernel, True)
        return kernel

    def _differentiable_kernel(self, transform: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """`W_b + T(W_b)` with autograd (for a backward that is itself differentiated)."""
        with torch.autocast(base.device.type, enabled=False):
            return refocus_kernel(base, transform, self._patches())

    def _runs_as_one_function(self, x: torch.Tensor, transform: torch.Tensor) -> bool:
        """Whether this training forward can be `RefocusedConv` (see the class docstring)."""
        return (self.__dict__.get("_conv_call") is not None and not _capturing()
                and not torch._C._are_functorch_transforms_active()
                and not (torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type))
                and x.dtype == transform.dtype == self._buffers["weight_base"].dtype)

    def keeps_kernel_in_graph(self) -> bool:
        """Whether a training forward leaves its refocused kernel to autograd until the backward (conv
        classes with their own forward) rather than in the layer's kernel buffer."""
        return self.__dict__.get("_conv_call") is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        transform = self._parameters["transform_weight"]
        if torch.is_grad_enabled() and transform.requires_grad and self._runs_as_one_function(x, transform):
            call = self._conv_call
            return RefocusedConv.apply(call.prepare(x), transform, self._buffers["weight_base"], self.bias, self,
                                       call)
        weight = self._kernel()
        if not self._overrides_forward:
            return self._template._conv_forward(x, weight, self.bias)
        params = {"weight": weight}
        if self.bias is not None:
            params["bias"] = self.bias
        return torch.func.functional_call(self._template, params, (x,))

    # -- folding ------------------------------------------------------------------------------------
    def to_conv(self) -> nn.modules.conv._ConvNd:
        """A plain conv of the original class and attributes holding the refocused kernel (float64 math)."""
        with torch.no_grad():
            weight = self.refocused_weight(dtype=torch.float64).to(self.weight_base.dtype)
        conv = copy.deepcopy(self._template)
        conv.weight = nn.Parameter(weight)
        if self.bias is not None:
            conv.bias = nn.Parameter(self.bias.detach().clone())
        return conv.train(self.training)

    def __getstate__(self):
        # copies and pickles carry the weights, not kernels derived from them (as large again)
        state = self.__dict__.copy()
        state["_kernel_cache"] = state["_patch_cache"] = None
        return state

    def transform_macs(self) -> int:
        """Multiply-accumulates of one transform evaluation (per step, independent of the batch)."""
        return self.transform_weight.numel() * math.prod(self.weight_base.shape[2:])

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self.clear_cache()
        return result

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        replica.clear_cache()  # a replica writes its own kernel buffer
        return replica

    def extra_repr(self) -> str:
        t = self._template
        kernel = "x".join(str(k) for k in t.kernel_size)
        return (
            f"{t.in_channels}, {t.out_channels}, kernel_size={kernel}, stride={t.stride}, padding={t.padding}, "
            f"groups={t.groups}, map_k={self.map_k}, base={type(t).__name__}"
        )


class RefConv1d(RefConvNd):
    dims = 1


class RefConv2d(RefConvNd):
    dims = 2


class RefConv3d(RefConvNd):
    dims = 3


_BY_DIMS = {1: RefConv1d, 2: RefConv2d, 3: RefConv3d}
_CONV_ATTRIBUTES = frozenset(
    ["in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
     "padding_mode", "transposed", "output_padding"]
)


def refconv_class_for(conv: nn.Module) -> type:
    dims = conv_dims(conv)
    if dims not in _BY_DIMS:
        raise ConversionError(f"{type(conv).__name__} is not a 1d/2d/3d convolution")
    return _BY_DIMS[dims]


def conv_dims(conv: nn.Module) -> int:
    if isinstance(conv, nn.modules.conv._ConvNd):
        return len(conv.kernel_size)
    return 0


def unsupported_reason(conv: nn.Module, map_k: int) -> Optional[str]:
    """Why `conv` cannot become a RefConv with this `map_k`, or None when it can."""
    if not isinstance(conv, nn.modules.conv._ConvNd):
        return "unsupported type"
    if conv.transposed:
        return "unsupported type (transposed conv)"
    if isinstance(conv, nn.modules.lazy.LazyModuleMixin) and conv.has_uninitialized_params():
        return "unsupported type (uninitialised lazy conv)"
    extra = [n for n, _ in conv.named_parameters(recurse=False) if n not in ("weight", "bias")]
    extra += [n for n, _ in conv.named_buffers(recurse=False)]
    if extra or list(conv.children()):
        return f"unsupported type ({type(conv).__name__} has extra state: {', '.join(extra) or 'submodules'})"
    if all(k == 1 for k in conv.kernel_size):
        return "1x1"
    if any(k < map_k for k in conv.kernel_size):
        return f"kernel {'x'.join(map(str, conv.kernel_size))} smaller than map_k={map_k}"
    return None


def check_convertible(conv: nn.Module, map_k: int, expected_dims: int = 0) -> None:
    check_map_k(map_k)
    reason = unsupported_reason(conv, map_k)
    if reason is not None:
        raise ConversionError(f"cannot refocus {type(conv).__name__}: {reason}")
    if expected_dims and conv_dims(conv) != expected_dims:
        raise ConversionError(
            f"RefConv{expected_dims}d needs a {expected_dims}d conv, got {type(conv).__name__}; "
            "use RefConvNd.from_conv to pick the class automatically"
        )


def _base_forward(conv: nn.Module):
    for cls in _PLAIN_CONVS:
        if isinstance(conv, cls):
            return cls.forward
    return None


def _weightless_copy(conv: nn.Module) -> nn.Module:
    """A deep copy of `conv` whose weight and bias live on the meta device (no memory, never used)."""
    memo = {}
    for name in ("weight", "bias"):
        p = conv._parameters.get(name)
        if p is not None:
            memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
    template = copy.deepcopy(conv, memo)
    template._forward_hooks.clear()
    template._forward_pre_hooks.clear()
    return template


def clear_kernel_caches(model: nn.Module) -> None:
    """Make every RefConv in `model` recompute its kernel (after writing weights through `.data`, which
    PyTorch's version counters do not see)."""
    for module in model.modules():
        if isinstance(module, RefConvNd):
            module.clear_cache()


def _capturing() -> bool:
    """Inside jit tracing, torch.compile or torch.export: what runs is recorded, so nothing may come from a
    cache (and fake tensors have no data pointer to key one by)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _version_key(t: torch.Tensor) -> tuple:
    """What identifies `t`'s current values: the tensor itself (a weak reference: a freed tensor's address
    can be reused by a new one, with the same version) and its version counter."""
    return weakref.ref(t), t._version


def _unchanged(key: tuple, t: torch.Tensor) -> bool:
    return key[0]() is t and key[1] == t._version
