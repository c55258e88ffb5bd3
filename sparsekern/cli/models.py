"""Small models for the command line, sized for 8x8 digits and usable on any image or feature input."""
from __future__ import annotations

import math

from torch import nn

MODELS = ("mlp", "cnn")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, width: int = 256) -> nn.Module:
    """A dense model for inputs of `input_shape` (without the batch dimension) and `num_classes` outputs.

    mlp: flatten -> width -> width -> classes (ReLU). cnn: two 3x3 convolutions (32, 64 channels) with a 2x2
    max-pool, adaptive average pooling to 4x4 (so any image size works), then width -> classes. The caller seeds
    torch's RNG beforehand: the weights come from it.
    """
    if name == "mlp":
        features = math.prod(input_shape)
        return nn.Sequential(nn.Flatten(), nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width),
                             nn.ReLU(), nn.Linear(width, num_classes))
    if name == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"model 'cnn' needs image inputs of shape (C, H, W), got {tuple(input_shape)}")
        channels = input_shape[0]
        return nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                             nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                             nn.Linear(64 * 16, width), nn.ReLU(), nn.Linear(width, num_classes))
    raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
