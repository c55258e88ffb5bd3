"""sparsekern::mask_grad_, the C++ in-place masking of the dense-kernel path's weight gradient, against
torch's out-of-place product, and the torch fallback that runs without the extension."""
import pytest
import torch

from sparsekern.nn import SparseLinear
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
    return grad * (mask.view(torch.uint8) != 0).to(grad.dtype)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_product_with_the_mask(dtype, shape, generator):
    grad, mask = random_case(generator, shape, dtype)
    want = expected(grad, mask)
    torch.ops.sparsekern.mask_grad_(grad, mask)
    torch.testing.assert_close(grad, want, rtol=0, atol=0, equal_nan=True)
    # Off the mask exactly 0 where the gradient was finite (a negative one gives -0.0, still == 0).
    off = mask.view(torch.uint8) == 0
    assert (grad[off & want.isfinite()] == 0).all()


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


@needs_cpu_kernel
def test_opcheck(generator):
    for shape, dtype in [((37, 53), torch.float32), ((0,), torch.float64), ((5, 3), torch.bfloat16)]:
        grad, mask = random_case(generator, shape, dtype)
        torch.library.opcheck(torch.ops.sparsekern.mask_grad_.default, (grad, mask))


@needs_cpu_kernel
def test_the_dense_path_masks_the_weight_gradient_with_the_kernel(generator):
    layer = SparseLinear(30, 20)
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.3)
    with torch.profiler.profile() as profile:
        layer(torch.randn(4, 30, generator=generator)).sum().backward()
    assert "sparsekern::mask_grad_" in {event.name for event in profile.events()}
    assert not layer.weight.grad[~layer.mask].any()


@pytest.mark.parametrize("compiled", [True, False], ids=["kernel", "torch fallback"])
def test_either_way_of_masking_gives_the_same_gradient(compiled, generator, monkeypatch):
    if compiled and _masked_linear_op._COMPILED_MASK_GRAD is None:
        pytest.skip("the extension has no mask_grad_")
    if not compiled:
        monkeypatch.setattr(_masked_linear_op, "_COMPILED_MASK_GRAD", None)
    # More entries than one chunk (128K) of the fallback, and an inf that must give NaN off the mask.
    grad, mask = random_case(generator, (300, 500), torch.float32)
    want = expected(grad, mask)
    assert _masked_linear_op._mask_in_place(grad, mask) is grad
    torch.testing.assert_close(grad, want, rtol=0, atol=0, equal_nan=True)
