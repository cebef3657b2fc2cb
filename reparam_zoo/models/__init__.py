"""The zoo: importing this module registers every architecture with timm."""
from . import rexnet, revcol  # noqa: F401  (registration side effects)
