"""Where a warning of the algorithms points: the user's line, however deep inside sparsekern it was raised."""
from __future__ import annotations

import os
import sys

import torch.utils._contextlib

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# torch.no_grad() as a decorator (on step(), next_cycle(), ...) puts a frame of this file between ours.
_TORCH_DECORATORS = os.path.abspath(torch.utils._contextlib.__file__)


def user_stacklevel() -> int:
    """warnings.warn's stacklevel, for the function calling this one, that names the first frame outside sparsekern
    (and torch's decorators): the line that called the algorithm, through however many of its frames (a preset
    such as RigL calling DST, next_cycle calling prune_masks). A count fixed in the code fits one path only."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE)
                                 or os.path.abspath(frame.f_code.co_filename) == _TORCH_DECORATORS):
        frame, level = frame.f_back, level + 1
    return level
