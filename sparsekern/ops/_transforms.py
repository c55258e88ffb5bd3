"""torch.func transforms (vmap, grad, vjp, jvp, jacrev, jacfwd, hessian) and forward-mode AD.

The fast paths are opaque to them: the C++ autograd Function of the dense-kernel path raises under
any transform, the backends' custom ops have no batching or forward-mode rule (a tangent through
them came out unmasked or lost: a silently wrong answer). So masked_linear and
weight_for_dense_kernel run plain torch code while one is active (`active`).
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad


def active() -> bool:
    """Whether a torch.func transform or a forward-mode AD dual level is active. A C call and an
    attribute read, cheap enough for every layer call; torch.compile folds both into constants."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0
