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



def test_sparsify_names_the_dense_first_layer_that_alone_exceeds_the_density():
    # The error said the density was below what "the dense first layer" holds, naming no layer of the model.
    model = nn.Sequential()
    model.add_module("stem", nn.Linear(100, 100))
    model.add_module("head", nn.Linear(100, 2))
    before = [parameter.detach().clone() for parameter in model.parameters()]
    with pytest.raises(ValueError, match=r"density=0\.5 .*dense first layer 'stem' alone.*dense_first_layer"):
        sparsekern.sparsify(model, 0.5, dense_first_layer=True)
    assert type(model.stem) is nn.Linear
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match=r"dense first layer 'layer 0' alone"):
        distributions.erk([(100, 100), (2, 2)], 0.5, dense_first_layer=True, names=["layer 0", "layer 1"])

# -- the specification's rules, against values worked out by hand --
# ERK's raw density of a layer is (sum of dims) / (product of dims): 20/100 = 0.2 for a (10, 10) linear
# weight, 25/100 = 0.25 for (20, 5), 12/72 = 1/6 for a (4, 2, 3, 3) conv, 4/4 = 1 for (2, 2).


def test_erk_by_hand_two_linear_layers():
    # eps·(0.2·100 + 0.25·100) = 0.45·200 = 90 gives eps = 2: densities 0.4 and 0.5 (40 + 50 = 90 weights).
    assert distributions.erk([(10, 10), (20, 5)], 0.45) == pytest.approx([0.4, 0.5], abs=1e-12)
    assert distributions.layer_counts([(10, 10), (20, 5)], [0.4, 0.5]) == [40, 50]


def test_erk_by_hand_counts_kernel_dims_in_the_sum_and_the_product():
    # eps·(72/6 + 0.2·100) = eps·32 = d·172; d = 96/172 gives eps = 3: 3/6 = 0.5 and 3·0.2 = 0.6.
    assert distributions.erk([(4, 2, 3, 3), (10, 10)], 96 / 172) == pytest.approx([0.5, 0.6], abs=1e-12)


def test_erk_by_hand_power_raises_the_raw_density():
    # power 2: raw 0.04 and 0.0625; eps·(4 + 6.25) = 0.41·200 = 82 gives eps = 8: 0.32 and 0.5.
    assert distributions.erk([(10, 10), (20, 5)], 0.41, power=2.0) == pytest.approx([0.32, 0.5], abs=1e-12)


def test_erk_by_hand_a_huge_power_fills_the_layers_in_order_of_their_raw_density():
    # Raw densities 0.2 and 0.25: as power grows the (20, 5) layer takes the budget first. At 0.6 of 200 weights
    # it saturates (100), and the (10, 10) layer gets the other 20. The raw values are scaled by the largest
    # before exp: scaled by the smallest, exp(1e4 · log(1.25)) overflowed (OverflowError).
    for power in (1e4, 1e308):
        assert distributions.erk([(10, 10), (20, 5)], 0.6, power=power) == pytest.approx([0.2, 1.0], abs=1e-12)


def test_erk_by_hand_a_saturated_layer_is_made_dense_and_eps_solved_again():
    # d = 94/204 (94 of 204 weights): first eps = 94 / (4 + 20 + 25) = 1.92 puts the (2, 2) layer at 1.92;
    # made dense, eps = (94 - 4) / (20 + 25) = 2: densities 1, 0.4, 0.5.
    shapes = [(2, 2), (10, 10), (20, 5)]
    assert distributions.erk(shapes, 94 / 204) == pytest.approx([1.0, 0.4, 0.5], abs=1e-12)


def test_erk_by_hand_dense_first_layer_spreads_the_rest_of_the_budget():
    # First layer (10, 10) dense: 100 of the 0.45·300 = 135 weights; eps·(0.25·100 + 0.25·100) = 35 gives
    # eps = 0.7: both (20, 5) layers at 0.175.
    shapes = [(10, 10), (20, 5), (5, 20)]
    assert distributions.erk(shapes, 0.45, dense_first_layer=True) == pytest.approx([1.0, 0.175, 0.175], abs=1e-12)


def test_uniform_by_hand_dense_first_layer_puts_the_total_above_d():
    assert distributions.uniform([(10, 10), (20, 5)], 0.1, dense_first_layer=True) == [1.0, 0.1]
    assert distributions.layer_counts([(10, 10), (20, 5)], [1.0, 0.1]) == [100, 10]   # 110 > 0.1 · 200


def test_counts_refuse_a_density_list_of_another_length_than_the_shapes():
    # zip would drop the layers past the shorter list: a count too few, given silently.
    with pytest.raises(ValueError, match="densities has 1 entries but shapes has 2"):
        distributions.layer_counts([(2, 2), (3, 3)], [0.5])


def test_counts_by_hand_round_halves_to_even():
    # 0.5·5 = 2.5 -> 2, 0.5·7 = 3.5 -> 4, 0.5·3 = 1.5 -> 2, 0.3·10 = 3.0000000000000004 -> 3.
    assert distributions.layer_counts([(1, 5), (1, 7), (3, 1), (2, 5)], [0.5, 0.5, 0.5, 0.3]) == [2, 4, 2, 3]


def test_sparsify_by_hand_erk_counts_and_dense_biases():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 20), nn.Linear(20, 5))
    sparsekern.sparsify(model, 0.45, "erk", generator=torch.Generator().manual_seed(0))
    modules = [m for _, m in sparsekern.nn.sparse_modules(model)]
    # weights (10, 10), (20, 10), (5, 20): raw 0.2, 0.15, 0.25; eps·(20 + 30 + 25) = 0.45·400 = 180, eps = 2.4.
    assert [m.nnz for m in modules] == [48, 72, 60]
    assert all(bool((m.bias != 0).all()) for m in modules)


@pytest.mark.parametrize("power", [0.0, -0.0, -0.5, -2.0])
def test_erk_refuses_a_power_that_is_not_positive(power):
    """Campaign 20: power 0 gave every layer the global density (distribution="uniform", under ERK's name), a negative
    one the larger layers the higher densities, the reverse of ERK; both were taken silently."""
    match = r"power must be a finite number > 0 \(ERK's exponent; 0 is distribution='uniform', below 0 reverses ERK\)"
    with pytest.raises(ValueError, match=match):
        distributions.erk([(4, 4), (8, 4)], 0.5, power=power)
    with pytest.raises(ValueError, match=match):
        distributions.layer_densities([(4, 4), (8, 4)], 0.5, power=power)
