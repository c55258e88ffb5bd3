"""Floor 3, the algorithms: DST (SET, RigL, MEST and every pruning criterion), IMP with rewinding, SWAMP and
OptG, with their criteria, drop-fraction schedules and torch.distributed helpers.

They drive the masks of `sparsekern.nn` modules and reach kernels only through `sparsekern.ops`.
"""
from . import criteria, distributed, schedules
from .criteria import Criterion
from .dst import DST, MEST, SET, RigL
from .imp import IMP
from .optg import OptG
from .swamp import SWAMP

__all__ = ["DST", "SET", "RigL", "MEST", "Criterion", "IMP", "OptG", "SWAMP", "criteria", "schedules", "distributed"]
