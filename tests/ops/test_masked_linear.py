"""masked_linear: values and gradients of every backend, and of the automatic choice, against float64
autograd of the reference."""
import functools

import pytest
import torch

import sparsekern
from sparsekern.ops import _backend, _masked_linear_op, reference

from ..helpers import BACKENDS, skip_interpreter_limits, strided

# Each backend by name, and "auto": SPARSEKERN_BACKEND unset, as most users run it. On CPU that is the
# dense kernel, on the weight itself (zero_off_mask) or on the masked weight
# (sparsekern::masked_linear_dense_kernel), not a backend's op.
PATHS = (*BACKENDS, "auto")

# Absolute slack on top of the relative rule below, per dtype.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def use_path(use_backend, monkeypatch):
    """use_path(name): a backend of PATHS by name (skipped if it cannot run), or the automatic choice."""
    def use(name: str) -> None:
        if name == "auto":
            monkeypatch.delenv(_backend.ENV_VAR, raising=False)
        else:
            use_backend(name, "masked_linear")
    return use


def make_inputs(generator, batch, in_features, out_features, dtype, bias=True, density=0.4):
    x = torch.randn((*batch, in_features), generator=generator).to(dtype)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    mask = torch.rand(out_features, in_features, generator=generator) < density
    b = torch.randn(out_features, generator=generator).to(dtype) if bias else None
    return x, weight, mask, b


def outputs_and_grads(function, x, weight, mask, bias, grad_out, dtype, dense_grad):
    """y and (dx, dweight, dbias) of function at the inputs cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, weight, bias)]
    y = function(leaves[0], leaves[1], mask, leaves[2], dense_grad)
    y.backward(grad_out.to(dtype))
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def reference_function(x, weight, mask, bias, dense_grad):
    if not dense_grad:
        return reference.masked_linear(x, weight, mask, bias)
    # The same values, but the weight's gradient bypasses the mask: the dense dy.T @ x.
    masked = weight + (reference.masked_weight(weight, mask) - weight).detach()
    return torch.nn.functional.linear(x, masked, bias)


def sparsekern_function(x, weight, mask, bias, dense_grad, zero_off_mask=False):
    return sparsekern.ops.masked_linear(x, weight, mask, bias, dense_grad=dense_grad, zero_off_mask=zero_off_mask)


def zero_off(weight, mask):
    return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype))


def assert_within_rule(name, actual, torch_same_dtype, exact, dtype):
    """The backend's error against float64 is at most twice plain PyTorch's at the same dtype, plus atol."""
    if exact is None:
        assert actual is None and torch_same_dtype is None, name
        return
    assert actual.dtype == dtype and actual.shape == exact.shape, f"{name}: {actual.dtype} {tuple(actual.shape)}"
    error = (actual.double() - exact).abs().max().item() if exact.numel() else 0.0
    torch_error = (torch_same_dtype.double() - exact).abs().max().item() if exact.numel() else 0.0
    assert error <= 2 * torch_error + ATOL[dtype], f"{name}: error {error} vs PyTorch's {torch_error} at {dtype}"


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch", [(5,), (2, 3), (), (0,)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dense_grad", [False, True])
@pytest.mark.parametrize("zero_off_mask", [False, True])
def test_values_and_gradients(backend, dtype, batch, bias, dense_grad, zero_off_mask, use_path, generator):
    use_path(backend)
    skip_interpreter_limits(backend, dtype)
    x, weight, mask, b = make_inputs(generator, batch, 19, 11, torch.float64, bias)
    if zero_off_mask:  # the caller's promise
        weight = zero_off(weight, mask)
    grad_out = torch.randn((*batch, 11), generator=generator, dtype=torch.float64)
    exact = outputs_and_grads(reference_function, x, weight, mask, b, grad_out, torch.float64, dense_grad)
    plain = outputs_and_grads(reference_function, x, weight, mask, b, grad_out, dtype, dense_grad)
    actual = outputs_and_grads(functools.partial(sparsekern_function, zero_off_mask=zero_off_mask),
                               x, weight, mask, b, grad_out, dtype, dense_grad)
    for name, a, p, e in zip(["y", "dx", "dweight", "dbias"], actual, plain, exact):
        assert_within_rule(name, a, p, e, dtype)
    if not dense_grad:
        assert not actual[2][~mask].any(), "masked dweight must be 0 off the mask"


def ops_run(function) -> list[str]:
    """Names of the ops `function()` dispatches, in order (the profiler sees those called from C++ too)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        function()
    return [event.name for event in profile.events()]


# The ops that make a masked copy of a weight (or of its gradient, out of place).
SELECTS = ("sparsekern::masked_weight", "aten::where")


@pytest.mark.parametrize("dense_grad", [False, True])
@pytest.mark.parametrize("zero_off_mask", [True, False])
def test_the_automatic_path_makes_a_masked_weight_only_where_the_weight_needs_one(zero_off_mask, dense_grad,
                                                                                  monkeypatch, generator):
    # Automatic choice on CPU: the dense kernel, on the weight itself where it is 0 off the mask (no
    # select, no custom op), else on the masked weight, made for the forward and again for dx, and
    # kept for neither: the graph saves nothing weight-sized but the weight and the mask, so that a
    # step's peak memory stays a dense step's, with dense_grad too (OptG's every step: F.linear on
    # weight_for_dense_kernel's Function kept the masked weight from forward to backward).
    if not zero_off_mask and _masked_linear_op._COMPILED_MASKED_LINEAR_DENSE_KERNEL is None:
        pytest.skip("without the extension the masked path runs the reference's custom ops")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    x, weight, mask, b = make_inputs(generator, (4,), 8, 6, torch.float32)
    weight = zero_off(weight, mask).requires_grad_()
    x.requires_grad_()
    saved = []

    def save(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(save, lambda t: t):
        names = ops_run(lambda: sparsekern.ops.masked_linear(x, weight, mask, b, dense_grad=dense_grad,
                                                             zero_off_mask=zero_off_mask).sum().backward())
    # (F.linear saves the masked weight transposed.)
    kept = [t for t in saved if t.numel() == weight.numel()
            and t.untyped_storage().data_ptr() not in (weight.data_ptr(), mask.data_ptr())]
    assert kept == [], "a masked weight kept from forward to backward"
    assert [name for name in names if name in SELECTS] == ([] if zero_off_mask else ["sparsekern::masked_weight"] * 2)
    assert not [name for name in names if "reference" in name], names
    assert weight.grad[mask].ne(0).all() and weight.grad[~mask].ne(0).any() == dense_grad


@pytest.mark.parametrize("batch", [(5,), (2, 3)])
def test_a_dense_gradient_on_the_masked_path_runs_the_dense_kernel_with_the_references_results(batch, monkeypatch,
                                                                                              generator):
    # OptG asks every step for the dense weight gradient on the masked path: it ran the reference's custom ops
    # (Python autograd, torch.where selects), its step 0.45x the dense step's speed on the digits MLP. Now the
    # dense kernel in the one-node C++ Function (sparsekern::masked_linear_dense_kernel), with the reference's
    # results bit for bit.
    if _masked_linear_op._COMPILED_MASKED_LINEAR_DENSE_KERNEL is None:
        pytest.skip("without the extension the masked path runs the reference's custom ops")
    x, weight, mask, b = make_inputs(generator, batch, 8, 6, torch.float32)
    grad_out = torch.randn((*batch, 6), generator=generator)
    results = {}
    for request in ("auto", "reference"):
        monkeypatch.setenv(_backend.ENV_VAR, request)
        leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
        names = ops_run(lambda: results.setdefault(request, [sparsekern.ops.masked_linear(
            leaves[0], leaves[1], mask, leaves[2], dense_grad=True, zero_off_mask=False)])[0].backward(grad_out))
        results[request] += [leaf.grad for leaf in leaves]
        assert any("reference" in name for name in names) == (request == "reference"), names
        assert ("sparsekern::masked_linear_dense_kernel" in names) == (request == "auto"), names
    assert all(torch.equal(auto, forced) for auto, forced in zip(results["auto"], results["reference"]))
    assert results["auto"][2][~mask].ne(0).any()   # the dense gradient, off the mask too


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("zero_off_mask", [False, True])
def test_non_contiguous_inputs(backend, layout, zero_off_mask, use_path, generator):
    use_path(backend)
    x, weight, mask, b = make_inputs(generator, (7,), 33, 21, torch.float64)
    if zero_off_mask:
        weight = zero_off(weight, mask)
    grad_out = torch.randn(7, 21, generator=generator, dtype=torch.float64)
    exact = outputs_and_grads(reference_function, x, weight, mask, b, grad_out, torch.float64, False)
    strided_inputs = [strided(t, generator, layout) for t in (x, weight, mask)]
    assert not any(t.is_contiguous() for t in strided_inputs)
    actual = outputs_and_grads(functools.partial(sparsekern_function, zero_off_mask=zero_off_mask),
                               *strided_inputs, b, strided(grad_out, generator, layout), torch.float64, False)
    for a, e in zip(actual, exact):
        torch.testing.assert_close(a, e)



@pytest.mark.parametrize("features", [(0, 5), (5, 0)], ids=["no inputs", "no outputs"])
@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("dense_grad", [False, True])
@pytest.mark.parametrize("zero_off_mask", [False, True])
def test_empty_features(features, backend, dense_grad, zero_off_mask, use_path, generator):
    # No input features: y is the bias and dx is empty; no output features: y is empty and dx is 0.
    use_path(backend)
    x, weight, mask, b = make_inputs(generator, (3,), *features, torch.float64)
    if zero_off_mask:
        weight = zero_off(weight, mask)
    grad_out = torch.randn(3, features[1], generator=generator, dtype=torch.float64)
    exact = outputs_and_grads(reference_function, x, weight, mask, b, grad_out, torch.float64, dense_grad)
    actual = outputs_and_grads(functools.partial(sparsekern_function, zero_off_mask=zero_off_mask),
                               x, weight, mask, b, grad_out, torch.float64, dense_grad)
    for a, e in zip(actual, exact):
        torch.testing.assert_close(a, e, rtol=0, atol=0)

def double_backward_case(generator, zero_off_mask):
    """(function of (x, bias, free weight values), leaves): with zero_off_mask only the active values
    are free, so the weight keeps the promise under gradcheck's nudges."""
    x, weight, mask, b = make_inputs(generator, (2, 2), 4, 3, torch.float64, density=0.6)
    if zero_off_mask:
        free = weight[mask].clone()
        make_weight = lambda values: torch.zeros(mask.shape, dtype=values.dtype).masked_scatter(mask, values)  # noqa: E731
    else:
        free, make_weight = weight, (lambda w: w)  # noqa: E731

    def function(x, b, w, dense_grad=False):
        return sparsekern_function(x, make_weight(w), mask, b, dense_grad, zero_off_mask)
    return function, [x.requires_grad_(), b.requires_grad_(), free.requires_grad_()]


@pytest.mark.parametrize("path", ["reference", "auto"])
@pytest.mark.parametrize("zero_off_mask", [False, True])
@pytest.mark.parametrize("dense_grad", [False, True])
def test_double_backward(path, zero_off_mask, dense_grad, use_path, generator):
    use_path(path)
    function, leaves = double_backward_case(generator, zero_off_mask)
    dense_grad = dense_grad and not zero_off_mask
    function = functools.partial(function, dense_grad=dense_grad)
    if not dense_grad:
        assert torch.autograd.gradcheck(function, leaves)
        assert torch.autograd.gradgradcheck(function, leaves)
        return
    # The dense gradient is not the function's derivative off the mask: the mask passes the weight's
    # derivatives straight through, through dx as through y (a gradient penalty's part of the dense
    # gradient), as the straight-through reference differentiates.
    x, weight, mask, b = make_inputs(generator, (2, 2), 4, 3, torch.float64, density=0.6)
    leaves = [x.requires_grad_(), weight.requires_grad_(), b.requires_grad_()]

    def first_and_second_order(forward):
        y = forward(x, weight, mask, b, True)
        first = torch.autograd.grad(y, leaves, torch.ones_like(y), create_graph=True)
        return (*first, *torch.autograd.grad(sum((g * g).sum() for g in first), leaves, materialize_grads=True))
    for got, want in zip(first_and_second_order(sparsekern_function), first_and_second_order(reference_function)):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(_masked_linear_op._COMPILED_MASKED_LINEAR_DENSE_KERNEL is None,
                    reason="the extension has no masked_linear_dense_kernel")
@pytest.mark.parametrize("zero_off_mask", [False, True])
def test_the_dense_kernel_op_passes_the_weight_gradient_through_dx_with_dense_grad(zero_off_mask, generator):
    # sparsekern::masked_linear_dense_kernel's double backward masked the weight's gradient through dx
    # whatever dense_grad said (a gradient penalty's part of the dense gradient lost off the mask), so
    # dense_grad calls could not take it. First and second order against the straight-through reference,
    # at a weight 0 off the mask (which either promise holds).
    x, weight, mask, b = make_inputs(generator, (2, 3), 9, 7, torch.float64, density=0.5)
    weight = zero_off(weight, mask)
    leaves = [x.requires_grad_(), weight.requires_grad_(), b.requires_grad_()]

    def first_and_second_order(forward):
        y = forward(x, weight, mask, b, True)
        first = torch.autograd.grad(y.square().sum(), leaves, create_graph=True)
        return (*first, *torch.autograd.grad(sum((g * g).sum() for g in first), leaves))
    got = first_and_second_order(lambda *args: torch.ops.sparsekern.masked_linear_dense_kernel(*args, zero_off_mask))
    want = first_and_second_order(reference_function)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert got[4][~mask].ne(0).any()   # the second-order weight gradient, dense


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("zero_off_mask", [False, True])
def test_every_backend_differentiates_its_backward_as_the_reference(backend, zero_off_mask, use_path, monkeypatch,
                                                                    generator):
    # gradgradcheck under the Triton interpreter would take minutes: compare one second-order
    # gradient of every input with the reference's instead.
    def second_order(name):
        monkeypatch.setenv(_backend.ENV_VAR, name)
        function, leaves = double_backward_case(torch.Generator().manual_seed(7), zero_off_mask)
        y = function(*leaves)
        first = torch.autograd.grad(y, leaves, torch.ones_like(y), create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in first), leaves, materialize_grads=True)

    use_path(backend)
    for got, want in zip(second_order(backend), second_order("reference")):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("zero_off_mask", [False, True])
def test_the_weight_gradient_through_dx_is_masked_too(backend, zero_off_mask, use_path, generator):
    # Double backward at a weight that is 0 off the mask (so either promise holds): the weight's
    # gradient through dx meets the mask as its gradient through y does, on the zero_off_mask path
    # too, whose dx takes the weight itself.
    use_path(backend)
    x, weight, mask, b = make_inputs(generator, (3,), 9, 7, torch.float64, density=0.5)
    weight = zero_off(weight, mask).requires_grad_()
    x.requires_grad_()
    y = sparsekern_function(x, weight, mask, b, False, zero_off_mask)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (grad_weight,) = torch.autograd.grad(grad_x.square().sum(), weight)
    assert grad_weight[mask].ne(0).all() and not grad_weight[~mask].any()


@pytest.mark.parametrize("backend", PATHS)
@pytest.mark.parametrize("zero_off_mask", [False, True])
def test_autocast_gives_what_linear_gives(backend, zero_off_mask, use_path, generator):
    use_path(backend)
    skip_interpreter_limits(backend, torch.bfloat16)
    x, weight, mask, b = make_inputs(generator, (6,), 16, 12, torch.float32)
    weight = zero_off(weight, mask)
    leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    expected_leaves = [t.clone().requires_grad_() for t in (x, weight, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparsekern_function(*leaves[:2], mask, leaves[2], False, zero_off_mask)
        expected = torch.nn.functional.linear(expected_leaves[0], zero_off(expected_leaves[1], mask), expected_leaves[2])
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected)
    grad_out = torch.randn(6, 12, generator=generator).to(torch.bfloat16)
    y.backward(grad_out)
    expected.backward(grad_out)
    for leaf, want in zip(leaves, expected_leaves):
        assert leaf.grad.dtype == torch.float32
        torch.testing.assert_close(leaf.grad, want.grad)


@pytest.mark.parametrize("backend", PATHS)
def test_masked_out_inf_and_nan_do_not_leak(backend, use_path, generator):
    use_path(backend)
    x, weight, mask, bias = make_inputs(generator, (4,), 8, 6, torch.float32)
    weight = torch.where(mask, weight, torch.tensor([float("inf"), -float("inf"), float("nan")]).repeat(16)[:48]
                         .view(6, 8)).requires_grad_()
    x.requires_grad_()
    y = sparsekern.ops.masked_linear(x, weight, mask, bias)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all()
    expected = torch.nn.functional.linear(x, torch.where(mask, weight, 0.0), bias)
    torch.testing.assert_close(y.detach(), expected.detach())


def test_the_rule_catches_a_wrong_gradient(generator):
    x, weight, mask, b = make_inputs(generator, (5,), 7, 3, torch.float64)
    grad_out = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    exact = outputs_and_grads(reference_function, x, weight, mask, b, grad_out, torch.float64, False)
    plain = outputs_and_grads(reference_function, x, weight, mask, b, grad_out, torch.float32, False)
    dense = outputs_and_grads(reference_function, x, weight, mask, b, grad_out, torch.float32, True)
    # The dense gradient where the masked one is asked for must fail the rule.
    with pytest.raises(AssertionError, match="dweight"):
        assert_within_rule("dweight", dense[2], plain[2], exact[2], torch.float32)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dense_grad", [False, True])
def test_opcheck_masked_linear_reference(bias, dense_grad, generator):
    x, weight, mask, b = make_inputs(generator, (2, 3), 6, 4, torch.float32, bias)
    grad_out = torch.randn(2, 3, 4, generator=generator)
    for t in (x, weight, grad_out):
        t.requires_grad_()
    ops = torch.ops.sparsekern
    torch.library.opcheck(ops.masked_linear_reference.default, (x, weight, mask, b, dense_grad, False))
    torch.library.opcheck(ops.masked_linear_grad_input_reference.default, (grad_out, weight, mask, False, dense_grad))
    torch.library.opcheck(ops.masked_linear_grad_weight_reference.default, (grad_out, x, mask, dense_grad))



@pytest.mark.parametrize("case", ["transposed", "sliced", "no rows", "no inputs", "no outputs"])
@pytest.mark.parametrize("zero_off_mask", [False, True])
def test_opcheck_masked_linear_reference_on_odd_inputs(case, zero_off_mask, generator):
    rows, in_features, out_features = {"no rows": (0, 6, 4), "no inputs": (3, 0, 4),
                                       "no outputs": (3, 6, 0)}.get(case, (3, 6, 4))
    x, weight, mask, b = make_inputs(generator, (2, rows), in_features, out_features, torch.float32)
    grad_out = torch.randn(2, rows, out_features, generator=generator)
    if zero_off_mask:
        weight = zero_off(weight, mask)
    if case in ("transposed", "sliced"):
        x, weight, mask, grad_out = (strided(t, generator, case) for t in (x, weight, mask, grad_out))
    for t in (x, weight, grad_out, b):
        t.requires_grad_()
    ops = torch.ops.sparsekern
    torch.library.opcheck(ops.masked_linear_reference.default, (x, weight, mask, b, False, zero_off_mask))
    torch.library.opcheck(ops.masked_linear_grad_input_reference.default, (grad_out, weight, mask, zero_off_mask, False))
    torch.library.opcheck(ops.masked_linear_grad_weight_reference.default, (grad_out, x, mask, False))

@pytest.mark.parametrize("zero_off_mask", [False, True])
def test_without_a_gradient_to_compute_the_automatic_path_gives_the_reference(zero_off_mask, monkeypatch, generator):
    # Under no_grad, and for a frozen weight (only dx to compute), the dense-kernel paths skip
    # what they keep for the weight gradient; off the mask inf and NaN, unless the weight promises 0.
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    x, weight, mask, b = make_inputs(generator, (3, 5), 29, 17, torch.float32)
    weight = zero_off(weight, mask) if zero_off_mask else torch.where(mask, weight, float("nan"))
    expected = reference.masked_linear(x, weight, mask, b)
    with torch.no_grad():
        torch.testing.assert_close(sparsekern_function(x, weight.requires_grad_(), mask, b, False, zero_off_mask),
                                   expected)
    weight.requires_grad_(False)
    x.requires_grad_()
    y = sparsekern_function(x, weight, mask, b, False, zero_off_mask)
    torch.testing.assert_close(y, expected)
    grad_out = torch.randn(y.shape, generator=generator)
    torch.testing.assert_close(torch.autograd.grad(y, x, grad_out)[0], grad_out @ zero_off(weight, mask))


@pytest.mark.parametrize("zero_off_mask", [False, True])
def test_activation_checkpointing_recomputes_what_the_forward_saved(zero_off_mask, monkeypatch, generator):
    # Non-reentrant torch.utils.checkpoint reruns the forward inside the backward, and torch.autograd.grad
    # asks for some inputs only: what the dense-kernel Function saves must depend on its inputs, not on
    # that backward (its graph knows nothing of the recomputed nodes), or the recomputation saves less
    # and checkpoint raises CheckpointError ("A different number of tensors was saved").
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    x, w1, m1, b1 = make_inputs(generator, (4,), 6, 5, torch.float32)
    _, w2, m2, b2 = make_inputs(generator, (4,), 5, 3, torch.float32)
    if zero_off_mask:
        w1, w2 = zero_off(w1, m1), zero_off(w2, m2)
    leaves = [t.requires_grad_() for t in (x, w1, b1, w2)]

    def two_layers(x):
        hidden = torch.relu(sparsekern_function(x, w1, m1, b1, False, zero_off_mask))
        return sparsekern_function(hidden, w2, m2, b2, False, zero_off_mask)
    expected = torch.autograd.grad(two_layers(x).square().sum(), leaves)
    recomputed = torch.utils.checkpoint.checkpoint(two_layers, x, use_reentrant=False)
    for got, want in zip(torch.autograd.grad(recomputed.square().sum(), leaves), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dense_grad", [False, True])
def test_compiled_masked_path_gives_what_eager_gives(dense_grad, monkeypatch, generator, fresh_compiler):
    # Eager calls take the C++ Function (sparsekern::masked_linear_dense_kernel), torch.compile F.linear
    # on the select: the same values and gradients, NaN off the mask kept out of both.
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    x, weight, mask, b = make_inputs(generator, (6,), 21, 13, torch.float32)
    weight = torch.where(mask, weight, float("nan"))
    grad_out = torch.randn(6, 13, generator=generator)
    compiled = outputs_and_grads(torch.compile(sparsekern_function, fullgraph=True, backend="aot_eager"), x, weight,
                                 mask, b, grad_out, torch.float32, dense_grad)
    eager = outputs_and_grads(sparsekern_function, x, weight, mask, b, grad_out, torch.float32, dense_grad)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want)
    assert compiled[0].isfinite().all() and compiled[1].isfinite().all()


def _call_names(graph) -> list[str]:
    """The ops an FX graph calls; a mutating op that functionalization wrapped, by its own name."""
    return [str(node.args[0]) if "auto_functionalized" in str(node.target) else str(node.target)
            for node in graph.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("extension", [True, False], ids=["extension", "no extension"])
@pytest.mark.parametrize("dense_grad", [False, True])
def test_the_compiled_masked_path_leaves_the_products_to_the_compiler(dense_grad, extension, monkeypatch, generator,
                                                                       fresh_compiler):
    # The reference's custom ops, which torch.compile traced before, hid the products from Inductor: it
    # could neither fuse the select nor the gradient's mask (a 64-256-256-10 MLP's compiled masked step
    # ran at 0.6x the dense one's, and at 1.6x its peak memory). The graphs hold the products; the
    # selects of a linear weight on CPU are the extension's kernels (Inductor's C++ kernels load a
    # bool mask one entry at a time: _masked_linear_op._traced_select_is_opaque), and torch.where
    # without them. A forced backend still runs its custom ops.
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    if extension and None in (_masked_linear_op._COMPILED_MASKED_WEIGHT, _masked_linear_op._COMPILED_MASK_GRAD):
        pytest.skip("the extension's selects are not built")
    if not extension:
        monkeypatch.setattr(_masked_linear_op, "_COMPILED_MASKED_WEIGHT", None)
        monkeypatch.setattr(_masked_linear_op, "_COMPILED_MASK_GRAD", None)
    graphs = []

    def record(graph, inputs):
        graphs.append(_call_names(graph))
        return make_boxed_func(graph.forward)

    def run():
        graphs.clear()
        torch._dynamo.reset()
        compiled = torch.compile(sparsekern_function, fullgraph=True,
                                 backend=aot_autograd(fw_compiler=record, bw_compiler=record))
        y = compiled(x, weight, mask, b, dense_grad, False)
        y.backward(torch.randn(y.shape, generator=generator))
        return graphs

    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    x, weight, mask, b = make_inputs(generator, (6,), 21, 13, torch.float32)
    weight.requires_grad_()
    forward, backward = run()
    assert "aten.addmm.default" in forward and "aten.mm.default" in backward, (forward, backward)
    selects = {"sparsekern.masked_weight.default", "sparsekern.mask_grad_.default", "aten.where.self"}
    called = [[t for t in graph if t in selects or "sparsekern" in t] for graph in (forward, backward)]
    if extension:
        expected = [["sparsekern.masked_weight.default"], [] if dense_grad else ["sparsekern.mask_grad_.default"]]
    else:
        expected = [["aten.where.self"], [] if dense_grad else ["aten.where.self"]]
    assert called == expected, (forward, backward)
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert any("masked_linear_reference" in t for graph in run() for t in graph)
