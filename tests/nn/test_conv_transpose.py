"""Sparse transposed convolutions (SparseConvTranspose1d/2d/3d) against plain PyTorch on the masked weight:
forward and every gradient, conversion, checkpoints, sparsify, the sparsity-aware init of their weight layout,
and DST on a model that holds them."""
import copy
import itertools
import pickle

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch import nn

import sparsekern
from sparsekern.nn import (SparseConvTranspose1d, SparseConvTranspose2d, SparseConvTranspose3d, SparseConvTransposeNd,
                           init, sparse_modules)

SPARSE = {1: SparseConvTranspose1d, 2: SparseConvTranspose2d, 3: SparseConvTranspose3d}
DENSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
FUNCTION = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
# Odd shapes: (in, out, kernel, options, input spatial size).
CASES = [
    (1, 3, 5, 3, dict(), (7,)),
    (1, 4, 6, 4, dict(stride=3, padding=1, output_padding=2, groups=2), (5,)),
    (2, 3, 5, (3, 2), dict(stride=2, padding=(1, 0), output_padding=1), (4, 5)),
    (2, 6, 4, 3, dict(stride=(2, 1), dilation=2, groups=2, bias=False), (3, 5)),
    (3, 2, 3, (2, 3, 1), dict(stride=(1, 2, 2), padding=(0, 1, 0), output_padding=(0, 1, 1)), (3, 2, 4)),
]


def reference(layer, x, weight, output_size=None):
    output_padding = layer._output_padding(x, output_size, layer.stride, layer.padding, layer.kernel_size,
                                           len(layer.kernel_size), layer.dilation)
    return FUNCTION[len(layer.kernel_size)](x, weight, layer.bias, layer.stride, layer.padding, output_padding,
                                            layer.groups, layer.dilation)


def make(case, dtype, generator, density=0.4):
    dims, cin, cout, kernel, options, size = case
    layer = SPARSE[dims](cin, cout, kernel, dtype=dtype, **options)
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < density)
    x = torch.randn(2, cin, *size, dtype=dtype, generator=generator)
    return layer, x


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}d-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("dense_grad", [False, True])
@pytest.mark.parametrize("zero_off_mask", [True, False])
def test_matches_the_transposed_convolution_on_the_masked_weight(case, dtype, tolerance, dense_grad, zero_off_mask,
                                                                  generator):
    layer, x = make(case, dtype, generator)
    mask = layer.mask.clone()
    if not zero_off_mask:   # values off the mask, which only the masked path keeps out
        with torch.no_grad():
            layer.weight.add_(torch.randn(mask.shape, dtype=dtype, generator=generator) * ~mask)
        layer.zero_off_mask = False
    layer.dense_grad = dense_grad
    x = x.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()   # not contiguous
    y = layer(x)
    dy = torch.randn(y.shape, dtype=dtype, generator=generator)
    y.backward(dy)

    weight = torch.where(mask, layer.weight.detach(), 0).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = reference(layer, x_ref, weight)
    y_ref.backward(dy)
    close = dict(atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(y, y_ref, **close)
    torch.testing.assert_close(x.grad, x_ref.grad, **close)
    want = weight.grad if dense_grad else torch.where(mask, weight.grad, 0)
    torch.testing.assert_close(layer.weight.grad, want, **close)
    assert bool((layer.weight.grad[~mask] != 0).any()) == dense_grad


def test_output_size_picks_the_output_padding_as_the_dense_module_does(generator):
    layer, x = make(CASES[2], torch.float64, generator)
    for output_size in ([7, 10], [8, 11]):
        y = layer(x, output_size=output_size)
        assert y.shape[-2:] == tuple(output_size)
        torch.testing.assert_close(y, reference(layer, x, layer.masked_weight(), output_size))
    with pytest.raises(ValueError, match="requested an output size of"):   # torch's own check
        layer(x, output_size=[20, 20])


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_from_dense_shares_the_parameters_and_to_dense_gives_the_masked_module(dims, generator):
    dense = DENSE[dims](4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dtype=torch.float64)
    sparse = SPARSE[dims].from_dense(dense)
    assert sparse.weight is dense.weight and sparse.bias is dense.bias and sparse.mask.all()
    assert (sparse.output_padding, sparse.groups, sparse.stride) == (dense.output_padding, 2, dense.stride)
    x = torch.randn(2, 4, *[3] * dims, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(sparse(x), dense(x))
    sparse.set_mask(torch.rand(sparse.weight.shape, generator=generator) < 0.3)
    back = sparse.to_dense()
    assert type(back) is DENSE[dims] and back.output_padding == dense.output_padding
    torch.testing.assert_close(back(x), sparse(x))
    with pytest.raises(TypeError, match=f"SparseConvTranspose{dims}d.from_dense takes an nn.ConvTranspose{dims}d"):
        SPARSE[dims].from_dense(nn.Conv2d(4, 6, 3))


def test_a_transposed_convolution_is_a_sparse_convolution_with_its_own_layout():
    layer = SparseConvTranspose2d(4, 6, 3, groups=2)
    assert isinstance(layer, (SparseConvTransposeNd, sparsekern.nn.SparseConvNd, nn.ConvTranspose2d))
    assert layer.mask.shape == layer.weight.shape == (4, 3, 3, 3)   # (in, out / groups, *kernel)


def test_padding_modes_other_than_zeros_are_refused_as_torch_refuses_them(generator):
    with pytest.raises(ValueError, match="zeros"):
        SparseConvTranspose2d(2, 2, 3, padding_mode="reflect")
    layer, x = make(CASES[2], torch.float32, generator)
    layer.padding_mode = "circular"
    with pytest.raises(ValueError, match="Only 'zeros' padding mode is supported for SparseConvTranspose2d"):
        layer(x)


def test_checkpoints_dense_and_pruned_state_dicts_load(generator):
    layer, x = make(CASES[3], torch.float32, generator)
    expected = layer(x)
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(copied.mask, layer.mask) and copied.zero_off_mask
        torch.testing.assert_close(copied(x), expected)
    reloaded = SparseConvTranspose2d(6, 4, 3, stride=(2, 1), dilation=2, groups=2, bias=False)
    reloaded.load_state_dict(layer.state_dict())
    torch.testing.assert_close(reloaded(x), expected)
    # torch.nn.utils.prune's weight_orig and weight_mask: that mask and the pruned weight
    pruned = nn.ConvTranspose2d(6, 4, 3, stride=(2, 1), dilation=2, groups=2, bias=False)
    torch.nn.utils.prune.random_unstructured(pruned, "weight", amount=0.7)
    reloaded.load_state_dict(pruned.state_dict())
    assert torch.equal(reloaded.mask, pruned.weight_mask.bool()) and reloaded.zero_off_mask
    torch.testing.assert_close(reloaded(x), pruned(x))


def autoencoder():
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.ReLU(),
                         nn.ConvTranspose2d(8, 3, 4, stride=2, padding=1, groups=1))


def test_sparsify_converts_transposed_convolutions_with_exact_counts(generator):
    model = autoencoder()
    shapes = [m.weight.shape for m in model if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    sparsekern.sparsify(model, 0.2, generator=generator)
    layers = [module for _, module in sparse_modules(model)]
    assert [type(m).__name__ for m in layers] == ["SparseConv2d", "SparseConv2d", "SparseConvTranspose2d",
                                                  "SparseConvTranspose2d"]
    densities = sparsekern.nn.distributions.erk(shapes, 0.2)
    for layer, density in zip(layers, densities):
        assert layer.nnz == round(density * layer.mask.numel()) and not layer.weight[~layer.mask].any()
    x = torch.randn(2, 3, 8, 8, generator=generator)
    plain = copy.deepcopy(model)
    for index, module in enumerate(plain):
        if hasattr(module, "mask"):
            plain[index] = module.to_dense()
    torch.testing.assert_close(model(x), plain(x))


def fans_by_hand(mask: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fan_in, fan_out) per weight of a transposed convolution's mask (in, out / groups, *kernel), counted one
    connection at a time: weight [i, j, ...] joins input channel i to output channel g * out_per_group + j,
    g = i // (in / groups)."""
    cin, out_per_group = mask.shape[:2]
    into, out_of = {}, {}
    for i, j in itertools.product(range(cin), range(out_per_group)):
        output = i // (cin // groups) * out_per_group + j
        active = int(mask[i, j].sum())
        into[output] = into.get(output, 0) + active
        out_of[i] = out_of.get(i, 0) + active
    fan_in, fan_out = torch.empty(mask.shape), torch.empty(mask.shape)
    for i, j in itertools.product(range(cin), range(out_per_group)):
        fan_in[i, j] = into[i // (cin // groups) * out_per_group + j]
        fan_out[i, j] = out_of[i]
    return fan_in, fan_out


@pytest.mark.parametrize("groups", [1, 3])
def test_fans_of_the_transposed_layout_count_into_the_output_channels(groups, generator):
    mask = torch.rand(6, 2, 3, 2, generator=generator) < 0.4
    fan_in, fan_out = fans_by_hand(mask, groups)
    assert torch.equal(init.fans(mask, "fan_in", groups, transposed=True), fan_in)
    assert torch.equal(init.fans(mask, "fan_out", groups, transposed=True), fan_out)
    assert torch.equal(init.fans(mask, "fan_avg", groups, transposed=True), (fan_in + fan_out) / 2)
    # the convolution's layout reads the same counts the other way round
    assert torch.equal(init.fans(mask, "fan_out", groups), fan_in)
    with pytest.raises(TypeError, match="transposed must be a bool"):
        init.fans(mask, transposed=1)
    with pytest.raises(ValueError, match="does not divide the weight's 6 input units"):
        init.fans(mask, groups=4, transposed=True)


def test_sparse_init_draws_each_output_channels_weights_by_its_own_fan_in(generator):
    # Output channels (dim 1) of very different fan-in: Var = scale / fan_in of the channel.
    layer = SparseConvTranspose1d(256, 3, 1, bias=False)
    fan_ins = [4, 32, 256]
    mask = torch.zeros(256, 3, 1, dtype=torch.bool)
    for channel, fan in enumerate(fan_ins):
        mask[torch.randperm(256, generator=generator)[:fan], channel] = True
    layer.set_mask(mask)
    squares, repeats = torch.zeros(3, dtype=torch.float64), 64
    for _ in range(repeats):
        init.sparse_(layer, scale=2.0, generator=generator)
        squares += layer.weight.detach().double().square().sum((0, 2))
    for channel, fan in enumerate(fan_ins):
        assert squares[channel] / (repeats * fan) == pytest.approx(2.0 / fan, rel=0.1)
    assert not layer.weight[~mask].any()


def test_rigl_trains_a_sparse_autoencoder_at_exact_counts(generator):
    torch.manual_seed(0)
    model = sparsekern.sparsify(autoencoder(), 0.3, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rigl = sparsekern.RigL(model, optimizer, update_every=2, total_steps=12, drop_fraction=0.5)
    layers = [module for _, module in sparse_modules(model)]
    counts = [layer.nnz for layer in layers]
    masks = [layer.mask.clone() for layer in layers]
    x = torch.randn(8, 3, 8, 8, generator=generator)
    for _ in range(12):
        F.mse_loss(model(x), x).backward()
        rigl.step()
        optimizer.step()
        optimizer.zero_grad()
    assert [layer.nnz for layer in layers] == counts
    assert all(not layer.weight[~layer.mask].any() for layer in layers)
    assert any(not torch.equal(layer.mask, before) for layer, before in zip(layers, masks))
