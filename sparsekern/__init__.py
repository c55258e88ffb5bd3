"""sparsekern: fused kernels and faithful algorithms for sparse neural-network training.

The package is built in floors, each importing only the floors below it (docs/architecture.md):
`ops` (the op contract, reference and backends) -> `nn` (sparse modules, sparsify, init, metrics) ->
`algorithms` (DST, IMP, SWAMP, OptG) -> `cli` and `bench` (tools). `checkpoint` serves every floor.
"""
from . import algorithms, checkpoint, nn, ops
from .algorithms import DST, IMP, MEST, SET, SWAMP, Criterion, OptG, RigL, distributed
from .nn import densify, densities, distributions, flops, gradient_flow, init, masks, sparsify, summary
from .ops import reference
from .ops._backend import backends

__all__ = ["ops", "reference", "backends", "nn", "distributions", "init", "sparsify", "densify", "densities",
           "masks", "summary", "flops", "gradient_flow", "algorithms", "DST", "SET", "RigL", "MEST", "Criterion",
           "IMP", "SWAMP", "OptG", "distributed", "checkpoint"]
__version__ = "0.1.0"
