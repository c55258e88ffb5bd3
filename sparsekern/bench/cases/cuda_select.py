"""Benchmark cases for the CUDA selection kernels (GPU only; no cases on other devices).

- global topk_mask over ResNet-50's 54 weight tensors (25.5M entries), against torch cat + topk;
- global topk_mask over a 1e9-entry list, against reading the list once (a sum over every
  tensor): the ratio says how many reads the selection costs;
- prune_grow (RigL update) over the 54 tensors, against the reference's sort-based update.
"""
from __future__ import annotations

import torch

from sparsekern import ops, reference
from sparsekern.bench.core import Case


def resnet50_weight_shapes() -> list[tuple[int, ...]]:
    """The 54 weight shapes of torchvision's ResNet-50 (53 convolutions and the classifier)."""
    shapes = [(64, 3, 7, 7)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(width, in_channels, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            if block == 0:
                shapes.append((4 * width, in_channels, 1, 1))
            in_channels = 4 * width
    return shapes + [(1000, 2048)]


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cuda":
        return []
    generator = torch.Generator(device=device).manual_seed(0)
    result = []
    shapes = resnet50_weight_shapes()
    for dtype in (torch.float32, torch.bfloat16):
        scores = [torch.randn(s, generator=generator, device=device).abs().to(dtype) for s in shapes]
        k = sum(s.numel() for s in scores) // 10
        result.append(Case(
            op="topk_mask global", size=f"ResNet-50 list 25.5M {str(dtype)[6:]}",
            runs={"torch cat+topk": lambda scores=scores, k=k: torch.cat([s.reshape(-1) for s in scores]).topk(k),
                  "sparsekern": lambda scores=scores, k=k: ops.topk_mask(scores, k)},
            baseline="torch cat+topk"))
    weights = [torch.randn(s, generator=generator, device=device) for s in shapes]
    masks = ops.topk_mask([w.abs() for w in weights], sum(w.numel() for w in weights) // 10)
    grads = [torch.randn(s, generator=generator, device=device) for s in shapes]

    def rigl(prune_grow):
        for w, m, g in zip(weights, masks, grads):
            prune_grow(w, m, w.abs(), g.abs(), int(m.sum()) // 3, [])
    result.append(Case(op="prune_grow", size="ResNet-50 54 layers fp32",
                       runs={"reference (torch sort)": lambda: rigl(reference.prune_grow),
                             "sparsekern": lambda: rigl(ops.prune_grow)},
                       baseline="reference (torch sort)"))
    if not quick:
        for dtype in (torch.float32, torch.bfloat16):
            big = [torch.rand(250_000_000, generator=generator, device=device).to(dtype) for _ in range(4)]
            result.append(Case(
                op="topk_mask global", size=f"1e9 entries {str(dtype)[6:]}",
                runs={"read once (sum)": lambda big=big: [t.sum() for t in big],
                      "sparsekern": lambda big=big: ops.topk_mask(big, 100_000_000)},
                baseline="read once (sum)"))
    return result
