"""The CUDA kernels (csrc/cuda) against the reference on fresh random inputs at real sizes.

Every test needs a CUDA device with the extension built for it; without one they are skipped.
Mask ops must match the reference bit for bit; sparse_linear within dtype tolerance.
"""
import subprocess
import sys
import textwrap

import pytest
import torch

from sparsekern import ops
from sparsekern.ops import _extension, reference
from sparsekern.ops.packing import PackedWeight

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# ResNet-50-like layer sizes (a few of its 54), plus the awkward ones: tiny, empty, not tile-sized.
SIZES = [(64, 3, 7, 7), (256, 64, 1, 1), (512, 512, 3, 3), (2048, 512, 1, 1), (1000, 2048), (5,), (0,),
         (4097,)]


@pytest.fixture(autouse=True)
def cuda_kernels():
    for op in ("topk_mask", "topk_mask_per_tensor", "prune_grow", "sparse_linear"):
        why = _extension.kernel_missing(op, "cuda")
        if why is not None:
            pytest.skip(f"no CUDA kernel for {op}: {why}")


def scores_like(generator, shapes, dtype, kind):
    """Random scores on the GPU: 'continuous', 'ties' (few distinct values, +-0.0), or 'nan' (some NaN)."""
    tensors = []
    for shape in shapes:
        s = torch.randn(shape, generator=generator, dtype=torch.float64)
        if kind == "ties":
            s = (s * 2).round() / 2  # a handful of values; many -0.0 and +0.0
            s[torch.rand(shape, generator=generator) < 0.2] = -0.0
        if kind == "nan":
            s[torch.rand(shape, generator=generator) < 0.05] = float("nan")
            s[torch.rand(shape, generator=generator) < 0.01] = float("-inf")
        tensors.append(s.to(dtype).cuda())
    return tensors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["continuous", "ties", "nan"])
def test_topk_mask_global_matches_reference(generator, dtype, kind):
    scores = scores_like(generator, SIZES, dtype, kind)
    numbers = reference.count_numbers(scores)
    total = sum(s.numel() for s in scores)
    for k in sorted({0, 1, total // 10, total // 2, numbers}):
        got = torch.ops.sparsekern.topk_mask(scores, k)
        want = reference.topk_mask(scores, k)
        assert sum(int(g.sum()) for g in got) == k
        for g, w in zip(got, want):
            assert g.dtype == torch.bool and g.shape == w.shape
            assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_raises_when_k_exceeds_numbers(generator, dtype):
    scores = scores_like(generator, [(1000,), (3000,)], dtype, "nan")
    numbers = reference.count_numbers(scores)
    with pytest.raises(ValueError, match="non-NaN"):
        torch.ops.sparsekern.topk_mask(scores, numbers + 1)
    with pytest.raises(ValueError, match="non-NaN"):
        torch.ops.sparsekern.topk_mask_per_tensor(scores, [0, 3000])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["continuous", "ties", "nan"])
def test_topk_mask_per_tensor_matches_reference(generator, dtype, kind):
    scores = scores_like(generator, SIZES, dtype, kind)
    k = [int(torch.randint(0, int((~torch.isnan(s)).sum()) + 1, (), generator=generator)) for s in scores]
    got = torch.ops.sparsekern.topk_mask_per_tensor(scores, k)
    for g, w in zip(got, reference.topk_mask_per_tensor(scores, k)):
        assert torch.equal(g, w)


def test_topk_mask_ranks_and_writes_positions_past_int32():
    # No other test reaches 2^31 entries. One fp16 tensor of 2^31 + 4101 (a partial last tile),
    # -1 up to a point past 2^31 and 0 after it, with four positive entries on both sides of 2^31:
    # k = 7 takes the four and the three ties (zeros) at the lowest positions, all past 2^31, so
    # reads, tie ranks and mask writes must index in 64 bits. ~6.5 GB of GPU memory; entries are
    # set and read one by one (basic indexing), so that only the op meets the size.
    n = 2**31 + 4101
    first_zero = 2**31 + 100
    scores = torch.full((n,), -1.0, dtype=torch.float16, device="cuda")
    scores[first_zero:] = 0.0
    best = {7: 1.0, 2**31 + 5: 2.0, 2**31 + 300: 3.0, n - 1: 4.0}
    for position, value in best.items():
        scores[position] = value
    (mask,) = torch.ops.sparsekern.topk_mask([scores], 7)
    del scores
    assert int(mask.sum()) == 7
    assert all(bool(mask[p]) for p in [*best, first_zero, first_zero + 1, first_zero + 2])


def test_topk_mask_non_contiguous_and_empty_list(generator):
    scores = [s.t() for s in scores_like(generator, [(300, 200), (64, 9)], torch.float32, "ties")]
    scores.append(scores_like(generator, [(64, 32, 3, 3)], torch.float32, "ties")[0].contiguous(
        memory_format=torch.channels_last))
    for g, w in zip(torch.ops.sparsekern.topk_mask(scores, 7000), reference.topk_mask(scores, 7000)):
        assert torch.equal(g, w)
    # An empty list cannot reach the CUDA kernel (the dispatcher picks it by a tensor's device; the entry point,
    # sparsekern.ops.topk_mask, answers [] itself): a list of empty tensors does.
    empty = [torch.empty(0, device="cuda"), torch.empty(3, 0, device="cuda")]
    got = torch.ops.sparsekern.topk_mask(empty, 0)
    assert [(g.shape, g.dtype, g.device.type) for g in got] == [((0,), torch.bool, "cuda"),
                                                                 ((3, 0), torch.bool, "cuda")]


def cuda_layers(generator, shapes, densities, score_dtype, kind, weight_dtype=torch.float32, state_dtype=torch.float32):
    """(weights, masks, prune_scores, grow_scores, state, masked) of layers on the GPU."""
    weights, masks, state, masked = [], [], [], []
    for shape, density in zip(shapes, densities):
        weights.append(torch.randn(shape, generator=generator).to(weight_dtype).cuda())
        masks.append((torch.rand(shape, generator=generator) < density).cuda())
        state.append([torch.randn(shape, generator=generator).to(state_dtype).cuda()])
        masked.append([torch.randn(shape, generator=generator).cuda()])
    prune = scores_like(generator, shapes, score_dtype, kind)
    grow = scores_like(generator, shapes, score_dtype, kind)
    return weights, masks, prune, grow, state, masked


def each(args, function):
    """function applied to every tensor of a layer list (tensors, and per-layer lists of tensors)."""
    return [[function(t) for t in x] if not x or not isinstance(x[0], list) else [[function(t) for t in ts] for ts in x]
            for x in args]


def run_prune_grow(args, n, global_scope, **flags):
    """The CUDA op and the reference (on copies) of one update; asserts they agree bit for bit."""
    from sparsekern.ops import flat_layers, new_masks_like
    weights, masks, prune, grow, state, masked = args
    copies = ([w.clone() for w in weights], [[t.clone() for t in ts] for ts in state],
              [[t.clone() for t in ts] for ts in masked])
    want = reference.prune_grow(copies[0], masks, prune, grow, n, global_scope, copies[1], copies[2], None,
                                flags.get("prune_abs", False), flags.get("grow_abs", False))
    got = new_masks_like(masks)
    torch.ops.sparsekern.prune_grow(weights, masks, prune, grow, n, global_scope, *flat_layers(state),
                                    *flat_layers(masked), None, flags.get("prune_abs", False),
                                    flags.get("grow_abs", False), got)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for actual, wanted in ((weights, copies[0]), (flat_layers(state)[0], flat_layers(copies[1])[0]),
                           (flat_layers(masked)[0], flat_layers(copies[2])[0])):
        for a, w in zip(actual, wanted):
            assert torch.equal(a, w)


@pytest.mark.parametrize("score_dtype", DTYPES)
@pytest.mark.parametrize("kind", ["continuous", "ties", "nan"])
@pytest.mark.parametrize("weight_dtype, state_dtype", [(torch.float32, torch.float32),
                                                        (torch.bfloat16, torch.float32),
                                                        (torch.float16, torch.float64)])
@pytest.mark.parametrize("global_scope", [False, True])
def test_prune_grow_matches_reference(generator, score_dtype, kind, weight_dtype, state_dtype, global_scope):
    # ResNet-50-like layers, densities around 1/(1 + r), one layer dense, one empty tensor.
    densities = [0.1, 0.2, 0.5, 0.9, 0.05, 1.0, 0.3, 0.5]
    args = cuda_layers(generator, SIZES, densities, score_dtype, kind, weight_dtype, state_dtype)
    counts = [int(m.sum()) for m in args[1]]
    choices = [[0] * len(counts), [round(0.3 * c) for c in counts], counts]
    for n in choices:
        run_prune_grow(each(args, torch.clone), [sum(n)] if global_scope else n, global_scope)


def offset_by_one(t):
    """A contiguous copy of t whose data starts one element past an aligned address: the kernels'
    16-byte vector loads must not be taken for it."""
    return torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_of_misaligned_contiguous_scores_matches_reference(generator, dtype):
    scores = [offset_by_one(s) for s in scores_like(generator, [(4096 * 3 + 7,), (33, 65)], dtype, "ties")]
    for k in (1, 4096, reference.count_numbers(scores) // 2):
        for got, want in zip(torch.ops.sparsekern.topk_mask(scores, k), reference.topk_mask(scores, k)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced", "offset"])
@pytest.mark.parametrize("global_scope", [False, True])
def test_prune_grow_any_strides_in_place(generator, layout, global_scope):
    shapes = [(64, 32, 3, 3), (128, 64, 1, 1), (300, 200, 1, 1)]
    args = cuda_layers(generator, shapes, [0.1, 0.5, 0.2], torch.float32, "ties")

    def lay(t):
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        if layout == "transposed":
            return t.transpose(0, 1).contiguous().transpose(0, 1)
        if layout == "offset":
            return offset_by_one(t)
        wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]

    args = each(args, lay)
    counts = [int(m.sum()) for m in args[1]]
    n = [sum(counts) // 3] if global_scope else [c // 3 for c in counts]
    run_prune_grow(args, n, global_scope, prune_abs=True, grow_abs=True)


def test_prune_grow_reads_any_nonzero_mask_byte_as_true(generator):
    raw = (torch.randint(0, 4, (4096 * 3 + 5,), generator=generator, dtype=torch.uint8) * 85).cuda()
    args = cuda_layers(generator, [raw.shape], [0.5], torch.float32, "ties")
    clean = raw != 0
    weights, _, prune, grow, state, masked = args
    copies = [w.clone() for w in weights], [[t.clone() for t in ts] for ts in state]
    n = [int(clean.sum()) // 2]
    run_prune_grow((copies[0], [clean], prune, grow, copies[1], [[]]), n, False)
    from sparsekern.ops import new_masks_like
    got = new_masks_like([raw])
    torch.ops.sparsekern.prune_grow(weights, [raw.view(torch.bool)], prune, grow, n, False, state[0], [0], [], [],
                                    None, False, False, got)
    assert int(got[0].sum()) == int(clean.sum())
    assert torch.equal(weights[0], copies[0][0])


def test_prune_grow_checks_an_empty_weight_list_as_the_cpu_does():
    # The glue once returned on an empty weight list before checking anything: stray layers passed.
    mask = torch.ones(5, dtype=torch.bool, device="cuda")
    with pytest.raises(ValueError, match="one entry per layer"):
        torch.ops.sparsekern.prune_grow([], [mask], [], [], [], False, [], [], [], [], None, False, False, [])
    with pytest.raises(ValueError, match=r"state_layers\[0\] must be in \[0, 0\)"):
        torch.ops.sparsekern.prune_grow([], [], [], [], [], False, [mask.float()], [0], [], [], None, False, False,
                                        [])


@pytest.mark.parametrize("global_scope", [False, True])
def test_prune_grow_does_not_synchronize_and_is_captured_in_a_graph(generator, global_scope):
    from sparsekern.ops import flat_layers, new_masks_like
    args = cuda_layers(generator, SIZES[:5], [0.1, 0.2, 0.5, 0.9, 0.3], torch.float32, "continuous")
    weights, masks, prune, grow, state, masked = args
    counts = [int(m.sum()) for m in masks]
    n = [sum(counts) // 4] if global_scope else [c // 4 for c in counts]
    saved = [w.clone() for w in weights], [[t.clone() for t in ts] for ts in state]
    new = new_masks_like(masks)
    call = lambda: torch.ops.sparsekern.prune_grow(weights, masks, prune, grow, n, global_scope, *flat_layers(state),
                                                   *flat_layers(masked), None, False, False, new)  # noqa: E731
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    eager = [m.clone() for m in new], [w.clone() for w in weights]
    for w, s in zip(weights, saved[0]):
        w.copy_(s)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        call()
    for w, s in zip(weights, saved[0]):
        w.copy_(s)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(new, eager[0]))
    assert all(torch.equal(a, b) for a, b in zip(weights, eager[1]))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2),
                                              (torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 2049)])
@pytest.mark.parametrize("batch", [1, 2, 4, 7, 16, 33, 300])  # 300: several launches of summed slabs
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_sparse_linear_matches_reference(generator, dtype, tolerance, shape, batch, density):
    weight = torch.randn(shape, generator=generator).to(dtype).cuda()
    mask = (torch.rand(shape, generator=generator) < density).cuda()
    bias = torch.randn(shape[0], generator=generator).to(dtype).cuda()
    x = torch.randn(batch, shape[1], generator=generator).to(dtype).cuda()
    packed = ops.pack(weight, mask)
    y = torch.ops.sparsekern.sparse_linear(x, packed.bitmap, packed.values, packed.chunk_offsets, bias)
    want = reference.masked_linear(x.double(), weight.double(), mask, bias.double())
    assert not torch.isnan(y).any()  # every output written (torch.empty may hold NaN)
    error = (y.double() - want).norm() / want.norm().clamp_min(1e-30)
    assert error < tolerance, f"relative error {error:.2e}"


def sparse_linear_case(generator, rows, out_features, in_features, density=0.3, dtype=torch.float16):
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    mask = torch.rand(out_features, in_features, generator=generator) < density
    x = torch.randn(rows, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype)
    return ops.pack(weight, mask).to("cuda"), x.cuda(), bias.cuda(), weight, mask


def test_sparse_linear_more_rows_than_a_grid_dimension(generator):
    # 16 * 65535 rows is the most one launch's grid.y covers; the kernel once overflowed it.
    packed, x, bias, weight, mask = sparse_linear_case(generator, 16 * 65535 + 37, 9, 70, dtype=torch.float32)
    y = torch.ops.sparsekern.sparse_linear(x, packed.bitmap, packed.values, packed.chunk_offsets, bias)
    want = reference.masked_linear(x.double(), weight.double().cuda(), mask.cuda(), bias.double())
    assert ((y.double() - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_without_columns_gives_the_bias(bias):
    b = torch.arange(6.0, device="cuda") if bias else None
    y = torch.ops.sparsekern.sparse_linear(torch.randn(2, 3, 0, device="cuda"), torch.zeros(6, 0, dtype=torch.int32,
                                           device="cuda"), torch.zeros(0, device="cuda"),
                                           torch.zeros(6, 0, dtype=torch.int64, device="cuda"), b)
    assert y.shape == (2, 3, 6) and torch.equal(y.cpu(), (b.cpu() if bias else torch.zeros(6)).expand(2, 3, 6))


@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_sparse_linear_is_deterministic(generator, rows):
    packed, x, bias, _, _ = sparse_linear_case(generator, rows, 300, 5000)
    first = torch.ops.sparsekern.sparse_linear(x, packed.bitmap, packed.values, packed.chunk_offsets, bias)
    for _ in range(3):
        again = torch.ops.sparsekern.sparse_linear(x, packed.bitmap, packed.values, packed.chunk_offsets, bias)
        assert torch.equal(again, first)


def test_sparse_linear_entry_point_runs_the_kernel(generator, monkeypatch):
    monkeypatch.setitem(ops.SPARSE_LINEAR_LIMITS, "cuda", {"dtypes": (torch.float16,), "min_rows": 1,
                                                           "max_density_by_rows": ((10**9, 1.0),)})
    packed, x, bias, weight, mask = sparse_linear_case(generator, 4, 100, 3000)
    y = ops.sparse_linear(x, packed, bias)
    want = reference.masked_linear(x.double(), weight.double().cuda(), mask.cuda(), bias.double())
    assert ((y.double() - want).norm() / want.norm()) < 2e-3


def test_packed_weight_checks_its_contents_on_the_gpu(generator):
    packed, _, _, _, _ = sparse_linear_case(generator, 1, 10, 2000)
    with pytest.raises(ValueError, match="chunk_offsets disagree"):
        PackedWeight(packed.bitmap, packed.values, packed.chunk_offsets + 1, 2000)
    with pytest.raises(ValueError, match="values has"):
        PackedWeight(packed.bitmap, packed.values[:-1], packed.chunk_offsets, 2000)


def test_sparse_linear_glue_refuses_what_it_can_see(generator):
    packed, x, _, _, _ = sparse_linear_case(generator, 2, 10, 100)
    op = torch.ops.sparsekern.sparse_linear
    with pytest.raises(ValueError, match="values is on cpu"):
        op(x, packed.bitmap, packed.values.cpu(), packed.chunk_offsets, None)
    with pytest.raises(ValueError, match="bitmap must have 4 words"):
        op(x, packed.bitmap[:, :3], packed.values, packed.chunk_offsets, None)


@pytest.mark.parametrize("tamper", ["offsets + 10**15", "values[:3]", "offsets + 1", "padding bit"])
def test_sparse_linear_kernel_stops_on_contents_that_disagree(tamper):
    # Checking contents on the host would synchronize every call, so the kernel checks them as it
    # reads and stops with a device-side assertion, which ends the CUDA context: a child process.
    script = textwrap.dedent(f"""
        import os
        import torch
        from sparsekern import ops
        packed = ops.pack(torch.randn(8, 70), torch.rand(8, 70) < 0.5)
        bitmap, values, offsets = packed.bitmap.cuda(), packed.values.cuda(), packed.chunk_offsets.cuda()
        tamper = {tamper!r}
        if tamper == "padding bit":
            bitmap[3, -1] |= 1 << 20
        else:
            values = values[:3] if tamper == "values[:3]" else values
            offsets = offsets + (10**15 if tamper == "offsets + 10**15" else 1 if tamper == "offsets + 1" else 0)
        try:
            torch.ops.sparsekern.sparse_linear(torch.randn(2, 70, device="cuda"), bitmap, values, offsets, None)
            torch.cuda.synchronize()
            print("not stopped")
        except RuntimeError as error:
            print("stopped:", error, flush=True)
        os._exit(0)  # no teardown in a CUDA context that an assertion ended
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "stopped:" in result.stdout and "device-side assert" in result.stdout, result.stdout + result.stderr[-2000:]


def test_opcheck_cuda_ops(generator):
    from sparsekern.ops import new_masks_like
    scores = scores_like(generator, [(40, 30), (17,)], torch.float32, "ties")
    torch.library.opcheck(torch.ops.sparsekern.topk_mask.default, (scores, 100))
    torch.library.opcheck(torch.ops.sparsekern.topk_mask_per_tensor.default, (scores, [10, 3]))
    weights = [torch.randn(40, 30, device="cuda"), torch.randn(17, device="cuda")]
    masks = [s > 0 for s in scores]
    for global_scope, n in ((False, [5, 2]), (True, [7])):
        torch.library.opcheck(torch.ops.sparsekern.prune_grow.default,
                              (weights, masks, [s.abs() for s in scores], [torch.randn_like(w) for w in weights], n,
                               global_scope, [torch.randn(40, 30, device="cuda")], [0], [torch.randn(17, device="cuda")],
                               [1], None, True, False, new_masks_like(masks)))
    packed = ops.pack(weights[0], masks[0])
    torch.library.opcheck(torch.ops.sparsekern.sparse_linear.default,
                          (torch.randn(3, 30, device="cuda"), packed.bitmap, packed.values,
                           packed.chunk_offsets, None))
