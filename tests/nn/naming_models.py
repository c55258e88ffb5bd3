"""Small models whose layers sparsify names in each of its ways (plain modules; an attention's projections and an
LSTM's matrices; two layers tied to one weight), shared by the tests of the per-layer mappings sparsify takes
(`distribution=`, `mask=`) and of `densities` and `masks`, which read them back."""
import torch
from torch import nn


def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32, 10))


def mixed(seed: int = 0) -> nn.Module:
    """A linear layer, a transformer block (its attention and MLP) and an LSTM."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoderLayer(8, 2, 16), nn.LSTM(8, 8))


def tied(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 12))
    model[1].weight = model[0].weight
    return model
