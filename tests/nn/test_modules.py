"""Sparse modules against plain PyTorch with masked weights, sparsify, summary and gradient flow."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import sparsekern
from sparsekern.nn import (SparseConv1d, SparseConv2d, SparseConv3d, SparseConvTranspose3d, SparseGRU, SparseLinear,
                           SparseMultiheadAttention, sparse_modules)
from sparsekern.nn.modules import refuse_meta

from ..helpers import BAD_OWN_MASKS, assert_unchanged, damage_mask, everything, mlp


def random_mask(shape, density, generator):
    return torch.rand(shape, generator=generator) < density


def masked(weight, mask):
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype))


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dense_grad", [False, True])
def test_sparse_linear_matches_masked_dense(generator, dtype, atol, bias, dense_grad):
    layer = SparseLinear(13, 7, bias=bias, dtype=dtype)
    mask = random_mask(layer.weight.shape, 0.3, generator)
    layer.set_mask(mask)
    layer.dense_grad = dense_grad
    x = torch.randn(2, 5, 13, generator=generator, dtype=dtype).requires_grad_()
    dy = torch.randn(2, 5, 7, generator=generator, dtype=dtype)
    y = layer(x)
    y.backward(dy)

    weight = masked(layer.weight.detach(), mask).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = layer.bias.detach().clone().requires_grad_() if bias else None
    y_ref = F.linear(x_ref, weight, bias_ref)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=atol, rtol=0)
    expected_grad = weight.grad if dense_grad else masked(weight.grad, mask)
    torch.testing.assert_close(layer.weight.grad, expected_grad, atol=atol, rtol=0)
    if dense_grad:
        assert (layer.weight.grad[~mask] != 0).any()
    if bias:
        torch.testing.assert_close(layer.bias.grad, bias_ref.grad, atol=atol, rtol=0)


DENSE_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPARSE_CONV = {1: SparseConv1d, 2: SparseConv2d, 3: SparseConv3d}
F_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
SPATIAL = {1: (9,), 2: (9, 8), 3: (5, 6, 4)}
# Tuples give one value per spatial dim, cut to the convolution's dims.
CONV_CASES = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2, 2), stride=(2, 1, 1), padding=(2, 0, 1), dilation=(1, 2, 1)),
    dict(kernel_size=3, dilation=2, padding="same"),
    dict(kernel_size=3, padding="valid", groups=2),
    dict(kernel_size=1, groups=6, bias=False),
    dict(kernel_size=3, padding=1, padding_mode="reflect", groups=3),
    dict(kernel_size=3, padding=1, padding_mode="circular"),
]


def for_dims(case, dims):
    return {key: value[:dims] if isinstance(value, tuple) else value for key, value in case.items()}


def channels_last(shape, generator, dtype=torch.float32):
    """Random (N, C, *spatial) values in channels-last strides, a non-contiguous input."""
    n, c, *spatial = shape
    return torch.randn(n, *spatial, c, generator=generator, dtype=dtype).movedim(-1, 1)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dense_grad", [False, True])
def test_sparse_conv_matches_conv_with_masked_weight(generator, dims, case, dense_grad):
    dense = DENSE_CONV[dims](6, 12, **for_dims(case, dims), dtype=torch.float64)
    layer = SPARSE_CONV[dims].from_dense(copy.deepcopy(dense))
    mask = random_mask(layer.weight.shape, 0.4, generator)
    layer.set_mask(mask)
    layer.dense_grad = dense_grad
    x = channels_last((3, 6, *SPATIAL[dims]), generator, torch.float64).requires_grad_()
    assert not x.is_contiguous()
    y = layer(x)
    dy = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    y.backward(dy)

    with torch.no_grad():
        dense.weight.copy_(masked(dense.weight, mask))
    x_ref = x.detach().clone().requires_grad_()
    y_ref = dense(x_ref)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    expected_grad = dense.weight.grad if dense_grad else masked(dense.weight.grad, mask)
    torch.testing.assert_close(layer.weight.grad, expected_grad)
    if dense.bias is not None:
        torch.testing.assert_close(layer.bias.grad, dense.bias.grad)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("batch", [2, 0], ids=["batch", "empty batch"])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 5e-2, 2e-2)])
def test_sparse_conv_matches_functional_conv_on_weight_times_mask(generator, dims, batch, dtype, atol, rtol):
    # Odd channel counts and sizes, groups, dilation and stride; bfloat16 through autocast, against
    # F.convNd on the masked weight under the same autocast.
    layer = SPARSE_CONV[dims](9, 15, (3, 2, 3)[:dims], stride=(1, 2, 1)[:dims], padding=(2, 1, 0)[:dims],
                              dilation=(2, 1, 1)[:dims], groups=3)
    mask = random_mask(layer.weight.shape, 0.3, generator)
    layer.set_mask(mask)
    x = channels_last((batch, 9, *(7, 5, 6)[:dims]), generator).requires_grad_()
    weight = masked(layer.weight.detach(), mask).requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = layer(x)
        y_ref = F_CONV[dims](x_ref, weight, bias, stride=layer.stride, padding=layer.padding,
                             dilation=layer.dilation, groups=3)
    assert y.dtype == y_ref.dtype == dtype and y.shape == y_ref.shape and y.shape[0] == batch
    dy = torch.randn(y.shape, generator=generator).to(dtype)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(layer.weight.grad, masked(weight.grad, mask), atol=atol, rtol=rtol)
    torch.testing.assert_close(layer.bias.grad, bias.grad, atol=atol, rtol=rtol)


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


@pytest.mark.parametrize("make", [lambda: SparseLinear(6, 4), lambda: SparseConv1d(3, 4, 2)])
@pytest.mark.parametrize("name", ["weight", "bias"])
def test_a_parametrized_weight_or_bias_is_what_forward_takes(generator, make, name):
    # Forward reads weight, mask and bias from nn.Module's dicts where they are; a parametrization
    # moves the tensor out of them, and forward must then take the attribute (the parametrized value).
    from torch.nn.utils import parametrize
    layer = make()
    layer.set_mask(random_mask(layer.weight.shape, 0.5, generator))
    x = torch.randn(2, 6, generator=generator) if isinstance(layer, SparseLinear) else torch.randn(2, 3, 5)
    expected_weight, expected_bias = masked(layer.weight.detach(), layer.mask), layer.bias.detach()
    if name == "weight":
        expected_weight = 2 * expected_weight
    else:
        expected_bias = 2 * expected_bias
    parametrize.register_parametrization(layer, name, _Doubled())
    if isinstance(layer, SparseLinear):
        expected = F.linear(x, expected_weight, expected_bias)
    else:
        expected = F.conv1d(x, expected_weight, expected_bias)
    torch.testing.assert_close(layer(x), expected)


def test_new_module_is_dense_and_set_mask_zeroes_weights(generator):
    layer = SparseLinear(8, 4)
    assert layer.mask.dtype == torch.bool and layer.mask.all() and layer.dense_grad is False
    mask = random_mask((4, 8), 0.5, generator)
    layer.set_mask(mask)
    assert torch.equal(layer.mask, mask) and layer.mask is not mask
    assert (layer.weight[~mask] == 0).all() and layer.nnz == int(mask.sum())
    assert layer.density == pytest.approx(int(mask.sum()) / 32)


@pytest.mark.parametrize("make", [lambda: SparseLinear(0, 4), lambda: SparseLinear(4, 0),
                                  lambda: SparseConv2d(2, 0, 3)])
def test_a_layer_with_no_weight_entries_has_density_1_and_so_has_its_pack(make):
    # Nothing to keep: the layer keeps all of it, as `summary` counts it (0 would read as a layer pruned away).
    layer = make()
    assert layer.density == 1.0
    if isinstance(layer, SparseLinear):
        assert layer.to_inference().packed.density == 1.0


@pytest.mark.parametrize("bad, error", [(torch.ones(4, 8), TypeError), (torch.ones(8, 4, dtype=torch.bool), ValueError),
                                        ([[True]], TypeError)])
def test_set_mask_rejects_bad_masks_and_changes_nothing(bad, error):
    layer = SparseLinear(8, 4)
    before = layer.weight.detach().clone()
    with pytest.raises(error, match="mask"):
        layer.set_mask(bad)
    assert layer.mask.all() and torch.equal(layer.weight, before)


def stepped(optimizer_class, generator, **options):
    """A layer trained one step by `optimizer_class`, whose state is then non-zero at every entry."""
    layer = SparseLinear(8, 4)
    optimizer = optimizer_class(layer.parameters(), lr=0.1, **options)
    layer(torch.randn(16, 8, generator=generator)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return layer, optimizer


@pytest.mark.parametrize("optimizer_class, options", [(torch.optim.SGD, {"momentum": 0.9}), (torch.optim.Adam, {})])
def test_set_mask_with_an_optimizer_zeroes_its_state_off_the_new_mask(generator, optimizer_class, options):
    # A method of one's own changing masks mid-training: without the state zeroed, the next step moves pruned
    # weights off 0 under the module's promise that they are 0, and forward computes with them.
    layer, optimizer = stepped(optimizer_class, generator, **options)
    mask = random_mask((4, 8), 0.5, generator)
    kept = {key: value.clone() for key, value in optimizer.state[layer.weight].items()}
    layer.set_mask(mask, optimizer=optimizer)
    for key, value in optimizer.state[layer.weight].items():
        if value.shape == layer.weight.shape:
            assert (value[~mask] == 0).all() and torch.equal(value[mask], kept[key][mask]), key
    layer(torch.randn(16, 8, generator=generator)).square().sum().backward()
    optimizer.step()
    layer.verify_zero_off_mask()
    assert (layer.weight[~mask] == 0).all()


def test_set_mask_refuses_an_lbfgs_and_a_state_it_cannot_zero_changing_nothing(generator):
    layer = SparseLinear(8, 4)
    with pytest.raises(ValueError, match="LBFGS"):
        layer.set_mask(random_mask((4, 8), 0.5, generator), optimizer=torch.optim.LBFGS(layer.parameters()))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        layer.set_mask(random_mask((4, 8), 0.5, generator), optimizer="sgd")
    assert layer.mask.all()
    layer, optimizer = stepped(torch.optim.SGD, generator, momentum=0.9)
    optimizer.state[layer.weight]["momentum_buffer"] = torch.ones(8).expand(4, 8)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="momentum_buffer"):
        layer.set_mask(random_mask((4, 8), 0.5, generator), optimizer=optimizer)
    assert layer.mask.all() and torch.equal(layer.weight, before)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(10, 6), (2, 10)),
    *[(lambda dims=dims: DENSE_CONV[dims](4, 6, 3, stride=2, padding=1, groups=2, padding_mode="reflect"),
       (2, 4, *[7] * dims)) for dims in (1, 2, 3)]], ids=["linear", "conv1d", "conv2d", "conv3d"])
def test_dense_round_trip_and_state_dicts(generator, make, shape):
    dense = make()
    sparse = (SparseLinear if isinstance(dense, nn.Linear) else SPARSE_CONV[dense.weight.dim() - 2]).from_dense(dense)
    assert sparse.weight is dense.weight  # shared, so an optimizer on the dense model stays valid
    assert repr(sparse) == f"{type(sparse).__name__}{repr(dense).removeprefix(type(dense).__name__)[:-1]}, density=1)"
    mask = random_mask(sparse.weight.shape, 0.5, generator)
    sparse.set_mask(mask)
    x = torch.randn(shape, generator=generator)

    back = sparse.to_dense()
    assert type(back) is type(dense) and back.weight is not sparse.weight
    torch.testing.assert_close(back(x), sparse(x))
    assert torch.equal(back.weight, masked(sparse.weight, mask))

    # A plain state dict loads strictly into a sparse module: mask all True (which it warns about).
    fresh = copy.deepcopy(sparse)
    with pytest.warns(UserWarning, match=r"no mask for 1 sparse layer, 'mask' .*as a dense layer"):
        fresh.load_state_dict(back.state_dict())
    assert fresh.mask.all()
    torch.testing.assert_close(fresh(x), back(x))
    # The sparse state dict carries the mask.
    state = sparse.state_dict()
    assert torch.equal(state["mask"], mask)
    other = copy.deepcopy(fresh)
    other.load_state_dict(state)
    assert torch.equal(other.mask, mask) and torch.equal(other.weight, sparse.weight)


@pytest.mark.parametrize("make", [lambda: SparseLinear(4, 3), lambda: SparseConv2d(2, 3, 3)])
def test_to_dense_keeps_which_parameters_train(make):
    # A frozen layer (a fine-tuned model's backbone) turned dense stays frozen, its trained bias trained.
    layer = make()
    layer.weight.requires_grad_(False)
    dense = layer.to_dense()
    assert dense.weight.requires_grad is False and dense.bias.requires_grad is True


@pytest.mark.parametrize("sparse, dense", [(SparseLinear, nn.Linear(4, 3)), (SparseConv1d, nn.Conv1d(2, 3, 3))])
def test_from_dense_keeps_the_dense_layers_mode(sparse, dense):
    # A layer in eval mode stays in it, as it would in a model switched to evaluation (and back).
    for training in (False, True):
        assert sparse.from_dense(dense.train(training)).training is training


def test_from_dense_takes_only_its_own_kind_of_layer():
    with pytest.raises(TypeError, match="SparseConv3d.from_dense takes an nn.Conv3d, got Conv1d"):
        SparseConv3d.from_dense(nn.Conv1d(2, 2, 3))
    with pytest.raises(TypeError, match="SparseLinear.from_dense takes an nn.Linear, got Bilinear"):
        SparseLinear.from_dense(nn.Bilinear(2, 2, 3))


def test_refuse_meta_names_every_layer_on_the_meta_device_and_says_how_to_materialize_the_model():
    """The one refusal that DST, IMP, SWAMP, OptG and summary give a model on the meta device (each had its own)."""
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    model[1].to("meta")
    model[2].to("meta")
    named = sparse_modules(model)
    remedy = ("are on the meta device, which holds no values: materialize the model first (to_empty, then "
              "initialise it or load its state dict)")
    with pytest.raises(ValueError) as refused:
        refuse_meta(named, "IMP")
    assert str(refused.value) == f"IMP: the weights of layers ['1', '2'] {remedy}"
    with pytest.raises(ValueError) as refused:
        refuse_meta(named, tensors=("mask",))
    assert str(refused.value) == f"the masks of layers ['1', '2'] {remedy}"
    refuse_meta(named[:1], "IMP")   # layer '0' holds values
    # DST names the meta layers too, not only the first layer when it is on the meta device (the others, as here,
    # were refused as "sparse modules must share one device", which did not say what to do).
    with pytest.raises(ValueError, match=r"^DST: the weights and masks of layers \['1', '2'\] are on the meta dev"):
        sparsekern.algorithms.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)


def test_refuse_meta_checks_weights_and_masks_at_once_naming_which_tensor_each_layer_has_on_the_meta_device():
    """DST and the ticket algorithms checked the weights, then the masks, in two calls: a model with a layer on the
    meta device and another whose mask alone stayed there was refused for the first, and once that was fixed, for
    the second. One call names both, and per layer which of its tensors is there."""
    whole = SparseLinear(4, 4, device="meta")
    mask_only = SparseLinear(4, 4, device="meta")
    mask_only.weight = nn.Parameter(torch.randn(4, 4))
    mask_only.bias = nn.Parameter(torch.randn(4))
    model = nn.Sequential(SparseLinear(4, 4), mask_only, whole, copy.deepcopy(mask_only))
    named = sparse_modules(model)
    with pytest.raises(ValueError) as refused:
        refuse_meta(named, "IMP", tensors=("weight", "mask"))
    assert str(refused.value) == (
        "IMP: the masks of layers ['1', '3'] and the weights and masks of layers ['2'] are on the meta device, which "
        "holds no values: materialize the model first (to_empty, then initialise it or load its state dict)")
    refusal = r"the masks of layers \['1', '3'\] and the weights and masks of layers \['2'\] are on the meta device"
    for who, build in _algorithms_built_on(model):
        with pytest.raises(ValueError, match=f"^{who}: {refusal}"):
            build()


def _algorithms_built_on(model):
    """(name, a builder of it on `model`) for IMP, OptG and DST (RigL), each of which checks the model's layers."""
    return [("IMP", lambda: sparsekern.IMP(model, lambda p: torch.optim.SGD(p, lr=0.1))),
            ("OptG", lambda: sparsekern.OptG(model, 0.5, epochs=2)),
            ("DST", lambda: sparsekern.algorithms.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                       total_steps=10))]


def test_a_mask_left_on_the_meta_device_under_a_real_weight_is_refused_by_name():
    """A real weight assigned to a layer built on the meta device leaves its mask there: IMP and OptG took the
    model (failing later, at a pruning or a forward), DST raised torch's "Tensor on device meta is not on the
    expected device cpu!", densities torch's "Tensor.item() cannot be called on meta tensors"."""
    layer = SparseLinear(4, 4, device="meta")
    layer.weight = nn.Parameter(torch.randn(4, 4))
    layer.bias = nn.Parameter(torch.randn(4))
    model = nn.Sequential(SparseLinear(4, 4), layer)
    refusal = r"the masks of layers \['1'\] are on the meta device, which holds no values: materialize"
    for who, build in _algorithms_built_on(model):
        with pytest.raises(ValueError, match=f"^{who}: {refusal}"):
            build()
    for read in (sparsekern.densities, sparsekern.masks):
        with pytest.raises(ValueError, match=f"^{refusal}"):
            read(model)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = SparseLinear(4, 4), SparseLinear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def test_a_tied_layers_mask_left_on_the_meta_device_is_refused_by_name():
    """Campaign 20b: the algorithms refused the meta tensors of the first layer holding a weight, while the check that
    tied layers carry one mask compared the others' first: a tied layer whose own mask stayed on the meta device
    failed in torch.equal ("aten::equal: attempted to run this operator with Meta tensors"), naming no layer."""
    model = _Tied()
    model.b.register_buffer("mask", torch.empty(4, 4, dtype=torch.bool, device="meta"))
    refusal = r"the masks of layers \['b'\] are on the meta device, which holds no values: materialize"
    for who, build in [("IMP", lambda: sparsekern.IMP(model, lambda p: torch.optim.SGD(p, lr=0.1))),
                       ("SWAMP", lambda: sparsekern.SWAMP(model, lambda p: torch.optim.SGD(p, lr=0.1), particles=2)),
                       ("OptG", lambda: sparsekern.OptG(model, 0.5, epochs=2)),
                       ("DST", lambda: sparsekern.algorithms.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                                                  total_steps=10))]:
        with pytest.raises(ValueError, match=f"^{who}: {refusal}"):
            build()
    for read in (sparsekern.densities, sparsekern.masks):
        with pytest.raises(ValueError, match=f"^{refusal}"):
            read(model)


@pytest.mark.parametrize("mask", ["random", "magnitude"])
def test_sparsify_refuses_dense_layers_on_the_meta_device_by_refuse_meta_before_anything_changes(mask):
    """sparsify's own refusal named only the first meta layer ("materialise": a second spelling), and its copy for
    mask='magnitude' could not be reached; the root layer's empty name reads as (root)."""
    remedy = ("are on the meta device, which holds no values: materialize the model first (to_empty, then "
              "initialise it or load its state dict)")
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4, device="meta"), nn.Linear(4, 2, device="meta"))
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    with pytest.raises(ValueError) as refused:
        sparsekern.sparsify(model, 0.5, mask=mask)
    assert str(refused.value) == f"sparsify: the weights of layers ['1', '2'] {remedy}"
    assert all(type(layer) is nn.Linear for layer in model)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items() if not value.is_meta)
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError) as refused:
        sparsekern.sparsify(nn.Linear(4, 2, device="meta"), 0.5, mask=mask)
    assert str(refused.value) == f"sparsify: the weights of layers ['(root)'] {remedy}"


@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("dense", [lambda: nn.Linear(6, 4), lambda: nn.Conv2d(2, 3, 3)], ids=["linear", "conv2d"])
def test_a_computed_weight_or_bias_is_refused_by_from_dense_and_left_dense_by_sparsify(dense, name):
    # torch.nn.utils.prune computes the pruned tensor at every forward, a plain attribute: from_dense failed on
    # assigning it ("cannot assign 'torch.FloatTensor' as parameter"), and sparsify with it, before checking.
    layer = dense()
    prune.random_unstructured(layer, name, 0.5)
    kind = SparseLinear if isinstance(layer, nn.Linear) else SparseConv2d
    with pytest.raises(TypeError, match=f"^{kind.__name__}.from_dense takes a layer whose {name} is a Parameter"):
        kind.from_dense(layer)
    model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(2)) if kind is SparseConv2d else nn.Sequential(
        layer, nn.Linear(4, 2))
    model(torch.randn(1, 2, 5, 5) if kind is SparseConv2d else torch.randn(1, 6))
    with pytest.warns(UserWarning, match=fr"^0 \({type(layer).__name__}\) stays dense: its {name} is computed"):
        sparsekern.sparsify(model, 0.5)
    assert model[0] is layer and isinstance(model[2 if kind is SparseConv2d else 1], SparseLinear)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, "float32"])
@pytest.mark.parametrize("make", [lambda dtype: SparseLinear(4, 3, dtype=dtype),
                                  lambda dtype: SparseConv2d(2, 3, 3, dtype=dtype),
                                  lambda dtype: SparseMultiheadAttention(8, 2, dtype=dtype)],
                         ids=["linear", "conv2d", "attention"])
def test_a_dtype_sparse_layers_do_not_take_is_refused_by_name(make, dtype):
    # complex64 was taken, and the layer's forward then refused its input ("x must be float16, ..."); int32 failed
    # in torch ("Only Tensors of floating point and complex dtype can require gradients")
    with pytest.raises(TypeError, match="^dtype must be float16, bfloat16, float32 or float64"):
        make(dtype)


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
@pytest.mark.parametrize("apply", [lambda layer: prune.l1_unstructured(layer, "weight", 0.5),
                                   lambda layer: prune.l1_unstructured(layer, "bias", 0.5),
                                   lambda layer: torch.nn.utils.parametrizations.weight_norm(layer)],
                         ids=["pruned weight", "pruned bias", "weight_norm"])
def test_sparsify_again_keeps_the_mask_of_a_sparse_layer_whose_weight_or_bias_is_computed(apply, generator):
    # It failed with a KeyError (the computed weight is no Parameter of the model's)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), 0.5, generator=generator)
    apply(model[0])
    mask = model[0].mask.clone()
    with pytest.warns(UserWarning, match=r"^0 \(SparseLinear\) keeps its mask: its (weight|bias) is computed"):
        sparsekern.sparsify(model, 0.3, generator=generator)
    assert torch.equal(model[0].mask, mask) and model[1].density == pytest.approx(0.3, abs=0.1)


def test_a_nested_weight_is_refused_by_from_dense_and_sparsify_as_a_torch_sparse_one_is():
    # torch.nested's older layout is strided: from_dense built a module around the nested weight, and
    # sparsify failed with PyTorch's 'Internal error: NestedTensorImpl doesn't support sizes'.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # that layout is a prototype
        linear, conv = nn.Linear(6, 4), nn.Conv2d(2, 3, 3)
        for module in (linear, conv):
            module.weight = nn.Parameter(torch.nested.nested_tensor([module.weight.detach()]), requires_grad=False)
    with pytest.raises(TypeError, match="^SparseLinear.from_dense takes a .*nested"):
        SparseLinear.from_dense(linear)
    with pytest.raises(TypeError, match="^SparseConv2d.from_dense takes a .*nested"):
        SparseConv2d.from_dense(conv)
    with pytest.raises(TypeError, match="layer '0' has a nested weight"):
        sparsekern.sparsify(nn.Sequential(linear), 0.5)


def test_a_float_prune_mask_loads_and_other_values_are_refused_naming_the_key():
    dense = nn.Linear(6, 5)
    prune.l1_unstructured(dense, "weight", amount=0.4)  # float 0/1 weight_mask, as saved by torch users
    saved = {"weight": dense.weight_orig.detach() * dense.weight_mask, "bias": dense.bias.detach(),
             "mask": dense.weight_mask.clone()}
    model = nn.Sequential(SparseLinear(6, 5))
    model.load_state_dict({f"0.{key}": value for key, value in saved.items()})
    assert torch.equal(model[0].mask, dense.weight_mask.bool())
    before = copy.deepcopy(model.state_dict())
    for dtype, value in ((torch.float32, 0.5), (torch.float32, float("nan")), (torch.float32, -1.0),
                         (torch.float16, 2.0), (torch.uint8, 2), (torch.int64, -1)):
        mask = torch.ones(5, 6, dtype=dtype)
        mask[0, 0], mask[1, 1] = 0, value
        bad = {"0.weight": torch.ones(5, 6), "0.bias": torch.ones(5), "0.mask": mask}
        with pytest.raises(ValueError, match=r"'0\.mask'.*only 0 and 1"):
            model.load_state_dict(bad)
        assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    # A torch.sparse mask (bool or float): refused by name before the weight loads, not failing in the
    # dispatcher as its values were read (float), nor after the weight had loaded (bool, in copy_).
    # A nested one (torch.nested's older layout is strided, and its shape raises) likewise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # that layout is a prototype
        nested = torch.nested.nested_tensor([dense.weight_mask.bool()], layout=torch.strided)
    for mask in (dense.weight_mask.to_sparse(), dense.weight_mask.bool().to_sparse(), nested):
        bad = {"0.weight": torch.ones(5, 6), "0.bias": torch.ones(5), "0.mask": mask}
        with pytest.raises(ValueError, match=r"'0\.mask'.*dense \(strided\)"):
            model.load_state_dict(bad)
        assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_a_model_pruned_by_torch_loads_into_its_sparse_twin(generator):
    # torch.nn.utils.prune saves weight_orig and a float weight_mask (bias_orig, bias_mask for a pruned bias):
    # load_state_dict refused them as unexpected keys, with weight and mask missing.
    torch.manual_seed(0)
    dense = small_model()
    convs_and_linears = [(m, "weight") for m in dense.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(convs_and_linears, pruning_method=prune.L1Unstructured, amount=0.7)
    prune.random_unstructured(dense[7], "bias", amount=0.5)
    sparse = sparsekern.sparsify(small_model(), 0.5, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no "as a dense layer" warning: the masks are there
        sparse.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 6, 6, generator=generator)
    torch.testing.assert_close(sparse.eval()(x), dense.eval()(x))
    for (_, layer), (module, _) in zip(sparse_modules(sparse), convs_and_linears):
        assert torch.equal(layer.mask, module.weight_mask.bool()) and layer.zero_off_mask
    assert torch.equal(sparse[7].bias, dense[7].bias)


def test_a_sparse_layer_pruned_by_torch_loads_its_own_state_dict():
    saved, loaded = SparseLinear(6, 5), SparseLinear(6, 5)
    for layer in (saved, loaded):
        prune.l1_unstructured(layer, "weight", amount=0.4)
    loaded.load_state_dict(saved.state_dict())
    assert torch.equal(loaded.weight_orig, saved.weight_orig) and torch.equal(loaded.weight_mask, saved.weight_mask)


def test_a_bad_prune_mask_is_refused_naming_its_key_before_the_module_changes():
    layer = SparseLinear(6, 5)
    before = copy.deepcopy(layer.state_dict())
    good = {"weight_orig": torch.ones(5, 6), "weight_mask": (torch.rand(5, 6) < 0.5).float(), "bias": torch.ones(5)}
    for key, value, words in (("weight_mask", torch.full((5, 6), 0.5), "only 0 and 1"),
                              ("weight_mask", torch.ones(6, 5), r"shape of 'weight_orig' \(5, 6\)"),
                              ("weight_orig", torch.ones(5, 6).to_sparse(), r"dense \(strided\)")):
        with pytest.raises(ValueError, match=rf"'{key}'.*{words}"):
            layer.load_state_dict({**good, key: value})
        assert all(torch.equal(before[name], value) for name, value in layer.state_dict().items())


@pytest.mark.parametrize("key", ["weight", "bias"])
def test_a_torch_sparse_or_nested_weight_or_bias_is_refused_naming_the_key_before_the_module_changes(key):
    # As the mask is: torch's load_state_dict copied the other entries in and then raised RuntimeError
    # (copy_ from a torch.sparse tensor), leaving the module half loaded (mask and bias replaced, weight
    # kept), and a nested entry raised PyTorch's 'Internal error: NestedTensorImpl doesn't support sizes'.
    model = nn.Sequential(SparseLinear(6, 5))
    before = copy.deepcopy(model.state_dict())
    good = {"0.weight": torch.ones(5, 6), "0.bias": torch.ones(5), "0.mask": torch.rand(5, 6) < 0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # torch.nested's strided layout is a prototype
        nested = torch.nested.nested_tensor([good[f"0.{key}"]], layout=torch.strided)
    for value in (good[f"0.{key}"].to_sparse(), nested):
        with pytest.raises(ValueError, match=rf"'0\.{key}'.*dense \(strided\)"):
            model.load_state_dict({**good, f"0.{key}": value})
        assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_float_mask_loads_as_bool_with_assign(device):
    """load_state_dict(assign=True) (loading into a model built on the meta device) put the float mask itself in
    the buffer, and the module then failed in the middle of loading (torch.where took no float condition)."""
    saved = {"weight": torch.tensor([[1.0, 0.0, 3.0]]), "bias": torch.zeros(1), "mask": torch.tensor([[1.0, 0.0, 1.0]])}
    layer = SparseLinear(3, 1, device=device)
    layer.load_state_dict(saved, assign=True)
    assert layer.mask.dtype == torch.bool and torch.equal(layer.mask, torch.tensor([[True, False, True]]))
    assert layer.zero_off_mask
    torch.testing.assert_close(layer(torch.ones(1, 3)), torch.tensor([[4.0]]))


def test_a_dense_checkpoint_of_another_shape_is_refused_for_its_weight_only():
    """The all-True mask filled in for a dense checkpoint took the checkpoint's weight shape: loading a Conv2d's
    weights into a SparseConv3d also reported a size mismatch for a 'mask' the checkpoint does not hold."""
    layer = SparseConv3d(4, 6, 3)
    with pytest.raises(RuntimeError, match="size mismatch for weight") as error:
        layer.load_state_dict(nn.Conv2d(4, 6, 3).state_dict())
    assert "mask" not in str(error.value)
    assert layer.mask.all() and layer.mask.shape == layer.weight.shape


def test_loading_dense_checkpoint_into_sparsified_model_keeps_callers_dict():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    state = copy.deepcopy(model.state_dict())
    sparse = sparsekern.sparsify(copy.deepcopy(model), 0.5, distribution="uniform")
    sparse.load_state_dict(state)
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(m.mask.all() for _, m in sparse_modules(sparse))
    x = torch.randn(4, 6)
    torch.testing.assert_close(sparse(x), model(x))


def small_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, groups=2, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-1)], ids=["sgd", "adam", "adamw"])
def test_inactive_weights_stay_zero_and_output_equals_masked_dense(generator, optimizer):
    model = sparsekern.sparsify(small_model(), 0.3, generator=generator)
    opt = optimizer(model.parameters())
    for _ in range(3):
        x = torch.randn(5, 3, 6, 6, generator=generator)
        y = torch.randint(0, 4, (5,), generator=generator)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        for _, module in sparse_modules(model):
            assert (module.weight[~module.mask] == 0).all()
    dense = copy.deepcopy(model)
    for name, module in sparse_modules(model):
        dense.set_submodule(name, module.to_dense())
    assert not sparse_modules(dense)
    model.eval(), dense.eval()
    x = torch.randn(5, 3, 6, 6, generator=generator)
    torch.testing.assert_close(model(x), dense(x))



@pytest.mark.parametrize("optimizer", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-2)], ids=["sgd", "adam"])
def test_an_optimizer_that_stepped_before_sparsify_leaves_the_pruned_weights_at_zero(generator, optimizer):
    # Pruning a trained model to fine-tune it with the optimizer that trained it. Before (no way to pass it):
    # its momentum or Adam moments moved the pruned weights off 0, and the layers, still promising zero_off_mask,
    # computed with them: the fine-tuned "sparse" model was a different one than its masked weights.
    model = small_model()
    opt = optimizer(model.parameters())
    for _ in range(2):
        F.cross_entropy(model(torch.randn(5, 3, 6, 6, generator=generator)),
                        torch.randint(0, 4, (5,), generator=generator)).backward()
        opt.step()
        opt.zero_grad()
    sparsekern.sparsify(model, 0.3, mask="magnitude", optimizer=opt)
    for _ in range(2):
        F.cross_entropy(model(torch.randn(5, 3, 6, 6, generator=generator)),
                        torch.randint(0, 4, (5,), generator=generator)).backward()
        opt.step()
        opt.zero_grad()
        for _, module in sparse_modules(model):
            assert module.zero_off_mask and (module.weight[~module.mask] == 0).all()
            assert all((state[~module.mask] == 0).all() for state in opt.state[module.weight].values()
                       if state.shape == module.weight.shape)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or None, got dict"):
        sparsekern.sparsify(small_model(), 0.3, optimizer=opt.state_dict())

def test_sparsify_swaps_in_place_and_keeps_other_layers_dense(generator):
    model = small_model()
    before = {name: p for name, p in model.named_parameters()}
    result = sparsekern.sparsify(model, 0.2, distribution="uniform", generator=generator)
    assert result is model
    assert [name for name, _ in sparse_modules(model)] == ["0", "3", "7", "9"]
    assert [type(m) for _, m in sparse_modules(model)] == [SparseConv2d, SparseConv2d, SparseLinear, SparseLinear]
    after = dict(model.named_parameters())
    assert set(after) == set(before) and all(after[n] is before[n] for n in before)
    assert model[1].weight.eq(1).all() and model[0].bias.ne(0).all()
    for _, module in sparse_modules(model):
        assert module.nnz == round(0.2 * module.weight.numel())


def test_sparsify_include_exclude_shared_and_root(generator):
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared, nn.Linear(4, 4)), "head": nn.Linear(4, 2),
                           "attention": nn.MultiheadAttention(4, 2)})
    sparsekern.sparsify(model, 0.5, include=["a", "b.*", "head"], exclude="head", generator=generator)
    assert isinstance(model["a"], SparseLinear) and model["b"][0] is model["a"]
    assert isinstance(model["b"][1], SparseLinear) and type(model["head"]) is nn.Linear
    assert type(model["attention"].out_proj) is not SparseLinear  # a Linear subclass, left alone
    root = sparsekern.sparsify(nn.Linear(5, 5), 0.4, generator=generator)
    assert isinstance(root, SparseLinear) and root.nnz == 10


def conv1d_conv3d_model():
    """Input (N, 2, 4, 4, 4), 5 classes."""
    return nn.Sequential(nn.Conv3d(2, 4, (3, 2, 3), groups=2), nn.ReLU(), nn.Flatten(2), nn.Conv1d(4, 6, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(60, 5))


@pytest.mark.parametrize("mask", ["random", "magnitude"])
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_sparsify_turns_conv1d_and_conv3d_sparse(generator, mask, distribution):
    model = conv1d_conv3d_model()
    before = {name: module.weight.detach().clone() for name, module in model.named_modules()
              if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv3d))}
    calls = []
    model[3].register_forward_hook(lambda module, args, output: calls.append(type(module)))
    sparsekern.sparsify(model, 0.3, distribution, mask=mask, generator=generator)
    layers = [module for _, module in sparse_modules(model)]
    assert [type(m) for m in layers] == [SparseConv3d, SparseConv1d, SparseLinear]
    shapes = [tuple(m.weight.shape) for m in layers]
    densities = sparsekern.distributions.layer_densities(shapes, 0.3, distribution)
    assert [m.nnz for m in layers] == [round(d * math.prod(s)) for d, s in zip(densities, shapes)]
    if distribution == "erk":  # RigL's (n_in + n_out + sum of kernel dims) / (n_in n_out prod of kernel dims)
        def raw(m):
            n_in, n_out = m.weight.shape[1], m.weight.shape[0]
            kernel = getattr(m, "kernel_size", ())
            return (n_in + n_out + sum(kernel)) / (n_in * n_out * math.prod(kernel))
        assert max(densities) < 1
        assert [d / raw(m) for d, m in zip(densities, layers)] == pytest.approx([densities[0] / raw(layers[0])] * 3)
    for (name, module) in sparse_modules(model):
        assert not module.weight[~module.mask].any()
        if mask == "magnitude":
            expected = torch.zeros(module.weight.numel(), dtype=torch.bool)
            expected[before[name].abs().flatten().argsort(descending=True, stable=True)[:module.nnz]] = True
            assert torch.equal(module.mask, expected.view_as(module.weight))
    x = torch.randn(3, 2, 4, 4, 4, generator=generator)
    dense = copy.deepcopy(model)
    for name, module in sparse_modules(model):
        dense.set_submodule(name, module.to_dense())
    torch.testing.assert_close(model(x), dense(x))
    assert calls == [SparseConv1d]  # the hook moved to the sparse module (to_dense makes a module without it)


class ScaledLinear(nn.Linear):
    pass


class ChannelConv3d(nn.Conv3d):
    pass


class GatedAttention(nn.MultiheadAttention):
    pass


def layers_left_dense():
    return nn.ModuleDict({"conv": nn.Conv1d(2, 4, 3), "up": nn.ConvTranspose3d(4, 2, 2),
                          "attention": nn.MultiheadAttention(4, 2), "gated": GatedAttention(4, 2),
                          "rnn": nn.GRUCell(4, 4), "gru": nn.GRU(4, 4),
                          "pair": nn.Bilinear(3, 3, 2), "scaled": ScaledLinear(4, 4), "channels": ChannelConv3d(2, 2, 1),
                          "norm": nn.LayerNorm(4), "batch_norm": nn.BatchNorm1d(4), "embedding": nn.Embedding(9, 4)})


def test_sparsify_names_the_weight_layers_it_leaves_dense_in_one_warning(generator):
    model = layers_left_dense()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsekern.sparsify(model, 0.5, generator=generator)
    assert isinstance(model["conv"], SparseConv1d) and isinstance(model["attention"], SparseMultiheadAttention)
    assert isinstance(model["up"], SparseConvTranspose3d) and isinstance(model["gru"], SparseGRU)
    assert len(caught) == 1 and caught[0].category is UserWarning and caught[0].filename == __file__
    message = str(caught[0].message)
    for named in ("gated (GatedAttention)", "rnn (GRUCell)", "pair (Bilinear)",
                  "scaled (ScaledLinear)", "channels (ChannelConv3d)", "subclass of nn.Linear", "subclass of nn.Conv3d",
                  "subclass of nn.MultiheadAttention"):
        assert named in message, named
    # the subclassed attention once, its out_proj (a NonDynamicallyQuantizableLinear) folded in; the exact one
    # is sparsified, not named
    assert "5 weight-bearing layer(s)" in message and "out_proj" not in message
    assert "attention (MultiheadAttention)" not in message and "gru (GRU)" not in message
    # norms and embeddings: dense by convention
    assert not any(name in message for name in ("norm", "embedding", "(Conv1d)", "ConvTranspose"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # excluded or not included: the user chose, nothing to say
        for attention in ("gated", "gated*"):   # out_proj goes with its attention module
            sparsekern.sparsify(layers_left_dense(), 0.5, exclude=["up", attention, "rnn", "pair", "scaled", "channels"])
        sparsekern.sparsify(layers_left_dense(), 0.5, include="conv")
    with pytest.raises(ValueError, match=r"model has no .* module to sparsify; .*0 \(GatedAttention\)"):
        sparsekern.sparsify(nn.Sequential(GatedAttention(4, 2)), 0.5)
    with pytest.raises(ValueError, match=r"matching include/exclude; .*attention\.out_proj \(NonDynamically.*"
                                         r"include must name"):
        sparsekern.sparsify(layers_left_dense(), 0.5, include="attention.out_proj")   # picked without its MHA


def test_sparsify_names_the_embeddings_and_norms_include_names_exactly(generator):
    """Left dense silently by default and under a pattern ("*"), but named when include asks for them by name."""
    def model():
        return nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3), nn.LayerNorm(3), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsekern.sparsify(model(), 0.5, generator=generator)
        sparsekern.sparsify(model(), 0.5, include="*", generator=generator)
        sparsekern.sparsify(model(), 0.5, include=["1", "3"], generator=generator)   # a ReLU holds no weight
    with pytest.warns(UserWarning, match=r"leaves 2 weight-bearing layer\(s\) dense: 0 \(Embedding\), "
                                         r"2 \(LayerNorm\): named by include, but sparsify has no sparse module"):
        sparsified = sparsekern.sparsify(model(), 0.5, include=["0", "1", "2"], generator=generator)
    assert [name for name, _ in sparse_modules(sparsified)] == ["1"]


def test_sparsify_sparsifies_an_attention_modules_plain_linear_out_proj_with_it(generator):
    # F.multi_head_attention_forward reads out_proj.weight directly, whatever its type: a user's plain
    # nn.Linear there becomes the SparseMultiheadAttention's out_proj, whose weight it masks, and is never
    # sparsified on its own.
    def model():
        attention = nn.MultiheadAttention(4, 2)
        attention.out_proj = nn.Linear(4, 4)
        return nn.ModuleDict({"attention": attention, "head": nn.Linear(4, 2)})
    sparsified = model()
    out_weight = sparsified["attention"].out_proj.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsekern.sparsify(sparsified, 0.5, generator=generator)
    attention = sparsified["attention"]
    assert isinstance(attention, SparseMultiheadAttention) and isinstance(attention.out_proj, SparseLinear)
    assert attention.out_proj.weight is out_weight and attention.out_proj.density < 1
    dense = attention.to_dense()
    x = torch.randn(3, 2, 4, generator=generator)
    torch.testing.assert_close(attention(x, x, x)[0], dense(x, x, x)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the attention module excluded: its out_proj goes with it, silently
        excluded = sparsekern.sparsify(model(), 0.5, exclude="attention", generator=generator)
    assert type(excluded["attention"]) is nn.MultiheadAttention and type(excluded["attention"].out_proj) is nn.Linear
    with pytest.raises(ValueError, match=r"matching include/exclude; .*attention\.out_proj \(Linear\): .*directly"):
        sparsekern.sparsify(model(), 0.5, include="attention.out_proj")   # picked without its MHA


def test_sparsify_same_seed_same_masks_and_weights():
    def masks(seed):
        torch.manual_seed(0)
        model = sparsekern.sparsify(small_model(), 0.25, generator=torch.Generator().manual_seed(seed))
        return [(m.mask.clone(), m.weight.detach().clone()) for _, m in sparse_modules(model)]
    first, again, other = masks(1), masks(1), masks(2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))


def test_magnitude_masks_keep_each_layers_largest_weights_and_the_weights(generator):
    model = small_model()
    before = {name: module.weight.detach().clone() for name, module in model.named_modules()
              if type(module) in (nn.Linear, nn.Conv2d)}
    sparsekern.sparsify(model, 0.2, mask="magnitude", generator=generator)
    for name, module in sparse_modules(model):
        weight = before[name]
        count = module.nnz
        expected = torch.zeros(weight.numel(), dtype=torch.bool)
        expected[weight.abs().flatten().argsort(descending=True, stable=True)[:count]] = True
        assert torch.equal(module.mask, expected.view_as(weight)), name
        assert torch.equal(module.weight.detach(), weight * module.mask), name  # kept: init "dense"
    densities = [m.nnz / m.weight.numel() for _, m in sparse_modules(model)]
    assert len(set(densities)) > 1  # ERK's per-layer densities, not one threshold
    # a lower density on the sparse model keeps a subset of its active weights, again by magnitude
    masks = [m.mask.clone() for _, m in sparse_modules(model)]
    sparsekern.sparsify(model, 0.1, mask="magnitude", generator=generator)
    assert all(bool((m.mask <= old).all()) for (_, m), old in zip(sparse_modules(model), masks))


def test_magnitude_masks_with_a_chosen_init_and_without_randomness(generator):
    torch.manual_seed(0)
    model = small_model()
    first = copy.deepcopy(model)
    sparsekern.sparsify(first, 0.3, mask="magnitude", generator=torch.Generator().manual_seed(1))
    again = copy.deepcopy(model)
    sparsekern.sparsify(again, 0.3, mask="magnitude", generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(a.mask, b.mask) for (_, a), (_, b) in zip(sparse_modules(first), sparse_modules(again)))
    fresh = copy.deepcopy(model)
    sparsekern.sparsify(fresh, 0.3, mask="magnitude", init="sparse", generator=generator)
    for (_, kept), (_, drawn) in zip(sparse_modules(first), sparse_modules(fresh)):
        assert torch.equal(kept.mask, drawn.mask) and not torch.equal(kept.weight, drawn.weight)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_magnitude_masks_refuse_non_finite_weights_and_change_nothing(value):
    model = small_model()
    with torch.no_grad():
        model[7].weight[0, 0] = value
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="'7' holds NaN or inf"):
        sparsekern.sparsify(model, 0.5, mask="magnitude")
    assert not sparse_modules(model)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(density=0), "density"), (dict(density=1.5), "density"), (dict(density=float("nan")), "density"),
    (dict(density=0.5, distribution="gaussian"), "distribution"), (dict(density=0.5, init="xavier"), "init"),
    (dict(density=0.5, include=["nothing*"]), "include"), (dict(density=0.5, power=float("inf")), "power"),
    (dict(density=0.5, mask="largest"), "mask")])
def test_sparsify_rejects_bad_arguments_before_touching_the_model(kwargs, argument):
    model = small_model()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=argument):
        sparsekern.sparsify(model, **kwargs)
    assert not sparse_modules(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mask, error", [("taylor", ValueError), ([torch.ones(4, 8, dtype=torch.bool)], TypeError)])
def test_sparsify_mask_not_a_rule_says_how_to_set_masks_of_ones_own(mask, error):
    model = small_model()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=r"mask must be one of .*set_mask\(mask, optimizer=optimizer\)") as raised:
        sparsekern.sparsify(model, 0.5, mask=mask)
    assert "tensor(" not in str(raised.value)   # a type, not the repr of every mask
    assert not sparse_modules(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_recipe_for_masks_of_ones_own_keeps_the_trained_weights_under_them(generator):
    model = small_model()
    trained = {name: module.weight.detach().clone() for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, nn.Conv2d))}
    sparsekern.sparsify(model, 1.0, init="dense")
    for name, layer in sparse_modules(model):
        mask = random_mask(layer.weight.shape, 0.3, generator)
        layer.set_mask(mask)
        assert torch.equal(layer.weight, torch.where(mask, trained[name], 0.0)), name


def test_summary_counts(generator, capsys):
    model = sparsekern.sparsify(small_model(), 0.3, distribution="uniform", generator=generator)
    result = sparsekern.summary(model)
    printed = capsys.readouterr().out
    assert "SparseConv2d" in printed and "total" in printed
    rows = {row["name"]: row for row in result["layers"]}
    assert list(rows) == ["0", "1", "3", "7", "9"]
    conv = model[0]
    assert rows["0"]["shape"] == (8, 3, 3, 3)
    assert rows["0"]["nonzeros"] == conv.nnz + 8 and rows["0"]["parameters"] == 8 * 27 + 8
    weights = [m.weight.numel() for _, m in sparse_modules(model)]
    assert result["sparse_weights"]["nonzeros"] == sum(round(0.3 * n) for n in weights)
    assert result["total"]["parameters"] == sum(p.numel() for p in model.parameters())
    sparsekern.summary(model, print_fn=None)
    assert capsys.readouterr().out == ""


def test_summary_reports_each_sparse_weights_own_density_beside_the_layers(generator, capsys):
    model = sparsekern.sparsify(small_model(), 0.3, distribution="erk", generator=generator)
    result = sparsekern.summary(model)
    printed = capsys.readouterr().out
    rows = {row["name"]: row for row in result["layers"]}
    weight_densities = {name: row["weight_density"] for name, row in rows.items() if row["weight_density"] is not None}
    assert weight_densities == sparsekern.densities(model)       # a paper's per-layer table: weights only
    assert rows["1"]["weight_density"] is None                     # BatchNorm: no sparse weight
    assert "weight density" in printed.splitlines()[0]
    conv = [line for line in printed.splitlines() if line.startswith("0 ")][0]
    assert conv.split()[-1] == f"{model[0].nnz / model[0].weight.numel():.4f}"


def test_gradient_flow_is_masked_norm_and_changes_nothing(generator):
    model = sparsekern.sparsify(nn.Sequential(small_model(), nn.Dropout(0.5)), 0.3, generator=generator)
    model[0][3].dense_grad = True  # the metric masks the gradient whatever the module is set to
    x = torch.randn(6, 3, 6, 6, generator=generator)
    y = torch.randint(0, 4, (6,), generator=generator)
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()

    flow = sparsekern.gradient_flow(model, F.cross_entropy, (x, y))

    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)
    # Reference: plain backward on a copy (same dropout draw), then mask.
    reference = copy.deepcopy(model)
    reference.zero_grad()
    torch.set_rng_state(rng)
    F.cross_entropy(reference(x), y).backward()
    squares = {}
    for name, p in reference.named_parameters():
        layer = name.rpartition(".")[0]
        module = reference.get_submodule(layer)
        grad = p.grad * module.mask if name.endswith("weight") and hasattr(module, "mask") else p.grad
        squares[layer] = squares.get(layer, 0.0) + float(grad.double().square().sum())
    assert flow["layers"] == pytest.approx({k: v ** 0.5 for k, v in squares.items()}, rel=1e-6)
    assert flow["total"] == pytest.approx(sum(squares.values()) ** 0.5, rel=1e-6)


@pytest.mark.parametrize("make, shape", [(lambda: SparseLinear(16, 8), (4, 16)),
                                         (lambda: SparseConv1d(4, 8, 3, padding=1, groups=2), (2, 4, 6)),
                                         (lambda: SparseConv2d(4, 8, 3, padding=1, groups=2), (2, 4, 6, 6)),
                                         (lambda: SparseConv3d(4, 8, 3, padding=1, groups=2), (2, 4, 4, 5, 3))],
                         ids=["linear", "conv1d", "conv2d", "conv3d"])
def test_compiles_as_one_graph_and_follows_dense_grad(generator, make, shape, fresh_compiler):
    # aot_eager traces forward and backward through the fake impls like inductor does, in a
    # fraction of inductor's compile time on CPU.
    layer = make()
    layer.set_mask(random_mask(layer.weight.shape, 0.5, generator))
    x = torch.randn(shape, generator=generator)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for dense_grad in (False, True):
        layer.dense_grad = dense_grad
        layer.weight.grad = None
        y = compiled(x)
        torch.testing.assert_close(y, layer(x))
        y.sum().backward()
        assert (layer.weight.grad[~layer.mask] != 0).any() == dense_grad


@pytest.mark.parametrize("make, shape", [(lambda: SparseLinear(6, 4), (3, 6)),
                                         (lambda: SparseConv1d(2, 4, 3, padding=1), (3, 2, 5)),
                                         (lambda: SparseConv2d(2, 4, 3, padding=1), (3, 2, 5, 5)),
                                         (lambda: SparseConv3d(2, 4, 3, padding=1), (3, 2, 4, 3, 5))],
                         ids=["linear", "conv1d", "conv2d", "conv3d"])
def test_values_off_the_mask_never_reach_the_output_and_load_as_saved(generator, make, shape):
    layer = make()
    mask = random_mask(layer.weight.shape, 0.5, generator)
    layer.set_mask(mask)
    x = torch.randn(shape, generator=generator)
    expected = layer(x)
    with torch.no_grad():  # what an algorithm writing `mask` directly (OptG) leaves behind
        layer.weight.masked_fill_(~mask, float("nan"))
        layer.weight.view(-1)[(~mask).view(-1).nonzero()[0]] = float("inf")
    # Written behind the module's back, the promise no longer holds: the opt-in check says so.
    with pytest.raises(RuntimeError, match="zero_off_mask"):
        layer.verify_zero_off_mask()
    layer.check_zero_off_mask = True
    with pytest.raises(RuntimeError, match="zero_off_mask"):
        layer(x)
    layer.zero_off_mask = False  # declared: the masked path
    layer.verify_zero_off_mask()
    torch.testing.assert_close(layer(x), expected)
    reloaded = make()
    reloaded.load_state_dict(layer.state_dict())
    assert torch.equal(reloaded.weight.isnan(), layer.weight.isnan())
    assert reloaded.zero_off_mask is False  # loading sees the values off the mask
    torch.testing.assert_close(reloaded(x), expected)
    layer.set_mask(mask)  # zeroes them: the promise holds again
    assert layer.zero_off_mask is True
    layer.verify_zero_off_mask()
    torch.testing.assert_close(layer(x), expected)


def test_a_gradient_pending_at_sparsify_is_zeroed_off_the_new_mask(generator):
    # sparsify between backward and step: the dense gradient left on the weight moved pruned weights off 0 at the
    # step, and the layers, promising zero_off_mask, computed with them.
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(torch.randn(5, 3, 6, 6, generator=generator)),
                    torch.randint(0, 4, (5,), generator=generator)).backward()
    sparsekern.sparsify(model, 0.3, mask="magnitude")
    opt.step()
    for _, module in sparse_modules(model):
        assert (module.weight.grad[~module.mask] == 0).all() and (module.weight.grad[module.mask] != 0).any()
        assert (module.weight[~module.mask] == 0).all()


def test_a_pending_gradient_that_cannot_be_written_is_refused_before_anything_changes():
    model = small_model()
    weight = model[0].weight
    weight.grad = torch.zeros(1).expand_as(weight)
    before = weight.detach().clone()
    with pytest.raises(ValueError, match=r"0\.weight\.grad has entries that share memory"):
        sparsekern.sparsify(model, 0.3)
    assert torch.equal(weight, before) and not sparse_modules(model)


def test_a_pending_gradient_of_another_shape_is_refused_before_anything_changes():
    # torch checks a gradient's shape when .grad is set, not when its .data is: zeroing it off the mask failed with
    # torch's error once the layers before it were replaced.
    model = small_model()
    model[-1].weight.grad = torch.zeros_like(model[-1].weight)
    model[-1].weight.grad.data = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"^9\.weight\.grad is a torch\.strided tensor of shape \(3, 3\) on cpu, its "
                                         r"weight a strided one of shape \(4, 16\)"):
        sparsekern.sparsify(model, 0.3)
    assert not sparse_modules(model)



@pytest.mark.parametrize("kind", BAD_OWN_MASKS)
def test_set_mask_refuses_a_mask_of_its_own_put_in_place_through_data_naming_what_is_wrong(kind):
    # torch refused an expanded one as it copied the new mask in ("more than one element of the written-to tensor
    # refers to a single memory location"), ~ a float one, and the argument was compared with the wrong shape.
    layer, new = SparseLinear(6, 4), torch.rand(4, 6) < 0.5
    error, match = damage_mask(layer, kind)
    before = everything(layer)
    with pytest.raises(error, match="^set_mask: this SparseLinear" + match):
        layer.set_mask(new)
    assert_unchanged(before, everything(layer))


def test_set_mask_reads_an_expanded_mask_it_is_given_into_a_mask_of_its_own():
    layer = SparseLinear(6, 4)
    layer.set_mask(torch.tensor([True, False, True, False, True, False]).expand(4, 6))
    assert layer.mask.is_contiguous() and layer.nnz == 12 and layer.weight[:, 1::2].eq(0).all()


def _other_mlp_state() -> dict:
    return sparsekern.sparsify(mlp(1, inputs=6, hidden=8, outputs=3), 0.5, distribution="uniform",
                               generator=torch.Generator().manual_seed(1)).state_dict()


@pytest.mark.parametrize("kind", BAD_OWN_MASKS)
def test_load_state_dict_refuses_a_layer_whose_mask_was_put_in_place_through_data_before_it_loads(kind):
    # Its first layer: torch loads module by module, so the layers before a refused one are loaded, as they are
    # before any other error torch's load_state_dict raises.
    model, saved = mlp(0, inputs=6, hidden=8, outputs=3), _other_mlp_state()
    error, match = damage_mask(model[0], kind)
    before = everything(model)
    with pytest.raises(error, match="^load_state_dict: layer '0'" + match):
        model.load_state_dict(saved)
    assert_unchanged(before, everything(model))


def test_load_state_dict_with_assign_puts_the_loaded_mask_in_place_of_an_expanded_one_put_in_through_data():
    model, saved = mlp(0, inputs=6, hidden=8, outputs=3), _other_mlp_state()
    damage_mask(model[0], "expanded")
    model.load_state_dict(saved, assign=True)
    assert model[0].mask.is_contiguous() and torch.equal(model[0].mask, saved["0.mask"])


@pytest.mark.parametrize("kind", BAD_OWN_MASKS)
def test_sparsify_again_refuses_a_sparse_layer_whose_mask_was_put_in_place_through_data_with_nothing_changed(kind):
    # The layers before it were sparsified (weights, masks) and torch's random stream drawn, then torch or set_mask
    # refused the damaged one.
    model = mlp(0, inputs=6, hidden=8, outputs=3)
    error, match = damage_mask(model[2], kind)
    before = everything(model)
    with pytest.raises(error, match="^sparsify: layer '2'" + match):
        sparsekern.sparsify(model, 0.5, distribution="uniform")
    assert_unchanged(before, everything(model))
