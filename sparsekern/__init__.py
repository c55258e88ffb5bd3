"""sparsekern: fused kernels and faithful algorithms for sparse neural-network training."""
from . import distributions, init, nn, ops, reference
from ._backend import backends
from .metrics import gradient_flow, summary
from .sparsify import sparsify
from .algorithms import DST, IMP, MEST, SET, SWAMP, OptG, RigL

__all__ = ["ops", "reference", "backends", "nn", "distributions", "init", "sparsify", "summary",
           "gradient_flow", "DST", "SET", "RigL", "MEST", "IMP", "SWAMP", "OptG"]
__version__ = "0.1.0"
