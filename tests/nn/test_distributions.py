"""Layer densities: ERK against a NumPy re-implementation of RigL's solver, uniform, exact counts."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import distributions

RESNET_LIKE = [(64, 3, 7, 7), (64, 64, 3, 3), (128, 64, 3, 3), (128, 128, 3, 3), (256, 128, 1, 1),
               (512, 256, 3, 3), (1000, 512)]


def erk_numpy(shapes, density, power=1.0, dense=()):
    """RigL's approach: solve eps, make the single most saturated layer dense, repeat."""
    sizes = np.array([np.prod(s) for s in shapes], dtype=np.float64)
    raw = np.array([np.sum(s) / np.prod(s) for s in shapes], dtype=np.float64) ** power
    dense = set(dense)
    while True:
        free = [i for i in range(len(shapes)) if i not in dense]
        budget = density * sizes.sum() - sizes[list(dense)].sum()
        eps = budget / np.sum(raw[free] * sizes[free]) if free else 0.0
        worst = max(free, key=lambda i: raw[i], default=None)
        if worst is None or eps * raw[worst] <= 1:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense.add(worst)


def random_shapes(generator, count):
    shapes = []
    for _ in range(count):
        dims = torch.randint(1, 40, (4,), generator=generator).tolist()
        shapes.append(tuple(dims[:2]) if torch.rand((), generator=generator) < 0.4 else
                      (dims[0], dims[1], dims[2] % 5 + 1, dims[3] % 5 + 1))
    return shapes


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("power", [1.0, 0.5, 2.0])
def test_erk_matches_formula_with_resolving(density, power):
    densities = distributions.erk(RESNET_LIKE, density, power=power)
    np.testing.assert_allclose(densities, erk_numpy(RESNET_LIKE, density, power), rtol=0, atol=1e-6)
    sizes = [math.prod(s) for s in RESNET_LIKE]
    assert sum(d * n for d, n in zip(densities, sizes)) == pytest.approx(density * sum(sizes), rel=1e-9)
    assert all(0 < d <= 1 for d in densities)
    sparse = [i for i, d in enumerate(densities) if d < 1]
    ratios = [densities[i] / (sum(RESNET_LIKE[i]) / sizes[i]) ** power for i in sparse]
    np.testing.assert_allclose(ratios, ratios[0] if ratios else [], rtol=1e-9)  # one eps


def test_erk_saturation_makes_layers_dense_and_resolves():
    # At 50% the small first conv and the classifier-like layers would exceed 1.
    shapes = [(16, 3, 3, 3), (512, 512, 3, 3), (10, 512)]
    densities = distributions.erk(shapes, 0.5)
    assert densities[0] == 1.0 and densities[2] == 1.0
    sizes = [math.prod(s) for s in shapes]
    assert densities[1] == pytest.approx((0.5 * sum(sizes) - sizes[0] - sizes[2]) / sizes[1], abs=1e-12)
    # Without re-solving the first pass would have given the big layer less than the budget.
    first_eps = 0.5 * sum(sizes) / sum(sum(s) for s in shapes)
    assert densities[1] > first_eps * sum(shapes[1]) / sizes[1]


def test_erk_random_shapes(generator):
    for _ in range(20):
        shapes = random_shapes(generator, 6)
        density = float(torch.rand((), generator=generator)) * 0.99 + 0.01
        np.testing.assert_allclose(distributions.erk(shapes, density), erk_numpy(shapes, density), atol=1e-6)
        if math.prod(shapes[0]) <= density * sum(math.prod(s) for s in shapes):
            np.testing.assert_allclose(distributions.erk(shapes, density, dense_first_layer=True),
                                       erk_numpy(shapes, density, dense=[0]), atol=1e-6)


def test_uniform():
    assert distributions.uniform(RESNET_LIKE, 0.2) == [0.2] * len(RESNET_LIKE)
    assert distributions.uniform(RESNET_LIKE, 0.2, dense_first_layer=True) == [1.0] + [0.2] * (len(RESNET_LIKE) - 1)
    assert distributions.layer_densities(RESNET_LIKE, 0.3, "uniform") == [0.3] * len(RESNET_LIKE)


def test_counts_are_rounded_exactly():
    shapes = [(3, 5), (7, 1, 3, 3), (2, 2)]
    assert distributions.layer_counts(shapes, [0.5, 0.1, 1.0]) == [round(7.5), round(6.3), 4]
    assert distributions.layer_counts(shapes, [0.0, 1.0, 0.0]) == [0, 63, 0]


@pytest.mark.parametrize("distribution, options", [
    ("erk", {}), ("erk", {"power": 0.5}), ("erk", {"dense_first_layer": True}),
    ("uniform", {}), ("uniform", {"dense_first_layer": True})])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.8])
def test_sparsify_gives_exact_counts_per_layer(generator, distribution, options, density):
    for init in ("sparse", "layer-scaled", "dense"):
        # never run: a stack of every kind of layer sparsify takes
        model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3, groups=4), nn.ReLU(),
                              nn.Flatten(), nn.Linear(32 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
                              nn.Conv1d(8, 12, 5), nn.Conv3d(4, 8, (3, 2, 2), groups=2))
        sparsekern.sparsify(model, density, distribution, init=init, generator=generator, **options)
        modules = [m for _, m in sparsekern.nn.sparse_modules(model)]
        assert len(modules) == 6
        shapes = [tuple(m.weight.shape) for m in modules]
        expected = distributions.layer_counts(
            shapes, distributions.layer_densities(shapes, density, distribution, **options))
        assert [m.nnz for m in modules] == expected
        assert [int((m.weight != 0).sum()) for m in modules] == expected  # no active weight drawn as 0
        assert all((m.weight[~m.mask] == 0).all() for m in modules)


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan")])
def test_bad_density(density):
    for function in (distributions.uniform, distributions.erk):
        with pytest.raises(ValueError, match="density"):
            function(RESNET_LIKE, density)


def test_bad_arguments():
    with pytest.raises(ValueError, match="distribution"):
        distributions.layer_densities(RESNET_LIKE, 0.5, "bernoulli")
    with pytest.raises(TypeError, match="density"):
        distributions.erk(RESNET_LIKE, "0.5")
    with pytest.raises(ValueError, match="shapes"):
        distributions.erk([(3, 0)], 0.5)
    with pytest.raises(ValueError, match="density"):  # the dense first layer alone is over budget
        distributions.erk([(100, 100), (2, 2)], 0.5, dense_first_layer=True)
