"""pack / sparse_linear: the packed layout, the reference, and the C++ CPU kernel against it."""
import dataclasses
import importlib.util
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from sparsekern import checkpoint, ops
from sparsekern.ops import _extension, reference
from sparsekern.ops.packing import PackedWeight

needs_cpu_kernel = pytest.mark.skipif(
    _extension.kernel_missing("sparse_linear", "cpu") is not None,
    reason=f"no C++ sparse_linear: {_extension.kernel_missing('sparse_linear', 'cpu')}")

# (dtype, atol, rtol) against a float64 product of the same (rounded) inputs.
ALWAYS_SPARSE = {"dtypes": (torch.float32,), "min_rows": 0, "max_density_by_rows": ((10**9, 1.0),)}
NEVER_SPARSE = {"dtypes": (), "min_rows": 1, "max_density_by_rows": ()}
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-2, 1e-2), (torch.bfloat16, 1e-1, 2e-2)]


def random_layer(generator, out_features, in_features, density, dtype):
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    mask = torch.rand(out_features, in_features, generator=generator) < density
    return weight, mask


def expected(x, weight, mask, bias):
    dense = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype)).double()
    y = x.double() @ dense.T
    return y + bias.double() if bias is not None else y


def test_importing_this_file_packs_nothing(monkeypatch):
    """Each weight here is packed by a test that uses it: packed at import (parametrize values), one failure of pack or
    of the PackedWeight checks errored the whole file instead of failing the tests that use them."""
    def refuse(*args, **kwargs):
        raise AssertionError("a weight packed at import")
    monkeypatch.setattr(ops, "pack", refuse)
    monkeypatch.setattr(PackedWeight, "__post_init__", refuse)
    spec = importlib.util.spec_from_file_location("test_sparse_linear_imported_again", __file__)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


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
@pytest.mark.parametrize("batch", [0, 1, 4, 5, 16, 21])   # each row tile of the CPU kernel, partly filled too
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



@needs_cpu_kernel
@pytest.mark.parametrize("dtype, atol, rtol", [*DTYPES, (torch.float64, 1e-12, 1e-12)])
@pytest.mark.parametrize("shape", [(1, 1), (5, 1025), (3, 33), (0, 8), (4, 0)])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_cpu_kernel_odd_shapes_every_dtype_and_opcheck(generator, dtype, atol, rtol, shape, layout):
    # Fresh inputs of odd and empty shapes in every dtype, x contiguous or every other column of a wider one.
    weight, mask = random_layer(generator, *shape, 0.4, dtype)
    bias = torch.randn(shape[0], generator=generator).to(dtype)
    x = torch.randn(3, 2 * shape[1], generator=generator).to(dtype)
    x = x[:, ::2] if layout == "sliced" else x[:, :shape[1]].contiguous()
    packed = ops.pack(weight, mask)
    args = (x, packed.bitmap, packed.values, packed.chunk_offsets, bias)
    y = torch.ops.sparsekern.sparse_linear(*args)
    assert y.dtype == dtype and y.shape == (3, shape[0])
    torch.testing.assert_close(y.double(), expected(x, weight, mask, bias), atol=atol, rtol=rtol)
    torch.testing.assert_close(y.double(), reference.sparse_linear(*args).double(), atol=2 * atol, rtol=2 * rtol)
    torch.library.opcheck(torch.ops.sparsekern.sparse_linear.default, args)

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


def test_packed_weight_repr_summarises_rather_than_prints_its_tensors(generator):
    weight, mask = random_layer(generator, 64, 300, 0.1, torch.float32)
    packed = ops.pack(weight, mask)
    kept = int(mask.sum())
    assert repr(packed) == (f"PackedWeight(shape=(64, 300), kept={kept}, density={kept / (64 * 300):.4g}, "
                            "dtype=torch.float32, device=cpu)")


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
    assert ops.dense_is_faster(0.1, 16, torch.float16, "cuda") is False
    assert ops.dense_is_faster(0.3, 16, torch.float16, "cuda") is True  # the batch tile's x reads cost most
    assert ops.dense_is_faster(0.5, 1, torch.bfloat16, "cuda") is False
    assert ops.dense_is_faster(0.5, 4, torch.float16, "cuda") is True
    assert ops.dense_is_faster(0.3, 8, torch.float16, "cuda") is True
    assert ops.dense_is_faster(0.1, 4, torch.float32, "meta") is True


def test_the_path_counts_the_rows_of_every_leading_dim_of_x(generator):
    # x (1, 4, 64) is 4 rows, which the CPU's sparse kernel takes at density 1/64; counted by x's first dim alone
    # (1 row) it went to the dense fallback, which makes and keeps the unpacked weight.
    mask = torch.zeros(8, 64, dtype=torch.bool)
    mask[:, 0] = True
    packed = ops.pack(torch.randn(8, 64, generator=generator), mask)
    assert not ops.dense_is_faster(packed.density, 4, torch.float32, "cpu")
    ops.sparse_linear(torch.randn(1, 4, 64, generator=generator), packed)
    assert packed._dense is None


def test_dense_fallback_unpacks_once_and_never_saves_the_copy(generator, tmp_path):
    weight, mask = random_layer(generator, 9, 33, 0.9, torch.float32)
    packed = ops.pack(weight, mask)
    x = torch.randn(64, 33, generator=generator)
    assert ops.dense_is_faster(packed.density, 64, x.dtype, "cpu")
    checkpoint.save(packed, tmp_path / "before.pt")
    first = ops.sparse_linear(x, packed)
    kept = packed.dense()
    torch.testing.assert_close(ops.sparse_linear(x, packed), first)
    assert packed.dense() is kept and torch.equal(kept, packed.unpack())
    checkpoint.save(packed, tmp_path / "packed.pt")
    # The file holds no more than before the copy was made (loading drops a saved copy: that alone tells nothing).
    assert (tmp_path / "packed.pt").stat().st_size == (tmp_path / "before.pt").stat().st_size
    assert checkpoint.load(tmp_path / "packed.pt")._dense is None


# ------------------------------------------------------------------ packed weights that disagree
# A PackedWeight is checked wherever one is made (constructor, .to(), unpickling) and the compiled op
# checks the raw tensors it indexes by: a bitmap that disagrees with values or chunk_offsets once made
# the C++ kernel read out of bounds (garbage for short values, a segfault for huge offsets).

def valid_fields():
    """A packed 6 x 1100 float32 weight (35 words, 2 chunks per row) with a bit in every region."""
    weight, mask = random_layer(torch.Generator().manual_seed(5), 6, 1100, 0.3, torch.float32)
    mask[:, [0, 1023, 1024, 1099]] = True
    mask[2, 1090:1100] = True  # columns that in_features=1090 would not have
    packed = ops.pack(weight, mask)
    return {"bitmap": packed.bitmap, "values": packed.values, "chunk_offsets": packed.chunk_offsets,
            "in_features": 1100}


def offsets_with(index, value):
    def change(fields):
        offsets = fields["chunk_offsets"].clone()
        offsets[index] = value
        return {**fields, "chunk_offsets": offsets}
    return change


def with_bit(row, column, on=True):
    def change(fields):
        bitmap = fields["bitmap"].clone()
        word, bit = divmod(column, 32)
        value = torch.tensor(1 << bit, dtype=torch.int64).to(torch.int32) if bit < 31 else torch.tensor(-2**31)
        bitmap[row, word] = bitmap[row, word] | value if on else bitmap[row, word] & ~value
        return {**fields, "bitmap": bitmap}
    return change


def replaced(**changes):
    return lambda fields: {**fields, **{name: make(fields) for name, make in changes.items()}}


def strided_copy(t):
    """t's values in a non-contiguous tensor."""
    return torch.stack([t, t], -1)[..., 0]


# Whose contents disagree with the bitmap: the op sees these as raw tensors too.
BAD_CONTENTS = {
    "values one short": (replaced(values=lambda f: f["values"][:-1]), "values"),
    "values three entries": (replaced(values=lambda f: f["values"][:3]), "values"),
    "values one too many": (replaced(values=lambda f: torch.cat([f["values"], f["values"][:1]])), "values"),
    "values empty": (replaced(values=lambda f: f["values"][:0]), "values"),
    "offsets shifted by one": (replaced(chunk_offsets=lambda f: f["chunk_offsets"] + 1), "chunk_offsets"),
    "offsets huge": (replaced(chunk_offsets=lambda f: f["chunk_offsets"] + 10**15), "chunk_offsets"),
    "offset negative": (offsets_with((3, 0), -5), "chunk_offsets"),
    "offset most negative": (offsets_with((0, 0), -2**63), "chunk_offsets"),
    "offset overflowing": (offsets_with((2, 1), 2**63 - 1), "chunk_offsets"),
    "offset off by one mid-row": (lambda f: offsets_with((3, 1), int(f["chunk_offsets"][3, 1]) + 1)(f),
                                  "chunk_offsets"),
    "offsets decreasing": (replaced(chunk_offsets=lambda f: f["chunk_offsets"].flip(0).contiguous()),
                           "chunk_offsets"),
    "offsets all zero": (replaced(chunk_offsets=lambda f: torch.zeros_like(f["chunk_offsets"])), "chunk_offsets"),
    "bit added in the last chunk": (with_bit(5, 1098), "values"),
    "bit cleared in a first chunk": (with_bit(0, 0, on=False), "chunk_offsets"),
    "padding bit set": (with_bit(1, 1100), "bitmap"),
    "sign bit of the last word set": (with_bit(4, 1119), "bitmap"),
    "every bit set": (replaced(bitmap=lambda f: torch.full_like(f["bitmap"], -1)), "bitmap"),
}
# Whose types, shapes or placement are wrong.
BAD_LAYOUTS = {
    "bitmap int64": (replaced(bitmap=lambda f: f["bitmap"].long()), TypeError, "bitmap"),
    "bitmap float": (replaced(bitmap=lambda f: f["bitmap"].float()), TypeError, "bitmap"),
    "bitmap a list": (replaced(bitmap=lambda f: f["bitmap"].tolist()), TypeError, "bitmap"),
    "values int32": (replaced(values=lambda f: f["values"].int()), TypeError, "values"),
    "values bool": (replaced(values=lambda f: f["values"] > 0), TypeError, "values"),
    "values None": (replaced(values=lambda f: None), TypeError, "values"),
    "values sparse": (replaced(values=lambda f: f["values"].to_sparse()), TypeError, "values"),
    "offsets int32": (replaced(chunk_offsets=lambda f: f["chunk_offsets"].int()), TypeError, "chunk_offsets"),
    "offsets float64": (replaced(chunk_offsets=lambda f: f["chunk_offsets"].double()), TypeError, "chunk_offsets"),
    "in_features float": (replaced(in_features=lambda f: 1100.0), TypeError, "in_features"),
    "in_features bool": (replaced(in_features=lambda f: True), TypeError, "in_features"),
    "in_features a string": (replaced(in_features=lambda f: "1100"), TypeError, "in_features"),
    "in_features negative": (replaced(in_features=lambda f: -1), ValueError, "in_features"),
    "in_features one word more": (replaced(in_features=lambda f: 1100 + 32), ValueError, "bitmap"),
    "in_features fewer words": (replaced(in_features=lambda f: 1000), ValueError, "bitmap"),
    "in_features cutting marked columns": (replaced(in_features=lambda f: 1090), ValueError, "bitmap"),
    "bitmap 1-D": (replaced(bitmap=lambda f: f["bitmap"].reshape(-1)), ValueError, "bitmap"),
    "bitmap 3-D": (replaced(bitmap=lambda f: f["bitmap"][None]), ValueError, "bitmap"),
    "values 2-D": (replaced(values=lambda f: f["values"][None]), ValueError, "values"),
    "offsets rows short": (replaced(chunk_offsets=lambda f: f["chunk_offsets"][:-1]), ValueError, "chunk_offsets"),
    "offsets one chunk per row": (replaced(chunk_offsets=lambda f: f["chunk_offsets"][:, :1]), ValueError,
                                  "chunk_offsets"),
    "offsets flat": (replaced(chunk_offsets=lambda f: f["chunk_offsets"].reshape(-1)), ValueError, "chunk_offsets"),
    "bitmap non-contiguous": (replaced(bitmap=lambda f: strided_copy(f["bitmap"])), ValueError, "bitmap"),
    "values non-contiguous": (replaced(values=lambda f: strided_copy(f["values"])), ValueError, "values"),
    "values expanded": (replaced(values=lambda f: f["values"][:1].expand(f["values"].numel())), ValueError,
                        "values"),
    "offsets non-contiguous": (replaced(chunk_offsets=lambda f: strided_copy(f["chunk_offsets"])), ValueError,
                               "chunk_offsets"),
    "values on another device": (replaced(values=lambda f: f["values"].to("meta")), ValueError, "values"),
    "offsets on another device": (replaced(chunk_offsets=lambda f: f["chunk_offsets"].to("meta")), ValueError,
                                  "chunk_offsets"),
}
TAMPERED = {**{name: (change, ValueError, field) for name, (change, field) in BAD_CONTENTS.items()}, **BAD_LAYOUTS}


def assert_names(raised, field):
    # sparsekern.checkpoint.load words a failure as "<path>: cannot load this checkpoint: <Error>: <message>".
    message = re.sub(r"^.*: cannot load this checkpoint: \w+: ", "", str(raised.value))
    assert re.match(rf"{field}\b", message), f"{raised.value!r} does not name {field}"


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_packed_weight_that_disagrees_is_refused_where_it_is_made(case):
    change, error, field = TAMPERED[case]
    with pytest.raises(error) as raised:
        PackedWeight(**change(valid_fields()))
    assert_names(raised, field)


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_checkpoint_is_refused_on_load(case, tmp_path):
    # sparsekern.checkpoint.load is meant to be safe for untrusted files: a file holds whatever the
    # state of the pickled object said, so write the tampered fields past the constructor's checks.
    if case in ("values sparse", "values on another device", "offsets on another device"):
        pytest.skip("torch.save cannot write this field (sparse layout, meta storage)")
    change, error, field = TAMPERED[case]
    packed = ops.pack(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool))
    for name, value in change(valid_fields()).items():
        object.__setattr__(packed, name, value)
    checkpoint.save({"layer": packed}, tmp_path / "tampered.pt")
    # A damaged file is a ValueError naming it, whatever the unpickled object raised (its TypeError included).
    with pytest.raises(ValueError) as raised:
        checkpoint.load(tmp_path / "tampered.pt")
    assert_names(raised, field)
    assert isinstance(raised.value.__cause__, error)


# Each state made by its test (as every packed weight here): made at import, one failure would fail the file.
SAVED_STATES = {
    "a field missing": lambda: {"bitmap": 0, "values": 0},
    "a field that is not one": lambda: {**valid_fields(), "weight": torch.zeros(3)},
    "not a dict": lambda: (valid_fields(), None),
}


@pytest.mark.parametrize("state", list(SAVED_STATES))
def test_a_saved_state_must_hold_exactly_the_fields(state):
    with pytest.raises(ValueError, match="saved PackedWeight"):
        PackedWeight.__new__(PackedWeight).__setstate__(SAVED_STATES[state]())


def test_a_saved_dense_copy_is_never_loaded(tmp_path):
    packed = PackedWeight(**valid_fields())
    object.__setattr__(packed, "_dense", torch.full(packed.shape, 7.0))
    state = {**packed.__getstate__(), "_dense": torch.full(packed.shape, 7.0)}
    loaded = PackedWeight.__new__(PackedWeight)
    loaded.__setstate__(state)
    assert loaded._dense is None and torch.equal(loaded.dense(), packed.unpack())


def test_to_refuses_a_bool_device_naming_the_argument():
    # True is an int to Python, and torch.device(True) raised its own TypeError naming no argument.
    with pytest.raises(TypeError, match="device must be a torch.device, a device name or an index, got bool"):
        PackedWeight(**valid_fields()).to(True)


def test_fields_cannot_be_reassigned_after_the_checks():
    packed = PackedWeight(**valid_fields())
    with pytest.raises(dataclasses.FrozenInstanceError):
        packed.values = packed.values[:3]


def test_short_values_no_longer_give_garbage():
    # The reported defect: values three entries long gave outputs around 3e34.
    fields = valid_fields()
    with pytest.raises(ValueError, match="values has 3 entries but bitmap marks"):
        PackedWeight(**{**fields, "values": fields["values"][:3]})


EDGE_LAYOUTS = {
    "no columns": lambda: {"bitmap": torch.zeros(6, 0, dtype=torch.int32), "values": torch.zeros(0),
                           "chunk_offsets": torch.zeros(6, 0, dtype=torch.int64), "in_features": 0},
    "no rows": lambda: {"bitmap": torch.zeros(0, 35, dtype=torch.int32), "values": torch.zeros(0),
                        "chunk_offsets": torch.zeros(0, 2, dtype=torch.int64), "in_features": 1100},
    "in_features a 0-d tensor": lambda: {**valid_fields(), "in_features": torch.tensor(1100)},
}


@pytest.mark.parametrize("fields", list(EDGE_LAYOUTS))
def test_edge_layouts_that_agree_are_accepted(fields):
    packed = PackedWeight(**EDGE_LAYOUTS[fields]())
    assert isinstance(packed.in_features, int) and packed.unpack().shape == packed.shape


def test_nan_and_inf_values_are_allowed(generator):
    fields = valid_fields()
    values = fields["values"].clone()
    values[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    packed = PackedWeight(**{**fields, "values": values})
    x = torch.randn(2, 1100, generator=generator)
    assert torch.isnan(ops.sparse_linear(x, packed)[:, 0]).all()


def test_meta_packed_weights_are_accepted_without_contents():
    packed = PackedWeight(**valid_fields()).to("meta")
    assert packed.device.type == "meta" and packed.shape == (6, 1100)


def test_to_checks_again_after_an_in_place_change():
    packed = PackedWeight(**valid_fields())
    packed.chunk_offsets.add_(10**15)
    with pytest.raises(ValueError, match="chunk_offsets"):
        packed.to("cpu")


@needs_cpu_kernel
@pytest.mark.parametrize("case", list(BAD_CONTENTS))
def test_the_compiled_op_refuses_raw_tensors_that_disagree(case, generator):
    change, field = BAD_CONTENTS[case]
    fields = change(valid_fields())
    x = torch.randn(3, 1100, generator=generator)
    with pytest.raises(ValueError) as raised:
        torch.ops.sparsekern.sparse_linear(x, fields["bitmap"], fields["values"], fields["chunk_offsets"], None)
    assert_names(raised, field)


@needs_cpu_kernel
def test_the_entry_point_refuses_a_packed_weight_changed_in_place(generator, monkeypatch):
    monkeypatch.setitem(ops.SPARSE_LINEAR_LIMITS, "cpu", ALWAYS_SPARSE)
    packed = PackedWeight(**valid_fields())
    packed.values.resize_(3)
    with pytest.raises(ValueError, match="values has 3 entries"):
        ops.sparse_linear(torch.randn(2, 1100, generator=generator), packed)


def _set_padding_bit(packed):
    packed.bitmap[1, -1] |= 1 << (packed.in_features % 32)


# Changes made in place after packing, each with the field its refusal names: the compiled kernel checks again what
# it indexes by; unpacking (the dense fallback's, on every backend) and the reference failed naming no field, or
# took a value resized to one for every kept entry.
CHANGED_IN_PLACE = {
    "values resized to one": (lambda packed: packed.values.resize_(1), "values"),
    "values resized to three": (lambda packed: packed.values.resize_(3), "values"),
    "offsets shifted": (lambda packed: packed.chunk_offsets.add_(1000), "chunk_offsets"),
    "offsets resized": (lambda packed: packed.chunk_offsets.resize_(0), "chunk_offsets"),
    "padding bit set": (_set_padding_bit, "bitmap"),
    "every bit set": (lambda packed: packed.bitmap.fill_(-1), "bitmap"),
    "bitmap resized": (lambda packed: packed.bitmap.resize_(1, 1), "bitmap"),
}


@pytest.mark.parametrize("case", list(CHANGED_IN_PLACE))
def test_unpacking_refuses_a_packed_weight_changed_in_place_naming_the_field(case):
    change, field = CHANGED_IN_PLACE[case]
    packed = PackedWeight(**valid_fields())
    change(packed)
    for unpack in (packed.unpack, packed.dense):
        with pytest.raises(ValueError) as raised:
            unpack()
        assert_names(raised, field)


@pytest.mark.parametrize("backend", ["reference", "compiled"])
@pytest.mark.parametrize("path", ["sparse", "dense"])
@pytest.mark.parametrize("case", list(CHANGED_IN_PLACE))
def test_every_backend_and_path_refuses_a_packed_weight_changed_in_place(case, path, backend, use_backend,
                                                                        monkeypatch, generator):
    use_backend(backend, "sparse_linear")
    monkeypatch.setitem(ops.SPARSE_LINEAR_LIMITS, "cpu", ALWAYS_SPARSE if path == "sparse" else NEVER_SPARSE)
    change, field = CHANGED_IN_PLACE[case]
    packed = PackedWeight(**valid_fields())
    change(packed)
    with pytest.raises(ValueError) as raised:
        ops.sparse_linear(torch.randn(2, 1100, generator=generator), packed)
    assert_names(raised, field)


@needs_cpu_kernel
def test_huge_offsets_are_refused_not_a_segfault():
    # The reported defect crashed the interpreter, so it runs in a child process.
    script = textwrap.dedent("""
        import torch
        from sparsekern import ops
        weight, mask = torch.randn(8, 64), torch.rand(8, 64) < 0.5
        packed = ops.pack(weight, mask)
        try:
            torch.ops.sparsekern.sparse_linear(torch.randn(2, 64), packed.bitmap, packed.values,
                                               packed.chunk_offsets + 10**15, None)
        except ValueError as error:
            print("refused:", error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "refused: chunk_offsets disagree with bitmap" in result.stdout


@needs_cpu_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_kernel_with_no_columns_gives_the_bias(bias):
    bitmap, offsets = torch.zeros(6, 0, dtype=torch.int32), torch.zeros(6, 0, dtype=torch.int64)
    b = torch.arange(6.0) if bias else None
    y = torch.ops.sparsekern.sparse_linear(torch.randn(2, 3, 0), bitmap, torch.zeros(0), offsets, b)
    assert y.shape == (2, 3, 6) and torch.equal(y, (b if bias else torch.zeros(6)).expand(2, 3, 6))


@pytest.mark.parametrize("fake", ["weight", "mask"])
def test_pack_refuses_fake_tensors_by_name(fake):
    # The packed sizes are the mask's count of kept entries: torch raised DynamicOutputShapeException from inside.
    tensors = {"weight": torch.randn(4, 40), "mask": torch.ones(4, 40, dtype=torch.bool)}
    tensors[fake] = torch._subclasses.fake_tensor.FakeTensorMode().from_tensor(tensors[fake])
    with pytest.raises(ValueError, match=rf"^{fake} is a fake tensor \(FakeTensorMode\), which holds no values"):
        ops.pack(tensors["weight"], tensors["mask"])


def test_the_dense_fallback_answers_in_the_packed_weights_dtype_under_autocast(generator):
    # As the sparse kernels do: autocast's dtype made the output's depend on the path.
    weight, mask = torch.randn(6, 40, generator=generator), torch.rand(6, 40, generator=generator) < 0.5
    x = torch.randn(1, 40, generator=generator)
    packed = ops.pack(weight, mask)
    assert ops.dense_is_faster(packed.density, 1, x.dtype, "cpu")
    with torch.autocast("cpu", torch.bfloat16):
        got = ops.sparse_linear(x, packed)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x @ torch.where(mask, weight, 0).T)


@pytest.mark.parametrize("rows", [1, 4])   # the dense fallback (1 row), the sparse kernel where it runs (4)
def test_autocast_casts_an_x_of_its_dtype_to_the_packed_weights(generator, rows):
    # What autocast gives a layer in inference mode after one it ran in bfloat16: refused with a TypeError before.
    weight, mask = torch.randn(6, 40, generator=generator), torch.rand(6, 40, generator=generator) < 0.05
    x = torch.randn(rows, 40, generator=generator).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        got = ops.sparse_linear(x, ops.pack(weight, mask))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x.float() @ torch.where(mask, weight, 0).T)
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16 but the packed weight has torch.float32"):
        ops.sparse_linear(x, ops.pack(weight, mask))   # outside autocast a dtype that differs is a mistake


def test_under_autocast_float64_is_refused_and_torch_func_grad_of_a_cast_x_too(generator):
    # Review 28: the cast came before the derivative check, which then saw a detached copy: torch.func.grad gave
    # zeros; and a float64 x, which autocast leaves alone, was cut to float32.
    weight, mask = torch.randn(6, 40, generator=generator), torch.rand(6, 40, generator=generator) < 0.05
    packed = ops.pack(weight, mask)
    x = torch.randn(4, 40, generator=generator)
    with torch.autocast("cpu", torch.bfloat16):
        with pytest.raises(TypeError, match="x has dtype torch.float64"):
            ops.sparse_linear(x.double(), packed)
        with pytest.raises(RuntimeError, match="sparse_linear"):
            torch.func.grad(lambda x: ops.sparse_linear(x, packed).sum())(x.bfloat16())
