"""torch.func transforms (vmap, grad, vjp, jvp, jacrev, jacfwd, hessian) and forward-mode AD.

The fast paths are opaque to them: the C++ autograd Function of the dense-kernel path raises under
any transform, the backends' custom ops have no batching or forward-mode rule (a tangent through
them came out unmasked or lost: a silently wrong answer), and the mask kernels have no batching
rule. So masked_linear and weight_for_dense_kernel run plain torch code while one is active
(`active`), and the ops that have no derivative or cannot be batched refuse by name.
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad

_VMAP = "torch.vmap"
_REVERSE = "torch.func's reverse-mode transforms (grad, vjp, jacrev, hessian)"
_FORWARD = "forward-mode AD (torch.func.jvp, jacfwd, hessian; torch.autograd.forward_ad)"


def active() -> bool:
    """Whether a torch.func transform or a forward-mode AD dual level is active. A C call and an
    attribute read, cheap enough for every layer call; torch.compile folds both into constants."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def refuse_vmap(op: str, why: str, instead: str) -> None:
    """RuntimeError naming `op` (the call as a user writes it), why and what to do `instead` while a
    vmap is active; nothing otherwise. Called before the op changes anything."""
    if active():
        # Private functorch modules, imported only under a transform: a torch that moved them breaks
        # the refusal, not `import sparsekern`.
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        if any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters()):
            _raise(op, _VMAP, why, instead)


def refuse_derivatives(op: str, tensors, why: str, instead: str) -> None:
    """RuntimeError naming `op`, the transform, why and what to do `instead` if a derivative is
    being taken through any of `tensors` (None allowed): a grad level of torch.func tracks it, or
    it has a forward-mode tangent (torch.func.jvp, forward_ad). Tensors no transform
    differentiates pass (the input of a frozen part of the model; grad wraps its other arguments
    too, untracked), as does a tensor that requires grad outside any transform."""
    if not active():
        return
    for t in tensors:
        if t is None:
            continue
        if forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None:
            _raise(op, _FORWARD, why, instead)
        # Transform levels wrap a tensor one inside another (vmap(grad(f)): a grad wrapper around a
        # batched tensor): a tracked grad wrapper at any depth means gradients flow through it.
        while torch._C._functorch.is_functorch_wrapped_tensor(t):
            if torch._C._functorch.is_gradtrackingtensor(t) and t.requires_grad:
                _raise(op, _REVERSE, why, instead)
            t = torch._C._functorch.get_unwrapped(t)


def _raise(op: str, transform: str, why: str, instead: str) -> None:
    raise RuntimeError(f"{op} does not support {transform}: {why}; {instead}")
