"""Optimizer state off a mask holds what a fresh state starts at, so that a weight grown there starts as a fresh one:
0 for momentum and Adam's moments, but Rprop's step sizes start at the lr (zeroed, a grown weight moved by 1e-6 a step
for dozens of steps) and Adagrad's sums at initial_accumulator_value."""

import pytest
import torch
from torch import nn

import sparsekern

from ..helpers import BACKENDS

LR, INITIAL = 0.01, 0.5
FRESH = {  # optimizer -> (its state that starts away from 0, the value it starts at)
    "Rprop": (lambda params: torch.optim.Rprop(params, lr=LR), "step_size", LR),
    "Adagrad": (lambda params: torch.optim.Adagrad(params, lr=0.1, initial_accumulator_value=INITIAL), "sum", INITIAL),
}
ZERO = {  # optimizers whose every state shaped like the weight starts at 0
    "Adam": lambda params: torch.optim.Adam(params, lr=0.01, amsgrad=True),
    "SGD": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
}


@pytest.fixture(autouse=True)
def one_thread(one_thread):
    yield


def dense_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def train(model, optimizer, steps, algo=None, seed=0):
    """`steps` training steps; DST's step() (`algo`) goes between backward and the optimizer step."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 4, generator=generator)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if algo is not None:
            algo.step()
        optimizer.step()


def sparse_layers(model):
    return [module for module in model.modules() if isinstance(module, sparsekern.nn.SparseModule)]


def assert_fresh_where(optimizer, layer, positions, key, value):
    state = optimizer.state[layer.weight][key]
    assert positions.any() and torch.all(state[positions] == value), state[positions]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset_state", [True, False])
@pytest.mark.parametrize("name", FRESH)
def test_a_weight_grown_by_dst_starts_from_the_fresh_state(name, reset_state, backend, use_backend):
    use_backend(backend, "prune_grow")
    make, key, value = FRESH[name]
    model = sparsekern.sparsify(dense_model(), 0.3, distribution="uniform", generator=torch.Generator().manual_seed(0))
    optimizer = make(model.parameters())
    algo = sparsekern.DST(model, optimizer, update_every=4, total_steps=100, reset_state=reset_state)
    train(model, optimizer, 3, algo)   # the kept weights' state moves away from its start
    before = [layer.mask.clone() for layer in sparse_layers(model)]
    train(model, optimizer, 1, algo, seed=1)   # the update, then the optimizer step
    for layer, old in zip(sparse_layers(model), before):
        state = optimizer.state[layer.weight][key]
        grown = layer.mask & ~old
        # The optimizer has stepped once since: Rprop keeps a step size whose previous gradient was 0, and Adagrad's
        # sum adds g² there.
        expected = value if name == "Rprop" else value + layer.weight.grad.square()
        assert grown.any() and torch.allclose(state[grown], torch.as_tensor(expected).expand_as(state)[grown])
        assert_fresh_where(optimizer, layer, ~layer.mask, key, value)
        assert not torch.all(state[layer.mask & old] == value)   # the kept weights' own, left alone


@pytest.mark.parametrize("name", FRESH)
def test_dst_built_or_loaded_resets_the_state_off_the_masks_to_the_fresh_state(name):
    make, key, value = FRESH[name]
    model = sparsekern.sparsify(dense_model(), 0.3, distribution="uniform", generator=torch.Generator().manual_seed(0))
    optimizer = make(model.parameters())
    train(model, optimizer, 2)   # state everywhere, as a dense start leaves it
    for layer in sparse_layers(model):
        optimizer.state[layer.weight][key].fill_(3.0)
    algo = sparsekern.DST(model, optimizer, update_every=4, total_steps=100)
    for layer in sparse_layers(model):
        assert_fresh_where(optimizer, layer, ~layer.mask, key, value)
    saved = algo.state_dict()
    for layer in sparse_layers(model):
        optimizer.state[layer.weight][key].fill_(3.0)
    algo.load_state_dict(saved)
    for layer in sparse_layers(model):
        assert_fresh_where(optimizer, layer, ~layer.mask, key, value)


def test_rprop_state_off_the_mask_takes_the_lr_of_the_weights_own_group():
    model = sparsekern.sparsify(dense_model(), 0.3, distribution="uniform", generator=torch.Generator().manual_seed(0))
    first, second = sparse_layers(model)
    optimizer = torch.optim.Rprop([{"params": [first.weight, first.bias], "lr": 0.02},
                                   {"params": [second.weight, second.bias]}], lr=0.05)
    train(model, optimizer, 2)
    sparsekern.DST(model, optimizer, update_every=4, total_steps=100)
    first.set_mask(torch.ones_like(first.mask).tril(), optimizer=optimizer)
    assert_fresh_where(optimizer, first, ~first.mask, "step_size", 0.02)
    assert_fresh_where(optimizer, second, ~second.mask, "step_size", 0.05)


@pytest.mark.parametrize("name", FRESH)
def test_set_mask_with_the_optimizer_resets_the_state_off_the_mask_to_the_fresh_state(name):
    make, key, value = FRESH[name]
    model = sparsekern.sparsify(dense_model(), 0.5, distribution="uniform", generator=torch.Generator().manual_seed(0))
    optimizer = make(model.parameters())
    train(model, optimizer, 3)
    layer = sparse_layers(model)[0]
    kept = layer.mask & (torch.rand(layer.mask.shape, generator=torch.Generator().manual_seed(1)) < 0.5)
    before = optimizer.state[layer.weight][key].clone()
    layer.set_mask(kept, optimizer=optimizer)
    assert_fresh_where(optimizer, layer, ~kept, key, value)
    assert torch.equal(optimizer.state[layer.weight][key][kept], before[kept])


@pytest.mark.parametrize("name", FRESH)
def test_sparsify_with_the_optimizer_resets_the_state_off_the_masks_to_the_fresh_state(name):
    make, key, value = FRESH[name]
    model = dense_model()
    optimizer = make(model.parameters())
    train(model, optimizer, 3)
    model = sparsekern.sparsify(model, 0.3, distribution="uniform", generator=torch.Generator().manual_seed(0),
                                optimizer=optimizer)
    for layer in sparse_layers(model):
        assert_fresh_where(optimizer, layer, ~layer.mask, key, value)


@pytest.mark.parametrize("name", FRESH)
def test_imp_pruning_leaves_the_fresh_state_off_the_masks(name):
    """IMP starts every cycle with a fresh optimizer, whose state is fresh everywhere (a guard: nothing zeroes it)."""
    make, key, value = FRESH[name]
    model = sparsekern.sparsify(dense_model(), 1.0, distribution="uniform")
    imp = sparsekern.IMP(model, make, prune_fraction=0.5, rewind_step=1)
    for _ in range(3):
        train(model, imp.optimizer, 1)
        imp.step()
    imp.next_cycle()
    train(model, imp.optimizer, 1)
    for layer in sparse_layers(model):
        assert_fresh_where(imp.optimizer, layer, ~layer.mask, key, value)


@pytest.mark.parametrize("name", ZERO)
def test_the_state_of_the_common_optimizers_is_exactly_zero_off_the_masks(name):
    model = sparsekern.sparsify(dense_model(), 0.3, distribution="uniform", generator=torch.Generator().manual_seed(0))
    optimizer = ZERO[name](model.parameters())
    algo = sparsekern.DST(model, optimizer, update_every=4, total_steps=100)
    train(model, optimizer, 4, algo)   # an update on the last step, before the optimizer's
    layer = sparse_layers(model)[0]
    layer.set_mask(layer.mask & torch.ones_like(layer.mask).tril(), optimizer=optimizer)
    for layer in sparse_layers(model):
        states = [tensor for tensor in optimizer.state[layer.weight].values() if tensor.shape == layer.weight.shape]
        assert states and all(torch.equal(state[~layer.mask], torch.zeros_like(state[~layer.mask]))
                              for state in states)


def no_host_reads(monkeypatch):
    """Makes a read of a tensor's value to the host from Python (float(), .item()) raise: on GPU each is a sync."""
    def refuse(tensor, *args):
        raise AssertionError("a tensor's value was read to the host")

    monkeypatch.setattr(torch.Tensor, "__float__", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)


@pytest.mark.parametrize("lr", [torch.tensor(LR, dtype=torch.float64), torch.tensor([LR])], ids=["0-d", "1-element"])
def test_a_tensor_lr_of_rprop_fills_the_fresh_state_without_reading_it_to_the_host(lr, monkeypatch):
    # fresh_state took float(lr): on GPU a sync at every update, for every layer.
    model = sparsekern.sparsify(dense_model(), 0.3, distribution="uniform", generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Rprop(model.parameters(), lr=lr)
    algo = sparsekern.DST(model, optimizer, update_every=4, total_steps=100)
    train(model, optimizer, 3, algo)
    before = [layer.mask.clone() for layer in sparse_layers(model)]
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=generator), torch.randn(16, 4, generator=generator)
    nn.functional.mse_loss(model(x), y).backward()
    with monkeypatch.context() as patch:
        no_host_reads(patch)
        assert algo.step()
        layer = sparse_layers(model)[0]
        layer.set_mask(layer.mask & torch.ones_like(layer.mask).tril(), optimizer=optimizer)
    for layer, old in zip(sparse_layers(model), before):
        state = optimizer.state[layer.weight]["step_size"]
        assert state.dtype == torch.float32
        assert_fresh_where(optimizer, layer, ~layer.mask | ~old, "step_size", torch.tensor(LR))


@pytest.mark.gpu
def test_a_cuda_tensor_lr_of_rprop_is_never_read_back_by_an_update():
    model = sparsekern.sparsify(dense_model(), 0.3, distribution="uniform", generator=torch.Generator().manual_seed(0))
    model.cuda()
    optimizer = torch.optim.Rprop(model.parameters(), lr=torch.tensor(LR, device="cuda"))
    algo = sparsekern.DST(model, optimizer, update_every=1, total_steps=100, host_checks=False)
    model(torch.randn(16, 8, device="cuda")).square().mean().backward()
    optimizer.step()
    algo.step()   # the first update counts the masks (one read), later ones do not
    model(torch.randn(16, 8, device="cuda")).square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert algo.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for layer in sparse_layers(model):
        assert torch.all(optimizer.state[layer.weight]["step_size"][~layer.mask] == LR)
