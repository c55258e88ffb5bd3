"""Benchmark input shapes: ResNet-50's weight tensors and a 1M-entry tensor.

RESNET50 lists the 54 conv/linear weights of torchvision's `resnet50()` (53 convolutions and the
classifier, 25,502,912 entries) in its state-dict order, derived from the architecture so the
benchmarks need no torchvision: a 7x7 stem, then four stages of 3, 4, 6, 3 bottleneck blocks of
widths 64, 128, 256, 512 (1x1 reduce, 3x3, 1x1 expand by 4; the first block of each stage adds a
1x1 projection shortcut), then a 2048 -> 1000 linear layer.
"""
from __future__ import annotations

import math

import torch

ONE_MILLION = (1 << 20,)


def _resnet50() -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("conv1.weight", (64, 3, 7, 7))]
    in_channels = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            shapes += [(f"{prefix}.conv1.weight", (width, in_channels, 1, 1)),
                       (f"{prefix}.conv2.weight", (width, width, 3, 3)),
                       (f"{prefix}.conv3.weight", (4 * width, width, 1, 1))]
            if block == 0:
                shapes.append((f"{prefix}.downsample.0.weight", (4 * width, in_channels, 1, 1)))
            in_channels = 4 * width
    shapes.append(("fc.weight", (1000, in_channels)))
    return shapes


RESNET50: list[tuple[str, tuple[int, ...]]] = _resnet50()
# A stand-in of the same structure with every channel count divided by 16 (quick runs, CI).
RESNET50_TINY: list[tuple[str, tuple[int, ...]]] = [
    (name, (max(1, shape[0] // 16), max(1, shape[1] // 16), *shape[2:])) for name, shape in RESNET50]


def numel(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    """Total entries of a list of (name, shape)."""
    return sum(math.prod(shape) for _, shape in shapes)


def describe(name: str, tensors: list[torch.Tensor]) -> str:
    """A size label: "resnet50 (54 tensors, 25.5M entries)", or "1 tensor (1.05M entries)"."""
    total = sum(t.numel() for t in tensors)
    count = "1 tensor" if len(tensors) == 1 else f"{len(tensors)} tensors"
    return f"{name} ({count}, {total / 1e6:.3g}M entries)"


def random_tensors(shapes: list[tuple[str, tuple[int, ...]]], device: torch.device, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """One standard-normal tensor per shape, reproducible from `seed`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=generator, device=device, dtype=dtype) for _, shape in shapes]
