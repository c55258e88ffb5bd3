"""Sparsity-aware initialisation: fans against a NumPy loop, and the variance into each unit."""
import functools

import numpy as np
import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import SparseConv1d, SparseConv2d, SparseConv3d, SparseLinear, init

from ..helpers import BAD_OWN_MASKS, assert_unchanged, damage_mask, everything


def fans_numpy(mask, mode, groups):
    mask = mask.numpy()
    out_units, in_per_group = mask.shape[:2]
    per_group = out_units // groups
    result = np.zeros(mask.shape)
    for index in np.ndindex(*mask.shape):
        j, i = index[:2]
        fan_in = mask[j].sum()
        group = j // per_group
        fan_out = mask[group * per_group:(group + 1) * per_group, i].sum()
        result[index] = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    return result


@pytest.mark.parametrize("mode", init.MODES)
@pytest.mark.parametrize("shape, groups", [((6, 5), 1), ((6, 4, 3, 2), 1), ((6, 2, 3, 3), 3)])
def test_fans_match_numpy(generator, mode, shape, groups):
    mask = torch.rand(shape, generator=generator) < 0.5
    np.testing.assert_array_equal(init.fans(mask, mode, groups).numpy(), fans_numpy(mask, mode, groups))


def rows_with_fan_in(fan_ins, in_features, generator):
    """A mask whose row j has exactly fan_ins[j] active entries at random positions."""
    scores = torch.rand(len(fan_ins), in_features, generator=generator)
    return sparsekern.ops.topk_mask(list(scores), list(fan_ins))


@pytest.mark.parametrize("distribution", init.DISTRIBUTIONS)
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_variance_into_each_unit_is_scale_over_its_fan_in(generator, distribution, scale):
    # Units of fan-in 4 to 1024 in one layer; fewer units where each unit gives more draws.
    units_per_fan = {4: 64, 32: 8, 256: 4, 1024: 4}
    fan_ins = torch.tensor([fan for fan, units in units_per_fan.items() for _ in range(units)])
    layer = SparseLinear(1024, len(fan_ins))
    layer.set_mask(torch.stack(rows_with_fan_in(fan_ins.tolist(), 1024, generator)))
    repeats = 16
    squares = torch.zeros(len(fan_ins), dtype=torch.float64)
    for _ in range(repeats):
        init.sparse_(layer, distribution=distribution, scale=scale, generator=generator)
        squares += layer.weight.detach().double().square().sum(1)
    variance = squares / (repeats * fan_ins)  # mean 0: the mean square is the variance
    for fan in units_per_fan:
        units = fan_ins == fan
        # 4096 draws per fan-in (relative standard error <= 2.2%): pooled over the units of
        # small fan-in, and for each unit on its own from fan-in 256 up.
        assert float(variance[units].mean()) == pytest.approx(scale / fan, rel=0.1)
        if fan >= 256:
            assert torch.all((variance[units] / (scale / fan) - 1).abs() < 0.1)


@pytest.mark.parametrize("make", [lambda: SparseConv1d(8, 4, 5, groups=2), lambda: SparseConv2d(8, 4, 3),
                                  lambda: SparseConv3d(8, 4, (3, 1, 2), groups=2)], ids=["conv1d", "conv2d", "conv3d"])
def test_uniform_bound_in_fan_in_and_fan_out_modes(generator, make):
    layer = make()
    mask = torch.rand(layer.weight.shape, generator=generator) < 0.3
    layer.set_mask(mask)
    # fan_in counted here directly: the active weights into each output channel, kernel positions included
    fan_in = mask.flatten(1).sum(1).view(-1, *[1] * (mask.dim() - 1))
    for mode, fan in (("fan_in", fan_in), ("fan_out", init.fans(mask, "fan_out", layer.groups))):
        init.sparse_(layer, distribution="uniform", mode=mode, scale=2.0, generator=generator)
        limit = (3 * 2.0 / fan.clamp(min=1)).sqrt()
        assert (layer.weight.abs() <= limit).all() and (layer.weight[~mask] == 0).all()
        assert (layer.weight[mask] != 0).all()
        # and not a looser bound than the draw used: some weight comes within 10% of it
        assert (layer.weight.abs() > 0.9 * limit).any()


def test_fan_out_variance(generator):
    # Columns (input units) with very different fan-out; weight (j, i) has Var = 1 / fan_out_i.
    fan_outs = [4, 32, 256]
    layer = SparseLinear(len(fan_outs) * 4, 256)
    columns = rows_with_fan_in([f for f in fan_outs for _ in range(4)], 256, generator)
    layer.set_mask(torch.stack(columns).T.contiguous())
    squares = torch.zeros(layer.in_features, dtype=torch.float64)
    repeats = 64
    for _ in range(repeats):
        init.sparse_(layer, mode="fan_out", generator=generator)
        squares += layer.weight.detach().double().square().sum(0)
    counts = torch.tensor([f for f in fan_outs for _ in range(4)], dtype=torch.float64)
    variance = squares / (repeats * counts)
    for k, fan in enumerate(fan_outs):
        assert variance[4 * k:4 * k + 4].mean() == pytest.approx(1 / fan, rel=0.1)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_layer_scaled_variance_is_dense_variance_over_density(generator, dims):
    layer = (SparseConv1d, SparseConv2d, SparseConv3d)[dims - 1](64, 64, 3)
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.1)
    init.layer_scaled_(layer, scale=2.0, generator=generator)
    active = layer.weight.detach()[layer.mask].double()
    assert float(active.square().mean()) == pytest.approx(2.0 / (layer.density * 64 * 3 ** dims), rel=0.05)
    assert (layer.weight[~layer.mask] == 0).all()


def test_dense_init_keeps_module_init(generator):
    torch.manual_seed(0)
    reference = nn.Linear(20, 10).weight.detach().clone()
    torch.manual_seed(0)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(20, 10)), 0.5, init="dense", generator=generator)
    layer = model[0]
    assert torch.equal(layer.weight[layer.mask], reference[layer.mask])


def test_same_seed_same_weights_and_callable_init():
    def weights(seed):
        model = sparsekern.sparsify(nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 5)), 0.3,
                                    init=functools.partial(init.sparse_, mode="fan_avg", scale=2.0),
                                    generator=torch.Generator().manual_seed(seed))
        return [p.detach().clone() for name, p in model.named_parameters() if name.endswith("weight")]
    assert all(torch.equal(a, b) for a, b in zip(weights(3), weights(3)))
    assert not torch.equal(weights(3)[0], weights(4)[0])


@pytest.mark.parametrize("kwargs, argument", [
    (dict(distribution="gamma"), "distribution"), (dict(mode="fan_sum"), "mode"), (dict(scale=0), "scale"),
    (dict(scale=-1.0), "scale")])
def test_bad_arguments_raise_and_change_nothing(kwargs, argument):
    layer = SparseLinear(6, 4)
    before = layer.weight.detach().clone()
    for function in (init.sparse_, init.layer_scaled_):
        with pytest.raises(ValueError, match=argument):
            function(layer, **kwargs)
    assert torch.equal(layer.weight, before)
    with pytest.raises(ValueError, match="init"):
        init.resolve("orthogonal")


class _CudaReportingGenerator(torch.Generator):
    """A CPU generator that reports a CUDA device, where this machine has none to make a real one on."""

    device = property(lambda self: torch.device("cuda", 0))


def test_a_generator_off_the_cpu_is_refused_naming_it_before_the_draw():
    # Masks and weights are drawn on the CPU, so that one seed gives the same on every device: a CUDA generator
    # failed in torch.randn naming no argument (or, on a CPU-only build, could not be made at all).
    generator = torch.Generator(device="cuda") if torch.cuda.is_available() else _CudaReportingGenerator()
    layer = SparseLinear(6, 4)
    before = layer.weight.detach().clone()
    for function in (init.sparse_, init.layer_scaled_):
        with pytest.raises(ValueError, match="generator must be a CPU torch.Generator"):
            function(layer, generator=generator)
    with pytest.raises(ValueError, match="generator must be a CPU torch.Generator"):
        sparsekern.sparsify(nn.Sequential(nn.Linear(6, 4)), 0.5, generator=generator)
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("kind", [kind for kind in BAD_OWN_MASKS if kind != "expanded"])  # read only: fine
@pytest.mark.parametrize("function", [init.sparse_, init.layer_scaled_, init.dense_])
def test_a_mask_put_in_place_through_data_is_refused_naming_the_function(function, kind):
    # A float mask failed in ~ or the fans naming no argument; a row of one broadcast over the weight.
    layer = SparseLinear(6, 4)
    error, match = damage_mask(layer, kind)
    generator = torch.Generator().manual_seed(0)
    before = everything(layer, generator=generator)
    with pytest.raises(error, match=f"{function.__name__}: module{match}"):
        function(layer, generator=generator)
    assert_unchanged(before, everything(layer, generator=generator))


# -- fans and variances worked out by hand --


def test_fans_by_hand():
    # linear (2, 3): fan_in per output row 2, 1; fan_out per input column 2, 1, 0
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert init.fans(mask, "fan_in").tolist() == [[2, 2, 2], [1, 1, 1]]
    assert init.fans(mask, "fan_out").tolist() == [[2, 1, 0], [2, 1, 0]]
    assert init.fans(mask, "fan_avg").tolist() == [[2, 1.5, 1], [1.5, 1, 0.5]]
    # grouped conv (4 out, 1 in per group, kernel 2), groups = 2: kernel positions count; input channel 0
    # feeds units 0-1 (3 active weights), channel 1 feeds units 2-3 (2 active weights)
    conv = torch.tensor([[1, 1], [1, 0], [0, 0], [1, 1]], dtype=torch.bool).view(4, 1, 2)
    assert init.fans(conv, "fan_in", groups=2).flatten().tolist() == [2, 2, 1, 1, 0, 0, 2, 2]
    assert init.fans(conv, "fan_out", groups=2).flatten().tolist() == [3, 3, 3, 3, 2, 2, 2, 2]
    # transposed conv weight (in 2, out 3, kernel 1): output unit j's fan-in is column j's count
    transposed = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool).view(2, 3, 1)
    assert init.fans(transposed, "fan_in", transposed=True).flatten().tolist() == [2, 1, 1, 2, 1, 1]
    assert init.fans(transposed, "fan_out", transposed=True).flatten().tolist() == [2, 2, 2, 2, 2, 2]


def _std_per_entry(initialise, mask):
    """The std each entry was drawn with: normal draws are randn · std, so with the same seed std = w / randn."""
    layer = SparseLinear(mask.shape[1], mask.shape[0], bias=False)
    layer.set_mask(mask)
    initialise(layer, generator=torch.Generator().manual_seed(3))
    return layer.weight.detach() / torch.randn(mask.shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("shape, groups, transposed", [((6, 2), 4, False), ((3, 2, 2), 2, False),
                                                       ((3, 2, 2), 2, True)])
def test_fans_refuse_groups_that_do_not_divide_the_units(shape, groups, transposed):
    # (3, 2, 2) in 2 groups reshaped without an error into fans of the wrong units; (6, 2) in 4 failed naming none.
    units = "input" if transposed else "output"
    with pytest.raises(ValueError, match=f"groups={groups} does not divide the weight's {shape[0]} {units} units"):
        init.fans(torch.ones(shape, dtype=torch.bool), groups=groups, transposed=transposed)


def test_dense_init_zeroes_the_weights_off_the_mask_and_keeps_the_others():
    # Called on a layer whose weight was written off its mask (sparsify's own calls find it zeroed already).
    layer = SparseLinear(6, 4)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    layer.set_mask(mask)
    with torch.no_grad():
        layer.weight.fill_(0.5)
    init.dense_(layer)
    assert torch.equal(layer.weight, torch.where(mask, 0.5, 0.0))


def test_sparse_and_layer_scaled_variances_by_hand():
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    std = _std_per_entry(functools.partial(init.sparse_, scale=2.0), mask)
    # Var = 2 / fan_in: 1 in row 0 (fan-in 2), 2 in row 1 (fan-in 1); 0 off the mask
    expected = torch.tensor([[1.0, 1.0, 0.0], [2 ** 0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(std, expected, rtol=1e-6, atol=0)
    # layer-scaled: Var = 2 / (density · dense fan-in) = 2 / (3/9 · 3) = 2 at every active entry
    std = _std_per_entry(functools.partial(init.layer_scaled_, scale=2.0), mask)
    torch.testing.assert_close(std, torch.where(mask, 2 ** 0.5, 0.0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("function", [init.sparse_, init.layer_scaled_, init.dense_])
def test_a_layer_built_under_inference_mode_is_refused_outside_it_before_the_draw(function):
    # torch refused the write into the inference tensor naming nothing, after the random stream had moved on.
    with torch.inference_mode():
        layer = SparseLinear(6, 4)
    before = everything(layer)
    with pytest.raises(ValueError, match="weight is an inference tensor .*initialise it there"):
        function(layer)
    assert_unchanged(before, everything(layer))
