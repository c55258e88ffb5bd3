"""sparsekern: fused kernels and faithful algorithms for sparse neural-network training."""
from . import nn, ops, reference
from ._backend import backends

__all__ = ["ops", "reference", "backends", "nn"]
__version__ = "0.1.0"
