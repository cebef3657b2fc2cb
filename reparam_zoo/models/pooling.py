"""Global pooling of the zoo's heads through timm's SelectAdaptivePool2d, with timm's pool names."""
from timm.layers import SelectAdaptivePool2d

__all__ = ["POOL_TYPES", "select_global_pool"]

# timm's names: '' is no pooling (the head sees the unpooled map), 'fast' is a mean over H and W.
POOL_TYPES = ("", "avg", "max", "avgmax", "catavgmax", "fast")


def select_global_pool(pool_type: str, flatten: bool, model_name: str, same_width: bool = False) -> SelectAdaptivePool2d:
    """`SelectAdaptivePool2d(pool_type)`, with a one-line ValueError for names timm does not know (timm
    asserts) and, with `same_width`, for pooling that changes the pooled width (catavgmax doubles it)."""
    if pool_type not in POOL_TYPES:
        raise ValueError(f"{model_name}: unknown global_pool {pool_type!r}; choose one of {', '.join(map(repr, POOL_TYPES))}")
    # timm flattens even an identity pool; an unpooled map must stay 4-D
    pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=flatten and bool(pool_type))
    if same_width and pool.feat_mult() != 1:
        raise ValueError(
            f"{model_name}: global_pool={pool_type!r} changes the pooled width ({pool.feat_mult()}x), but the head "
            "normalizes the model's channels (as timm's NormMlpClassifierHead, which refuses it too)"
        )
    return pool
