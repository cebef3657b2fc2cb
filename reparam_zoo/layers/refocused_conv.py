"""A RefConv layer's training-time conv: one autograd Function that owns the refocused kernel.

Written as separate ops (the transform, `W_b + T(W_b)`, the conv) autograd allocates per layer and step
T(W_b), the refocused kernel (kept from the forward for the backward), the kernel's gradient and the
transform's gradient: about four weight-sized tensors where plain fine-tuning allocates one, the weight's
gradient. With glibc's default allocator each large one is a fresh mmap that is page-faulted in and
returned to the OS every step (resnet18, batch 8 at 112 px: 45.6k minor page faults per step against plain
fine-tuning's 11.6k; benchmarks/README.md, "own loop"). `RefocusedConv` instead

* computes the refocused kernel into a buffer the layer keeps from step to step (the kernel itself never
  comes from the allocator), with temporaries of at most `SCRATCH_BYTES` on the CPU, each freed at once,
  which an allocator hands back for the next (glibc: below its dynamic mmap threshold);
* keeps no kernel in the autograd graph: the backward reuses the buffer while it still holds the kernel of
  the transform the forward saw, and recomputes it otherwise; so no weight-sized tensor stays alive from
  the forward to the backward;
* computes a chunked dense layer's transform gradient (the same size as the kernel's gradient when `map_k`
  equals the kernel size) into the kernel gradient's own storage.

The values are those of the separate ops up to rounding: the same ops on the same operands, split into
chunks along the independent kernel slices for large kernels (a chunk may run another conv kernel).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F

__all__ = ["RefocusedConv", "ConvCall", "SCRATCH_BYTES", "refocus_into", "transform_grad", "kernel_buffer_fits"]

# Temporaries of the kernel math are at most this large (larger kernels are computed in chunks) and freed
# one after the other, so an allocator recycles them: glibc's mmap threshold rises to the largest block freed,
# up to 32 MiB, after a training step's first frees; a block above that is a fresh mmap every time. Chunks
# cost time (a 512x512x3x3 kernel, forward + backward, two threads: 5.0 ms as one op, 7.9 ms in 4 MiB
# chunks; resnet18 at batch 32, 224 px, two threads: 1.05x plain fine-tuning's step with 4 MiB chunks, 1.00x
# with 16 MiB), so only kernels beyond 16 MiB (e.g. 1024x1024x3x3) are split.
SCRATCH_BYTES = 16 * 1024 * 1024

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ConvCall:
    """How a plain conv (nn.Conv1d/2d/3d) calls its op: the input padding it applies first (padding modes,
    the odd part of "same"), then `convolution(x, W, b, stride, padding, dilation, groups)`."""

    def __init__(self, conv):
        self.dims = len(conv.kernel_size)
        self.stride, self.dilation, self.groups = list(conv.stride), list(conv.dilation), conv.groups
        self.pad_mode: Optional[str] = None
        self.pad: List[int] = []
        if conv.padding_mode != "zeros":  # nn.Conv's own _conv_forward: pad the input, then no conv padding
            self.pad_mode, self.pad = conv.padding_mode, list(conv._reversed_padding_repeated_twice)
            self.padding = [0] * self.dims
        elif conv.padding == "valid":
            self.padding = [0] * self.dims
        elif conv.padding == "same":
            # ATen's "same": the conv pads dilation*(k-1)//2 on both sides and an odd remainder goes to the
            # end of the input, zero-padded first
            total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
            self.padding = [t // 2 for t in total]
            extra = [t - 2 * (t // 2) for t in total]
            if any(extra):
                self.pad_mode = "constant"
                self.pad = [p for e in reversed(extra) for p in (0, e)]
        else:
            self.padding = list(conv.padding)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.pad_mode is None else F.pad(x, self.pad, mode=self.pad_mode)

    def forward(self, x, weight, bias):
        return _CONV_FNS[self.dims](x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, grad, x, weight, bias_sizes, mask):
        return torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, self.stride, self.padding,
                                                   self.dilation, False, [0] * self.dims, self.groups, mask)


class RefocusedConv(torch.autograd.Function):
    """`conv(x, W_b + T(W_b), bias)` with the kernel in `layer`'s buffer (see the module docstring).

    `layer` provides `_training_kernel(transform, base, token)` (the kernel for these tensors' current
    values, in its buffer), `_patches()` and `_differentiable_kernel(transform, base)`; `call` is its
    `ConvCall`."""

    @staticmethod
    def forward(ctx, x, transform, base, bias, layer, call):
        ctx.token = object()
        kernel = layer._training_kernel(transform, base, ctx.token)
        ctx.layer, ctx.call = layer, call
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.save_for_backward(x, transform, base, bias)
        return call.forward(x, kernel, bias)

    @staticmethod
    def backward(ctx, grad):
        x, transform, base, bias = ctx.saved_tensors
        layer, call = ctx.layer, ctx.call
        needs_x, needs_t, _, needs_bias = ctx.needs_input_grad[:4]
        mask = [needs_x, needs_t, needs_bias]
        if torch.is_grad_enabled():  # create_graph: a backward that is itself differentiable
            kernel = layer._differentiable_kernel(transform, base)
            grad_x, grad_kernel, grad_bias = call.backward(grad, x, kernel, ctx.bias_sizes, mask)
            grad_t = None
            if needs_t:
                (grad_t,) = torch.autograd.grad(kernel, transform, grad_kernel, create_graph=True)
            return grad_x, grad_t, None, grad_bias, None, None
        kernel = layer._training_kernel(transform, base, ctx.token)
        grad_x, grad_kernel, grad_bias = call.backward(grad, x, kernel, ctx.bias_sizes, mask)
        grad_t = transform_grad(grad_kernel, base, transform, layer._patches()) if needs_t else None
        return grad_x, grad_t, None, grad_bias, None, None


def _chunks(total: int, per_chunk: int):
    for start in range(0, total, per_chunk):
        yield start, min(total, start + per_chunk)


def _per_chunk(t: torch.Tensor, unit_elements: int, total: int) -> int:
    """How many units of `unit_elements` a chunk holds: the scratch budget on the CPU, all on an
    accelerator (whose caching allocator recycles blocks, and where each chunk would be a kernel launch)."""
    if t.device.type != "cpu":
        return total
    return max(1, SCRATCH_BYTES // (unit_elements * t.element_size()))


@torch.no_grad()
def refocus_into(out: torch.Tensor, base: torch.Tensor, transform: torch.Tensor,
                 patches: Optional[torch.Tensor]) -> torch.Tensor:
    """`W_b + T(W_b)` written into `out` (contiguous, the base's shape), computed with the formulation
    `refocus_kernel` uses when a gradient is needed (the grouped conv for dense layers, the neighbourhood
    matmul for grouped ones), chunk by chunk."""
    n, g = transform.shape[:2]
    map_k = transform.shape[2:]
    kernel = base.shape[2:]
    size = math.prod(kernel)
    image = base.reshape(n, *kernel)
    flat = out.view(n, *kernel)
    if g == 1:
        conv = _CONV_FNS[len(kernel)]
        padding = [k // 2 for k in map_k]
        for s, e in _chunks(n, _per_chunk(out, size, n)):
            mixed = conv(image[s:e].unsqueeze(0), transform[s:e], padding=padding, groups=e - s)
            torch.add(image[s:e], mixed.view(e - s, *kernel), out=flat[s:e])
        return out
    groups = n // g
    mix = transform.reshape(groups, g, g * math.prod(map_k))
    grouped_base, grouped_out = image.view(groups, g, size), out.view(groups, g, size)
    for s, e in _chunks(groups, _per_chunk(out, g * size, groups)):
        mixed = torch.bmm(patches[s:e], mix[s:e].transpose(1, 2))  # the fast GEMM orientation, see refconv
        torch.add(grouped_base[s:e], mixed.transpose(1, 2), out=grouped_out[s:e])
    return out


@torch.no_grad()
def transform_grad(grad_kernel: torch.Tensor, base: torch.Tensor, transform: torch.Tensor,
                   patches: Optional[torch.Tensor]) -> torch.Tensor:
    """The transform's gradient from the refocused kernel's. A dense layer's is the weight gradient of
    the depthwise transform conv: one op when the layer fits one chunk, else chunk by chunk into
    `grad_kernel`'s storage when it has the same size (`map_k` equal to the kernel: chunk i's result only
    overwrites gradient rows already read) or into a new tensor; a grouped layer's is one matmul with the
    neighbourhoods."""
    n, g = transform.shape[:2]
    map_k = transform.shape[2:]
    kernel = base.shape[2:]
    grad_kernel = grad_kernel.contiguous()
    if g > 1:
        grad = torch.bmm(grad_kernel.view(n // g, g, math.prod(kernel)), patches)
        return grad.view(transform.shape)
    taps = math.prod(map_k)
    image_grad, image = grad_kernel.view(n, *kernel), base.reshape(n, *kernel)
    d = len(kernel)
    padding = [k // 2 for k in map_k]

    def part(s, e):
        return torch.ops.aten.convolution_backward(
            image_grad[s:e].unsqueeze(0), image[s:e].unsqueeze(0), transform[s:e], None, [1] * d, padding,
            [1] * d, False, [0] * d, e - s, [False, True, False])[1]

    per_chunk = _per_chunk(grad_kernel, math.prod(kernel), n)
    if per_chunk >= n:  # one chunk: its result is the gradient, no copy
        return part(0, n).view(transform.shape)
    if taps == math.prod(kernel):
        out = grad_kernel.view(n, taps)
    else:
        out = torch.empty((n, taps), dtype=grad_kernel.dtype, device=grad_kernel.device)
    for s, e in _chunks(n, per_chunk):
        out[s:e].copy_(part(s, e).view(e - s, taps))
    return out.view(transform.shape)


def kernel_buffer_fits(buffer: Optional[torch.Tensor], base: torch.Tensor) -> bool:
    """Whether `buffer` can take the kernel of `base` in place."""
    return (buffer is not None and buffer.shape == base.shape and buffer.dtype == base.dtype
            and buffer.device == base.device and buffer.is_contiguous() and not buffer.is_inference())
