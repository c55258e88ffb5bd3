"""torch.func over the sparse layers and ops: functional_call, grad, vmap(grad) per-sample gradients,
vjp, jvp, jacrev, jacfwd, hessian, stack_module_state ensembles and forward-mode AD give what they
give on the plain-torch formula (F.linear / F.convNd on weight * mask), whose results are the truth;
what has no derivative or no batching rule refuses by name.

The truth of dense_grad is the dense layer at the masked weight: its gradient is the dense one, and
its jvp (the adjoint) passes a weight tangent on unmasked.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, stack_module_state, vjp, vmap

import sparsekern
from sparsekern.nn import SparseConv1d, SparseConv2d, SparseConv3d, SparseConvTranspose2d, SparseLinear, SparseModule
from sparsekern.ops import _masked_linear_op

D = torch.float64
KINDS = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose2d")
# zero_off_mask: the promise kept (the dense-kernel path); masked: values off the mask
# (zero_off_mask=False, the masked path); dense_grad: either, with dense weight gradients.
STATES = ("zero_off_mask", "masked", "dense_grad", "masked_dense_grad")


def make_layer(kind, state, generator, batch=3):
    """A float64 layer of odd shapes with a random mask, in `state`, and an input batch for it."""
    if kind == "linear":
        layer, x = SparseLinear(7, 5, dtype=D), torch.randn(batch, 7, dtype=D, generator=generator)
    elif kind == "conv1d":
        layer = SparseConv1d(3, 4, 3, padding=1, dtype=D)
        x = torch.randn(batch, 3, 5, dtype=D, generator=generator)
    elif kind == "conv2d":
        layer = SparseConv2d(4, 6, (3, 2), stride=(2, 1), groups=2, dtype=D)
        x = torch.randn(batch, 4, 5, 4, dtype=D, generator=generator)
    elif kind == "conv3d":
        layer = SparseConv3d(2, 3, 2, bias=False, dtype=D)
        x = torch.randn(batch, 2, 3, 4, 3, dtype=D, generator=generator)
    else:
        layer = SparseConvTranspose2d(4, 6, (3, 2), stride=(2, 1), output_padding=(1, 0), groups=2, dtype=D)
        x = torch.randn(batch, 4, 3, 4, dtype=D, generator=generator)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, dtype=D, generator=generator))
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.5)
    if state.startswith("masked"):
        with torch.no_grad():
            layer.weight.add_(torch.randn(layer.weight.shape, dtype=D, generator=generator) * ~layer.mask)
        layer.zero_off_mask = False
    layer.dense_grad = state.endswith("dense_grad")
    return layer, x


def params_of(layer):
    return {name: p.detach().clone() for name, p in layer.named_parameters()}


def truth(layer):
    """(f, params -> the params f takes): f(params, x) is the plain-torch layer on weight * mask; for
    dense_grad the dense layer, handed the masked weight."""
    mask = layer.mask

    def dense(params, x):
        weight, bias = params["weight"], params.get("bias")
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, bias)
        if layer.transposed:
            return F.conv_transpose2d(x, weight, bias, layer.stride, layer.padding, layer.output_padding, layer.groups,
                                      layer.dilation)
        return layer._conv_forward(x, weight, bias)

    if layer.dense_grad:
        return dense, lambda params: {**params, "weight": params["weight"] * mask}
    return (lambda params, x: dense({**params, "weight": params["weight"] * mask}, x)), lambda params: params


def assert_close(got, want):
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_close(got[key], want[key])
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert_close(a, b)
    else:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def loss_of(f):
    return lambda params, x: f(params, x).pow(2).sum()


def layer_loss(layer):
    return loss_of(lambda params, x: functional_call(layer, params, (x,)))


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("kind", KINDS)
def test_grad_of_functional_call_matches_plain_torch(kind, state, generator):
    layer, x = make_layer(kind, state, generator)
    f, as_truth = truth(layer)
    params = params_of(layer)
    got = grad(layer_loss(layer), argnums=(0, 1))(params, x)
    assert_close(got, grad(loss_of(f), argnums=(0, 1))(as_truth(params), x))
    if not layer.dense_grad:
        assert not got[0]["weight"][~layer.mask].any()
    # vjp gives the same gradient for a cotangent of ones.
    out, pullback = vjp(lambda p: functional_call(layer, p, (x,)), params)
    assert_close(pullback(torch.ones_like(out))[0],
                 vjp(lambda p: f(p, x), as_truth(params))[1](torch.ones_like(out))[0])


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_gradients_match_a_loop_of_ordinary_backward(kind, state, generator):
    layer, x = make_layer(kind, state, generator, batch=4)
    per_sample = vmap(grad(lambda p, xi: layer_loss(layer)(p, xi.unsqueeze(0))), in_dims=(None, 0))(params_of(layer), x)
    for i in range(x.shape[0]):
        # The eager path (the C++ Function on the dense-kernel path, the custom ops on the masked one).
        grads = torch.autograd.grad(layer(x[i:i + 1]).pow(2).sum(), list(layer.parameters()))
        for (name, _), want in zip(layer.named_parameters(), grads):
            torch.testing.assert_close(per_sample[name][i], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_mode_and_jacobians_match_plain_torch(kind, state, generator):
    layer, x = make_layer(kind, state, generator, batch=2)
    f, as_truth = truth(layer)
    params = params_of(layer)
    tangents = {name: torch.randn(p.shape, dtype=D, generator=generator) for name, p in params.items()}
    x_tangent = torch.randn(x.shape, dtype=D, generator=generator)
    assert_close(jvp(lambda p, xx: functional_call(layer, p, (xx,)), (params, x), (tangents, x_tangent)),
                 jvp(f, (as_truth(params), x), (tangents, x_tangent)))
    for jacobian in (jacfwd, jacrev):
        assert_close(jacobian(lambda p, xx: functional_call(layer, p, (xx,)), argnums=(0, 1))(params, x),
                     jacobian(f, argnums=(0, 1))(as_truth(params), x))


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("kind", ("linear", "conv1d"))
def test_hessian_matches_plain_torch(kind, state, generator):
    layer, x = make_layer(kind, state, generator, batch=2)
    f, as_truth = truth(layer)
    # tanh: a loss with second derivatives in the weights, not only a quadratic in the output.
    loss = lambda p, xx: functional_call(layer, p, (xx,)).tanh().sum()  # noqa: E731
    params = params_of(layer)
    assert_close(hessian(loss, argnums=(0, 1))(params, x),
                 hessian(lambda p, xx: f(p, xx).tanh().sum(), argnums=(0, 1))(as_truth(params), x))


@pytest.mark.parametrize("state", ("zero_off_mask", "masked"))
def test_compiled_per_sample_gradients_match_eager_ones(state, generator, fresh_compiler):
    # Dynamo folds the check for an active transform while it traces vmap(grad(...)).
    layer, x = make_layer("linear", state, generator, batch=4)
    per_sample = vmap(grad(lambda p, xi: layer_loss(layer)(p, xi.unsqueeze(0))), in_dims=(None, 0))
    params = params_of(layer)
    compiled = torch.compile(per_sample, fullgraph=True, backend="aot_eager")
    assert_close(compiled(params, x), per_sample(params, x))


@pytest.mark.parametrize("state", STATES)
def test_an_ensemble_from_stack_module_state_matches_each_model(state, generator):
    models = [make_layer("linear", state, generator)[0] for _ in range(3)]
    x = torch.randn(3, 4, 7, dtype=D, generator=generator)
    params, buffers = stack_module_state(models)  # the masks are buffers: stacked, one per model

    def loss(p, b, xx):
        return functional_call(models[0], (p, b), (xx,)).pow(2).sum()

    outputs = vmap(lambda p, b, xx: functional_call(models[0], (p, b), (xx,)))(params, buffers, x)
    grads = vmap(grad(loss))(params, buffers, x)
    for i, model in enumerate(models):
        torch.testing.assert_close(outputs[i], model(x[i]), rtol=1e-10, atol=1e-12)
        want = torch.autograd.grad(model(x[i]).pow(2).sum(), list(model.parameters()))
        for (name, _), w in zip(model.named_parameters(), want):
            torch.testing.assert_close(grads[name][i], w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("kind", KINDS)
def test_vmap_of_a_module_whose_parameters_require_grad_backpropagates(kind, state, generator):
    # Batches x only: the parameters stay ordinary autograd leaves.
    layer, x = make_layer(kind, state, generator)
    vmap(lambda xi: layer(xi.unsqueeze(0)).squeeze(0))(x).pow(2).sum().backward()
    got = [p.grad for p in layer.parameters()]
    layer.zero_grad()
    layer(x).pow(2).sum().backward()
    assert_close(got, [p.grad for p in layer.parameters()])
    if not layer.dense_grad:
        assert not got[0][~layer.mask].any()


def test_per_sample_gradients_of_a_sparsified_model(generator):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5), nn.Tanh(),
                          nn.Linear(5, 2)).double()
    sparsekern.sparsify(model, 0.4, generator=generator)
    x = torch.randn(3, 3, 5, 5, dtype=D, generator=generator)
    y = torch.randint(0, 2, (3,), generator=generator)
    params = params_of(model)

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        want = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        for (name, _), w in zip(model.named_parameters(), want):
            torch.testing.assert_close(per_sample[name][i], w, rtol=1e-10, atol=1e-12)
    for name, module in model.named_modules():
        if isinstance(module, SparseModule):
            assert not per_sample[f"{name}.weight"][:, ~module.mask].any()


@pytest.mark.parametrize("dense_grad", (False, True))
@pytest.mark.parametrize("zero_off_mask", (True, False))
@pytest.mark.parametrize("requires_grad", (True, False))
def test_forward_mode_ad_masks_the_weight_tangent(zero_off_mask, requires_grad, dense_grad, generator):
    # Before: with zero_off_mask a weight tangent went through unmasked, without it the masked
    # path's custom op dropped it (no grad) or raised (grad). dense_grad passes it on whole.
    weight = torch.randn(5, 7, dtype=D, generator=generator)
    mask = torch.rand(5, 7, generator=generator) < 0.5
    if zero_off_mask:
        weight = weight * mask
    weight.requires_grad_(requires_grad)
    x = torch.randn(3, 2, 7, dtype=D, generator=generator)
    tangent = torch.randn(5, 7, dtype=D, generator=generator)
    with fwAD.dual_level():
        y = sparsekern.ops.masked_linear(x, fwAD.make_dual(weight, tangent), mask, dense_grad=dense_grad,
                                         zero_off_mask=zero_off_mask)
        got = fwAD.unpack_dual(y)
    assert_close(got.primal, F.linear(x, weight * mask))
    assert_close(got.tangent, F.linear(x, tangent if dense_grad else tangent * mask))


@pytest.mark.parametrize("zero_off_mask", (True, False))
@pytest.mark.parametrize("dense_grad", (True, False))
def test_the_ops_under_transforms_on_every_path(zero_off_mask, dense_grad, generator, monkeypatch, use_backend):
    # masked_linear on 3-D x and weight_for_dense_kernel, with the backend forced (the reference's
    # custom ops, Triton's) and without the C++ Function (builds without the extension).
    weight = torch.randn(5, 7, dtype=D, generator=generator)
    mask = torch.rand(5, 7, generator=generator) < 0.5
    weight = weight * mask if zero_off_mask else weight
    x = torch.randn(2, 3, 7, dtype=D, generator=generator)
    bias = torch.randn(5, dtype=D, generator=generator)

    def loss(w, b):
        y = sparsekern.ops.masked_linear(x, w, mask, b, dense_grad=dense_grad, zero_off_mask=zero_off_mask)
        return y.pow(2).sum() + sparsekern.ops.weight_for_dense_kernel(
            w, mask, zero_off_mask=zero_off_mask, dense_grad=dense_grad).pow(3).sum()

    def plain(w, b):
        return F.linear(x, w, b).pow(2).sum() + w.pow(3).sum()

    masked = weight * mask
    want = grad(plain, argnums=(0, 1))(masked, bias) if dense_grad else grad(
        lambda w, b: plain(w * mask, b), argnums=(0, 1))(weight, bias)
    assert_close(grad(loss, argnums=(0, 1))(weight, bias), want)
    with monkeypatch.context() as patch:
        patch.setattr(_masked_linear_op, "_COMPILED_WEIGHT_FOR_DENSE_KERNEL", None)
        assert_close(grad(loss, argnums=(0, 1))(weight, bias), want)
    for backend in ("reference", "triton"):  # last: skips where Triton cannot run
        use_backend(backend, "masked_linear")
        assert_close(grad(loss, argnums=(0, 1))(weight, bias), want)


def test_inference_mode_vmaps_and_refuses_derivatives(generator):
    layer, x = make_layer("linear", "zero_off_mask", generator, batch=4)
    want = layer(x)
    layer.to_inference()
    assert_close(vmap(lambda xi: layer(xi.unsqueeze(0)).squeeze(0))(x), want)
    params = params_of(layer)
    with pytest.raises(RuntimeError, match=r"sparse_linear does not support torch.func's reverse-mode.*to_training"):
        grad(lambda xx: layer(xx).sum())(x)
    with pytest.raises(RuntimeError, match=r"sparse_linear does not support torch.func's reverse-mode"):
        grad(layer_loss(layer))(params, x)  # the bias is differentiated
    with pytest.raises(RuntimeError, match=r"sparse_linear does not support forward-mode AD"):
        jvp(lambda xx: layer(xx), (x,), (torch.ones_like(x),))
    # A frozen inference-mode part of a model under a transform of another part is no derivative.
    head = nn.Linear(5, 1, dtype=D)
    per_sample = vmap(grad(lambda p, xi: functional_call(head, p, (layer(xi),)).sum()), in_dims=(None, 0))(
        params_of(head), x)
    torch.testing.assert_close(per_sample["weight"][:, 0], want, rtol=1e-10, atol=1e-12)


def test_the_sparse_kernel_of_inference_mode_is_not_run_once_per_sample_under_vmap(generator, monkeypatch):
    # The kernel has no batching rule: vmap's fallback would loop over samples (and warn).
    layer = SparseLinear(64, 5)
    layer.set_mask(torch.rand(5, 64, generator=generator) < 0.03)
    layer.to_inference()
    x = torch.randn(4, 8, 64, generator=generator)
    monkeypatch.setattr(sparsekern.ops, "dense_is_faster", lambda *args: False)
    want = layer(x)  # the sparse kernel
    monkeypatch.setattr(sparsekern.ops._backend, "choose", lambda *args: pytest.fail("sparse kernel under vmap"))
    torch.testing.assert_close(vmap(layer)(x), want)


def test_the_mask_ops_refuse_vmap_and_change_nothing(generator):
    scores = torch.randn(3, 4, 5, generator=generator)
    with pytest.raises(RuntimeError, match=r"topk_mask does not support torch.vmap.*one k per tensor"):
        vmap(lambda s: sparsekern.ops.topk_mask([s], 4)[0])(scores)
    with pytest.raises(RuntimeError, match=r"topk_mask does not support torch.vmap"):
        vmap(lambda s: sparsekern.ops.topk_mask([s], [4])[0])(scores)
    weights = torch.randn(3, 4, 5, generator=generator)
    masks = torch.rand(3, 4, 5, generator=generator) < 0.5
    before = weights.clone()
    with pytest.raises(RuntimeError, match=r"prune_grow does not support torch.vmap"):
        vmap(lambda w, m, g: sparsekern.ops.prune_grow(w, m, w, g, 1, prune_abs=True))(weights, masks, scores)
    assert torch.equal(weights, before)
    # Masks have no derivative: under grad the selection runs as usual.
    got = grad(lambda s: (s * sparsekern.ops.topk_mask([s], 4)[0]).sum())(scores[0])
    assert torch.equal(got, sparsekern.ops.topk_mask([scores[0]], 4)[0].to(got.dtype))


def test_a_dst_step_refuses_vmap_before_it_counts(generator):
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), 0.5, generator=generator)
    rigl = sparsekern.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), update_every=1, total_steps=10)
    with pytest.raises(RuntimeError, match=r"DST.step\(\) does not support torch.vmap"):
        vmap(lambda x: (rigl.step(), x)[1])(torch.randn(2, 6, generator=generator))
    assert rigl.step_count == 0


def test_the_zero_off_mask_check_does_not_break_vmap(generator, monkeypatch):
    # The debugging check reads values (vmap cannot); under transforms nothing relies on the promise.
    monkeypatch.setattr(SparseModule, "check_zero_off_mask", True)
    models = [make_layer("linear", "zero_off_mask", generator)[0] for _ in range(2)]
    params, buffers = stack_module_state(models)
    x = torch.randn(2, 3, 7, dtype=D, generator=generator)
    got = vmap(lambda p, b, xx: functional_call(models[0], (p, b), (xx,)))(params, buffers, x)
    assert_close(got, torch.stack([m(xi) for m, xi in zip(models, x)]))


@pytest.mark.parametrize("kind", ("linear", "conv2d"))
def test_functional_call_refuses_a_mask_that_is_not_bool_by_name(kind, generator):
    # functional_call swaps buffers in without the checks of an assigned mask: torch's select refused a float one
    # naming no mask (a linear layer), or a convolution on the dense-kernel path multiplied by the weight alone.
    layer, x = make_layer(kind, "zero_off_mask", generator)
    before = layer(x)
    with pytest.raises(TypeError, match=r"mask must be a bool tensor, got torch.float64 .*functional_call"):
        functional_call(layer, {"mask": layer.mask.to(D)}, (x,))
    assert layer.zero_off_mask
    assert_close(layer(x), before)
