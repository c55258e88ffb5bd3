"""The dense-kernel path's compiled pieces: sparsekern::mask_grad_, the C++ in-place masking of the weight
gradient, against torch's out-of-place product; sparsekern::masked_weight, the C++ select, against
torch.where; the C++ autograd Function of weight_for_dense_kernel that eager convolution calls take,
against the Python one (torch.compile's, and the fallback without the extension); and
sparsekern::masked_linear_dense_kernel, the Function eager SparseLinear calls take (its values and
gradients: tests/ops/test_masked_linear.py, path "auto")."""
import pytest
import torch

from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern import ops
from sparsekern.ops import _extension, _masked_linear_op

needs_cpu_kernel = pytest.mark.skipif(
    _extension.kernel_missing("mask_grad_", "cpu") is not None,
    reason=f"no C++ mask_grad_: {_extension.kernel_missing('mask_grad_', 'cpu')}")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Empty, one entry, odd 2-D and 3-D shapes, and more entries than one block (16K) of the kernel.
SHAPES = [(0,), (1,), (37, 53), (3, 5, 7), (129, 300)]


def random_case(generator, shape, dtype):
    """A gradient with inf and NaN on and off the mask, and a mask whose True bytes are not all 1."""
    grad = torch.randn(shape, generator=generator).to(dtype)
    special = torch.rand(shape, generator=generator)
    grad[special < 0.02] = float("nan")
    grad[(special >= 0.02) & (special < 0.04)] = float("inf")
    grad[(special >= 0.04) & (special < 0.05)] = -float("inf")
    bytes_ = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    bytes_[torch.rand(shape, generator=generator) < 0.5] = 0
    return grad, bytes_.view(torch.bool)


def expected(grad, mask):
    """The reference's masking: a select, +0.0 off the mask whatever the gradient held there."""
    return torch.where(mask.view(torch.uint8) != 0, grad, 0)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_references_select(dtype, shape, generator):
    grad, mask = random_case(generator, shape, dtype)
    want = expected(grad, mask)
    torch.ops.sparsekern.mask_grad_(grad, mask)
    torch.testing.assert_close(grad, want, rtol=0, atol=0, equal_nan=True)
    # Off the mask +0.0, inf and NaN included (a product would leave -0.0 and NaN).
    off = mask.view(torch.uint8) == 0
    assert (grad[off] == 0).all() and not grad[off].signbit().any()


@needs_cpu_kernel
def test_a_non_contiguous_mask_is_read_by_position(generator):
    grad, mask = random_case(generator, (40, 30), torch.float32)
    mask_t = mask.t().contiguous().t()  # the same values, column-major
    want = expected(grad, mask)
    torch.ops.sparsekern.mask_grad_(grad, mask_t)
    torch.testing.assert_close(grad, want, rtol=0, atol=0, equal_nan=True)


@needs_cpu_kernel
@pytest.mark.parametrize("case, error, match", [
    ("strided", ValueError, "grad must be contiguous"),
    ("int grad", TypeError, "grad must be float16"),
    ("float mask", TypeError, "mask must be a bool tensor"),
    ("shape", ValueError, "mask must have grad's shape"),
])
def test_bad_arguments_are_refused_and_change_nothing(case, error, match, generator):
    grad, mask = random_case(generator, (20, 30), torch.float32)
    if case == "strided":
        grad = grad.t()
        mask = mask.t()
    elif case == "int grad":
        grad = grad.nan_to_num().to(torch.int32)
    elif case == "float mask":
        mask = mask.float()
    else:
        mask = mask[:, :29]
    before = grad.clone()
    with pytest.raises(error, match=match):
        torch.ops.sparsekern.mask_grad_(grad, mask)
    torch.testing.assert_close(grad, before, rtol=0, atol=0, equal_nan=True)


needs_masked_weight = pytest.mark.skipif(
    _extension.kernel_missing("masked_weight", "cpu") is not None,
    reason=f"no C++ masked_weight: {_extension.kernel_missing('masked_weight', 'cpu')}")


def selected(weight, mask):
    return torch.where(mask.view(torch.uint8) != 0, weight, torch.zeros((), dtype=weight.dtype))


@needs_masked_weight
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_masked_weight_matches_the_select(dtype, shape, generator):
    # inf and NaN on and off the mask: kept on it, +0.0 off it, bit for bit.
    weight, mask = random_case(generator, shape, dtype)
    got = torch.ops.sparsekern.masked_weight(weight, mask)
    want = selected(weight, mask)
    assert got.is_contiguous() and got.dtype == dtype and (got.numel() == 0 or got.data_ptr() != weight.data_ptr())
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    assert torch.equal(got.view(bits), want.view(bits))


@needs_masked_weight
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_masked_weight_reads_non_contiguous_tensors_by_position(layout, generator):
    weight, mask = random_case(generator, (40, 30), torch.float32)
    if layout == "transposed":
        weight_s, mask_s = weight.t().contiguous().t(), mask.t().contiguous().t()
    else:
        weight_s = torch.randn(40, 60, generator=generator)[:, ::2].copy_(weight)
        mask_s = torch.zeros(40, 60, dtype=torch.bool)[:, ::2].copy_(mask)
    assert not weight_s.is_contiguous() and not mask_s.is_contiguous()
    torch.testing.assert_close(torch.ops.sparsekern.masked_weight(weight_s, mask_s), selected(weight, mask),
                               rtol=0, atol=0, equal_nan=True)


@needs_masked_weight
@pytest.mark.parametrize("case, error, match", [
    ("int weight", TypeError, "weight must be float16"),
    ("float mask", TypeError, "mask must be a bool tensor"),
    ("shape", ValueError, "mask must have weight's shape"),
])
def test_masked_weight_refuses_bad_arguments(case, error, match, generator):
    weight, mask = random_case(generator, (20, 30), torch.float32)
    if case == "int weight":
        weight = weight.nan_to_num().to(torch.int32)
    elif case == "float mask":
        mask = mask.float()
    else:
        mask = mask[:, :29]
    with pytest.raises(error, match=match):
        torch.ops.sparsekern.masked_weight(weight, mask)


@needs_cpu_kernel
def test_opcheck(generator):
    for shape, dtype in [((37, 53), torch.float32), ((0,), torch.float64), ((5, 3), torch.bfloat16)]:
        grad, mask = random_case(generator, shape, dtype)
        torch.library.opcheck(torch.ops.sparsekern.mask_grad_.default, (grad, mask))


@needs_cpu_kernel
@pytest.mark.parametrize("zero_off_mask", [True, False])
@pytest.mark.parametrize("dense_grad", [False, True])
def test_opcheck_weight_for_dense_kernel(zero_off_mask, dense_grad, generator):
    mask = torch.rand(7, 11, generator=generator) < 0.5
    weight = (torch.randn(7, 11, generator=generator) * mask).requires_grad_()
    torch.library.opcheck(torch.ops.sparsekern.weight_for_dense_kernel.default,
                          (weight, mask, zero_off_mask, dense_grad))


needs_masked_linear_dense_kernel = pytest.mark.skipif(
    _masked_linear_op._COMPILED_MASKED_LINEAR_DENSE_KERNEL is None,
    reason="the extension has no masked_linear_dense_kernel")


@needs_masked_linear_dense_kernel
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dense_grad", [False, True])
@pytest.mark.parametrize("zero_off_mask", [True, False])
def test_opcheck_masked_linear_dense_kernel(bias, dense_grad, zero_off_mask, generator):
    mask = torch.rand(7, 11, generator=generator) < 0.5
    weight = torch.randn(7, 11, generator=generator)
    weight = (weight * mask if zero_off_mask else weight).requires_grad_()
    x = torch.randn(2, 3, 11, generator=generator).requires_grad_()
    b = torch.randn(7, generator=generator).requires_grad_() if bias else None
    torch.library.opcheck(torch.ops.sparsekern.masked_linear_dense_kernel.default,
                          (x, weight, mask, b, dense_grad, zero_off_mask))


def test_the_torch_fallback_masks_like_the_kernel(generator):
    # More entries than one chunk (128K) of the fallback, and inf and NaN that must give 0 off the mask.
    grad, mask = random_case(generator, (300, 500), torch.float32)
    want = expected(grad, mask)
    assert _masked_linear_op._mask_in_place(grad, mask) is grad
    torch.testing.assert_close(grad, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_gpu_select_by_bits_masks_like_the_kernel(dtype, generator):
    # What a GPU runs (the C++ Functions' GPU branch does the same): run here on CPU tensors.
    grad, mask = random_case(generator, (37, 29), dtype)
    want = expected(grad, mask)
    assert _masked_linear_op._select_by_bits(grad, mask) is grad
    torch.testing.assert_close(grad, want, rtol=0, atol=0, equal_nan=True)
    assert not grad[mask.view(torch.uint8) == 0].signbit().any()


@pytest.mark.parametrize("compiled", [True, False], ids=["C++ Function", "Python Function"])
@pytest.mark.parametrize("zero_off_mask", [True, False])
@pytest.mark.parametrize("dense_grad", [False, True])
def test_either_autograd_function_gives_the_contract(compiled, zero_off_mask, dense_grad, generator, monkeypatch):
    # weight_for_dense_kernel's eager calls take the C++ Function; the Python one is what
    # torch.compile traces and what runs without the extension. Both: values, the gradient masked
    # in place (an inf off the mask gives 0, as the reference's select does), dense_grad,
    # and a differentiable backward.
    if compiled and _masked_linear_op._COMPILED_WEIGHT_FOR_DENSE_KERNEL is None:
        pytest.skip("the extension has no weight_for_dense_kernel")
    if not compiled:
        monkeypatch.setattr(_masked_linear_op, "_COMPILED_WEIGHT_FOR_DENSE_KERNEL", None)
    mask = torch.rand(9, 13, generator=generator) < 0.4
    weight = torch.randn(9, 13, generator=generator, dtype=torch.float64)
    if zero_off_mask:
        weight = weight * mask
    else:
        weight[~mask] = float("inf")
    weight.requires_grad_()
    x = torch.randn(5, 13, generator=generator, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 9, generator=generator, dtype=torch.float64)
    upstream[0, 0] = float("inf")  # the weight gradient's first row is inf wherever x[0] is non-zero
    kernel_weight = ops.weight_for_dense_kernel(weight, mask, zero_off_mask=zero_off_mask, dense_grad=dense_grad)
    torch.testing.assert_close(kernel_weight, torch.where(mask, weight, 0).detach())
    y = torch.nn.functional.linear(x, kernel_weight)
    (y * upstream).sum().backward()
    dense = upstream.t() @ x.detach()
    torch.testing.assert_close(weight.grad, dense if dense_grad else torch.where(mask, dense, 0), equal_nan=True)
    # Double backward (the out-of-place select, recorded in the graph) against the same formula in
    # torch ops: the masked weight, whose gradient is masked, or whole under dense_grad.
    finite = weight.detach().nan_to_num(posinf=3.0).requires_grad_()
    reference_weight = torch.where(mask, finite, finite - finite.detach() if dense_grad else 0)
    grads = []
    for kernel_weight in (ops.weight_for_dense_kernel(finite, mask, zero_off_mask=zero_off_mask,
                                                      dense_grad=dense_grad), reference_weight):
        y = torch.nn.functional.linear(x, kernel_weight)
        (grad_weight,) = torch.autograd.grad(y.square().sum(), finite, create_graph=True)
        grads.append(torch.autograd.grad((grad_weight * grad_weight.detach()).sum(), (x, finite)))
    torch.testing.assert_close(grads[0], grads[1])


@needs_cpu_kernel
@pytest.mark.parametrize("make, shape", [(lambda: SparseLinear(30, 20), (4, 30)),
                                         (lambda: SparseConv2d(3, 4, 3), (2, 3, 5, 5))], ids=["linear", "conv2d"])
@pytest.mark.parametrize("zero_off_mask", [True, False])
def test_eager_calls_take_the_cpp_function(make, shape, zero_off_mask, generator):
    # SparseLinear has a Function of its own, the whole layer in one node: F.linear on
    # weight_for_dense_kernel's result records three (~20 us more per layer and step), and would keep
    # the masked weight for backward; the reference's custom ops, which ran the masked path, take
    # Python autograd and torch.where (0.48x a dense step's speed for the digits MLP, 1.5x its peak
    # memory).
    layer = make()
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.3)
    layer.zero_off_mask = zero_off_mask
    names, pending = [], [layer(torch.randn(shape, generator=generator)).grad_fn]
    while pending:
        node = pending.pop()
        if node is not None:
            names.append(node.name())
            pending += [next_node for next_node, _ in node.next_functions]
    if isinstance(layer, SparseLinear):
        assert names[0].endswith("::MaskedLinear>") and "AddmmBackward0" not in names, names
    else:
        assert any(name.endswith("::WeightForDenseKernel>") for name in names), names
    assert not [name for name in names if "_WeightForDenseKernelBackward" in name or "reference" in name], names


@needs_cpu_kernel
@pytest.mark.parametrize("make, shape", [(lambda: SparseLinear(6, 5), (4, 6)),
                                         (lambda: SparseConv2d(2, 3, 3), (2, 2, 4, 4))], ids=["linear", "conv2d"])
@pytest.mark.parametrize("zero_off_mask", [True, False])
@pytest.mark.parametrize("vmap", ["is_grads_batched", "torch.func.vmap"])
def test_a_batched_backward_through_the_cpp_functions(make, shape, zero_off_mask, vmap, generator):
    # A graph recorded outside any transform (the C++ Functions) and differentiated under vmap: the
    # rows of a Jacobian at once (torch.autograd.grad's is_grads_batched, functional.jacobian's
    # vectorize). The in-place masking of the weight gradient has no batching rule: the batched
    # gradient is masked out of place.
    layer = make()
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.5)
    layer.zero_off_mask = zero_off_mask
    x = torch.randn(shape, generator=generator, requires_grad=True)
    y = layer(x)
    vectors = torch.randn((3, *y.shape), generator=generator)
    if vmap == "is_grads_batched":
        got = torch.autograd.grad(y, (x, layer.weight), vectors, retain_graph=True, is_grads_batched=True)
    else:
        got = torch.func.vmap(lambda v: torch.autograd.grad(y, (x, layer.weight), v, retain_graph=True))(vectors)
    for i, v in enumerate(vectors):
        for batched, one in zip(got, torch.autograd.grad(y, (x, layer.weight), v, retain_graph=True)):
            torch.testing.assert_close(batched[i], one)
    assert not got[1][:, ~layer.mask].any()


# Fresh random inputs in every dtype, odd and empty shapes, and non-contiguous layouts, for the two ops
# whose other tests take one float32 or float64 case: their opcheck, and weight_for_dense_kernel's
# values and gradient against the reference's select.
def laid_out(t, layout):
    """t's values in a non-contiguous layout where it has two dims ('transposed'), else t itself."""
    return t.t().contiguous().t() if layout == "transposed" and t.dim() == 2 else t


@needs_masked_weight
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (37, 53)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck_masked_weight(dtype, shape, layout, generator):
    weight, mask = random_case(generator, shape, dtype)
    # No NaN: opcheck compares eager and traced outputs without equal_nan (aten.relu fails it on a NaN too).
    weight = laid_out(weight.nan_to_num(nan=1.0, posinf=float("inf"), neginf=-float("inf")), layout)
    torch.library.opcheck(torch.ops.sparsekern.masked_weight.default, (weight, laid_out(mask, layout)))


needs_weight_for_dense_kernel = pytest.mark.skipif(
    _masked_linear_op._COMPILED_WEIGHT_FOR_DENSE_KERNEL is None, reason="the extension has no weight_for_dense_kernel")


@needs_weight_for_dense_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (5, 0), (1,), (7, 11), (3, 5, 7)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("zero_off_mask", [True, False])
@pytest.mark.parametrize("dense_grad", [False, True])
def test_weight_for_dense_kernel_matches_the_select(dtype, shape, layout, zero_off_mask, dense_grad, generator):
    weight, mask = random_case(generator, shape, dtype)
    upstream, _ = random_case(generator, shape, dtype)
    if zero_off_mask:  # the caller's promise
        weight = selected(weight, mask)
    weight = laid_out(weight, layout).requires_grad_()
    mask, upstream = laid_out(mask, layout), laid_out(upstream, layout)
    got = torch.ops.sparsekern.weight_for_dense_kernel(weight, mask, zero_off_mask, dense_grad)
    torch.testing.assert_close(got, selected(weight.detach(), mask), rtol=0, atol=0, equal_nan=True)
    got.backward(upstream)
    want = upstream if dense_grad else selected(upstream, mask)
    torch.testing.assert_close(weight.grad, want, rtol=0, atol=0, equal_nan=True)


@needs_weight_for_dense_kernel
@pytest.mark.parametrize("zero_off_mask", [True, False])
def test_gradcheck_weight_for_dense_kernel(zero_off_mask, generator):
    # With zero_off_mask only the active values are free, so the weight keeps the promise under
    # gradcheck's nudges (the masked gradient is the derivative only then).
    mask = torch.rand(5, 7, generator=generator) < 0.5
    mask[0, 0] = True
    if zero_off_mask:
        free = torch.randn(int(mask.sum()), generator=generator, dtype=torch.float64)
        make_weight = lambda values: torch.zeros(mask.shape, dtype=values.dtype).masked_scatter(mask, values)  # noqa: E731
    else:
        free, make_weight = torch.randn(5, 7, generator=generator, dtype=torch.float64), (lambda w: w)  # noqa: E731
    x = torch.randn(3, 7, generator=generator, dtype=torch.float64, requires_grad=True)

    def function(x, values):
        weight = torch.ops.sparsekern.weight_for_dense_kernel(make_weight(values), mask, zero_off_mask, False)
        return torch.nn.functional.linear(x, weight)
    assert torch.autograd.gradcheck(function, (x, free.requires_grad_()))



@needs_masked_linear_dense_kernel
@pytest.mark.parametrize("case", ["transposed", "sliced x", "no rows", "no inputs", "no outputs"])
@pytest.mark.parametrize("zero_off_mask", [True, False])
def test_opcheck_masked_linear_dense_kernel_odd_inputs(case, zero_off_mask, generator):
    rows, in_features, out_features = {"no rows": (0, 11, 7), "no inputs": (3, 0, 7),
                                       "no outputs": (3, 11, 0)}.get(case, (3, 11, 7))
    mask = torch.rand(out_features, in_features, generator=generator) < 0.5
    weight = torch.randn(out_features, in_features, generator=generator)
    weight = weight * mask if zero_off_mask else weight
    x = torch.randn(rows, 2 * in_features, generator=generator)
    x = x[:, ::2] if case == "sliced x" else x[:, :in_features].contiguous()
    if case == "transposed":
        weight, mask = laid_out(weight, "transposed"), laid_out(mask, "transposed")
    assert (case in ("transposed", "sliced x")) != (x.is_contiguous() and weight.is_contiguous())
    b = torch.randn(out_features, generator=generator).requires_grad_()
    torch.library.opcheck(torch.ops.sparsekern.masked_linear_dense_kernel.default,
                          (x.requires_grad_(), weight.requires_grad_(), mask, b, False, zero_off_mask))


@pytest.mark.parametrize("path", ["auto", "torch fallback"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_mask_in_place_is_the_references_select_in_place(path, dtype, shape, generator, monkeypatch):
    # ops.mask_in_place, OptG's masking of the dense weight gradient: the reference's select, +0.0 off the
    # mask whatever was there, inf and NaN included, with the extension's kernel and without it.
    if path == "torch fallback":
        monkeypatch.setattr(_masked_linear_op, "_COMPILED_MASK_GRAD", None)
    grad, mask = random_case(generator, shape, dtype)
    mask = mask.view(torch.uint8) != 0
    want = ops.reference.masked_weight(grad, mask)
    assert ops.mask_in_place(grad, mask) is grad
    torch.testing.assert_close(grad, want, rtol=0, atol=0, equal_nan=True)
    assert not grad[~mask].signbit().any()


@pytest.mark.parametrize("shape", [(3, 5, 7), (40,), (6, 4)], ids=["3-d", "1-d", "2-d"])
def test_mask_in_place_masks_in_place_under_torch_compile(shape, generator):
    # Traced, the select of a gradient that is not a 2-d weight's makes a new tensor: it must still land in the
    # tensor (it used to be dropped, leaving the tensor unmasked).
    grad, mask = random_case(generator, shape, torch.float32)
    mask = mask.view(torch.uint8) != 0
    want = ops.reference.masked_weight(grad, mask)
    torch._dynamo.reset()
    torch.compile(ops.mask_in_place)(grad, mask)
    torch.testing.assert_close(grad, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_mask_in_place_masks_a_strided_tensor_in_place(layout, generator):
    shape = (6, 5) if layout == "transposed" else (4, 3, 5, 5)
    grad, mask = random_case(generator, shape, torch.float32)
    mask = mask.view(torch.uint8) != 0
    if layout == "transposed":
        grad, mask = grad.t().contiguous().t(), mask.t().contiguous().t()
    else:
        grad = grad.contiguous(memory_format=torch.channels_last)
    want = ops.reference.masked_weight(grad, mask)
    strides = grad.stride()
    assert ops.mask_in_place(grad, mask) is grad and grad.stride() == strides
    torch.testing.assert_close(grad, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", ["0-d", "empty", "every other column", "transposed mask", "expanded mask",
                                  "every other column of a mask", "inference tensor in inference mode"])
def test_mask_in_place_takes_every_legal_layout_and_writes_nothing_else(case, generator):
    """Campaign 16: odd but legal tensors and masks give the reference's select, and a view leaves the rest of its
    base as it was."""
    base = torch.randn(4, 12, generator=generator)
    mask = torch.rand(4, 6, generator=generator) < 0.5
    tensor = base[:, :6]
    if case == "0-d":
        tensor, mask = base[0, 0], mask[0, 0]
    elif case == "empty":
        tensor, mask = base[:0, :6], mask[:0]
    elif case == "every other column":
        tensor = base[:, ::2]
    elif case == "transposed mask":
        mask = mask.T.contiguous().T
    elif case == "expanded mask":
        mask = mask[:1].expand(4, 6)
    elif case == "every other column of a mask":
        mask = torch.rand(4, 12, generator=generator)[:, ::2] < 0.5
    want, untouched = ops.reference.masked_weight(tensor, mask), base.clone()
    if case == "inference tensor in inference mode":
        with torch.inference_mode():
            base, tensor = base.clone(), base.clone()[:, :6]
            ops.mask_in_place(tensor, mask)
    else:
        assert ops.mask_in_place(tensor, mask) is tensor
    assert torch.equal(tensor, want)
    written = torch.zeros_like(base, dtype=torch.bool)
    if tensor.dim() and case != "inference tensor in inference mode":
        written.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset()).fill_(True)
        assert torch.equal(base[~written], untouched[~written])


def test_mask_in_place_allocates_nothing_mask_sized(generator):
    # masked_fill_(~mask, 0), which OptG took, allocates ~mask.
    from sparsekern.bench.cases.training_step import step_peak_bytes

    grad, mask = random_case(generator, (256, 256), torch.float32)
    mask = mask.view(torch.uint8) != 0
    ops.mask_in_place(grad, mask)   # the fallback's scratch chunk, allocated once per thread
    assert step_peak_bytes(lambda: ops.mask_in_place(grad, mask), torch.device("cpu")) < mask.numel()


@pytest.mark.parametrize("tensor, mask, error, match", [
    (torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.bool), TypeError, "tensor must be float"),
    (torch.ones(2, 3), torch.ones(2, 3), TypeError, "mask must be a bool tensor"),
    (torch.ones(2, 3), torch.ones(3, 2, dtype=torch.bool), ValueError, "mask must have the shape of tensor"),
    ([1.0], torch.ones(1, dtype=torch.bool), TypeError, "tensor must be a Tensor"),
])
def test_mask_in_place_refuses_bad_arguments_and_changes_nothing(tensor, mask, error, match):
    before = tensor.clone() if isinstance(tensor, torch.Tensor) else None
    with pytest.raises(error, match=match):
        ops.mask_in_place(tensor, mask)
    if before is not None:
        assert torch.equal(tensor, before)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_mask_in_place_counts_its_change_so_a_backward_that_saved_the_tensor_refuses(layout):
    # The C++ select wrote behind the version counter: a backward that had saved the tensor ran on the masked
    # values and gave a wrong gradient without a word (torch's own in-place ops make it refuse).
    x = torch.ones(3, 4, requires_grad=True)
    y = x * 1 if layout == "contiguous" else (x * 1).T.contiguous().T
    z = y * y   # saves y for its backward
    with torch.no_grad():
        ops.mask_in_place(y, torch.eye(3, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_mask_in_place_works_under_no_grad_and_in_inference_mode():
    mask = torch.eye(3, 4, dtype=torch.bool)
    weight = torch.nn.Parameter(torch.ones(3, 4))
    with torch.no_grad():
        ops.mask_in_place(weight, mask)
    with torch.inference_mode():
        inference = torch.ones(3, 4)
        ops.mask_in_place(inference, mask)
    assert torch.equal(weight.detach(), mask.float()) and torch.equal(inference, mask.float())
