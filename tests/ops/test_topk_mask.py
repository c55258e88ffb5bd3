"""topk_mask and topk_mask_per_tensor: every backend equals the reference, bit for bit."""
import pytest
import torch

import sparsekern
from sparsekern.ops import _extension, reference

from ..helpers import BACKENDS, DTYPES, random_scores, skip_interpreter_limits, strided

# Odd shapes, an empty tensor, a 1-D and a 4-D one.
SHAPES = [(7, 5), (0, 3), (13,), (3, 1, 4, 6), (1, 1)]


def score_list(generator, dtype, kind, layout, shapes=SHAPES):
    return [strided(random_scores(generator, s, dtype, kind), generator, layout) for s in shapes]


def assert_same_masks(actual, expected):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == torch.bool and a.shape == e.shape, f"mask {i}: {a.dtype} {tuple(a.shape)}"
        if not torch.equal(a, e):
            wrong = (a != e).nonzero().tolist()[:5]
            raise AssertionError(f"mask {i} differs from the reference at {wrong}")


def non_nan_counts(scores):
    return [int((~torch.isnan(s)).sum()) for s in scores]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_global_selection_equals_reference(backend, dtype, kind, layout, use_backend, generator):
    use_backend(backend, "topk_mask")
    skip_interpreter_limits(backend, dtype)
    scores = score_list(generator, dtype, kind, layout)
    originals = [s.clone() for s in scores]
    available = sum(non_nan_counts(scores))
    for k in sorted({k for k in (0, 1, available // 3, available - 1, available) if 0 <= k <= available}):
        assert_same_masks(sparsekern.ops.topk_mask(scores, k), reference.topk_mask(originals, k))
    for s, original in zip(scores, originals):
        torch.testing.assert_close(s, original, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_per_tensor_selection_equals_reference(backend, dtype, kind, layout, use_backend, generator):
    use_backend(backend, "topk_mask_per_tensor")
    skip_interpreter_limits(backend, dtype)
    scores = score_list(generator, dtype, kind, layout)
    counts = non_nan_counts(scores)
    for choose in (lambda c: 0, lambda c: c, lambda c: int(torch.randint(0, c + 1, (), generator=generator))):
        k = [choose(c) for c in counts]
        assert_same_masks(sparsekern.ops.topk_mask(scores, k), reference.topk_mask_per_tensor(scores, k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
def test_large_list_equals_reference(backend, dtype, kind, use_backend, generator):
    # Large enough for the compiled kernels' parallel blocks and 16-bit radix digits.
    if backend == "reference":
        pytest.skip("the reference is the expected answer")
    use_backend(backend, "topk_mask")
    shapes = [(300, 257), (33, 3, 3, 3), (20_001,)]
    skip_interpreter_limits(backend, dtype, size=sum(torch.Size(s).numel() for s in shapes))
    scores = score_list(generator, dtype, kind, "transposed", shapes)
    available = sum(non_nan_counts(scores))
    for k in (available // 10, available // 2 + 1, available):
        assert_same_masks(sparsekern.ops.topk_mask(scores, k), reference.topk_mask(scores, k))
    k = [c // 7 for c in non_nan_counts(scores)]
    assert_same_masks(sparsekern.ops.topk_mask(scores, k), reference.topk_mask_per_tensor(scores, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_equal_scores_go_to_lowest_positions(backend, use_backend):
    use_backend(backend, "topk_mask")
    scores = [torch.zeros(5), -torch.zeros(2, 3), torch.zeros(4)]
    masks = sparsekern.ops.topk_mask(scores, 7)
    assert [m.reshape(-1).tolist() for m in masks] == [[True] * 5, [True, True, False, False, False, False],
                                                        [False] * 4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinities_are_ordinary_and_nan_is_last(backend, use_backend):
    use_backend(backend, "topk_mask")
    scores = [torch.tensor([float("nan"), -float("inf"), 1.0, float("inf"), -float("inf")])]
    expected = {1: [0, 0, 0, 1, 0], 2: [0, 0, 1, 1, 0], 3: [0, 1, 1, 1, 0], 4: [0, 1, 1, 1, 1]}
    for k, mask in expected.items():
        assert sparsekern.ops.topk_mask(scores, k)[0].int().tolist() == mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_more_than_the_numbers_raises(backend, per_tensor, use_backend):
    use_backend(backend, "topk_mask_per_tensor" if per_tensor else "topk_mask")
    scores = [torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([float("nan")])]
    originals = [s.clone() for s in scores]
    k = [3, 0] if per_tensor else 3
    with pytest.raises(ValueError, match=r"k(\[0\])?=3 is more than the 2 non-NaN scores"):
        sparsekern.ops.topk_mask(scores, k)
    for s, original in zip(scores, originals):
        torch.testing.assert_close(s, original, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_list_and_empty_tensors(backend, use_backend):
    use_backend(backend, "topk_mask")
    assert sparsekern.ops.topk_mask([], 0) == []
    assert sparsekern.ops.topk_mask([], []) == []
    masks = sparsekern.ops.topk_mask([torch.empty(0), torch.empty(2, 0)], 0)
    assert [tuple(m.shape) for m in masks] == [(0,), (2, 0)]
    assert all(m.dtype == torch.bool for m in masks)


def test_the_comparison_catches_a_wrong_tie_break(generator):
    # A backend that broke ties by the higher position would select as many entries with the
    # same scores; the bit-for-bit comparison must still fail it.
    scores = [torch.tensor([1.0, 3.0, 1.0, 1.0])]
    expected = reference.topk_mask(scores, 2)
    wrong = [torch.tensor([False, True, False, True])]
    with pytest.raises(AssertionError, match="differs from the reference"):
        assert_same_masks(wrong, expected)


compiled = pytest.mark.skipif(_extension.kernel_missing("topk_mask", "cpu") is not None,
                              reason=f"no compiled CPU kernels: {_extension.kernel_missing('topk_mask', 'cpu')}")


@compiled
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck_compiled_topk_mask(layout, generator):
    scores = score_list(generator, torch.float32, "special", layout)
    available = sum(non_nan_counts(scores))
    torch.library.opcheck(torch.ops.sparsekern.topk_mask.default, (scores, available // 2))
    k = [c // 2 for c in non_nan_counts(scores)]
    torch.library.opcheck(torch.ops.sparsekern.topk_mask_per_tensor.default, (scores, k))


@compiled
@pytest.mark.parametrize("kind", ["normal", "sorted", "clumped", "zeros", "nan"])
def test_compiled_kernel_every_selection_path(kind, generator):
    # Tensors large enough to be sampled; scores that send the sampled windows astray, or hold one
    # value many times.
    sizes = [300_000, 70_000, 5]
    scores = []
    for numel in sizes:
        s = torch.arange(numel, dtype=torch.float32) if kind == "sorted" else torch.randn(numel, generator=generator)
        if kind == "clumped":
            s[torch.rand(numel, generator=generator) < 0.9] = 0.5
        if kind == "zeros":
            s[torch.rand(numel, generator=generator) < 0.4] = 0.0
        if kind == "nan":
            s[torch.rand(numel, generator=generator) < 0.3] = float("nan")
        scores.append(s)
    available = sum(non_nan_counts(scores))
    for k in (1, available // 7, available // 2, available):
        assert_same_masks(sparsekern.ops.topk_mask(scores, k), reference.topk_mask(scores, k))
    k = [c // 3 for c in non_nan_counts(scores)]
    assert_same_masks(sparsekern.ops.topk_mask(scores, k), reference.topk_mask_per_tensor(scores, k))
