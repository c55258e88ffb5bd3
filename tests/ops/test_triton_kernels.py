"""The Triton kernels against sparsekern.ops.reference: under TRITON_INTERPRET=1 on CPU tensors (small
shapes, no bfloat16: the interpreter computes it wrongly), and at real sizes on a GPU (`gpu` mark)."""
import numpy as np
import pytest
import torch

from sparsekern.ops import _backend, reference

from ..helpers import reversed_dims

pytest.importorskip("triton")

CPU = torch.device("cpu")
INTERPRETER_DTYPES = [
    torch.float32, torch.float16, torch.float64,
    pytest.param(torch.bfloat16, marks=pytest.mark.skip(reason="Triton interpreter lacks bf16")),
]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Largest ||out - ref|| / ||ref|| against a float64 reference, per input dtype.
RELATIVE_ERROR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2, torch.float64: 1e-12}


def _import_kernels():
    from sparsekern.ops import _triton_ops
    from sparsekern.triton_kernels import masked_linear, prune_grow, topk_mask
    return _triton_ops, masked_linear, topk_mask, prune_grow


@pytest.fixture(scope="module")
def kernels():
    """The Triton modules, for tests on CPU tensors (which need the interpreter)."""
    reason = _backend.triton_missing("cpu")
    if reason is not None:
        pytest.skip(reason)
    return _import_kernels()


@pytest.fixture(scope="module")
def masked_linear_kernels(kernels):
    """The Triton modules, for masked_linear tests on CPU tensors (whose loops some interpreters cannot run)."""
    reason = _backend.triton_missing_with_loaded_loops("cpu")
    if reason is not None:
        pytest.skip(reason)
    return kernels


@pytest.fixture(scope="module")
def gpu_kernels():
    return _import_kernels()


def _scores_with_ties(shape, dtype, generator, device=CPU):
    """Small integers (many ties), with NaN, -0.0 and infinities sprinkled in."""
    scores = torch.randint(-6, 6, shape, generator=generator).to(dtype)
    flat = scores.view(-1)
    if flat.numel() >= 10:
        flat[::7] = float("nan")
        flat[3::11] = -0.0
        flat[1] = float("-inf")
        flat[5] = float("inf")
    return scores.to(device)


def _close(out, expected, dtype):
    out, expected = out.double().cpu(), expected.double().cpu()
    assert not torch.isnan(out).any()
    scale = expected.norm().clamp_min(1e-30)
    assert (out - expected).norm() / scale <= RELATIVE_ERROR[dtype], ((out - expected).abs().max(), scale)


def _masked_linear_case(shape_x, n, density, dtype, generator, device=CPU, block=None):
    k = shape_x[-1]
    x = torch.randn(shape_x, generator=generator).to(dtype)
    weight = torch.randn(n, k, generator=generator).to(dtype)
    mask = torch.rand(n, k, generator=generator) < density if block is None else _block_mask((n, k), block, density,
                                                                                             generator)
    weight[~mask] = float("nan")  # off the mask nothing may leak, not even NaN
    bias = torch.randn(n, generator=generator).to(dtype)
    dy = torch.randn(*shape_x[:-1], n, generator=generator).to(dtype)
    return [t.to(device) for t in (x, weight, mask, bias, dy)]


def _check_masked_linear(ml, x, weight, mask, bias, dy, dtype, zero_off_mask=False):
    x64, w64, b64, dy64 = (t.double() for t in (x, weight, bias, dy))
    if zero_off_mask:  # the caller's promise: the weight is 0 off the mask
        weight = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype))
    _close(ml.masked_linear(x, weight, mask, bias, zero_off_mask),
           reference.masked_linear(x64, w64, mask, b64), dtype)
    _close(ml.masked_linear_grad_input(dy, weight, mask, zero_off_mask),
           reference.masked_linear_grad_input(dy64, w64, mask), dtype)
    masked = ml.masked_linear_grad_weight(dy, x, mask, False)
    _close(masked, reference.masked_linear_grad_weight(dy64, x64, mask, False), dtype)
    assert not masked[~mask].any()
    _close(ml.masked_linear_grad_weight(dy, x, mask, True), reference.masked_linear_grad_weight(dy64, x64, mask, True),
           dtype)


def _block_mask(shape, block, density, generator):
    blocks = torch.rand(-(-shape[0] // block[0]), -(-shape[1] // block[1]), generator=generator) < density
    return blocks.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:shape[0], :shape[1]].contiguous()


# ----------------------------------------------------------------------------------- masked_linear


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
@pytest.mark.parametrize("zero_off_mask", [False, True])
def test_masked_linear_products_match_reference(masked_linear_kernels, dtype, zero_off_mask, generator):
    _, ml, _, _ = masked_linear_kernels
    # Unstructured: every tile is active and partial, so every step goes through the select.
    # Sizes that are not multiples of the tiles nor of the 32 flag blocks; batch dims on x.
    case = _masked_linear_case((2, 35, 90), 100, 0.4, dtype, generator)
    _check_masked_linear(ml, *case, dtype, zero_off_mask)


@pytest.mark.parametrize("density", [0.0, 1.0])
def test_masked_linear_all_zero_and_all_one_masks(masked_linear_kernels, density, generator):
    _, ml, _, _ = masked_linear_kernels
    case = _masked_linear_case((40, 70), 50, density, torch.float32, generator)
    layout = ml.pack_mask(case[2])
    assert layout.active_fraction == density and (layout.flags == (ml.FULL if density else ml.EMPTY)).all()
    _check_masked_linear(ml, *case, torch.float32)


@pytest.mark.parametrize("block, tile, zero_off_mask", [((32, 32), (32, 32), False), ((32, 32), (32, 32), True),
                                                        ((64, 64), (64, 64), False), ((64, 32), (64, 32), False),
                                                        ((32, 96), (32, 32), True)])
def test_masked_linear_block_mask_runs_tiles_of_its_blocks(masked_linear_kernels, block, tile, zero_off_mask,
                                                          generator):
    _, ml, _, _ = masked_linear_kernels
    x, weight, mask, bias, dy = _masked_linear_case((20, 200), 136, 0.3, torch.float32, generator, block=block)
    layout = ml.pack_mask(mask)
    assert (layout.tile_n, layout.tile_k) == tile
    # Tiles match the blocks: the active tiles cover exactly the active blocks' area, no more.
    flags = layout.flags.to(torch.int64).repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)[:136, :200]
    assert torch.equal(flags > ml.EMPTY, mask)
    assert 0 < layout.active_fraction < 1
    # Every active tile of a block mask is full except at the ragged edges: no select inside.
    interior = layout.flags[:136 // tile[0], :200 // tile[1]]
    assert not (interior == ml.PARTIAL).any()
    _check_masked_linear(ml, x, weight, mask, bias, dy, torch.float32, zero_off_mask)


def test_block_masks_at_density_one_tenth_run_one_tenth_of_the_steps(kernels, generator):
    # Found by a review of the kernels: 64x32 tiles over a 32x32-block mask ran 19% of the steps at density 0.1.
    _, ml, _, _ = kernels
    blocks = torch.zeros(100, dtype=torch.bool)
    blocks[torch.randperm(100, generator=generator)[:10]] = True
    mask = blocks.view(10, 10).repeat_interleave(32, 0).repeat_interleave(32, 1)
    layout = ml.pack_mask(mask)
    assert (layout.tile_n, layout.tile_k) == (32, 32) and layout.active_fraction == 0.1
    assert int(layout.forward_steps.starts[-1]) == int(layout.grad_input_steps.starts[-1]) == 10
    assert layout.grad_weight_tiles.shape == (10, 2)
    assert not ml.skips_tiles(torch.rand(320, 320, generator=generator) < 0.1)  # unstructured: nothing to skip


def test_pack_mask_matches_numpy(kernels, generator):
    _, ml, _, _ = kernels
    mask = torch.rand(45, 100, generator=generator) < 0.1
    mask[:32, 64:] = False  # two empty 32x32 blocks, side by side: 32x64 tiles skip them, no larger tile can
    mask[32:, :32] = True   # a full block at the ragged bottom edge
    layout = ml.pack_mask(mask.T.contiguous().T)  # non-contiguous input
    padded = np.zeros((45, 128), dtype=np.uint64)
    padded[:, :100] = mask.numpy()
    words = (padded.reshape(45, 4, 32) << np.arange(32, dtype=np.uint64)).sum(-1)
    np.testing.assert_array_equal(layout.bits.numpy().view(np.uint32), words.astype(np.uint32))
    assert (layout.tile_n, layout.tile_k) == (32, 64)
    entries = np.zeros((64, 128), dtype=np.int64)  # 1 active, 0 inactive, -1 past the edge
    entries[:] = -1
    entries[:45, :100] = mask.numpy()
    tiles = entries.reshape(2, 32, 2, 64).transpose(0, 2, 1, 3).reshape(2, 2, -1)
    real = np.where(tiles >= 0, tiles, 1)
    expected = np.where((real == 1).all(-1), ml.FULL, np.where((tiles == 1).any(-1), ml.PARTIAL, ml.EMPTY))
    np.testing.assert_array_equal(layout.flags.numpy(), expected)
    assert expected[1, 0] == ml.PARTIAL and expected[0, 1] == ml.EMPTY
    # Step lists: full tiles first, then partial ones, each in order.
    steps = layout.forward_steps
    for strip in range(2):
        row = expected[strip]
        want = [j for j in range(2) if row[j] == ml.FULL] + [j for j in range(2) if row[j] == ml.PARTIAL]
        assert steps.steps[steps.starts[strip]:steps.starts[strip + 1]].tolist() == want
        assert int(steps.split[strip] - steps.starts[strip]) == int((row == ml.FULL).sum())


@pytest.mark.parametrize("shape_x, n", [((0, 20), 30), ((7, 0), 30), ((7, 20), 0), ((2, 0, 20), 30)])
def test_masked_linear_empty(kernels, shape_x, n, generator):
    _, ml, _, _ = kernels
    x, weight, mask, bias, dy = _masked_linear_case(shape_x, n, 0.5, torch.float32, generator)
    torch.testing.assert_close(ml.masked_linear(x, weight, mask, bias), reference.masked_linear(x, weight, mask, bias))
    torch.testing.assert_close(ml.masked_linear_grad_input(dy, weight, mask),
                               reference.masked_linear_grad_input(dy, weight, mask))
    # reference.masked_linear_grad_weight cannot reshape an empty last dim (reshape(-1, 0)), so
    # the expected gradient is written out here: dy^T x over all rows is all zeros or empty.
    for dense in (False, True):
        got = ml.masked_linear_grad_weight(dy, x, mask, dense)
        assert got.shape == mask.shape and not got.any()


def test_masked_linear_non_contiguous(masked_linear_kernels, generator):
    _, ml, _, _ = masked_linear_kernels
    x, weight, mask, bias, dy = _masked_linear_case((70, 40), 60, 0.5, torch.float32, generator)
    x_t = x.T.contiguous().T
    weight_t = weight.T.contiguous().T
    mask_t = mask.T.contiguous().T
    dy_t = dy.T.contiguous().T
    bias_t = torch.stack([bias, bias], 1)[:, 0]
    assert not any(t.is_contiguous() for t in (x_t, weight_t, mask_t, dy_t, bias_t))
    _check_masked_linear(ml, x_t, weight_t, mask_t, bias_t, dy_t, torch.float32)


def test_mask_layout_cache_sees_in_place_updates(masked_linear_kernels, generator):
    _, ml, _, _ = masked_linear_kernels
    x, weight, mask, bias, _ = _masked_linear_case((20, 40), 30, 0.5, torch.float32, generator)
    weight = torch.randn_like(weight)
    before = ml.masked_linear(x, weight, mask, bias)
    assert ml.mask_layout(mask) is ml.mask_layout(mask)
    mask.logical_not_()
    _close(ml.masked_linear(x, weight, mask, bias), reference.masked_linear(x, weight, mask, bias), torch.float32)
    assert not torch.allclose(before, ml.masked_linear(x, weight, mask, bias))


def test_masked_linear_autograd_through_ops(masked_linear_kernels, use_backend, generator):
    use_backend("triton", "masked_linear")
    from sparsekern import ops
    x, weight, mask, bias, dy = _masked_linear_case((3, 10, 40), 30, 0.5, torch.float32, generator)
    weight = torch.randn_like(weight)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    expected = [t.double().requires_grad_() for t in (x, weight, bias)]
    ops.masked_linear(leaves[0], leaves[1], mask, leaves[2], dense_grad=True).backward(dy)
    reference.masked_linear(expected[0], expected[1], mask, expected[2]).backward(dy.double())
    for leaf, want in zip(leaves[::2], expected[::2]):
        _close(leaf.grad, want.grad, torch.float32)
    # dense_grad: the weight gradient is dy^T x everywhere, the reference's before masking.
    _close(leaves[1].grad, dy.reshape(-1, 30).double().T @ x.reshape(-1, 40).double(), torch.float32)


# -------------------------------------------------------------------------------------- topk_mask


def _score_list(dtype, generator, device=CPU):
    scores = [_scores_with_ties(shape, dtype, generator) for shape in [(30, 40), (7,), (0,), (2, 3, 50), (1500,)]]
    scores[0] = scores[0].T.contiguous().T  # non-contiguous
    return [s.to(device) for s in scores]


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_topk_mask_matches_reference(kernels, dtype, generator):
    _, _, tk, _ = kernels
    scores = _score_list(dtype, generator)
    numbers = reference.count_numbers(scores)
    for k in (0, 1, 333, numbers):
        got = tk.topk_mask(scores, k)
        expected = reference.topk_mask(scores, k)
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), k
        assert sum(int(g.sum()) for g in got) == k


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_topk_mask_per_tensor_matches_reference(kernels, dtype, generator):
    _, _, tk, _ = kernels
    scores = _score_list(dtype, generator)
    k = [5, 6, 0, 150, reference.count_numbers(scores[-1:])]
    got = tk.topk_mask_per_tensor(scores, k)
    assert all(torch.equal(g, e) for g, e in zip(got, reference.topk_mask_per_tensor(scores, k)))


def test_topk_mask_zero_signs_and_random_scores(kernels, generator):
    _, _, tk, _ = kernels
    # -0.0 and +0.0 tie (lower position wins); distinct random floats exercise every radix round.
    scores = [torch.tensor([0.0, -0.0, -0.0, 0.0, -1.0]), torch.randn(2000, generator=generator)]
    scores[1][100:110] = 0.0
    for k in (2, 3, 1000):
        got = tk.topk_mask(scores, k)
        assert all(torch.equal(g, e) for g, e in zip(got, reference.topk_mask(scores, k))), k


def test_topk_mask_refuses_more_than_the_numbers(kernels, generator):
    _, _, tk, _ = kernels
    scores = _score_list(torch.float32, generator)
    numbers = reference.count_numbers(scores)
    with pytest.raises(ValueError, match=f"k={numbers + 1} is more than the {numbers} non-NaN"):
        tk.topk_mask(scores, numbers + 1)
    with pytest.raises(ValueError, match="non-NaN"):
        tk.topk_mask_per_tensor([torch.tensor([float("nan"), 1.0])], [2])


def test_topk_mask_empty(kernels):
    _, _, tk, _ = kernels
    assert tk.topk_mask([], 0) == []
    got = tk.topk_mask([torch.empty(0), torch.empty(3, 0)], 0)
    assert [g.shape for g in got] == [(0,), (3, 0)] and all(g.dtype == torch.bool for g in got)


# ------------------------------------------------------------------------------------- prune_grow


def _prune_grow_case(shape, dtype, generator, device=CPU):
    weight = torch.randn(shape, generator=generator).to(dtype)
    mask = torch.rand(shape, generator=generator) < 0.4
    prune_score = _scores_with_ties(shape, dtype, generator)
    grow_score = _scores_with_ties(shape, dtype, generator)
    state = [torch.randn(shape, generator=generator).to(dtype),
             reversed_dims(torch.randn(tuple(reversed(shape)), generator=generator).to(dtype))]  # non-contiguous
    return [t.to(device) for t in (weight, mask, prune_score, grow_score)], [s.to(device) for s in state]


def _check_prune_grow(pg, layers, n, global_scope=False, masked=None):
    """Runs the Triton list kernel on layers [(weight, mask, prune_score, grow_score, state)] and
    the reference on copies; compares masks, weights, state and masked tensors bit for bit."""
    weights, masks, prune, grow, state = (list(x) for x in zip(*layers))
    masked = masked or [[] for _ in layers]
    copies = [w.clone() for w in weights], [[t.clone() for t in ts] for ts in state], [[t.clone() for t in ts] for ts in masked]
    expected = reference.prune_grow(copies[0], masks, prune, grow, n, global_scope, copies[1], copies[2])
    got = pg.prune_grow(weights, masks, prune, grow, n, global_scope, state, masked)
    assert all(torch.equal(g.cpu(), e.cpu()) for g, e in zip(got, expected))
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(weights, copies[0]))
    for actual, wanted in ((state, copies[1]), (masked, copies[2])):
        assert all(torch.equal(a.cpu(), b.cpu()) for ts, es in zip(actual, wanted) for a, b in zip(ts, es))


@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES)
def test_prune_grow_matches_reference(kernels, dtype, generator):
    _, _, _, pg = kernels
    tensors, state = _prune_grow_case((45, 50), dtype, generator)
    active = int(tensors[1].sum())
    for n in (0, 7, min(active, tensors[1].numel() - active), active):
        _check_prune_grow(pg, [([t.clone() for t in tensors] + [[s.clone() for s in state]])], [n])


@pytest.mark.parametrize("global_scope", [False, True])
def test_prune_grow_list_by_magnitude(kernels, global_scope, generator):
    _, _, _, pg = kernels
    layers = []
    for shape in [(30, 20), (7,), (0, 3), (5, 4, 3)]:
        tensors, state = _prune_grow_case(shape, torch.float32, generator)
        layers.append(tensors + [state[:1]])
    counts = [int(layer[1].sum()) for layer in layers]
    n = [sum(counts) // 3] if global_scope else [c // 3 for c in counts]
    weights = [layer[0] for layer in layers]
    expected_weights = [w.clone() for w in weights]
    masks = [layer[1] for layer in layers]
    grads = [layer[3] for layer in layers]
    expected = reference.prune_grow(expected_weights, masks, [w.clone() for w in weights], [g.clone() for g in grads],
                                    n, global_scope, [[] for _ in layers], [[g.clone()] for g in grads], None, True, True)
    got = pg.prune_grow(weights, masks, weights, grads, n, global_scope, [[] for _ in layers], [[g] for g in grads],
                        None, True, True)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert all(torch.equal(w, e) for w, e in zip(weights, expected_weights))


def test_prune_grow_reads_any_nonzero_mask_byte_as_true(kernels, generator):
    _, _, _, pg = kernels
    raw = torch.randint(0, 4, (60,), generator=generator, dtype=torch.uint8) * 85
    mask = raw.view(torch.bool)
    tensors, state = _prune_grow_case((60,), torch.float32, generator)
    tensors[1] = mask
    clean = [tensors[0], raw != 0, tensors[2], tensors[3], state]
    expected_weight = tensors[0].clone()
    expected = reference.prune_grow([expected_weight], [clean[1]], [clean[2]], [clean[3]], [5], False, [[]], [[]])
    got = pg.prune_grow([tensors[0]], [mask], [tensors[2]], [tensors[3]], [5], False, [[]], [[]])
    assert torch.equal(got[0], expected[0]) and torch.equal(tensors[0], expected_weight)


@pytest.mark.parametrize("global_scope", [False, True])
def test_prune_grow_never_grows_into_a_blocks_padding(kernels, global_scope, generator):
    """Layers that fill part of their last 1024-entry block: the lanes past a layer's end read score 0 and a clear mask
    byte, which makes them grow candidates but for the bounds check. Grow scores below 0 rank every such lane above
    every entry, so one taken would grow nothing real in its place and the active count would fall."""
    _, _, _, pg = kernels
    layers = []
    for shape in [(100,), (7, 9)]:
        tensors, state = _prune_grow_case(shape, torch.float32, generator)
        tensors[3] = -1 - torch.rand(shape, generator=generator)
        layers.append(tensors + [state])
    counts = [int(layer[1].sum()) for layer in layers]
    _check_prune_grow(pg, layers, [sum(counts) // 2] if global_scope else [count // 2 for count in counts],
                      global_scope)


def test_prune_grow_non_contiguous_weight_and_empty(kernels, generator):
    _, _, _, pg = kernels
    tensors, state = _prune_grow_case((30, 20), torch.float32, generator)
    tensors = [t.T.contiguous().T for t in tensors]
    _check_prune_grow(pg, [tensors + [state]], [20])
    empty = [torch.empty(0, 5), torch.empty(0, 5, dtype=torch.bool), torch.empty(0, 5), torch.empty(0, 5)]
    assert pg.prune_grow(*[[t] for t in empty], [0], False, [[]], [[]])[0].shape == (0, 5)


# ---------------------------------------------------------------------------------------- opcheck


def test_opcheck_every_triton_masked_linear_op(masked_linear_kernels, generator):
    x, weight, mask, bias, dy = _masked_linear_case((20, 40), 30, 0.5, torch.float32, generator)
    weight = torch.randn_like(weight)
    torch.library.opcheck(torch.ops.sparsekern.masked_linear_triton, (x, weight, mask, bias, False, False))
    torch.library.opcheck(torch.ops.sparsekern.masked_linear_grad_input_triton, (dy, weight, mask, False, False))
    torch.library.opcheck(torch.ops.sparsekern.masked_linear_grad_weight_triton, (dy, x, mask, True))


def test_opcheck_every_triton_selection_op(kernels, generator):
    scores = [torch.randn(10, 20, generator=generator), torch.randn(30, generator=generator)]
    torch.library.opcheck(torch.ops.sparsekern.topk_mask_triton, (scores, 50))
    torch.library.opcheck(torch.ops.sparsekern.topk_mask_per_tensor_triton, (scores, [5, 6]))
    (weight, mask, prune_score, grow_score), state = _prune_grow_case((10, 20), torch.float32, generator)
    for global_scope in (False, True):
        torch.library.opcheck(torch.ops.sparsekern.prune_grow_triton,
                              ([weight], [mask], [prune_score], [grow_score], [5], global_scope, state, [0, 0],
                               [torch.randn(10, 20)], [0], True, False, [torch.empty(10, 20, dtype=torch.bool)]))


def test_opcheck_triton_ops_on_non_contiguous_and_empty_inputs(masked_linear_kernels, generator):
    scores = [reversed_dims(torch.randn(5, 7, generator=generator)), torch.empty(0, 4),
              torch.randn(13, generator=generator)]
    torch.library.opcheck(torch.ops.sparsekern.topk_mask_triton, (scores, 20))
    torch.library.opcheck(torch.ops.sparsekern.topk_mask_per_tensor_triton, (scores, [4, 0, 6]))
    x, weight, mask, bias, dy = _masked_linear_case((5, 40), 9, 0.5, torch.float32, generator)
    weight = reversed_dims(torch.randn(40, 9, generator=generator))
    torch.library.opcheck(torch.ops.sparsekern.masked_linear_triton, (x[:, ::2], weight[:, ::2], mask[:, ::2],
                                                                       bias, False, False))
    dy = reversed_dims(dy.t().contiguous())
    torch.library.opcheck(torch.ops.sparsekern.masked_linear_grad_input_triton, (dy, weight, mask, False, False))
    torch.library.opcheck(torch.ops.sparsekern.masked_linear_grad_weight_triton, (dy[:0], x[:0], mask, False))
    (weight, mask, prune_score, grow_score), state = _prune_grow_case((6, 5), torch.float32, generator)
    weight = reversed_dims(weight.t().contiguous())
    torch.library.opcheck(torch.ops.sparsekern.prune_grow_triton,
                          ([weight], [mask], [prune_score], [grow_score], [3], False, state, [0, 0],
                           [], [], True, False, [torch.empty(6, 5, dtype=torch.bool)]))


# ------------------------------------------------------------------------------- GPU, real sizes

CUDA = torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("density, block", [(0.5, None), (0.05, None), (0.1, (32, 32)), (1.0, None)])
@pytest.mark.parametrize("zero_off_mask", [False, True])
def test_gpu_masked_linear_products(gpu_kernels, dtype, density, block, zero_off_mask, generator):
    _, ml, _, _ = gpu_kernels
    case = _masked_linear_case((4, 1000, 1500), 2100, density, dtype, generator, CUDA, block)
    _check_masked_linear(ml, *case, dtype, zero_off_mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_topk_mask(gpu_kernels, dtype, generator):
    _, _, tk, _ = gpu_kernels
    scores = [_scores_with_ties(shape, dtype, generator, CUDA) for shape in [(512, 1000), (3,), (64, 3, 3, 3), (10**6,)]]
    scores.append(torch.randn(2**20, generator=generator).to(dtype).to(CUDA))
    cpu_scores = [s.cpu() for s in scores]
    for k in (1, 123_457, reference.count_numbers(cpu_scores) // 2):
        got = tk.topk_mask(scores, k)
        assert all(torch.equal(g.cpu(), e) for g, e in zip(got, reference.topk_mask(cpu_scores, k))), k
    per = [s.numel() // 3 for s in scores]
    got = tk.topk_mask_per_tensor(scores, per)
    assert all(torch.equal(g.cpu(), e) for g, e in zip(got, reference.topk_mask_per_tensor(cpu_scores, per)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_prune_grow(gpu_kernels, dtype, generator):
    _, _, _, pg = gpu_kernels
    layers = []
    for shape in [(1024, 2304), (64, 3, 7, 7), (1000,)]:
        tensors, state = _prune_grow_case(shape, dtype, generator, CUDA)
        layers.append(tensors + [state])
    counts = [int(layer[1].sum()) for layer in layers]
    for global_scope, n in ((False, [c // 10 for c in counts]), (True, [sum(counts) // 3])):
        _check_prune_grow(pg, [[t.clone() for t in layer[:4]] + [[s.clone() for s in layer[4]]] for layer in layers],
                          n, global_scope)
