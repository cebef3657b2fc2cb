"""Stochastic depth that survives torch.fx dead-code elimination.

timm's `drop_path` scales its random mask in place (`random_tensor.div_(keep_prob)`) and then uses the
mask, not the result of `div_`. A traced graph records `div_` as a node nobody reads, and
`Graph.eliminate_dead_code()` (run by torchvision's and timm's `create_feature_extractor`) removes it:
the traced model then drops paths without rescaling the kept ones, so in training it computes
something else than the eager model (issue 21: fx vs eager gradients differed with drop path on).
This DropPath draws the same mask with the same RNG call and divides out of place, so the eager
numbers are bit-identical to timm's and the division is an op the graph's output depends on.
"""
import torch
from timm.layers import DropPath as TimmDropPath


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)  # the draw timm's drop_path makes
    if keep_prob > 0.0 and scale_by_keep:
        random_tensor = random_tensor / keep_prob  # out of place: see the module docstring
    return x * random_tensor


class DropPath(TimmDropPath):
    """timm's DropPath (same attributes, state and repr) with the fx-safe `drop_path` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)
