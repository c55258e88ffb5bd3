"""Sparse-training algorithms that drive the masks of `sparsekern.nn` sparse modules."""
from .imp import IMP
from .optg import OptG
from .swamp import SWAMP

__all__ = ["IMP", "OptG", "SWAMP"]
