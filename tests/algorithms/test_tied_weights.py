"""DST, IMP, SWAMP and OptG on models with shared modules and tied weights: a shared weight is one
layer, counted and updated once, and every module holding it carries its mask."""
import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.algorithms import IMP, SWAMP, OptG
from sparsekern.nn import sparse_modules

pytestmark = pytest.mark.usefixtures("one_thread")


def tied_model(seed=0, density=0.4):
    """x -> shared(8x8) -> tanh -> shared again (the same module) -> tied(8x8, own bias) -> head."""
    torch.manual_seed(seed)
    shared, tied = nn.Linear(8, 8), nn.Linear(8, 8)
    tied.weight = shared.weight
    model = nn.Sequential(nn.Linear(6, 8), shared, nn.Tanh(), shared, tied, nn.Tanh(), nn.Linear(8, 3))
    return sparsekern.sparsify(model, density, distribution="uniform", generator=torch.Generator().manual_seed(seed))


def batch(step):
    generator = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def loss(model, step):
    x, y = batch(step)
    return nn.functional.cross_entropy(model(x), y)


def assert_one_mask_per_weight(model):
    masks = {}
    for name, module in sparse_modules(model):
        first = masks.setdefault(id(module.weight), module.mask)
        assert torch.equal(first, module.mask), name
        assert torch.all(module.weight[~module.mask] == 0), name


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("method", ["RigL", "SET"])
def test_dst_updates_a_shared_weight_once_and_every_holder_follows(method, scope):
    model = tied_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = getattr(sparsekern, method)(model, optimizer, update_every=2, total_steps=40, scope=scope)
    assert [name for name, _ in algo.modules] == ["0", "1", "6"]   # "4" holds the weight of "1"
    counts = [int(m.mask.sum()) for _, m in algo.modules]
    masks, changed = [m.mask.clone() for _, m in algo.modules], False
    for step in range(8):
        optimizer.zero_grad()
        loss(model, step).backward()
        algo.step()
        optimizer.step()
        assert_one_mask_per_weight(model)
        now = [int(m.mask.sum()) for _, m in algo.modules]
        assert now == counts if scope == "layer" else sum(now) == sum(counts)
    changed = any(not torch.equal(a, m.mask) for a, (_, m) in zip(masks, algo.modules))
    assert changed
    state = algo.state_dict()
    assert sorted(state["masks"]) == ["0", "1", "6"]
    fresh = tied_model(seed=1)
    other = getattr(sparsekern, method)(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), update_every=2,
                                        total_steps=40, scope=scope)
    other.load_state_dict(state)
    assert_one_mask_per_weight(fresh)
    assert torch.equal(dict(sparse_modules(fresh))["4"].mask, state["masks"]["1"])


def test_dst_refuses_modules_that_share_a_weight_with_different_masks():
    model = tied_model()
    model[4].mask.logical_not_()
    with pytest.raises(ValueError, match="share one weight but have different masks"):
        sparsekern.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)


def _sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9)


def _train(model, algorithm, steps, seed=0):
    for t in range(algorithm.step_in_cycle, steps):
        loss(model, seed * 1000 + t).backward()
        algorithm.optimizer.step()
        algorithm.optimizer.zero_grad()
        algorithm.step()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_imp_prunes_a_shared_weight_once_and_rewinds_a_module_used_twice(scope):
    model = tied_model(density=1.0)
    imp = IMP(model, _sgd, prune_fraction=0.5, rewind_step=2, scope=scope)
    assert len(imp.layers) == 3
    _train(model, imp, 6)
    active = [int(m.mask.sum()) for m in imp.layers]
    masks = imp.next_cycle()
    assert_one_mask_per_weight(model)
    after = [int(m.sum()) for m in masks]
    if scope == "global":
        assert sum(after) == sum(active) - -(-sum(active) // 2)
    else:
        assert after == [n - -(-n // 2) for n in active]
    # The module reached as both "1" and "3" keeps the pruned mask: rewinding restores no mask.
    assert torch.equal(model[1].mask, masks[1]) and torch.equal(model[3].mask, masks[1])


def test_swamp_averages_and_prunes_a_shared_weight_once():
    model = tied_model(density=1.0)
    swamp = SWAMP(model, _sgd, particles=2, prune_fraction=0.5, rewind_step=1, swa_start=2)
    for _ in range(2):
        _train(model, swamp, 5, seed=swamp.data_seed)
        if not swamp.next_particle():
            break
    masks = swamp.next_cycle()
    assert_one_mask_per_weight(model)
    total = sum(m.weight.numel() for m in swamp.layers)
    assert sum(int(m.sum()) for m in masks) == total - total // 2


def test_optg_keeps_one_score_and_one_mask_per_shared_weight():
    model = tied_model(density=1.0)
    optg = OptG(model, sparsity=0.5, epochs=3, lr=0.5, dense_while_scores_tie=False)
    assert len(optg.scores) == 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(3):
        for step in range(3):
            loss(model, 10 * epoch + step).backward()
            optg.step()
            optimizer.step()
            optimizer.zero_grad()
            for name, module in sparse_modules(model):
                assert module.dense_grad, name
        optg.next_epoch()
        masks = {}
        for name, module in sparse_modules(model):
            assert torch.equal(masks.setdefault(id(module.weight), module.mask), module.mask), name
    total = sum(score.numel() for score in optg.scores)
    assert sum(int(m.sum()) for m in optg.masks) == total - round(optg.sparsity_at(3) * total)
