"""DST's drop-and-grow rules, each on a layer small enough to work out by hand: the gradient a criterion reads (the
dense one of the batch, through backward), ties, what a regrown just-dropped entry keeps (its value and its optimizer
state) against a newly grown one (0 both), one global selection against per-layer ones, swap counts above the
inactive count (RigL's ResNet-50 case), the criteria's formulas at every weight dtype, and the zeros-off-mask
promise an update leaves a layer with."""
import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import SparseLinear


def hand_layer(weights, active, out_features=1):
    """A bias-free SparseLinear holding `weights` (a flat list) with the flat positions `active` active."""
    numel = len(weights)
    layer = SparseLinear(numel // out_features, out_features, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weights).view(out_features, -1))
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[list(active)] = True
    layer.set_mask(mask.view(out_features, -1))
    return layer


def positions(mask):
    return mask.flatten().nonzero().flatten().tolist()


def constant_dst(model, optimizer, drop_fraction, **options):
    """DST updating at every step by a constant fraction, magnitude pruning and gradient growth unless told."""
    return sparsekern.DST(model, optimizer, **{"prune": "magnitude", "grow": "gradient", "schedule": "constant",
                                               "drop_fraction": drop_fraction, "update_every": 1,
                                               "total_steps": 10, **options})


def test_gradient_growth_reads_the_dense_gradient_of_the_batch_and_grown_weights_take_their_first_step():
    # A 3x4 layer, y = (θ ⊙ m) x, loss = c · y for x = (1, 2, 3, 4) and c = (1, -2, 0.5): the dense gradient
    # ∂L/∂(θ ⊙ m) is c_i x_j at every entry, inactive ones included:
    #   row 0:  1   2   3   4      flat 0..3
    #   row 1: -2  -4  -6  -8      flat 4..7
    #   row 2: .5   1 1.5   2      flat 8..11
    # Active: 0..3 (|θ| .5 .1 .3 .05) and 8, 9 (|θ| .2 .9). r = 0.5: n = 3 drops the smallest |θ|, flat 3, 1, 8;
    # kept 0, 2, 9. Growth: top-3 |g| among the other nine: 7 (8), 6 (6), then 3 and 5 tie at 4 and the lower
    # position, 3 (just dropped), wins, keeping its weight .05.
    weights = [0.5, -0.1, 0.3, 0.05, 0, 0, 0, 0, -0.2, 0.9, 0, 0]
    layer = hand_layer(weights, [0, 1, 2, 3, 8, 9], out_features=3)
    model = nn.Sequential(layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = constant_dst(model, optimizer, 0.5)
    x, c = torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([1.0, -2, 0.5])
    (model(x) * c).sum().backward()
    assert algo.step()
    assert positions(layer.mask) == [0, 2, 3, 6, 7, 9]
    expected = torch.tensor([0.5, 0, 0.3, 0.05, 0, 0, 0, 0, 0, 0.9, 0, 0])
    assert torch.equal(layer.weight.detach().flatten(), expected)
    # The optimizer step that follows sees the gradient masked by the new mask: the grown entries 6 and 7 take
    # their first step at once, -0.1 · (-6) and -0.1 · (-8).
    dense = torch.outer(c, x[0]).flatten()
    assert torch.equal(layer.weight.grad.flatten(), torch.where(layer.mask.flatten(), dense, 0.0))
    optimizer.step()
    stepped = layer.weight.detach().flatten()
    assert stepped[6].item() == pytest.approx(0.6) and stepped[7].item() == pytest.approx(0.8)
    assert torch.all(stepped[~layer.mask.flatten()] == 0)


def test_ties_keep_and_grow_the_lower_flat_position():
    # Four active weights of one magnitude, 1, -1, 1, -1 (flat 0..3), r = 0.5: n = 2; the tie keeps the lower
    # positions 0 and 1 and drops 2 and 3. Growth over the four not kept, |g| = 0 0 7 7: flat 4 and 5.
    layer = hand_layer([1.0, -1, 1, -1, 0, 0], range(4))
    model = nn.Sequential(layer)
    algo = constant_dst(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5)
    layer.weight.grad = torch.tensor([[0.0, 0, 0, 0, 7, 7]])
    assert algo.step()
    assert positions(layer.mask) == [0, 1, 4, 5]
    # Growth ties among entries of two rows: |θ| 1, 2 (flat 0, 1) and 3 (flat 7) active, r = 2/3: n = 2 drops
    # flat 0 and 1; |g| is 5 at flat 2..6 and 0 elsewhere, so the two lowest of the five tied, 2 and 3, grow.
    layer = hand_layer([1.0, 2, 0, 0, 0, 0, 0, 3], [0, 1, 7], out_features=2)
    model = nn.Sequential(layer)
    algo = constant_dst(model, torch.optim.SGD(model.parameters(), lr=0.1), 2 / 3)
    layer.weight.grad = torch.tensor([[0.0, 0, 5, 5], [5, 5, 5, 0]])
    assert algo.step()
    assert positions(layer.mask) == [2, 3, 7]


def test_an_update_leaves_a_layer_that_held_values_off_its_mask_promising_zeros_again():
    # The update writes every weight off the new mask to 0 (the value 7 at flat 5 is grown and starts at 0), so
    # the layer may take the dense kernel again, as set_mask would leave it: DST must say so (zero_off_mask).
    layer = hand_layer([0.5, -0.1, 0.3, 0.05, 0, 0], range(4))
    with torch.no_grad():
        layer.weight[0, 5] = 7.0
    layer.zero_off_mask = False
    model = nn.Sequential(layer)
    algo = constant_dst(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5)
    layer.weight.grad = torch.tensor([[0.0, 0, 0, 0, 1, 2]])
    assert algo.step()
    assert positions(layer.mask) == [0, 2, 4, 5]
    assert torch.equal(layer.weight.detach().flatten(), torch.tensor([0.5, 0, 0.3, 0, 0, 0]))
    assert layer.zero_off_mask


@pytest.mark.parametrize("reset_state", [True, False])
@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    lambda params: torch.optim.Adam(params, lr=0.1),
], ids=["sgd-momentum", "adam"])
def test_a_regrown_just_dropped_entry_keeps_its_value_and_optimizer_state_a_new_one_starts_at_0(reset_state,
                                                                                                 make_optimizer):
    # A 1x4 layer, |θ| 1 2 3 active (flat 0..2), flat 3 inactive. r = 2/3: n = 2 drops flat 0 and 1 (kept: 2).
    # Growth over flat 0, 1, 3 by |g| = 9 1 . 8: flat 0 (just dropped: keeps θ = 1 and its state) and flat 3 (new:
    # θ = 0, state 0). Flat 1, dropped, is 0 with state 0. As RigL's code, which resets only entries inactive before.
    layer = hand_layer([1.0, 2, 3, 0], range(3))
    model = nn.Sequential(layer)
    optimizer = make_optimizer(model.parameters())
    layer.weight.grad = torch.ones(1, 4)
    optimizer.step()   # makes the optimizer's state; then planted, non-zero at the active entries
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2, 3, 0]]))
    planted = {key: torch.tensor([[5.0, 6, 7, 0]]) * (index + 1)
               for index, key in enumerate(key for key, value in optimizer.state[layer.weight].items()
                                           if value.shape == layer.weight.shape)}
    optimizer.state[layer.weight].update({key: value.clone() for key, value in planted.items()})
    algo = constant_dst(model, optimizer, 2 / 3, reset_state=reset_state)
    layer.weight.grad = torch.tensor([[9.0, 1, 0.5, 8]])
    assert algo.step()
    assert positions(layer.mask) == [0, 2, 3]
    assert torch.equal(layer.weight.detach(), torch.tensor([[1.0, 0, 3, 0]]))
    assert planted   # momentum, or Adam's two moments
    for key, value in planted.items():
        assert torch.equal(optimizer.state[layer.weight][key], value * torch.tensor([[1.0, 0, 1, 0]])), key


def two_layers():
    """Layers a and b, 1x6 each, three active weights apiece: a |θ| .1 .2 .7, b |θ| 3 4 5 (flat 0..2)."""
    a = hand_layer([0.1, -0.2, 0.7, 0, 0, 0], range(3))
    b = hand_layer([3.0, 4, -5, 0, 0, 0], range(3))
    model = nn.Sequential(a, b)
    grads = [torch.tensor([[0.0, 0, 0, 1, 2, 0.5]]), torch.tensor([[0.0, 0, 0, 5, 0.4, 3]])]
    return model, grads


@pytest.mark.parametrize("scope, expected", [
    # Global: n = round(0.5 · 6) = 3 over both layers drops the three smallest |θ| of the model, all of a's
    # (.1 .2 .7 < 3); growth takes the top-3 |g| of the model among the entries not kept: b3 (5), b5 (3), a4 (2).
    # Layer a goes from 3 active weights to 1, b from 3 to 5; the total stays 6.
    ("global", ([4], [0, 1, 2, 3, 5])),
    # Per layer: n = round(0.5 · 3) = round(1.5) = 2 each (halves to even). a drops a0, a1 and grows a4, a3;
    # b drops b0, b1 and grows b3, b5. Each keeps its 3.
    ("layer", ([2, 3, 4], [2, 3, 5])),
])
def test_one_global_selection_moves_weights_between_layers_per_layer_selections_do_not(scope, expected):
    model, grads = two_layers()
    algo = constant_dst(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.5, scope=scope)
    for layer, grad in zip(model, grads):
        layer.weight.grad = grad.clone()
    assert algo.step()
    assert tuple(positions(layer.mask) for layer in model) == expected



def test_snip_ranks_by_the_product_itself_where_the_fantastic_weights_offset_would_tie():
    # Active |θ·g| = 1e-13, 3e-13, 1, 1 (flat 0..3), flat 4 inactive with the largest gradient. n = round(0.25 · 4)
    # = 1 drops the smallest score, flat 0, and flat 4 grows. The Fantastic Weights code's |θ·g| + 1e-5 merges
    # the first two in float32 (both become 1e-5): the tie keeps the lower position, so a Criterion adding it
    # drops flat 1 instead, and so does snip_shift=1e-5, the option that adds it.
    def kept(prune, **options):
        layer = hand_layer([1e-6, 3e-6, 1.0, 1.0, 0.0], range(4))
        model = nn.Sequential(layer)
        algo = constant_dst(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.25, prune=prune, **options)
        layer.weight.grad = torch.tensor([[1e-7, 1e-7, 1.0, 1.0, 100.0]])
        assert algo.step()
        return positions(layer.mask)

    offset = sparsekern.Criterion("snip+1e-5", lambda weights, grads, masks, *, generator: [
        (w * g).abs() + 1e-5 for w, g in zip(weights, grads)], reads_gradient=True, elementwise=True)
    assert kept("snip") == kept("snip", snip_shift=0.0) == [1, 2, 3, 4]
    assert kept(offset) == kept("snip", snip_shift=1e-5) == [0, 2, 3, 4]


def resnet50_weight_shapes():
    """(name, weight shape) of every convolution and the classifier of torchvision's ResNet-50."""
    shapes, channels = [("conv1", (64, 3, 7, 7))], 64
    for stage, (blocks, width) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512]), 1):
        for block in range(blocks):
            name = f"layer{stage}.{block}"
            shapes += [(f"{name}.conv1", (width, channels, 1, 1)), (f"{name}.conv2", (width, width, 3, 3)),
                       (f"{name}.conv3", (4 * width, width, 1, 1))]
            if block == 0:
                shapes.append((f"{name}.downsample", (4 * width, channels, 1, 1)))
            channels = 4 * width
    return shapes + [("fc", (1000, 2048))]


def test_resnet50_erk_at_density_0_1_swaps_4712_of_a_1x1_conv_with_675_inactive_as_rigl_does():
    # RigL's published case: ERK at d = 0.1 puts the six 1x1 convolutions of layer1 that are not 64 -> 64 at
    # density 0.96 (15,709 of 16,384) and the 64 -> 64 one dense; RigL's code swaps floor(0.3 · 15,709) = 4,712
    # per update, where a cap at the 675 inactive entries would swap 675.
    shapes = resnet50_weight_shapes()
    counts = dict(zip([name for name, _ in shapes], sparsekern.distributions.layer_counts(
        [shape for _, shape in shapes], sparsekern.distributions.erk([shape for _, shape in shapes], 0.1))))
    one_by_one = {name: counts[name] for name, shape in shapes if name.startswith("layer1") and shape[2:] == (1, 1)}
    assert one_by_one.pop("layer1.0.conv1") == 64 * 64
    assert list(one_by_one.values()) == [15709] * 6
    # One such convolution: active entries a_0..a_15708 (flat order) with |θ| rising and |g| falling in k, the
    # 675 inactive with far larger |g|. n = 4,712 drops a_0..a_4711; growth takes the 675 inactive entries and
    # the 4,037 just-dropped ones of largest |g|, a_0..a_4036, which keep their weights. So a_4037..a_4711 (675)
    # leave the mask. A swap capped at 675 would drop a_0..a_674 and grow the 675 inactive ones instead.
    conv = sparsekern.nn.SparseConv2d(64, 256, 1, bias=False)
    active = torch.ones(16384, dtype=torch.bool)
    active[torch.arange(675) * 24] = False
    conv.set_mask(active.view(256, 64, 1, 1))
    where = active.nonzero().flatten()
    k = torch.arange(15709, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.view(-1)[where] = ((k + 1) / 15709).float()
    grad = torch.full((16384,), 1e6)
    grad[where] = (15709 - k).float()
    model = nn.Sequential(conv)
    algo = constant_dst(model, torch.optim.SGD(model.parameters(), lr=0.1), 0.3, swap_rounding="floor")
    conv.weight.grad = grad.view(256, 64, 1, 1).clone()
    weight = conv.weight.detach().clone()
    assert algo.step()
    new = conv.mask.flatten()
    assert int(new.sum()) == 15709 and bool(new[~active].all())
    assert torch.equal((active & ~new).nonzero().flatten(), where[4037:4712])
    assert torch.equal(conv.weight.detach().flatten()[where[:4037]], weight.flatten()[where[:4037]])



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prune, weights, grads, drop_fraction", [
    # RSensitivity |θ| / (|g| + 1e-8) at the active flat 0..3: 1e8, 2e8 (g = 0 there), 5, 5. r = 0.75: n = 3
    # keeps flat 1 alone. In float16 the 1e-8 guard underflows to 0: flat 0 and 1 both score inf, and the tie
    # keeps flat 0.
    ("rsensitivity", [1.0, 2, 5, 5, 0], [0.0, 0, 1, 1, 100], 0.75),
    # Sensitivity |g| / (|θ| + 1e-8): θ = 0 at flat 0 and 1 (g = 1, 2): 1e8, 2e8, 1, 1, as above.
    ("sensitivity", [0.0, 0, 1, 1, 0], [1.0, 2, 5, 5, 100], 0.75),
    # SNIP |θ·g|: 1e-8, 2e-8, 5, 5. r = 0.25: n = 1 drops flat 0. In float16 both products underflow to 0 (below
    # its 6e-8) and the tie drops flat 1.
    ("snip", [1e-4, 2e-4, 5, 5, 0], [1e-4, 1e-4, 1, 1, 100], 0.25),
    # MEST |θ| + |g|: 1 + 2^-10, 1 + 2^-9, 6, 6: n = 1 drops flat 0. In bfloat16 (spacing 2^-7 at 1) both sums
    # round to 1 and the tie drops flat 1.
    ("mest", [1.0, 1, 5, 5, 0], [2 ** -10, 2 ** -9, 1, 1, 100], 0.25),
])
def test_scores_combining_weight_and_gradient_rank_as_in_float32_whatever_the_weights_dtype(prune, weights, grads,
                                                                                             drop_fraction, dtype):
    # Every case keeps flat 1 and grows flat 4 (|g| 100), the 4 - 1 entries grown (or 1 dropped and grown) being
    # the largest |g| not kept: the drop set of the criterion's formula, in float32,
    # whose products, 1e-8 guard and sums do not underflow or round together as a half-precision dtype's do.
    layer = hand_layer(weights, range(4)).to(dtype)
    model = nn.Sequential(layer)
    algo = constant_dst(model, torch.optim.SGD(model.parameters(), lr=0.1), drop_fraction, prune=prune)
    layer.weight.grad = torch.tensor([grads], dtype=dtype)
    assert algo.step()
    assert positions(layer.mask) == [1, 2, 3, 4]
