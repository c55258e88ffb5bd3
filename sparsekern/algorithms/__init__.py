"""Sparse-training algorithms that drive the masks of `sparsekern.nn` sparse modules."""
from .dst import DST, MEST, SET, RigL
from .imp import IMP
from .optg import OptG
from .swamp import SWAMP

__all__ = ["DST", "SET", "RigL", "MEST", "IMP", "OptG", "SWAMP"]
