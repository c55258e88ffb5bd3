"""The `sparsekern` command. With no arguments it runs the main job on the embedded default."""
from __future__ import annotations

import argparse

import torch

from . import ops


def _digits(seed: int):
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def demo(density: float = 0.1, steps: int = 300, seed: int = 0) -> float:
    """Trains a 64-256-10 MLP whose weights keep a random mask at `density`; returns test accuracy."""
    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = _digits(seed)
    layers = [torch.nn.Linear(64, 256), torch.nn.Linear(256, 10)]
    masks = ops.topk_mask([torch.rand_like(layer.weight) for layer in layers],
                          [round(density * layer.weight.numel()) for layer in layers])
    params = [p for layer in layers for p in layer.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)

    def forward(x):
        hidden = torch.relu(ops.masked_linear(x, layers[0].weight, masks[0], layers[0].bias))
        return ops.masked_linear(hidden, layers[1].weight, masks[1], layers[1].bias)

    for step in range(steps):
        batch = torch.randint(len(y_train), (64,))
        loss = torch.nn.functional.cross_entropy(forward(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (forward(x_test).argmax(1) == y_test).float().mean().item()
    active = sum(int(m.sum()) for m in masks)
    total = sum(m.numel() for m in masks)
    print(f"density {active / total:.3f} ({active}/{total} weights), test accuracy {accuracy:.3f}")
    return accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sparsekern", description=__doc__)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.density <= 1:
        parser.error(f"--density must be in (0, 1], got {args.density}")
    demo(args.density, args.steps, args.seed)


if __name__ == "__main__":
    main()
