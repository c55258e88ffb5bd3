"""Sparse-training algorithms built on sparsekern's modules and ops."""
from .dst import DST, MEST, SET, RigL

__all__ = ["DST", "SET", "RigL", "MEST"]
