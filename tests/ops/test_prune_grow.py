"""prune_grow: every backend returns the reference's mask and mutates weight and state exactly as it does."""
import pytest
import torch

import sparsekern
from sparsekern.ops import _extension, reference

from ..helpers import BACKENDS, DTYPES, random_scores, skip_interpreter_limits, strided


def case(generator, shape, score_dtype, kind, layout, density=0.3, weight_dtype=torch.float32):
    """weight, mask, prune_score, grow_score, state of one shape, all laid out as `layout` says."""
    weight = torch.randn(shape, generator=generator).to(weight_dtype)
    mask = torch.rand(shape, generator=generator) < density
    prune_score = random_scores(generator, shape, score_dtype, kind)
    grow_score = random_scores(generator, shape, score_dtype, kind)
    state = [torch.randn(shape, generator=generator), torch.randn(shape, generator=generator).to(weight_dtype)]
    tensors = [weight, mask, prune_score, grow_score, *state]
    weight, mask, prune_score, grow_score, *state = [strided(t, generator, layout) for t in tensors]
    return weight, mask, prune_score, grow_score, state


def swap_counts(mask, generator):
    active = int(mask.sum())
    most = min(active, mask.numel() - active)
    return sorted({0, most, int(torch.randint(0, most + 1, (), generator=generator))})


def assert_same_update(backend_args, reference_args, n):
    """Runs prune_grow on both argument sets and compares mask, weight and state bit for bit."""
    new = sparsekern.ops.prune_grow(*backend_args[:4], n, backend_args[4])
    expected = reference.prune_grow(*reference_args[:4], n, reference_args[4])
    assert new.dtype == torch.bool and new.shape == expected.shape
    assert torch.equal(new, expected), f"new mask differs at {(new != expected).nonzero().tolist()[:5]}"
    assert int(new.sum()) == int(backend_args[1].sum())
    for name, actual, wanted in [("weight", backend_args[0], reference_args[0])] + [
            (f"state[{i}]", a, w) for i, (a, w) in enumerate(zip(backend_args[4], reference_args[4]))]:
        torch.testing.assert_close(actual, wanted, rtol=0, atol=0, equal_nan=True, msg=f"{name} differs")


def clone_args(args):
    weight, mask, prune_score, grow_score, state = args
    return weight.clone(), mask.clone(), prune_score.clone(), grow_score.clone(), [s.clone() for s in state]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_equals_reference(backend, dtype, kind, layout, use_backend, generator):
    use_backend(backend, "prune_grow")
    skip_interpreter_limits(backend, dtype)
    for shape in [(9, 7), (1, 5), (4, 3, 5)]:
        args = case(generator, shape, dtype, kind, layout)
        mask_before = args[1].clone()
        for n in swap_counts(args[1], generator):
            backend_args, reference_args = clone_args(args), clone_args(args)
            assert_same_update(backend_args, reference_args, n)
            assert torch.equal(backend_args[1], mask_before), "mask must not be mutated"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.0, 1.0, 0.5])
def test_all_inactive_all_active_and_empty(backend, density, use_backend, generator):
    use_backend(backend, "prune_grow")
    for shape in [(6, 4), (0, 4)]:
        args = case(generator, shape, torch.float32, "ties", "contiguous", density=density)
        for n in swap_counts(args[1], generator):
            assert_same_update(clone_args(args), clone_args(args), n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float64])
def test_weight_dtype_other_than_scores(backend, weight_dtype, use_backend, generator):
    use_backend(backend, "prune_grow")
    skip_interpreter_limits(backend, weight_dtype)
    args = case(generator, (10, 10), torch.float16, "special", "transposed", weight_dtype=weight_dtype)
    for n in swap_counts(args[1], generator):
        assert_same_update(clone_args(args), clone_args(args), n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_may_be_the_weight_itself(backend, use_backend, generator):
    # Magnitude pruning often passes the weight (or a view of it) as the score: selection must
    # read it before any entry is zeroed.
    use_backend(backend, "prune_grow")
    weight = random_scores(generator, (8, 8), torch.float32, "ties")
    mask = torch.rand(8, 8, generator=generator) < 0.5
    expected_weight = weight.clone()
    expected = reference.prune_grow(expected_weight, mask, expected_weight.clone(), expected_weight.clone(), 3)
    new = sparsekern.ops.prune_grow(weight, mask, weight, weight, 3)
    assert torch.equal(new, expected)
    assert torch.equal(weight, expected_weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
def test_large_tensor_equals_reference(backend, kind, use_backend, generator):
    # Large enough for the compiled kernel's parallel blocks and 16-bit radix digits.
    if backend == "reference":
        pytest.skip("the reference is the expected answer")
    use_backend(backend, "prune_grow")
    skip_interpreter_limits(backend, size=260 * 300)
    args = case(generator, (260, 300), torch.float32, kind, "transposed", density=0.1)
    for n in swap_counts(args[1], generator):
        assert_same_update(clone_args(args), clone_args(args), n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_scores_never_raise_and_rank_last(backend, use_backend):
    use_backend(backend, "prune_grow")
    weight = torch.arange(1.0, 7.0)
    mask = torch.tensor([True, True, True, False, False, False])
    nan = float("nan")
    prune_score = torch.tensor([nan, 1.0, nan, 0.0, 0.0, 0.0])
    grow_score = torch.tensor([nan, nan, nan, nan, 5.0, nan])
    new = sparsekern.ops.prune_grow(weight, mask, prune_score, grow_score, 2, [torch.ones(6)])
    # Kept: position 1 (the only number); grown: position 4, then the first NaN not kept (position 0).
    assert new.tolist() == [True, True, False, False, True, False]
    assert weight.tolist() == [1.0, 2.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.skipif(_extension.kernel_missing("prune_grow", "cpu") is not None,
                    reason=f"no compiled CPU kernels: {_extension.kernel_missing('prune_grow', 'cpu')}")
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_opcheck_compiled_prune_grow(layout, generator):
    weight, mask, prune_score, grow_score, state = case(generator, (12, 9), torch.float32, "ties", layout)
    n = min(int(mask.sum()), int((~mask).sum())) // 2
    torch.library.opcheck(torch.ops.sparsekern.prune_grow.default, (weight, mask, prune_score, grow_score, n, state))
