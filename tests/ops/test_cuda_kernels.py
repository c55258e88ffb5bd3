"""The CUDA kernels (csrc/cuda) against the reference on fresh random inputs at real sizes.

Every test needs a CUDA device with the extension built for it; without one they are skipped.
Mask ops must match the reference bit for bit; sparse_linear within dtype tolerance.
"""
import pytest
import torch

from sparsekern import ops
from sparsekern.ops import _extension, reference

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


def test_topk_mask_non_contiguous_and_empty_list(generator):
    scores = [s.t() for s in scores_like(generator, [(300, 200), (64, 9)], torch.float32, "ties")]
    for g, w in zip(torch.ops.sparsekern.topk_mask(scores, 7000), reference.topk_mask(scores, 7000)):
        assert torch.equal(g, w)
    assert torch.ops.sparsekern.topk_mask([], 0) == []


@pytest.mark.parametrize("score_dtype", DTYPES)
@pytest.mark.parametrize("kind", ["continuous", "ties", "nan"])
@pytest.mark.parametrize("weight_dtype, state_dtype", [(torch.float32, torch.float32),
                                                        (torch.bfloat16, torch.float32),
                                                        (torch.float16, torch.float64)])
def test_prune_grow_matches_reference(generator, score_dtype, kind, weight_dtype, state_dtype):
    shape = (1024, 1153)  # not a multiple of the tile
    mask = (torch.rand(shape, generator=generator) < 0.2).cuda()
    active = int(mask.sum())
    prune_score, grow_score = scores_like(generator, [shape, shape], score_dtype, kind)
    for n in (0, 1, active // 3, min(active, mask.numel() - active)):
        weight = torch.randn(shape, generator=generator).to(weight_dtype).cuda()
        state = [torch.randn(shape, generator=generator).to(state_dtype).cuda() for _ in range(2)]
        weight_ref, state_ref = weight.clone(), [s.clone() for s in state]
        got = torch.ops.sparsekern.prune_grow(weight, mask, prune_score, grow_score, n, state)
        want = reference.prune_grow(weight_ref, mask, prune_score, grow_score, n, state_ref)
        assert torch.equal(got, want) and int(got.sum()) == active
        assert torch.equal(weight, weight_ref)
        for s, r in zip(state, state_ref):
            assert torch.equal(s, r)


def test_prune_grow_non_contiguous_weight_and_state(generator):
    shape = (300, 200)
    mask = (torch.rand(shape, generator=generator) < 0.5).cuda()
    prune_score, grow_score = scores_like(generator, [shape, shape], torch.float32, "ties")
    weight = torch.randn(shape[::-1], generator=generator).cuda().t()
    state = [torch.randn(shape[::-1], generator=generator).cuda().t()]
    weight_ref, state_ref = weight.clone(), [state[0].clone()]
    got = torch.ops.sparsekern.prune_grow(weight, mask, prune_score, grow_score, 1000, state)
    want = reference.prune_grow(weight_ref, mask, prune_score, grow_score, 1000, state_ref)
    assert torch.equal(got, want) and torch.equal(weight, weight_ref) and torch.equal(state[0], state_ref[0])


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2),
                                              (torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 2049)])
@pytest.mark.parametrize("batch", [1, 4, 16, 33])
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


def test_opcheck_cuda_ops(generator):
    scores = scores_like(generator, [(40, 30), (17,)], torch.float32, "ties")
    torch.library.opcheck(torch.ops.sparsekern.topk_mask.default, (scores, 100))
    torch.library.opcheck(torch.ops.sparsekern.topk_mask_per_tensor.default, (scores, [10, 3]))
    weight = torch.randn(40, 30, device="cuda")
    mask = scores[0] > 0
    torch.library.opcheck(torch.ops.sparsekern.prune_grow.default,
                          (weight, mask, scores[0].abs(), torch.randn(40, 30, device="cuda"), 5,
                           [torch.randn(40, 30, device="cuda")]))
    packed = ops.pack(weight, mask)
    torch.library.opcheck(torch.ops.sparsekern.sparse_linear.default,
                          (torch.randn(3, 30, device="cuda"), packed.bitmap, packed.values,
                           packed.chunk_offsets, None))
