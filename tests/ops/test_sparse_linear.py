"""pack / sparse_linear: the packed layout, the reference, and the C++ CPU kernel against it."""
import pytest
import torch

from sparsekern import checkpoint, ops
from sparsekern.ops import _extension, reference
from sparsekern.ops.packing import PackedWeight

needs_cpu_kernel = pytest.mark.skipif(
    _extension.kernel_missing("sparse_linear", "cpu") is not None,
    reason=f"no C++ sparse_linear: {_extension.kernel_missing('sparse_linear', 'cpu')}")

# (dtype, atol, rtol) against a float64 product of the same (rounded) inputs.
ALWAYS_SPARSE = {"dtypes": (torch.float32,), "max_density": 1.0, "min_rows": 0, "max_rows": 10**9}
NEVER_SPARSE = {"dtypes": (), "max_density": 0.0, "min_rows": 1, "max_rows": 0}
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-2, 1e-2), (torch.bfloat16, 1e-1, 2e-2)]


def random_layer(generator, out_features, in_features, density, dtype):
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    mask = torch.rand(out_features, in_features, generator=generator) < density
    return weight, mask


def expected(x, weight, mask, bias):
    dense = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype)).double()
    y = x.double() @ dense.T
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("shape", [(37, 100), (5, 1025), (1, 1), (3, 2100), (0, 8), (4, 0)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_pack_round_trip_is_exact(generator, shape, density, dtype):
    weight, mask = random_layer(generator, *shape, density, dtype)
    weight[~mask] = float("nan")  # whatever lies off the mask is dropped
    packed = ops.pack(weight, mask)
    assert packed.values.numel() == int(mask.sum())
    assert torch.equal(packed.unpack(), torch.where(mask, weight, torch.zeros((), dtype=dtype)))
    assert packed.shape == shape and packed.dtype == dtype


def test_pack_layout_matches_its_description():
    weight = torch.arange(1, 2 * 1100 + 1, dtype=torch.float32).reshape(2, 1100)
    mask = torch.zeros(2, 1100, dtype=torch.bool)
    mask[0, [0, 31, 32, 1050]] = True
    mask[1, [5]] = True
    packed = ops.pack(weight, mask)
    assert packed.bitmap.shape == (2, 35) and packed.chunk_offsets.shape == (2, 2)
    assert packed.bitmap[0, 0].item() == (1 | (1 << 31)) - 2**32  # bits 0 and 31 of word 0
    assert packed.bitmap[0, 1].item() == 1 and packed.bitmap[0, 1050 // 32].item() == 1 << (1050 % 32)
    assert packed.values.tolist() == [1, 32, 33, 1051, 1106]
    assert packed.chunk_offsets.tolist() == [[0, 3], [4, 5]]


@needs_cpu_kernel
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("batch", [0, 1, 4, 16])
def test_cpu_kernel_matches_reference(generator, dtype, atol, rtol, density, batch):
    weight, mask = random_layer(generator, 37, 1100, density, dtype)
    bias = torch.randn(37, generator=generator).to(dtype)
    x = torch.randn(batch, 1100, generator=generator).to(dtype)
    packed = ops.pack(weight, mask)
    y = torch.ops.sparsekern.sparse_linear(x, packed.bitmap, packed.values, packed.chunk_offsets, bias)
    want = reference.sparse_linear(x, packed.bitmap, packed.values, packed.chunk_offsets, bias)
    assert y.dtype == dtype and y.shape == (batch, 37)
    torch.testing.assert_close(y.double(), expected(x, weight, mask, bias), atol=atol, rtol=rtol)
    torch.testing.assert_close(y.double(), want.double(), atol=2 * atol, rtol=2 * rtol)


@needs_cpu_kernel
def test_cpu_kernel_float64_leading_dims_and_non_contiguous_x(generator):
    weight, mask = random_layer(generator, 9, 70, 0.4, torch.float64)
    packed = ops.pack(weight, mask)
    x = torch.randn(3, 70, 2, generator=generator, dtype=torch.float64).transpose(1, 2)  # (3, 2, 70)
    assert not x.is_contiguous()
    y = torch.ops.sparsekern.sparse_linear(x, packed.bitmap, packed.values, packed.chunk_offsets, None)
    assert y.shape == (3, 2, 9)
    torch.testing.assert_close(y, expected(x, weight, mask, None), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("limits_allow_sparse", [True, False])
def test_entry_point_matches_reference_on_both_paths(generator, monkeypatch, limits_allow_sparse):
    weight, mask = random_layer(generator, 20, 50, 0.2, torch.float32)
    packed = ops.pack(weight, mask)
    x = torch.randn(2, 3, 50, generator=generator)
    monkeypatch.setitem(ops.SPARSE_LINEAR_LIMITS, "cpu", ALWAYS_SPARSE if limits_allow_sparse else NEVER_SPARSE)
    assert ops.dense_is_faster(packed.density, 6, torch.float32, "cpu") is not limits_allow_sparse
    y = ops.sparse_linear(x, packed)
    torch.testing.assert_close(y.double(), expected(x, weight, mask, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "compiled"])
def test_each_backend_through_the_entry_point(generator, use_backend, monkeypatch, backend):
    use_backend(backend, "sparse_linear")
    monkeypatch.setitem(ops.SPARSE_LINEAR_LIMITS, "cpu", ALWAYS_SPARSE)
    weight, mask = random_layer(generator, 33, 65, 0.1, torch.float32)
    bias = torch.randn(33, generator=generator)
    packed = ops.pack(weight, mask)
    x = torch.randn(4, 65, generator=generator)
    torch.testing.assert_close(ops.sparse_linear(x, packed, bias).double(), expected(x, weight, mask, bias),
                               atol=1e-5, rtol=1e-5)


@needs_cpu_kernel
def test_opcheck(generator):
    weight, mask = random_layer(generator, 12, 40, 0.3, torch.float32)
    packed = ops.pack(weight, mask)
    for x, bias in [(torch.randn(4, 40, generator=generator), torch.randn(12, generator=generator)),
                    (torch.randn(2, 1, 40, generator=generator), None)]:
        torch.library.opcheck(torch.ops.sparsekern.sparse_linear.default,
                              (x, packed.bitmap, packed.values, packed.chunk_offsets, bias))


def test_packed_weight_survives_save_and_load(generator, tmp_path):
    weight, mask = random_layer(generator, 7, 45, 0.5, torch.bfloat16)
    packed = ops.pack(weight, mask)
    checkpoint.save({"layer": packed}, tmp_path / "packed.pt")
    loaded = checkpoint.load(tmp_path / "packed.pt")["layer"]  # weights_only=True
    assert isinstance(loaded, PackedWeight) and loaded.in_features == 45
    for name in ("bitmap", "values", "chunk_offsets"):
        assert torch.equal(getattr(loaded, name), getattr(packed, name))
    moved = loaded.to("cpu")
    assert torch.equal(moved.unpack(), packed.unpack())


def test_bad_inputs_raise_naming_the_argument(generator):
    weight, mask = random_layer(generator, 6, 10, 0.5, torch.float32)
    packed = ops.pack(weight, mask)
    x = torch.randn(2, 10)
    cases = [
        (lambda: ops.pack(weight[0], mask[0]), ValueError, "weight"),
        (lambda: ops.pack(weight, mask.float()), TypeError, "mask"),
        (lambda: ops.pack(weight, mask[:, :5]), ValueError, "mask"),
        (lambda: ops.pack(weight.int(), mask), TypeError, "weight"),
        (lambda: ops.sparse_linear(x, weight), TypeError, "packed"),
        (lambda: ops.sparse_linear(torch.randn(2, 11), packed), ValueError, "x"),
        (lambda: ops.sparse_linear(x.half(), packed), TypeError, "x"),
        (lambda: ops.sparse_linear(x, packed, torch.randn(5)), ValueError, "bias"),
        (lambda: ops.sparse_linear(x, packed, torch.randn(6).double()), TypeError, "bias"),
    ]
    for call, error, name in cases:
        with pytest.raises(error, match=name):
            call()


@needs_cpu_kernel
def test_kernel_checks_name_the_argument():
    weight, mask = random_layer(torch.Generator().manual_seed(0), 6, 40, 0.5, torch.float32)
    packed = ops.pack(weight, mask)
    op = torch.ops.sparsekern.sparse_linear
    with pytest.raises(ValueError, match="bitmap"):
        op(torch.randn(2, 70), packed.bitmap, packed.values, packed.chunk_offsets, None)
    with pytest.raises(TypeError, match="values"):
        op(torch.randn(2, 40), packed.bitmap, packed.values.double(), packed.chunk_offsets, None)
    with pytest.raises(ValueError, match="bias"):
        op(torch.randn(2, 40), packed.bitmap, packed.values, packed.chunk_offsets, torch.randn(3))


def test_dense_fallback_rule():
    assert ops.dense_is_faster(0.05, 4, torch.float32, "cpu") is False
    assert ops.dense_is_faster(0.05, 1, torch.float32, "cpu") is True  # MKL's GEMV wins at one row
    assert ops.dense_is_faster(0.1, 4, torch.float32, "cpu") is True
    assert ops.dense_is_faster(0.1, 4, torch.bfloat16, "cpu") is True
    assert ops.dense_is_faster(0.1, 1000, torch.float16, "cuda") is True
    assert ops.dense_is_faster(0.3, 16, torch.float16, "cuda") is False
    assert ops.dense_is_faster(0.1, 4, torch.float32, "meta") is True


def test_dense_fallback_unpacks_once_and_never_saves_the_copy(generator, tmp_path):
    weight, mask = random_layer(generator, 9, 33, 0.9, torch.float32)
    packed = ops.pack(weight, mask)
    x = torch.randn(64, 33, generator=generator)
    assert ops.dense_is_faster(packed.density, 64, x.dtype, "cpu")
    first = ops.sparse_linear(x, packed)
    kept = packed.dense()
    torch.testing.assert_close(ops.sparse_linear(x, packed), first)
    assert packed.dense() is kept and torch.equal(kept, packed.unpack())
    checkpoint.save(packed, tmp_path / "packed.pt")
    assert checkpoint.load(tmp_path / "packed.pt")._dense is None
