"""Benchmark cases: sparse_linear on a packed weight against dense F.linear on the masked weight.

Inference at small batch is limited by the bytes of weight read; the packed bitmap reads
0.125 + itemsize * density bytes per entry against itemsize for dense (sparsekern.ops.packing).
Labels: "dense F.linear" (baseline), "sparsekern.ops.sparse_linear" (the entry point, with its dense
fallback rule), "sparsekern kernel only" (the compiled kernel alone, where the extension has one).
"""
from __future__ import annotations

import torch

from ... import ops
from ...ops import _extension
from ..core import Case

OPS = ("sparse_linear",)


def _plan(device: torch.device, quick: bool):
    if quick:
        # Two shapes, so the smoke test catches a case that reads another case's tensors.
        return [torch.float32], [(256, 256), (128, 192)], [1, 16], [0.1]
    if device.type == "cuda":
        return [torch.float16, torch.bfloat16], [(4096, 4096), (8192, 8192)], [1, 4, 16], [0.05, 0.1, 0.2, 0.3, 0.5]
    return [torch.float32, torch.bfloat16], [(1024, 1024), (4096, 4096)], [1, 4, 16, 64], [0.05, 0.1, 0.3, 0.5]


def _runs(x, dense, packed, bias, has_kernel: bool) -> dict:
    # A function of its own so each case's closures hold that case's tensors (a lambda in the loop
    # would read the loop's last bias).
    runs = {
        "dense F.linear": lambda: torch.nn.functional.linear(x, dense, bias),
        "sparsekern.ops.sparse_linear": lambda: ops.sparse_linear(x, packed, bias),
    }
    if has_kernel:
        runs["sparsekern kernel only"] = lambda: torch.ops.sparsekern.sparse_linear(
            x, packed.bitmap, packed.values, packed.chunk_offsets, bias)
    return runs


def cases(device: torch.device, quick: bool) -> list[Case]:
    generator = torch.Generator().manual_seed(0)
    has_kernel = _extension.kernel_missing("sparse_linear", device.type) is None
    result = []
    dtypes, shapes, batches, densities = _plan(device, quick)
    for dtype in dtypes:
        for out_features, in_features in shapes:
            weight = torch.randn(out_features, in_features, generator=generator).to(dtype).to(device)
            bias = torch.randn(out_features, generator=generator).to(dtype).to(device)
            for density in densities:
                mask = (torch.rand(out_features, in_features, generator=generator) < density).to(device)
                dense = torch.where(mask, weight, torch.zeros((), dtype=dtype, device=device))
                packed = ops.pack(weight, mask)
                for batch in batches:
                    x = torch.randn(batch, in_features, generator=generator).to(dtype).to(device)
                    runs = _runs(x, dense, packed, bias, has_kernel)
                    size = f"{out_features}x{in_features} batch {batch} density {density} {str(dtype)[6:]}"
                    result.append(Case(op="sparse_linear", size=size, runs=runs, baseline="dense F.linear"))
    return result
