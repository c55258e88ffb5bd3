"""prune_grow: every backend returns the reference's masks and mutates weights, state and masked
tensors exactly as it does, over lists of layers (layer and global scope) and in the one-layer form."""
import pytest
import torch

import sparsekern
from sparsekern.ops import _checks, _extension, flat_layers, new_masks_like, reference

from ..helpers import BACKENDS, DTYPES, random_scores, skip_interpreter_limits, strided

# Odd shapes, an empty tensor, a 1-D and a 4-D one.
SHAPES = [(9, 7), (0, 4), (13,), (3, 2, 3, 3), (1, 5)]
# Densities per layer: half, none, all, above 1/(1 + 0.3) (n = round(0.3 A) exceeds the inactive count).
DENSITIES = [0.5, 0.0, 1.0, 0.86, 0.3]


def laid_out(t, generator, layout):
    """t in a layout: 'contiguous', 'transposed', 'sliced' (helpers.strided) or 'channels_last' (4-D only)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    return strided(t, generator, layout)


def layer_list(generator, score_dtype, kind, layout, shapes=SHAPES, densities=DENSITIES, weight_dtypes=None):
    """(weights, masks, prune_scores, grow_scores, state, masked) of random layers, laid out as asked.

    Weights are of `weight_dtypes` in turn (default float32 and the score dtype), each layer has two,
    one or no state tensors, and one masked tensor (a gradient)."""
    weight_dtypes = weight_dtypes or [torch.float32, score_dtype]
    weights, masks, prune, grow, state, masked = [], [], [], [], [], []
    for i, (shape, density) in enumerate(zip(shapes, densities)):
        put = lambda t: laid_out(t, generator, layout)  # noqa: E731
        weights.append(put(torch.randn(shape, generator=generator).to(weight_dtypes[i % len(weight_dtypes)])))
        masks.append(put(torch.rand(shape, generator=generator) < density))
        prune.append(put(random_scores(generator, shape, score_dtype, kind)))
        grow.append(put(random_scores(generator, shape, score_dtype, kind)))
        state.append([put(torch.randn(shape, generator=generator).to(dtype))
                      for dtype in [torch.float32, torch.float64][:i % 3]])
        masked.append([put(torch.randn(shape, generator=generator))])
    return weights, masks, prune, grow, state, masked


def clone(args):
    """A deep copy of a layer list that keeps each tensor's strides."""
    def copy(t):
        out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
        return out.copy_(t)
    weights, masks, prune, grow, state, masked = args
    return ([copy(t) for t in weights], [copy(t) for t in masks], [copy(t) for t in prune], [copy(t) for t in grow],
            [[copy(t) for t in ts] for ts in state], [[copy(t) for t in ts] for ts in masked])


def swap_choices(masks, generator, global_scope):
    """Values of n to try: none, all active, and random ones."""
    counts = [int(m.sum()) for m in masks]
    if global_scope:
        total = sum(counts)
        return sorted({0, total, int(torch.randint(0, total + 1, (), generator=generator))})
    random = [int(torch.randint(0, c + 1, (), generator=generator)) for c in counts]
    return [[0] * len(counts), counts, random, [round(0.3 * c) for c in counts]]


def run_both(args, n, **flags):
    """Runs sparsekern.ops.prune_grow and the reference on copies of args; returns both (masks, args)."""
    ours, theirs = clone(args), clone(args)
    global_scope = not isinstance(n, list)
    new = sparsekern.ops.prune_grow(*ours[:4], n, state=ours[4], masked=ours[5], **flags)
    expected = reference.prune_grow(*theirs[:4], n if not global_scope else [n], global_scope, theirs[4], theirs[5],
                                    None, flags.get("prune_abs", False), flags.get("grow_abs", False))
    return (new, ours), (expected, theirs)


def assert_same_update(args, n, **flags):
    (new, ours), (expected, theirs) = run_both(args, n, **flags)
    assert len(new) == len(expected)
    for i, (a, e) in enumerate(zip(new, expected)):
        assert a.dtype == torch.bool and a.shape == e.shape, f"mask {i}: {a.dtype} {tuple(a.shape)}"
        assert torch.equal(a, e), f"mask {i} differs at {(a != e).nonzero().tolist()[:5]}"
    counts = [int(m.sum()) for m in args[1]]
    if isinstance(n, list):
        assert [int(m.sum()) for m in new] == counts
    else:
        assert sum(int(m.sum()) for m in new) == sum(counts)
    names = ["weights", "masks", "prune_scores", "grow_scores"]
    for name, actual, wanted in zip(names, ours[:4], theirs[:4]):
        for i, (a, w) in enumerate(zip(actual, wanted)):
            torch.testing.assert_close(a, w, rtol=0, atol=0, equal_nan=True, msg=f"{name}[{i}] differs")
    for name, actual, wanted in (("state", ours[4], theirs[4]), ("masked", ours[5], theirs[5])):
        for (i, a), (_, w) in zip(enumerate(flat_layers(actual)[0]), enumerate(flat_layers(wanted)[0])):
            torch.testing.assert_close(a, w, rtol=0, atol=0, equal_nan=True, msg=f"{name} tensor {i} differs")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced", "channels_last"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_list_equals_reference(backend, dtype, kind, layout, scope, use_backend, generator):
    if backend == "reference":
        pytest.skip("the reference is the expected answer")
    use_backend(backend, "prune_grow")
    skip_interpreter_limits(backend, dtype)
    args = layer_list(generator, dtype, kind, layout)
    masks_before = [m.clone() for m in args[1]]
    for n in swap_choices(args[1], generator, scope == "global"):
        assert_same_update(args, n)
    assert all(torch.equal(a, b) for a, b in zip(args[1], masks_before)), "masks must not be mutated"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("prune_abs, grow_abs", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_scores_ranked_by_magnitude(backend, scope, prune_abs, grow_abs, dtype, use_backend, generator):
    # Every key width: |x| is taken by clearing the sign bit (Triton 3.6 could not compile tl.abs of fp16).
    use_backend(backend, "prune_grow")
    skip_interpreter_limits(backend, dtype)
    args = layer_list(generator, dtype, "special", "transposed")
    for n in swap_choices(args[1], generator, scope == "global"):
        assert_same_update(args, n, prune_abs=prune_abs, grow_abs=grow_abs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_scores_may_be_the_tensors_written(backend, scope, use_backend, generator):
    # RigL passes each weight as its prune score and each gradient as its grow score (by magnitude),
    # and the same gradient as a masked tensor: every selection must read them before any write.
    use_backend(backend, "prune_grow")
    weights, masks, _, _, state, _ = layer_list(generator, torch.float32, "ties", "channels_last")
    grads = [random_scores(generator, w.shape, torch.float32, "ties") for w in weights]
    expected_weights, expected_grads = [w.clone() for w in weights], [g.clone() for g in grads]
    expected_state = [[s.clone() for s in ts] for ts in state]
    n = [round(0.3 * int(m.sum())) for m in masks] if scope == "layer" else round(0.3 * sum(int(m.sum()) for m in masks))
    expected = reference.prune_grow(expected_weights, masks, [w.clone() for w in expected_weights],
                                    [g.clone() for g in expected_grads], n if scope == "layer" else [n],
                                    scope == "global", expected_state, [[g] for g in expected_grads], None, True, True)
    new = sparsekern.ops.prune_grow(weights, masks, weights, grads, n, state=state, masked=[[g] for g in grads],
                                    prune_abs=True, grow_abs=True)
    assert all(torch.equal(a, b) for a, b in zip(new, expected))
    assert all(torch.equal(a, b) for a, b in zip(weights, expected_weights))
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))
    assert all(torch.equal(a, b) for ts, es in zip(state, expected_state) for a, b in zip(ts, es))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_score_sharing_memory_otherwise_is_read_first(backend, use_backend, generator):
    # A score that is another layer's weight, or a transposed view of its own, is copied first.
    use_backend(backend, "prune_grow")
    weights = [random_scores(generator, (6, 6), torch.float32, "ties") for _ in range(2)]
    masks = [torch.rand(6, 6, generator=generator) < 0.5 for _ in range(2)]
    prune, grow = [weights[1], weights[0].t()], [weights[0], weights[1].t()]
    expected_weights = [w.clone() for w in weights]
    expected = reference.prune_grow(expected_weights, masks, [p.clone() for p in prune], [g.clone() for g in grow],
                                    [4, 5], False, [[], []], [[], []])
    new = sparsekern.ops.prune_grow(weights, masks, prune, grow, [4, 5])
    assert all(torch.equal(a, b) for a, b in zip(new, expected))
    assert all(torch.equal(a, b) for a, b in zip(weights, expected_weights))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_mask_bytes_other_than_one_are_true(backend, scope, use_backend, generator):
    # uint8 data viewed as bool: torch reads every non-zero byte as True, and so must every backend.
    use_backend(backend, "prune_grow")
    raw = torch.randint(0, 4, (2, 30), generator=generator, dtype=torch.uint8) * 85  # 0, 85, 170, 255
    masks = [raw[0].view(torch.bool), raw[1].view(torch.bool).view(5, 6)]
    clean = [m.view(torch.uint8) != 0 for m in masks]
    weights = [torch.randn(m.shape, generator=generator) for m in masks]
    prune = [random_scores(generator, m.shape, torch.float32, "ties") for m in masks]
    grow = [random_scores(generator, m.shape, torch.float32, "ties") for m in masks]
    counts = [int(m.sum()) for m in clean]
    n = [c // 2 for c in counts] if scope == "layer" else sum(counts) // 2
    expected_weights = [w.clone() for w in weights]
    expected = reference.prune_grow(expected_weights, clean, prune, grow, n if scope == "layer" else [n],
                                    scope == "global", [[], []], [[], []])
    new = sparsekern.ops.prune_grow(weights, masks, prune, grow, n)
    assert [int(m.sum()) for m in new] == [int(m.sum()) for m in expected]
    assert all(torch.equal(a, b) for a, b in zip(new, expected))
    assert all(torch.equal(a, b) for a, b in zip(weights, expected_weights))


@pytest.mark.parametrize("backend", BACKENDS)
def test_swap_count_above_the_inactive_count_regrows_just_dropped(backend, use_backend, generator):
    # RigL's rule, uncapped: a layer at density 0.86 with r = 0.3 swaps n = round(r·A),
    # more than its inactive entries, so some just-dropped entries grow back (keeping their values).
    use_backend(backend, "prune_grow")
    numel = 200
    mask = torch.randperm(numel, generator=generator) < 172  # density 0.86
    active = int(mask.sum())
    n = round(0.3 * active)
    assert n > numel - active
    weight = torch.randn(numel, generator=generator)
    grow_score = torch.rand(numel, generator=generator)
    before = weight.clone()
    new = sparsekern.ops.prune_grow(weight, mask, weight.abs(), grow_score, n)
    assert torch.equal(new, reference.prune_grow([before.clone()], [mask], [before.abs()], [grow_score], [n],
                                                 False, [[]], [[]])[0])
    assert int(new.sum()) == active
    kept = reference.select(before.abs(), mask, active - n)
    dropped = mask & ~kept
    regrown = dropped & new
    assert int(dropped.sum()) == n and int(regrown.sum()) >= n - (numel - active) > 0
    assert torch.equal(weight[regrown], before[regrown]) and torch.all(weight[new & ~mask] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_one_layer_form_equals_reference(backend, dtype, layout, use_backend, generator):
    use_backend(backend, "prune_grow")
    skip_interpreter_limits(backend, dtype)
    for shape, density in [((9, 7), 0.3), ((1, 5), 0.6), ((4, 3, 5), 0.9), ((0, 4), 0.5)]:
        (weight,), (mask,), (prune,), (grow,), (state,), (masked,) = layer_list(
            generator, dtype, "special", layout, [shape], [density])
        state = state + [laid_out(torch.randn(shape, generator=generator), generator, layout)]
        active = int(mask.sum())
        for n in sorted({0, active, round(0.3 * active)}):
            ours = clone(([weight], [mask], [prune], [grow], [state], [masked]))
            theirs = clone(([weight], [mask], [prune], [grow], [state], [masked]))
            new = sparsekern.ops.prune_grow(ours[0][0], ours[1][0], ours[2][0], ours[3][0], n, ours[4][0],
                                            masked=ours[5][0])
            expected = reference.prune_grow(*theirs[:4], [n], False, theirs[4], theirs[5])[0]
            assert isinstance(new, torch.Tensor) and torch.equal(new, expected)
            for a, b in zip([ours[0][0], *ours[4][0], *ours[5][0]], [theirs[0][0], *theirs[4][0], *theirs[5][0]]):
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_large_list_equals_reference(backend, kind, scope, use_backend, generator):
    # Large enough for the compiled kernel's parallel blocks, 16-bit digits, candidate boundaries
    # (smooth scores) and exact ones (ties), and per-thread layers in layer scope.
    if backend == "reference":
        pytest.skip("the reference is the expected answer")
    use_backend(backend, "prune_grow")
    shapes = [(260, 300), (64, 16, 3, 3), (7000,), (3, 3), (90_000,)]
    skip_interpreter_limits(backend, size=sum(torch.Size(s).numel() for s in shapes))
    args = layer_list(generator, torch.float32, kind, "transposed", shapes, [0.1, 0.5, 0.9, 1.0, 0.05])
    for n in swap_choices(args[1], generator, scope == "global")[1:]:
        assert_same_update(args, n, prune_abs=kind == "normal")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_list(backend, use_backend):
    use_backend(backend, "prune_grow")
    assert sparsekern.ops.prune_grow([], [], [], [], []) == []
    assert sparsekern.ops.prune_grow([], [], [], [], 0) == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_wrong_active_count_is_refused_on_cpu_by_every_backend_with_nothing_changed(backend, scope, use_backend,
                                                                                         generator):
    # DST passes the counts it remembers; a mask written without its version changing makes them stale, and DST
    # recovers only from a refusal. The Triton backend (the interpreter, on CPU tensors) used the count unchecked.
    use_backend(backend, "prune_grow")
    weights, masks, prune, grow, state, masked = layer_list(generator, torch.float32, "ties", "contiguous")
    counts = [int(m.sum()) for m in masks]
    n = [c // 2 for c in counts] if scope == "layer" else sum(counts) // 2
    active = [c + (i == 0) for i, c in enumerate(counts)] if scope == "layer" else sum(counts) + 1
    before = [w.clone() for w in weights]
    name = r"active\[0\] is \d+ but masks\[0\] has" if scope == "layer" else r"active is \d+ but the masks have"
    with pytest.raises(ValueError, match=name):
        sparsekern.ops.prune_grow(weights, masks, prune, grow, n, state, masked, active=active)
    assert all(torch.equal(w, b) for w, b in zip(weights, before))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_swap_count_above_the_active_entries_is_refused_on_cpu_by_every_backend_with_nothing_changed(
        backend, scope, use_backend, generator):
    # Without a caller's count, prune_grow's checks leave counting to the CPU kernels; the Triton backend (the
    # interpreter, on CPU tensors) counted only a count it was given, and swapped entries that were not there.
    use_backend(backend, "prune_grow")
    weights, masks, prune, grow, state, masked = layer_list(generator, torch.float32, "ties", "contiguous")
    counts = [int(m.sum()) for m in masks]
    n = [c + (i == 0) for i, c in enumerate(counts)] if scope == "layer" else sum(counts) + 1
    before = [t.clone() for t in [*weights, *(t for ts in (*state, *masked) for t in ts)]]
    name = (r"n\[0\] must be in \[0, \d+\] \(masks\[0\] has" if scope == "layer"
            else r"n must be in \[0, \d+\] \(the masks")
    with pytest.raises(ValueError, match=name):
        sparsekern.ops.prune_grow(weights, masks, prune, grow, n, state, masked)
    after = [*weights, *(t for ts in (*state, *masked) for t in ts)]
    assert all(torch.equal(t, b) for t, b in zip(after, before))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("written, name", [("weight", r"weights\[1\]"), ("state", r"state\[1\]\[0\]"),
                                           ("masked", r"masked\[1\]\[0\]"), ("one-layer weight", "weight")])
def test_a_written_tensor_that_autograd_records_is_refused_by_every_backend_with_nothing_changed(
        backend, written, name, use_backend, generator):
    # prune_grow ran under torch.no_grad whatever the caller's grad mode: it wrote into a Parameter (or a result)
    # requiring grad behind autograd's back, where mask_in_place, and torch's in-place ops on such a Parameter, refuse.
    use_backend(backend, "prune_grow")
    weights, masks, prune, grow, state, masked = layer_list(generator, torch.float32, "normal", "contiguous",
                                                            shapes=[(6, 5), (9, 7)], densities=[0.5, 0.5])
    n = [round(0.3 * int(m.sum())) for m in masks]
    expected_weights = [w.clone() for w in weights]
    copies = [[[t.clone() for t in ts] for ts in per_layer] for per_layer in (state, masked)]
    expected_masks = reference.prune_grow(expected_weights, masks, prune, grow, n, False, *copies)
    tensors, index = (weights, 1) if written.endswith("weight") else ({"state": state, "masked": masked}[written][1], 0)
    tensors[index] = torch.nn.Parameter(tensors[index])   # layer 1's

    def update():
        if written == "one-layer weight":
            return [sparsekern.ops.prune_grow(weights[1], masks[1], prune[1], grow[1], n[1])]
        return sparsekern.ops.prune_grow(weights, masks, prune, grow, n, state, masked)

    written_tensors = [*weights, *(t for ts in (*state, *masked) for t in ts)]
    before = [t.detach().clone() for t in written_tensors]
    with pytest.raises(ValueError, match=f"^{name} requires grad, and autograd would not see it changed in place"):
        update()
    assert all(torch.equal(t, b) for t, b in zip(written_tensors, before))
    with torch.no_grad():   # as torch.optim's steps write parameters
        new = update()
    assert torch.equal(new[-1], expected_masks[1]) and torch.equal(weights[1].detach(), expected_weights[1])


compiled = pytest.mark.skipif(_extension.kernel_missing("prune_grow", "cpu") is not None,
                              reason=f"no compiled CPU kernels: {_extension.kernel_missing('prune_grow', 'cpu')}")


@compiled
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_opcheck_compiled_prune_grow(layout, scope, generator):
    weights, masks, prune, grow, state, masked = layer_list(generator, torch.float32, "ties", layout)
    counts = [int(m.sum()) for m in masks]
    n = [c // 2 for c in counts] if scope == "layer" else [sum(counts) // 2]
    active = counts if scope == "layer" else [sum(counts)]
    for hint in (None, active):
        torch.library.opcheck(torch.ops.sparsekern.prune_grow.default,
                              (weights, masks, prune, grow, n, scope == "global", *flat_layers(state),
                               *flat_layers(masked), hint, True, False, new_masks_like(masks)))


def shaped_scores(generator, numel, kind):
    """Scores that lead the compiled kernels' sampled windows astray or through their other paths."""
    if kind == "sorted":  # chunks are not alike: a sample of chunks predicts badly (radix fallback)
        return torch.arange(numel, dtype=torch.float32) / max(numel, 1)
    scores = torch.randn(numel, generator=generator)
    if kind == "clumped":  # one value held by most entries
        scores[torch.rand(numel, generator=generator) < 0.9] = 0.5
    elif kind == "zeros":  # many +-0.0, as the weights of just-grown entries
        scores[torch.rand(numel, generator=generator) < 0.4] = 0.0
        scores[torch.rand(numel, generator=generator) < 0.1] = -0.0
    elif kind == "nan":
        scores[torch.rand(numel, generator=generator) < 0.3] = float("nan")
    return scores


@pytest.mark.parametrize("kind", ["normal", "sorted", "clumped", "zeros", "nan"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_compiled_kernel_every_selection_path(kind, scope, use_backend, generator):
    # Layers large enough to be sampled (2^15 entries and more), at densities around 1/(1 + r).
    use_backend("compiled", "prune_grow")
    sizes = [300_000, 70_000, 5, 130_000]
    weights = [torch.randn(n, generator=generator) for n in sizes]
    masks = [torch.rand(n, generator=generator) < d for n, d in zip(sizes, [0.1, 0.8, 0.6, 0.4])]
    prune = [shaped_scores(generator, n, kind) for n in sizes]
    grow = [shaped_scores(generator, n, kind) for n in sizes]
    counts = [int(m.sum()) for m in masks]
    for n in ([round(0.3 * c) for c in counts], [c for c in counts], [1, 0, 1, 2]):
        if scope == "global":
            n = sum(n)
        for flags in ({}, {"prune_abs": True, "grow_abs": True}):
            assert_same_update((weights, masks, prune, grow, [[] for _ in sizes], [[] for _ in sizes]), n, **flags)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_slices_of_one_tensor_sharing_no_entry_are_updated_as_tensors_of_their_own(backend, scope, use_backend,
                                                                                   generator):
    # Column slices of one weight (and every other column), with their state and gradients sliced alike, interleave
    # their memory but share no entry: they were refused as sharing memory.
    use_backend(backend, "prune_grow")
    weight, state, grad = (torch.randn(9, 10, generator=generator) for _ in range(3))
    cuts = [lambda t: t[:, :4], lambda t: t[:, 4::2], lambda t: t[:, 5::2]]
    masks = [torch.rand(cut(weight).shape, generator=generator) < 0.5 for cut in cuts]
    prune, grow = ([random_scores(generator, m.shape, torch.float32, "ties") for m in masks] for _ in range(2))
    counts = [int(m.sum()) for m in masks]
    n = [round(0.3 * c) for c in counts] if scope == "layer" else round(0.3 * sum(counts))
    theirs = [[cut(t).clone() for cut in cuts] for t in (weight, state, grad)]
    expected = reference.prune_grow(theirs[0], masks, [p.clone() for p in prune], [g.clone() for g in grow],
                                    n if scope == "layer" else [n], scope == "global", [[s] for s in theirs[1]],
                                    [[g] for g in theirs[2]], None, False, False)
    new = sparsekern.ops.prune_grow([cut(weight) for cut in cuts], masks, prune, grow, n,
                                    state=[[cut(state)] for cut in cuts], masked=[[cut(grad)] for cut in cuts])
    assert all(torch.equal(a, b) for a, b in zip(new, expected))
    for tensor, wanted in zip((weight, state, grad), theirs):
        assert all(torch.equal(cut(tensor), part) for cut, part in zip(cuts, wanted))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_scores_sliced_from_a_written_tensor_without_sharing_an_entry_are_read_in_place(backend, scope, use_backend,
                                                                                        monkeypatch, generator):
    # RigL's magnitude criteria over column slices of one weight: each layer's prune score is its weight, its grow
    # score its gradient slice, both written by prune_grow. Each score's byte range interleaves the other layers'
    # written slices, with no entry in common: the scores were copied first, as though they shared memory.
    use_backend(backend, "prune_grow")
    weight, grad = (torch.randn(9, 10, generator=generator) for _ in range(2))
    cuts = [lambda t: t[:, :4], lambda t: t[:, 4::2], lambda t: t[:, 5::2]]
    masks = [torch.rand(cut(weight).shape, generator=generator) < 0.5 for cut in cuts]
    counts = [int(m.sum()) for m in masks]
    n = [round(0.3 * c) for c in counts] if scope == "layer" else round(0.3 * sum(counts))
    theirs = [[cut(t).clone() for cut in cuts] for t in (weight, grad)]
    expected = reference.prune_grow(theirs[0], masks, [w.clone() for w in theirs[0]], [g.clone() for g in theirs[1]],
                                    n if scope == "layer" else [n], scope == "global", [[] for _ in cuts],
                                    [[g] for g in theirs[1]], None, True, True)
    checked = []
    check = _checks.prune_grow_args
    monkeypatch.setattr(_checks, "prune_grow_args", lambda *a: (checked.append(check(*a)), checked[-1])[1])
    weights, grads = [cut(weight) for cut in cuts], [cut(grad) for cut in cuts]
    new = sparsekern.ops.prune_grow(weights, masks, weights, grads, n, masked=[[g] for g in grads], prune_abs=True,
                                    grow_abs=True)
    assert all(read is given for read, given in zip(checked[0].prune_scores + checked[0].grow_scores,
                                                    weights + grads))
    assert all(torch.equal(a, b) for a, b in zip(new, expected))
    for tensor, wanted in zip((weight, grad), theirs):
        assert all(torch.equal(cut(tensor), part) for cut, part in zip(cuts, wanted))


def test_fake_tensors_are_not_taken_to_share_memory(recwarn):
    # FakeTensorMode's tensors all read a data pointer of 0 (warning that this is deprecated) rather than raise:
    # weights, masks and state were refused as sharing memory.
    with torch._subclasses.fake_tensor.FakeTensorMode():
        weights, masks = [torch.empty(4, 5), torch.empty(3)], [torch.empty(4, 5, dtype=torch.bool),
                                                               torch.empty(3, dtype=torch.bool)]
        new = sparsekern.ops.prune_grow(weights, masks, [torch.empty(4, 5), torch.empty(3)],
                                        [torch.empty(4, 5), torch.empty(3)], [1, 0],
                                        state=[[torch.empty(4, 5)], []], masked=[[torch.empty(4, 5)], []],
                                        active=[3, 1])
        assert [mask.shape for mask in new] == [(4, 5), (3,)] and new[0].dtype == torch.bool
    assert not [warning for warning in recwarn if "data pointer" in str(warning.message)]
