"""Building blocks: the RefConv layers."""
from .refconv import RefConv1d, RefConv2d, RefConv3d, RefConvNd, clear_kernel_caches

__all__ = ["RefConv1d", "RefConv2d", "RefConv3d", "RefConvNd", "clear_kernel_caches"]
