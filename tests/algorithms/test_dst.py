"""DST (SET, RigL, MEST): the papers' update rules and schedules, state, arguments."""
import copy
import sys
import warnings

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern import checkpoint
from sparsekern.algorithms import criteria
from sparsekern.algorithms.dst import _Blocks
from sparsekern.nn import SparseConv1d, SparseConv3d, SparseLinear, sparse_modules

from ..helpers import batch as stateless_batch
from ..helpers import (BACKENDS, BAD_OWN_MASKS, assert_unchanged, conv1d_conv3d_model, conv_data, counting_host_reads,
                       damage_mask, everything)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: with CI's few cores shared by other jobs, more threads only contend
    (the digits runs took 60x longer with 2 threads on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(seed=0, density=0.3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 24), nn.ReLU(),
                          nn.Linear(24, 5))
    return sparsekern.sparsify(model, density, distribution="uniform", generator=torch.Generator().manual_seed(seed))


def batch(step):
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 2, 6, 6, generator=generator), torch.randint(0, 5, (8,), generator=generator)


def train_step(model, optimizer, algo, step):
    x, y = batch(step)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    updated = algo.step() if algo is not None else False
    optimizer.step()
    return updated


def one_step_before_an_update(algorithm):
    """(model, optimizer, algorithm updating every 5 steps) after 4 training steps: the next step is due."""
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = algorithm(model, optimizer, update_every=5, total_steps=50)
    for step in range(4):
        train_step(model, optimizer, algo, step)
    return model, optimizer, algo


def masks(model):
    return [m.mask.clone() for _, m in sparse_modules(model)]


def assert_inactive_zero(model):
    for name, module in sparse_modules(model):
        assert torch.all(module.weight[~module.mask] == 0), name


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("grow", ["gradient", "random"])
@pytest.mark.parametrize("prune", sorted(criteria.PRUNE))
def test_exact_counts_after_every_update(prune, grow, scope):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    algo = sparsekern.DST(model, optimizer, prune=prune, grow=grow, schedule="constant", update_every=2,
                          total_steps=20)
    counts = [int(m.sum()) for m in masks(model)]
    updates, changed = 0, False
    for step in range(6):
        before = masks(model)
        updates += train_step(model, optimizer, algo, step)
        after = masks(model)
        changed |= any(not torch.equal(a, b) for a, b in zip(before, after))
        now = [int(m.sum()) for m in after]
        assert (now == counts) if scope == "layer" else sum(now) == sum(counts)
        assert_inactive_zero(model)
    assert updates == 3 and changed


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("block", [(2, 3), (4, 4)])
def test_block_masks_stay_whole_blocks_with_exact_block_counts(block, scope):
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    algo = sparsekern.RigL(model, optimizer, update_every=2, total_steps=40, block=block, scope=scope)
    modules = [m for _, m in sparse_modules(model)]
    grids = [_Blocks(m.weight.shape, block) for m in modules]

    def block_counts():
        counts = []
        for grid, module in zip(grids, modules):
            per_block = grid.sum(module.mask.float())
            full = grid.sum(torch.ones_like(module.weight))
            assert torch.all((per_block == 0) | (per_block == full))  # all or nothing
            counts.append(int((per_block > 0).sum()))
        return counts

    expected = [min(round(0.3 * m.weight.numel() / (block[0] * block[1])), g.grid[0] * g.grid[1])
                for m, g in zip(modules, grids)]
    assert block_counts() == expected
    for step in range(8):
        train_step(model, optimizer, algo, step)
        counts = block_counts()
        assert (counts == expected) if scope == "layer" else sum(counts) == sum(expected)
        assert_inactive_zero(model)


def test_rigl_planted_gradient(generator):
    """Check 3: dropped = n smallest |θ| among active, grown = top-n |g| among inactive; grown
    weights and their optimizer state are 0, and so is the state at dropped positions."""
    layer = SparseLinear(10, 8, bias=False)
    numel = layer.weight.numel()
    mask = (torch.randperm(numel, generator=generator) < 24).view(8, 10)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 10, generator=generator))
    layer.set_mask(mask)
    model = nn.Sequential(layer)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(3, 10, generator=generator)).sum().backward()
    optimizer.step()
    for value in optimizer.state[layer.weight].values():
        if value.shape == layer.weight.shape:
            value.copy_(mask.float() + 1)  # non-zero at active positions, for the check below
    algo = sparsekern.RigL(model, optimizer, update_every=1, total_steps=100)
    assert layer.dense_grad  # step 1 is an update step
    # Planted dense gradient: inactive entries all larger than active ones, distinct.
    grad = torch.rand(8, 10, generator=generator)
    grad[~mask] += 1 + torch.randperm(numel - 24, generator=generator).float()
    layer.weight.grad = grad.clone()
    old_weight = layer.weight.detach().clone()

    assert algo.step()
    n = round(0.3 / 2 * (1 + torch.cos(torch.tensor(torch.pi / 75))).item() * 24)
    assert n == 7
    active, inactive = mask.flatten().nonzero().squeeze(1), (~mask).flatten().nonzero().squeeze(1)
    dropped = active[old_weight.flatten()[active].abs().argsort()[:n]]
    grown = inactive[grad.flatten()[inactive].argsort(descending=True)[:n]]
    new = layer.mask.flatten()
    assert torch.equal((mask.flatten() & ~new).nonzero().squeeze(1).sort().values, dropped.sort().values)
    assert torch.equal((new & ~mask.flatten()).nonzero().squeeze(1).sort().values, grown.sort().values)
    weight = layer.weight.detach().flatten()
    assert torch.all(weight[grown] == 0) and torch.all(weight[dropped] == 0)
    kept = mask.flatten() & new
    assert torch.equal(weight[kept], old_weight.flatten()[kept])
    for value in optimizer.state[layer.weight].values():
        if value.shape == layer.weight.shape:
            flat = value.flatten()
            assert torch.all(flat[grown] == 0) and torch.all(flat[dropped] == 0) and torch.all(flat[kept] == 2)
    # The optimizer step that follows sees masked gradients: grown entries keep theirs.
    assert torch.equal(layer.weight.grad, torch.where(layer.mask, grad, 0.0))
    assert not layer.dense_grad or algo.schedule.is_update(2)


def test_updates_follow_the_schedule_and_stop_at_end_step():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    algo = sparsekern.RigL(model, optimizer, update_every=2, total_steps=20)
    updated = [step + 1 for step in range(20) if train_step(model, optimizer, algo, step)]
    assert updated == [2, 4, 6, 8, 10, 12, 14]  # T_end = 15


@pytest.mark.parametrize("method", [sparsekern.RigL, sparsekern.SET, sparsekern.MEST])
def test_dense_grad_only_before_update_steps(method):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    algo = method(model, optimizer, update_every=3, total_steps=30)
    modules = [m for _, m in sparse_modules(model)]
    for step in range(7):
        train_step(model, optimizer, algo, step)
        expected = (step + 2) % 3 == 0
        assert all(m.dense_grad == expected for m in modules)
        for module in modules:  # the gradient the optimizer saw was masked
            assert torch.all(module.weight.grad[~module.mask] == 0)


@pytest.mark.parametrize("method", ["SET", "MEST"])
def test_random_growth_gives_its_grown_weights_their_first_gradient_step_at_the_update(method):
    """The papers' default on an update step: the update and the optimizer step both, so grown
    weights (at 0) take one plain SGD step, -lr * g, whatever the growth criterion."""
    model = small_model()
    lr = 0.05
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    algo = getattr(sparsekern, method)(model, optimizer, update_every=2, total_steps=20)
    train_step(model, optimizer, algo, 0)
    before = masks(model)
    x, y = batch(1)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert algo.step()
    optimizer.step()
    for (name, module), old in zip(sparse_modules(model), before):
        grown = module.mask & ~old
        assert grown.any()
        torch.testing.assert_close(module.weight.detach()[grown], -lr * module.weight.grad[grown],
                                   rtol=0, atol=0, msg=name)
        assert (module.weight.detach()[grown] != 0).any(), name   # (a unit behind a dead ReLU has g = 0)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("prune", sorted(criteria.PRUNE))
def test_every_pruning_criterion_updates_from_the_masked_gradient_as_from_the_dense_one(prune, scope):
    """The built-in pruning criteria read only the active entries' gradients (their scores at inactive ones are
    ignored), which the masked gradient holds: under random growth an update from it swaps the weights that one
    from the dense gradient swaps. What the dense gradient DST asks for gives them is their grown weights' first
    step at the update (`DST._dense_grad_next`)."""
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    algo = sparsekern.DST(model, optimizer, prune=prune, grow="random", scope=scope, update_every=2, total_steps=20)
    train_step(model, optimizer, algo, 0)   # momentum buffers, and step 2 is an update step
    layers = [module for _, module in sparse_modules(model)]
    assert all(layer.dense_grad for layer in layers)
    x, y = batch(1)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(layer.weight.grad[~layer.mask].ne(0).any() for layer in layers)   # dense indeed
    updated = []
    for masked in (True, False):
        copied_model, copied_optimizer, copied_algo = copy.deepcopy((model, optimizer, algo))
        copied = [module for _, module in sparse_modules(copied_model)]
        for layer, original in zip(copied, layers):   # (a deep copy leaves gradients behind)
            # masked: what the layers' backward gives without dense_grad
            grad = original.weight.grad
            layer.weight.grad = torch.where(layer.mask, grad, 0.0) if masked else grad.clone()
        assert copied_algo.step()
        updated.append([(layer.mask, layer.weight.detach(), copied_optimizer.state[layer.weight]["momentum_buffer"])
                        for layer in copied])
    for from_masked, from_dense in zip(*updated):
        assert all(torch.equal(a, b) for a, b in zip(from_masked, from_dense))
    assert any(not torch.equal(mask, layer.mask) for (mask, _, _), layer in zip(updated[0], layers))   # swapped


@pytest.mark.parametrize("method", ["SET", "RigL"])
@pytest.mark.parametrize("after_backward", [False, True])
def test_finish_lets_training_go_on_without_step_and_keeps_inactive_weights_at_0(after_backward, method):
    # Stopped on the step before an update, the layers would compute dense gradients for it, and
    # the optimizer alone moved inactive weights (0.1 of them, with momentum) off 0.
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    set_ = getattr(sparsekern, method)(model, optimizer, update_every=5, total_steps=50)
    for step in range(4):
        train_step(model, optimizer, set_, step)
    before = masks(model)
    if after_backward:   # a backward ran first: its dense gradients are masked too
        x, y = batch(4)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        set_.finish()
        optimizer.step()
    else:
        set_.finish()
    for step in range(5, 9):
        train_step(model, optimizer, None, step)
    assert_inactive_zero(model)
    assert all(torch.equal(a, b) for a, b in zip(before, masks(model)))
    # step() carries on with the schedule; its own step cannot update (its gradients were masked)
    assert [train_step(model, optimizer, set_, step) for step in range(9, 15)] == [False] * 5 + [True]
    assert set_.step_count == 10
    assert_inactive_zero(model)



class _TiedPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_finish_masks_the_gradient_of_every_module_holding_a_tied_weight():
    # finish() cleared dense_grad on the primary only: the tied module's backward added a dense
    # gradient, and momentum moved inactive weights off 0.
    torch.manual_seed(0)
    model = sparsekern.sparsify(_TiedPair(), 0.3, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    set_ = sparsekern.SET(model, optimizer, update_every=5, total_steps=50)
    generator = torch.Generator().manual_seed(1)
    for step in range(9):
        optimizer.zero_grad()
        model(torch.randn(8, 8, generator=generator)).pow(2).sum().backward()
        if step < 4:
            set_.step()
        elif step == 4:
            set_.finish()
        optimizer.step()
    assert not model.b.dense_grad
    assert_inactive_zero(model)


def test_load_state_dict_after_finish_lets_the_due_update_happen():
    # The state was saved on the step before an update: loaded after finish(), its update was
    # skipped silently, its dense gradients computed for nothing.
    model, optimizer, set_ = one_step_before_an_update(sparsekern.SET)
    state = set_.state_dict()
    set_.finish()
    set_.load_state_dict(state)
    assert train_step(model, optimizer, set_, 4)


def test_a_state_saved_after_finish_loads_finished():
    # finish() was no part of the state: loaded into a fresh DST, the next backward was dense and the due
    # step() updated the masks from it, where the saving DST would not have.
    model, optimizer, set_ = one_step_before_an_update(sparsekern.SET)
    set_.finish()
    state = set_.state_dict()
    fresh = sparsekern.SET(model, optimizer, update_every=5, total_steps=50)
    fresh.load_state_dict(state)
    assert state["finished"] and not any(module.dense_grad for _, module in sparse_modules(model))
    before = masks(model)
    assert not train_step(model, optimizer, fresh, 4) and fresh.step_count == 5
    assert all(torch.equal(a, b) for a, b in zip(before, masks(model)))
    assert not fresh.state_dict()["finished"]   # step() ended it
    state.pop("finished")   # as saved before it was part of the state: not finished
    fresh.load_state_dict(state)
    assert train_step(model, optimizer, fresh, 4)


def test_a_due_step_after_finish_asks_for_no_gradient():
    # It cannot update (its backward was masked), so RigL's "no gradient" refusal has nothing to protect.
    model, optimizer, rigl = one_step_before_an_update(sparsekern.RigL)
    rigl.finish()
    optimizer.zero_grad(set_to_none=True)
    before = masks(model)
    assert not rigl.step() and rigl.step_count == 5
    assert all(torch.equal(a, b) for a, b in zip(before, masks(model)))


OPTIMIZERS = {
    "sgd momentum wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    "sgd nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "adam amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2, amsgrad=True),
}


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("grow", ["gradient", "random"])
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_inactive_weights_stay_zero_after_every_optimizer_step(optimizer_name, grow, scope):
    """Check 6: θ⊙(1−m) = 0 after every optimizer step; the sparse model equals a dense model
    with masked weights."""
    model = small_model()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    algo = sparsekern.DST(model, optimizer, grow=grow, scope=scope, update_every=2, total_steps=30,
                          schedule="constant", drop_fraction=0.5)
    for step in range(8):
        train_step(model, optimizer, algo, step)
        assert_inactive_zero(model)
    dense = copy.deepcopy(model)
    for name, module in sparse_modules(model):
        parent, _, child = name.rpartition(".")
        setattr(dense.get_submodule(parent) if parent else dense, child, module.to_dense())
    x, _ = batch(99)
    torch.testing.assert_close(model(x), dense(x), rtol=0, atol=0)


def run_training(total, stop=None, path=None, algorithm="RigL"):
    model = small_model(seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    algo = getattr(sparsekern, algorithm)(model, optimizer, update_every=4, total_steps=total, seed=5)
    start = 0
    if stop is not None and path is not None and path.exists():
        model = small_model(seed=1)  # a different init, overwritten by the checkpoint
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        algo = getattr(sparsekern, algorithm)(model, optimizer, update_every=4, total_steps=total, seed=6)
        saved = checkpoint.load(path)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        algo.load_state_dict(saved["algorithm"])
        start = stop
    for step in range(start, total):
        if stop is not None and step == stop and start == 0:
            checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "algorithm": algo.state_dict()}, path)
            return None
        train_step(model, optimizer, algo, step)
    return model


@pytest.mark.parametrize("algorithm", ["RigL", "SET", "MEST"])
def test_resume_from_checkpoint_is_bit_identical(algorithm, tmp_path):
    path = tmp_path / "run.pt"
    whole = run_training(20, algorithm=algorithm)
    assert run_training(20, stop=7, path=path, algorithm=algorithm) is None  # step 8 updates
    resumed = run_training(20, stop=7, path=path, algorithm=algorithm)
    for (name, a), (_, b) in zip(sparse_modules(whole), sparse_modules(resumed)):
        assert torch.equal(a.mask, b.mask), name
        assert torch.equal(a.weight, b.weight), name
        assert a.dense_grad == b.dense_grad
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))


def test_state_dict_round_trip_and_bad_state_changes_nothing():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.SET(model, optimizer, update_every=2, total_steps=20)
    for step in range(5):
        train_step(model, optimizer, algo, step)
    state = algo.state_dict()
    assert state["step_count"] == 5 and set(state["masks"]) == {name for name, _ in sparse_modules(model)}
    before = masks(model)
    broken = dict(state, masks={name: mask[:1] for name, mask in state["masks"].items()})
    with pytest.raises(ValueError, match="masks"):
        algo.load_state_dict(broken)
    with pytest.raises(ValueError, match="step_count"):
        algo.load_state_dict(dict(state, step_count=-1))
    with pytest.raises(ValueError, match="lacks"):
        algo.load_state_dict({"masks": state["masks"]})
    with pytest.raises(ValueError, match="schedule"):
        algo.load_state_dict(dict(state, schedule={"name": "cosine"}))
    assert all(torch.equal(a, b) for a, b in zip(before, masks(model))) and algo.step_count == 5


def test_a_saved_schedule_that_replaces_the_built_one_is_named_in_a_warning():
    # A run resumed through the Python API with a longer total_steps followed the saved schedule without a word.
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = sparsekern.RigL(model, optimizer, update_every=4, total_steps=40).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsekern.RigL(model, optimizer, update_every=4, total_steps=40).load_state_dict(state)
    longer = sparsekern.RigL(model, optimizer, update_every=4, total_steps=80)
    with pytest.warns(UserWarning, match=r"replaces the one this DST was built with \(end_step: 60 -> 30, "
                                         r"total_steps: 80 -> 40\)"):
        longer.load_state_dict(state)
    assert longer.schedule.total_steps == 40


def test_loading_masks_zeroes_the_optimizer_state_off_them():
    # Rolling the model and DST back to an earlier state while the optimizer keeps its momentum. Before: the
    # momentum of weights active since then moved them off 0 under the loaded masks, and the layers, promising
    # zero_off_mask, computed with them.
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.RigL(model, optimizer, update_every=4, total_steps=40)
    for step in range(5):
        train_step(model, optimizer, algo, step)
    saved = copy.deepcopy({"model": model.state_dict(), "algo": algo.state_dict()})
    for step in range(5, 13):
        train_step(model, optimizer, algo, step)
    assert any(not torch.equal(a, b) for a, b in zip(masks(model), saved["algo"]["masks"].values()))
    model.load_state_dict(saved["model"])
    algo.load_state_dict(saved["algo"])
    assert not train_step(model, optimizer, algo, 13)    # no update: nothing else zeroes the weights
    assert_inactive_zero(model)


def test_state_at_total_steps_loads_without_a_warning():
    # A run that ended where its schedule ends did not go past it: its state loads silently.
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.SET(model, optimizer, update_every=2, total_steps=4)
    for step in range(4):
        train_step(model, optimizer, algo, step)
    fresh = sparsekern.SET(model, optimizer, update_every=2, total_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.load_state_dict(algo.state_dict())
    assert fresh.step_count == 4


def test_state_past_total_steps_loads_with_a_warning_before_any_change():
    # step() lets a run go past total_steps (warning once), so such a state is DST's own and must load
    # back; loading it warns, since step() will not, and the warning comes before any change.
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.SET(model, optimizer, update_every=2, total_steps=4)
    with pytest.warns(UserWarning, match="more than total_steps"):
        for step in range(6):
            train_step(model, optimizer, algo, step)
    state = algo.state_dict()
    fresh = sparsekern.SET(model, optimizer, update_every=2, total_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"state\['step_count'\]=6 is beyond the schedule's total_steps=4"):
            fresh.load_state_dict(state)
    assert fresh.step_count == 0
    with pytest.warns(UserWarning, match="step_count"):
        fresh.load_state_dict(state)
    assert fresh.step_count == 6


def test_presets_and_overrides():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = sparsekern.RigL(model, optimizer, total_steps=100)
    assert (rigl.prune, rigl.grow, rigl.schedule.name) == ("magnitude", "gradient", "cosine")
    assert rigl.schedule.drop_fraction == 0.3
    assert rigl.schedule.update_every == 100 and rigl.schedule.end_step == 75
    set_ = sparsekern.SET(model, optimizer, total_steps=100)
    assert (set_.prune, set_.grow, set_.schedule.name) == ("set", "random", "constant")
    mest = sparsekern.MEST(model, optimizer, total_steps=100, mest_gamma=0.5, grow="gradient")
    assert (mest.prune, mest.grow, mest.mest_gamma) == ("mest", "gradient", 0.5)
    annealed = sparsekern.DST(model, optimizer, schedule="annealed", total_steps=100)
    assert annealed.schedule.drop_fraction == 0.5 and annealed.schedule.end_step == 100


def test_keeps_no_tensors_between_steps():
    """No per-layer dense buffer lives between steps: the algorithm holds no tensor of its own,
    and the gradients the model keeps are masked outside update steps."""
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.RigL(model, optimizer, update_every=2, total_steps=20, scope="global")

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from tensors(item)

    own = {key: value for key, value in vars(algo).items() if key not in ("modules", "optimizer")}
    for step in range(6):
        train_step(model, optimizer, algo, step)
        assert list(tensors(own)) == []
        for _, module in algo.modules:
            assert torch.all(module.weight.grad[~module.mask] == 0)


@pytest.mark.parametrize("arguments, error, word", [
    (dict(prune="biggest"), ValueError, "prune"),
    (dict(grow=1), TypeError, "grow"),
    (dict(schedule="step"), ValueError, "schedule"),
    (dict(update_every=0), ValueError, "update_every"),
    (dict(total_steps=None), TypeError, "total_steps"),
    (dict(end_step=0), ValueError, "end_step"),
    (dict(drop_fraction=2.0), ValueError, "drop_fraction"),
    (dict(scope="row"), ValueError, "scope"),
    (dict(scope=None), TypeError, "scope"),
    (dict(reset_state=1), TypeError, "reset_state"),
    (dict(host_checks="no"), TypeError, "host_checks"),
    (dict(block=(0, 4)), ValueError, "block"),
    (dict(block=4), TypeError, "block"),
    (dict(block=(2, 2), prune="set"), ValueError, "block"),
    (dict(mest_gamma=-1.0), ValueError, "mest_gamma"),
    (dict(mest_gamma="1"), TypeError, "mest_gamma"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(mest_gamma=float("inf")), ValueError, "mest_gamma"),
    (dict(generator=3), TypeError, "generator"),
])
def test_bad_arguments_name_themselves_and_change_nothing(arguments, error, word):
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = masks(model)
    options = dict(total_steps=10)
    options.update(arguments)
    with pytest.raises(error, match=word):
        sparsekern.DST(model, optimizer, **options)
    assert all(torch.equal(a, b) for a, b in zip(before, masks(model)))
    assert not any(m.dense_grad for _, m in sparse_modules(model))


def test_model_and_optimizer_types_are_checked():
    model = small_model()
    with pytest.raises(TypeError, match="optimizer"):
        sparsekern.DST(model, None, total_steps=10)
    with pytest.raises(TypeError, match="model"):
        sparsekern.DST(None, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)
    dense = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="sparse modules"):
        sparsekern.DST(dense, torch.optim.SGD(dense.parameters(), lr=0.1), total_steps=10)


def test_update_without_gradient_says_so():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.RigL(model, optimizer, update_every=1, total_steps=10)
    with pytest.raises(RuntimeError, match="after backward"):
        algo.step()


def digits_run(method, seed, data, steps=400, update_every=40):
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    # The same seed gives every method the same initial mask and weights.
    model = sparsekern.sparsify(model, 0.1, distribution="uniform", generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    algo = None
    if method == "rigl":
        algo = sparsekern.RigL(model, optimizer, total_steps=steps, update_every=update_every, seed=seed)
    elif method == "set":
        algo = sparsekern.SET(model, optimizer, total_steps=steps, update_every=update_every,
                              end_step=round(0.75 * steps), seed=seed)
    order = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, len(train_x), (64,), generator=order)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(train_x[index]), train_y[index]).backward()
        if algo is not None:
            algo.step()
        optimizer.step()
    with torch.no_grad():
        logits = model(test_x)
    return nn.functional.cross_entropy(logits, test_y).item(), (logits.argmax(1) == test_y).float().mean().item()


def test_rigl_and_set_beat_static_sparse_training_on_digits():
    """Check 11: scikit-learn's bundled digits, 90% sparsity, 3 seeds, held-out loss."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(123))
    x, y = x[order], y[order]
    data = (x[:1400], y[:1400], x[1400:], y[1400:])
    accuracy = {"static": 0.0, "rigl": 0.0, "set": 0.0}
    for seed in range(3):
        results = {method: digits_run(method, seed, data) for method in accuracy}
        for method in ("rigl", "set"):
            assert results[method][0] < results["static"][0], (seed, results)
        for method, (_, correct) in results.items():
            accuracy[method] += correct / 3
    assert accuracy["rigl"] > accuracy["static"] and accuracy["set"] > accuracy["static"], accuracy


@pytest.mark.parametrize("reset_state", [True, False])
def test_update_after_the_optimizer_step_and_without_state_reset(reset_state):
    """The "after" placement: the optimizer step sees dense gradients on update steps, and the
    update that follows puts every inactive weight and its state back to 0."""
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    algo = sparsekern.RigL(model, optimizer, update_every=2, total_steps=40, reset_state=reset_state)
    counts = [int(m.sum()) for m in masks(model)]
    for step in range(8):
        x, y = batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        algo.step()
        assert_inactive_zero(model)
        for _, module in sparse_modules(model):
            for value in optimizer.state[module.weight].values():
                if value.shape == module.weight.shape:
                    assert torch.all(value[~module.mask] == 0)
    assert [int(m.sum()) for m in masks(model)] == counts


def test_rigl_code_order_an_update_instead_of_the_optimizer_step():
    """RigL's code order (the documented option): the optimizer step is skipped on update steps, so the
    weights are those the update left (kept ones unchanged, grown ones at 0); other steps train as usual."""
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.RigL(model, optimizer, update_every=3, total_steps=40)
    updates = 0
    for step in range(9):
        x, y = batch(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        before = [(m.weight.detach().clone(), m.mask.clone()) for _, m in sparse_modules(model)]
        if algo.step():
            updates += 1
            for (_, module), (weight, old) in zip(sparse_modules(model), before):
                kept = module.mask & old
                assert torch.equal(module.weight.detach()[kept], weight[kept])
                assert torch.all(module.weight.detach()[module.mask & ~old] == 0)
        else:
            optimizer.step()
        assert_inactive_zero(model)
    assert updates == 3


@pytest.mark.parametrize("algorithm", ["SET", "MEST"])
def test_random_growth_with_the_seed_that_drew_the_masks_still_moves_them(algorithm):
    # sparsify's generator and DST share seed 0 here: DST must not replay the stream that chose the
    # masks, or random growth would regrow exactly the dropped weights and the masks never change.
    model = small_model(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    algo = getattr(sparsekern, algorithm)(model, optimizer, total_steps=4, update_every=1, seed=0)
    before = masks(model)
    train_step(model, optimizer, algo, step=1)
    assert any(not torch.equal(b, a) for b, a in zip(before, masks(model)))


def test_a_numpy_integer_seed_draws_what_the_equal_int_draws():
    """Seeds often come from NumPy (np.random.randint, a sweep's array); any integer scalar is a seed."""
    import numpy as np

    drawn = []
    for seed in (7, np.int64(7), torch.tensor(7)):
        model = small_model(seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        algo = sparsekern.SET(model, optimizer, total_steps=4, update_every=1, seed=seed)
        train_step(model, optimizer, algo, step=1)
        drawn.append(masks(model))
    assert all(torch.equal(a, b) for other in drawn[1:] for a, b in zip(drawn[0], other))


def test_a_block_of_numpy_or_tensor_integers_is_a_block_of_ints():
    # A NumPy integer was refused ("block must hold two ints") though every other count DST takes accepts it.
    import numpy as np

    for block in ((np.int64(2), 2), (2, torch.tensor(2)), [2, 2]):
        model = small_model(seed=0)
        algo = sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.05), block=block, total_steps=4)
        assert algo.block == (2, 2) and all(type(size) is int for size in algo.block)


# -- the update path: one op call, counts kept on the host, swap counts above the inactive count --


@pytest.mark.parametrize("poison, updates", [(None, True), (3e38, True), (float("inf"), False), (float("nan"), False)])
def test_an_update_waits_only_for_gradients_that_are_not_finite(poison, updates):
    # 3e38 twice overflows a float32 sum to inf although every gradient is finite: the exact check
    # behind the fast one must still let the update run.
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.RigL(model, optimizer, update_every=1, total_steps=100, drop_fraction=0.5)
    x, y = batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    if poison is not None:
        model[3].weight.grad[0, :2] = poison
    before = masks(model)
    assert algo.step() is updates
    assert any(not torch.equal(a, b) for a, b in zip(before, masks(model))) is updates
    # Skipped or not, the optimizer step sees masked gradients (a skipped update's were left dense for it,
    # and an optimizer step without a GradScaler would have moved inactive weights).
    for name, module in sparse_modules(model):
        assert torch.equal(module.weight.grad[~module.mask], torch.zeros_like(module.weight.grad[~module.mask])), name


@pytest.mark.parametrize("poison, updates", [(1.0, True), (3e38, False), (float("inf"), False)])
def test_a_sparse_gradient_of_another_parameter_is_checked_by_its_values(poison, updates):
    # An nn.Embedding(sparse=True) beside the sparse layers: the optimizer holds its torch.sparse gradient,
    # whose overflow (a step a GradScaler skips) raised NotImplementedError from isfinite (no sparse kernel).
    embedding = nn.Embedding(10, 8, sparse=True)
    layer = sparsekern.sparsify(nn.Linear(8, 4), 0.5, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD([*embedding.parameters(), *layer.parameters()], lr=0.1)
    algo = sparsekern.RigL(nn.ModuleList([embedding, layer]), optimizer, update_every=1, total_steps=10,
                           drop_fraction=0.5)
    layer(embedding(torch.tensor([[1, 2], [3, 1]])).mean(1)).square().sum().backward()
    # Two entries for one row, as an embedding's backward leaves them: summed, they are what the optimizer
    # applies (3e38 twice overflows float32 to inf).
    embedding.weight.grad = torch.sparse_coo_tensor([[1, 1]], [[poison] * 8, [poison] * 8], (10, 8))
    before = layer.mask.clone()
    assert algo.step() is updates
    assert (not torch.equal(before, layer.mask)) is updates


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_the_momentum_zero_redundancy_optimizer_keeps_is_zeroed_too(one_rank):
    # ZeroRedundancyOptimizer's own `state` is empty: each rank's shard lives in its local optimizer. Read
    # there, DST's dropped weights keep no momentum; read from `state`, they moved off 0 at the next step.
    from torch.distributed.optim import ZeroRedundancyOptimizer
    model = small_model()
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1, momentum=0.9)
    algo = sparsekern.SET(model, optimizer, update_every=2, total_steps=40)
    for step in range(5):
        train_step(model, optimizer, algo, step)
        assert_inactive_zero(model)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_an_lbfgs_inside_a_zero_redundancy_optimizer_is_refused_as_a_plain_one(one_rank):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    model = small_model()
    optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.LBFGS, lr=0.1)
    with pytest.raises(ValueError, match="LBFGS"):
        sparsekern.SET(model, optimizer, update_every=2, total_steps=40)


def test_the_emptied_layer_warning_reads_whole_masks_whose_first_entries_are_inactive():
    # Both layers hold more entries than the warning's first look (4096): layer 0 keeps one active
    # entry past it, layer 2 none at all.
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 80)), 0.3,
                                generator=torch.Generator().manual_seed(0))
    algo = sparsekern.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), scope="global", total_steps=10)
    late = torch.zeros(64, 128, dtype=torch.bool)
    late.view(-1)[5000] = True
    model[0].set_mask(late)
    model[2].set_mask(torch.zeros(80, 64, dtype=torch.bool))
    with pytest.warns(UserWarning, match=r"left \['2'\] with no active weight"):
        algo._warn_if_emptied()


def test_the_emptied_layer_warning_names_a_layer_again_only_once_it_was_refilled():
    # Each global update that leaves a layer empty would repeat the warning for as long as training goes on.
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    algo = sparsekern.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), scope="global", total_steps=10)
    refilled = model[2].mask.clone()
    model[2].set_mask(torch.zeros(4, 6, dtype=torch.bool))
    with pytest.warns(UserWarning, match=r"left \['2'\] with no active weight"):
        algo._warn_if_emptied()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        algo._warn_if_emptied()   # still empty: said already
        model[2].set_mask(refilled)
        algo._warn_if_emptied()
    model[2].set_mask(torch.zeros(4, 6, dtype=torch.bool))
    with pytest.warns(UserWarning, match=r"left \['2'\] with no active weight"):
        algo._warn_if_emptied()


def dense_layer_model(density, seed=0):
    """One SparseLinear(20, 10) at `density`, its dense gradient set."""
    generator = torch.Generator().manual_seed(seed)
    layer = SparseLinear(20, 10, bias=False)
    mask = (torch.randperm(200, generator=generator) < round(density * 200)).view(10, 20)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(10, 20, generator=generator))
    layer.set_mask(mask)
    layer.weight.grad = torch.rand(10, 20, generator=generator)
    return nn.Sequential(layer), generator


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_layer_denser_than_one_over_one_plus_r_swaps_round_r_active(scope):
    """Acceptance check 12: at density 0.86 with r = 0.3, n = round(r·A) = 52 exceeds the 28
    inactive entries; just-dropped entries grow back (keeping their weights), the count stays."""
    model, _ = dense_layer_model(0.86)
    layer = model[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.DST(model, optimizer, prune="magnitude", grow="gradient", schedule="constant",
                          drop_fraction=0.3, update_every=1, total_steps=10, scope=scope)
    old, weight = layer.mask.clone(), layer.weight.detach().clone()
    active = int(old.sum())
    n = round(0.3 * active)
    assert n > old.numel() - active
    layer.weight.grad = torch.rand(10, 20, generator=torch.Generator().manual_seed(1))
    grad = layer.weight.grad.clone()
    assert algo.step()
    new = layer.mask
    assert int(new.sum()) == active
    kept = old.flatten().clone()
    kept[weight.abs().flatten().masked_fill(~old.flatten(), float("inf")).argsort()[:n]] = False
    dropped = (old.flatten() & ~kept).view_as(old)
    assert int(dropped.sum()) == n
    regrown = dropped & new
    assert int(regrown.sum()) >= n - (old.numel() - active) > 0
    # Grown entries are the best n by |g| among all not kept.
    candidates = (~kept).nonzero().squeeze(1)
    expected = torch.zeros(200, dtype=torch.bool)
    expected[candidates[grad.flatten()[candidates].argsort(descending=True)[:n]]] = True
    assert torch.equal((new.flatten() & ~kept), expected)
    assert torch.equal(layer.weight.detach()[regrown], weight[regrown])
    assert torch.all(layer.weight.detach()[new & ~old] == 0)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("block", [None, (2, 2)])
def test_an_update_is_one_prune_grow_call_and_reads_no_count(scope, block, monkeypatch):
    from sparsekern.ops import reference
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.RigL(model, optimizer, update_every=1, total_steps=100, scope=scope, block=block)
    calls = {"prune_grow": 0, "topk_mask": 0, "count": 0}
    for name in ("prune_grow", "topk_mask"):
        original = getattr(sparsekern.ops, name)
        monkeypatch.setattr(sparsekern.ops, name, lambda *a, _f=original, _n=name, **k: (
            calls.__setitem__(_n, calls[_n] + 1), _f(*a, **k))[1])
    counting = reference.active_counts
    monkeypatch.setattr(reference, "active_counts", lambda masks: (
        calls.__setitem__("count", calls["count"] + 1), counting(masks))[1])
    for step in range(3):
        train_step(model, optimizer, algo, step)
    # Three updates: three calls; the masks are counted by construction alone (the first update counted them
    # again), never again.
    assert calls == {"prune_grow": 3, "topk_mask": 0, "count": 0}
    # Masks set another way are counted again at the next update.
    module = algo.modules[0][1]
    module.set_mask(module.mask.clone())
    train_step(model, optimizer, algo, 3)
    assert calls["count"] == 1


@pytest.mark.parametrize("block", [None, (2, 2)])
def test_a_mask_set_between_construction_and_the_first_update_is_counted_again(block):
    # Construction's count serves the first update only while the masks are the ones it counted.
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.RigL(model, optimizer, update_every=1, total_steps=100, block=block)
    module = algo.modules[1][1]   # Linear(64, 24)
    sparser = torch.zeros_like(module.mask)
    sparser[:, :8] = True   # whole 2x2 blocks
    assert int(sparser.sum()) != int(module.mask.sum())
    module.set_mask(sparser)
    train_step(model, optimizer, algo, 0)
    assert int(module.mask.sum()) == int(sparser.sum()) and not torch.equal(module.mask, sparser)


def test_counts_follow_masks_loaded_from_a_state_dict():
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.RigL(model, optimizer, update_every=1, total_steps=100)
    train_step(model, optimizer, algo, 0)
    state = algo.state_dict()
    denser = small_model(seed=3, density=0.6)
    other = sparsekern.RigL(denser, torch.optim.SGD(denser.parameters(), lr=0.1), update_every=1, total_steps=100)
    train_step(denser, other.optimizer, other, 0)
    with pytest.warns(UserWarning, match=r"^state\['masks'\] holds other active weight counts than the model's"):
        other.load_state_dict(state)  # the sparser masks: counts must be read again
    counts = [int(m.sum()) for m in masks(denser)]
    train_step(denser, other.optimizer, other, 1)
    assert [int(m.sum()) for m in masks(denser)] == counts


# Writes into a mask that leave its version counter as it was: DST's count of it goes stale unseen.
UNSEEN_WRITES = {
    "mask.data.copy_": lambda module, mask: module.mask.data.copy_(mask),
    "mask.data[...] =": lambda module, mask: module.mask.data.__setitem__(..., mask),
    "mask.data =": lambda module, mask: setattr(module.mask, "data", mask.clone()),
    "a NumPy view": lambda module, mask: module.mask.numpy().__setitem__(..., mask.numpy()),
}


def _update_after_writing_a_mask(write, scope, block=None, **options):
    """(masks, weights, warnings) after the second update of a small model's DST whose layer '3' lost its first 8
    rows (whole 2x2 blocks) by `write(module, mask)` between its backward and step(), after the first update (in
    global scope DST then keeps only the total count)."""
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.DST(model, optimizer, update_every=2, total_steps=100, scope=scope, block=block, **options)
    for step in range(3):
        train_step(model, optimizer, algo, step)
    x, y = batch(3)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    module = algo.modules[1][1]   # Linear(64, 24)
    sparser = module.mask.clone()
    sparser[:8] = False
    write(module, sparser)
    assert torch.equal(module.mask, sparser)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert algo.step()
    return masks(model), [m.weight.detach().clone() for _, m in sparse_modules(model)], [str(w.message) for w in caught]


@pytest.mark.parametrize("write", UNSEEN_WRITES)
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("block", [None, (2, 2)])
def test_a_mask_written_without_its_version_changing_is_counted_again(write, scope, block):
    """The count DST keeps of a mask goes stale when the mask is written without its version counter changing.
    `mask.data = ...` moves its values, which DST sees; the other writes the CPU kernels find, checking the count
    they are given (refusing the update before anything changes): DST counts again and warns, naming the layer,
    and the update is that of a DST whose mask was set with set_mask."""
    expected_masks, expected_weights, _ = _update_after_writing_a_mask(lambda m, mask: m.set_mask(mask), scope,
                                                                       block, grow="gradient")
    new_masks, weights, warned = _update_after_writing_a_mask(UNSEEN_WRITES[write], scope, block, grow="gradient")
    assert all(torch.equal(a, b) for a, b in zip(new_masks, expected_masks))
    assert all(torch.equal(a, b) for a, b in zip(weights, expected_weights))
    if write == "mask.data =":
        assert warned == []
        return
    # Layer '3' held 461 active entries (115 blocks) and lost 143 (36 blocks); the model held 519 (130 blocks) in all
    # after the first global update.
    changed = {("layer", None): "the mask of layer '3' (461 active entries when DST counted them, 318 now)",
               ("layer", (2, 2)): "the mask of layer '3' (115 active 2x2 blocks when DST counted them, 79 now)",
               ("global", None): "a mask of the layers '0', '3', '5' (519 active entries in all when DST counted "
                                 "them, 386 now)",
               ("global", (2, 2)): "a mask of the layers '0', '3', '5' (130 active 2x2 blocks in all when DST "
                                   "counted them, 98 now)"}[scope, block]
    assert warned == [f"DST.step(): {changed} was changed without its version counter changing (a write through "
                      f".data or a NumPy view?), so DST counted the masks again; use module.set_mask(...) to change "
                      f"a mask"]


def test_masks_written_unseen_with_their_total_kept_are_counted_again_in_layer_scope():
    # Layer scope counts each layer: one layer losing the entries another gains leaves the total as DST counted it,
    # yet each layer's count is stale, and the update must count them again rather than raise the kernels' refusal.
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.DST(model, optimizer, update_every=2, total_steps=100, scope="layer", grow="gradient")
    for step in range(3):
        train_step(model, optimizer, algo, step)
    x, y = batch(3)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    (_, hidden), (_, last) = algo.modules[1], algo.modules[2]
    sparser, denser = hidden.mask.clone(), last.mask.clone()
    sparser.view(-1)[sparser.flatten().nonzero()[:8]] = False
    denser.view(-1)[(~denser).flatten().nonzero()[:8]] = True
    hidden.mask.data.copy_(sparser)
    last.mask.data.copy_(denser)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert algo.step()
    warned = [str(w.message) for w in caught]
    assert len(warned) == 1
    assert warned[0].startswith("DST.step(): the masks of layers '3' (") and "and '5' (" in warned[0]
    assert [int(m.sum()) for m in masks(model)[1:]] == [int(sparser.sum()), int(denser.sum())]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_every_cpu_backend_recovers_from_a_stale_count_alike(backend, scope, use_backend):
    # The Triton backend (the interpreter, on CPU tensors) used the stale count unchecked: its masks differed from
    # a set_mask run's, silently.
    use_backend(backend, "prune_grow")
    expected_masks, _, _ = _update_after_writing_a_mask(lambda m, mask: m.set_mask(mask), scope, grow="gradient")
    new_masks, _, warned = _update_after_writing_a_mask(UNSEEN_WRITES["mask.data.copy_"], scope, grow="gradient")
    assert all(torch.equal(a, b) for a, b in zip(new_masks, expected_masks))
    assert len(warned) == 1 and "was changed without its version counter changing" in warned[0]


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("prune", ["set", "set_fw"])
def test_an_update_made_again_from_a_fresh_count_draws_what_it_would_have_drawn(scope, prune):
    # Random growth draws again from the stream as it was before the refused try; set_fw's scores, which take the
    # swap count, are made again from the fresh count.
    options = {"prune": prune, "grow": "random", "schedule": "constant"}
    expected_masks, expected_weights, _ = _update_after_writing_a_mask(lambda m, mask: m.set_mask(mask), scope,
                                                                       **options)
    new_masks, weights, warned = _update_after_writing_a_mask(UNSEEN_WRITES["mask.data.copy_"], scope, **options)
    assert len(warned) == 1 and "counted the masks again" in warned[0]
    assert all(torch.equal(a, b) for a, b in zip(new_masks, expected_masks))
    assert all(torch.equal(a, b) for a, b in zip(weights, expected_weights))


def test_an_update_refused_for_another_reason_after_a_fresh_count_changes_nothing():
    """A stale count is counted again, but an update refused again (here for a criterion's NaN scores) raises its
    own error and changes nothing: masks, weights, optimizer state, the random stream, the step count."""
    nan_growth = criteria.Criterion("nan_growth", lambda weights, grads, masks, *, generator: [
        torch.rand(w.shape, generator=generator).masked_fill(m, float("nan")) for w, m in zip(weights, masks)],
        reads_gradient=False, elementwise=True)
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.DST(model, optimizer, prune="random", grow=nan_growth, update_every=2, total_steps=100)
    train_step(model, optimizer, algo, 0)
    module = algo.modules[1][1]
    module.mask.data[:8] = False
    before = (masks(model), [m.weight.detach().clone() for _, m in algo.modules],
              [optimizer.state[m.weight]["momentum_buffer"].clone() for _, m in algo.modules],
              algo.generator.get_state(), algo.step_count)
    x, y = batch(1)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(UserWarning, match="the mask of layer '3'"), \
            pytest.raises(ValueError, match=r"^criterion 'nan_growth' scored NaN in layers \['0', '3', '5'\]"):
        algo.step()
    after = (masks(model), [m.weight.detach() for _, m in algo.modules],
             [optimizer.state[m.weight]["momentum_buffer"] for _, m in algo.modules],
             algo.generator.get_state(), algo.step_count)
    for old, new in zip(before[:3], after[:3]):
        assert all(torch.equal(a, b) for a, b in zip(old, new))
    assert torch.equal(before[3], after[3]) and before[4] == after[4]


@pytest.mark.parametrize("kind", BAD_OWN_MASKS)
def test_a_mask_replaced_through_data_is_refused_naming_the_layer_before_an_update_changes_anything(kind):
    # `mask.data = ...` passes none of the checks of an assigned mask: with an expanded view the update wrote the
    # weights and optimizer state, then torch refused to copy the new masks in; another dtype or shape was refused
    # by prune_grow naming its argument, masks[1], not the layer.
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.DST(model, optimizer, update_every=2, total_steps=100)
    train_step(model, optimizer, algo, 0)
    x, y = batch(1)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    error, match = damage_mask(algo.modules[1][1], kind)
    before = everything(model, optimizer, algo.generator)
    with pytest.raises(error, match="^DST: layer '3'" + match):
        algo.step()
    assert_unchanged(before, everything(model, optimizer, algo.generator))
    assert algo.step_count == 1


@pytest.mark.parametrize("kind", BAD_OWN_MASKS)
def test_a_mask_replaced_through_data_is_refused_naming_the_layer_before_a_load_changes_anything(kind):
    # set_mask refused the damaged layer's only after the layers before it were loaded (masks, weights, momentum).
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.DST(model, optimizer, update_every=1, total_steps=100)
    saved = copy.deepcopy(algo.state_dict())
    train_step(model, optimizer, algo, 0)
    error, match = damage_mask(algo.modules[1][1], kind)
    before = everything(model, optimizer, algo.generator)
    with pytest.raises(error, match="^DST: layer '3'" + match):
        algo.load_state_dict(saved)
    assert_unchanged(before, everything(model, optimizer, algo.generator))
    assert algo.step_count == 1


def _host_reads_of_the_first_update(algo: sparsekern.DST, model) -> int:
    """Tensor-to-Python conversions (host reads, a sync each on a GPU) of the next step, an update (planted
    gradients: the same for every model built by small_model)."""
    planted = torch.Generator().manual_seed(11)
    for _, module in sparse_modules(model):
        module.weight.grad = torch.randn(module.weight.shape, generator=planted)
    with counting_host_reads() as reads:
        assert algo.step()
    return len(reads)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("block", [None, (2, 2)])
def test_the_first_update_after_a_load_reads_the_counts_only_where_the_load_did_not(scope, block):
    """In layer scope load_state_dict counts the loaded masks (for its empty-layer warning), and the first update
    counted them again: a second host read. Its count now serves that update, as construction's does; in global
    scope the load counts nothing, and with block= the updates count blocks, so the update counts them."""
    saving_model = small_model(seed=3, density=0.6)   # other masks than the loading model's: other counts
    saving = sparsekern.RigL(saving_model, torch.optim.SGD(saving_model.parameters(), lr=0.1), update_every=1,
                             total_steps=100, scope=scope, block=block)
    model = small_model()
    algo = sparsekern.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), update_every=1, total_steps=100,
                           scope=scope, block=block)
    with torch.no_grad():   # the same weights: the same update
        for (_, module), (_, source) in zip(algo.modules, saving.modules):
            module.weight.copy_(source.weight)
    algo.load_state_dict(saving.state_dict())
    after_construction = _host_reads_of_the_first_update(saving, saving_model)
    after_load = _host_reads_of_the_first_update(algo, model)
    assert after_load == after_construction + (scope == "global" or block is not None)
    assert all(torch.equal(a, b) for a, b in zip(masks(model), masks(saving_model)))   # the counts served were right


def cuda_rigl(scope):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    model = sparsekern.sparsify(model, 0.1, generator=torch.Generator().manual_seed(0)).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    algo = sparsekern.RigL(model, optimizer, update_every=1, total_steps=10 ** 6, scope=scope, host_checks=False)
    x = torch.randn(64, 256, device="cuda")
    model(x).square().mean().backward()
    optimizer.step()  # momentum buffers exist
    algo.step()       # the first update counts the masks (one read), later ones do not
    return model, optimizer, algo, x


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_cuda_update_never_waits_for_the_device(scope):
    model, optimizer, algo, x = cuda_rigl(scope)
    model(x).square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert algo.step()  # raises on any synchronizing call (a count or n read back, a pageable copy)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _, module in algo.modules:
        assert torch.all(module.weight[~module.mask] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_cuda_update_is_captured_in_a_graph(scope):
    model, optimizer, algo, x = cuda_rigl(scope)
    model(x).square().mean().backward()
    saved = {"masks": [m.mask.clone() for _, m in algo.modules],
             "weights": [m.weight.detach().clone() for _, m in algo.modules],
             "grads": [m.weight.grad.clone() for _, m in algo.modules],
             "momenta": [optimizer.state[m.weight]["momentum_buffer"].clone() for _, m in algo.modules]}
    # Eager result of the update, then the same update captured and replayed from the same state.
    step = algo.step_count
    algo.step()
    expected = [m.mask.clone() for _, m in algo.modules], [m.weight.detach().clone() for _, m in algo.modules]

    def restore():
        with torch.no_grad():
            for (_, m), mask, weight, grad, momentum in zip(algo.modules, saved["masks"], saved["weights"],
                                                            saved["grads"], saved["momenta"]):
                m.mask.copy_(mask)
                m.weight.copy_(weight)
                m.weight.grad.copy_(grad)
                optimizer.state[m.weight]["momentum_buffer"].copy_(momentum)
        algo.step_count = step

    restore()
    algo.step()  # counts the restored masks outside the capture
    restore()
    algo._remember_counts([m.mask for _, m in algo.modules], algo._counts[1])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        algo.step()
    restore()
    graph.replay()
    torch.cuda.synchronize()
    for (_, m), mask, weight in zip(algo.modules, *expected):
        assert torch.equal(m.mask, mask) and torch.equal(m.weight.detach(), weight)


@pytest.mark.parametrize("algorithm", ["SET", "RigL", "MEST"])
def test_conv1d_and_conv3d_masks_update_at_exact_counts(algorithm):
    model = sparsekern.sparsify(conv1d_conv3d_model(0), 0.3, distribution="uniform",
                                generator=torch.Generator().manual_seed(0))
    convolutions = [model[0], model[3]]
    assert [type(m) for m in convolutions] == [SparseConv3d, SparseConv1d]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = getattr(sparsekern, algorithm)(model, optimizer, update_every=2, total_steps=40, drop_fraction=0.5)
    start = [m.mask.clone() for m in convolutions]
    counts = [int(m.sum()) for m in masks(model)]
    x, y = conv_data()
    for step in range(6):
        optimizer.zero_grad()
        inputs, targets = stateless_batch(x, y, 0, step, 16)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        algo.step()
        optimizer.step()
        assert [int(m.sum()) for m in masks(model)] == counts
        assert_inactive_zero(model)
    assert all(not torch.equal(m.mask, before) for m, before in zip(convolutions, start))


def test_a_compiled_model_under_rigl_compiles_twice_whatever_the_steps(generator, fresh_compiler):
    # RigL sets dense_grad before each update step and clears it after: the compiled forward guards
    # on it, so the model compiles once per value, then reuses both graphs, with no graph break.
    # Anything else a forward read that changed per step (a counter, a mask replaced rather than
    # written in place) would recompile at every update step, and stop compiling at Dynamo's limit.
    from torch._dynamo.utils import counters

    model = nn.Sequential(SparseLinear(8, 16), nn.ReLU(), SparseLinear(16, 4))
    sparsekern.sparsify(model, 0.5, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algorithm = sparsekern.algorithms.RigL(model, optimizer, update_every=2, total_steps=12)
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(5, 8, generator=generator)
    counters.clear()
    masks = []
    for _ in range(12):
        optimizer.zero_grad()
        compiled(x).square().sum().backward()
        algorithm.step()
        optimizer.step()
        masks.append(model[0].mask.clone())
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    assert not all(torch.equal(mask, masks[0]) for mask in masks)  # the masks did change


def test_masking_gradients_makes_no_inverted_mask():
    # finish() (as a skipped update step) masks every layer's gradient with ops.mask_in_place: the
    # masked_fill_(~mask, 0) it replaced allocated a mask-sized `~mask` per layer.
    from sparsekern.bench.cases.training_step import step_peak_bytes

    torch.manual_seed(0)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(512, 512, bias=False)), 0.1,
                                generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.RigL(model, optimizer, update_every=5, total_steps=50)
    model[0].dense_grad = True   # a dense gradient, as the backward before an update leaves it
    model(torch.randn(2, 512)).sum().backward()
    expected = torch.where(model[0].mask, model[0].weight.grad, 0.0)
    assert step_peak_bytes(algo.finish, torch.device("cpu")) < model[0].mask.numel()
    assert torch.equal(model[0].weight.grad.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int32])
def test_construction_zeroes_optimizer_state_off_the_masks_bit_for_bit(dtype):
    # Through ops.mask_in_place for a floating state (+0.0 off the mask whatever it held, -0.0, inf and NaN
    # included, as masked_fill_ gave), through masked_fill_ for one it does not take (an integer state).
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weight, mask = model[3].weight, model[3].mask
    values = torch.tensor([float("nan"), float("inf"), -0.0, 1.5, -2.0]) if dtype.is_floating_point else \
        torch.arange(-2, 3)
    state = values[torch.randint(0, 5, weight.shape, generator=torch.Generator().manual_seed(0))].to(dtype)
    optimizer.state[weight]["buffer"] = state
    expected = state.clone().masked_fill_(~mask, 0)
    sparsekern.RigL(model, optimizer, update_every=5, total_steps=50)
    assert optimizer.state[weight]["buffer"] is state
    assert torch.equal(state.view(torch.int16 if dtype == torch.float16 else torch.int32),
                       expected.view(torch.int16 if dtype == torch.float16 else torch.int32))


def _swap_warnings(model, **options) -> list[str]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsekern.DST(model, optimizer, total_steps=1000, update_every=100, **options)
    return [str(warning.message) for warning in caught]


def _two_layers() -> nn.Module:
    # 100 and 10 active weights: a drop fraction of 0.01 swaps 1 of the first's, 0 of the second's
    model = nn.Sequential(SparseLinear(20, 10), SparseLinear(10, 2))
    model[0].set_mask(torch.arange(200).reshape(10, 20) % 2 == 0)
    model[1].set_mask(torch.arange(20).reshape(2, 10) % 2 == 0)
    return model


@pytest.mark.parametrize("options, want", [
    # cosine's largest fraction is its first update's (0.0478 for 0.05 here): "constant" keeps these exact
    (dict(drop_fraction=0.01, schedule="constant", scope="layer"),
     "the masks of ['1'] never change: the largest fraction any update drops, 0.01 (drop_fraction=0.01), of each "
     "one's active weights rounds to 0 (swap_rounding='round')"),
    (dict(drop_fraction=0.004, schedule="constant", scope="layer"),
     "no mask update swaps a weight: the largest fraction any update drops, 0.004 (drop_fraction=0.004), of each "
     "layer's active weights rounds to 0 (swap_rounding='round')"),
    (dict(drop_fraction=0.009, schedule="constant", scope="global", swap_rounding="floor"),
     "no mask update swaps a weight: the largest fraction any update drops, 0.009 (drop_fraction=0.009), of the 110 "
     "active weights rounds down to 0 (swap_rounding='floor')"),
])
def test_a_swap_count_that_rounds_to_0_at_every_update_is_warned(options, want):
    # Only drop_fraction=0 was warned: a fraction too small for a layer's count swapped nothing, silently.
    assert _swap_warnings(_two_layers(), **options) == [want]


@pytest.mark.parametrize("options", [dict(drop_fraction=0.01, schedule="constant", scope="global"),
                                     dict(drop_fraction=0.06, scope="layer"), dict()])
def test_no_swap_count_warning_where_every_layer_swaps(options):
    assert _swap_warnings(_two_layers(), **options) == []


def test_the_swap_count_warning_counts_blocks():
    # 100 active weights make 25 blocks of 2x2, of which 0.01 rounds to 0
    model = nn.Sequential(SparseLinear(20, 10))
    model[0].set_mask(torch.arange(10).reshape(10, 1).expand(10, 20) < 5)
    assert _swap_warnings(model, drop_fraction=0.01, schedule="constant", block=(2, 2)) == [
        "no mask update swaps a weight: the largest fraction any update drops, 0.01 (drop_fraction=0.01), of each "
        "layer's active blocks of 2x2 rounds to 0 (swap_rounding='round')"]


def _random_criteria_masks(monkeypatch, backend, scope, prune):
    """The masks after three updates of pruning by `prune` and random growth under `backend`."""
    monkeypatch.setenv("SPARSEKERN_BACKEND", backend)
    model = small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.DST(model, optimizer, prune=prune, grow="random", schedule="constant", update_every=1,
                          total_steps=10, scope=scope, seed=3)
    planted = torch.Generator().manual_seed(7)
    for _ in range(3):
        for _, module in sparse_modules(model):
            module.weight.grad = torch.randn(module.weight.shape, generator=planted)
        algo.step()
        optimizer.step()
    return [module.mask.clone() for _, module in sparse_modules(model)]


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("prune", ["random", "set_fw", "set_fixed"])
def test_random_criteria_give_the_same_masks_on_every_backend(monkeypatch, scope, prune):
    # The random scores are drawn by torch, per updated layer in model order, before the backend's prune_grow, whose
    # selection of the top scores (ties to the lower position) every backend makes alike. The Fantastic Weights SET
    # rules decide their counts in torch too, and score all they drop alike (0): every backend drops those.
    masks = {backend: _random_criteria_masks(monkeypatch, backend, scope, prune)
             for backend in ("reference", "compiled", "triton")}
    assert all(torch.equal(a, b) for a, b in zip(masks["reference"], masks["compiled"]))
    assert all(torch.equal(a, b) for a, b in zip(masks["reference"], masks["triton"]))
    initial = [module.mask for _, module in sparse_modules(small_model())]
    assert not any(torch.equal(a, b) for a, b in zip(masks["reference"], initial))   # the updates swapped


def _host_reads_at_construction(layers: int, **options) -> int:
    """Tensor-to-Python conversions (each a device-to-host read, a sync on a GPU) while DST is built on a model of
    `layers` sparse layers of which the last has no active weight (so both construction warnings read the counts)."""
    model = sparsekern.sparsify(nn.Sequential(*(nn.Linear(8, 8) for _ in range(layers))), 0.5,
                                generator=torch.Generator().manual_seed(0))
    model[-1].set_mask(torch.zeros(8, 8, dtype=torch.bool))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with counting_host_reads() as reads:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sparsekern.DST(model, optimizer, total_steps=1000, update_every=100, drop_fraction=0.01,
                           schedule="constant", **options)
    assert any("have no active weight" in str(warning.message) for warning in caught)
    return len(reads)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("block", [None, (2, 2)])
def test_construction_reads_the_layers_counts_once_for_all_layers(block, backend, monkeypatch):
    # _warn_if_idle read each layer's mask.any() and _warn_if_nothing_swaps each one's count (int(mask.sum())), and
    # block= each one's count twice more: host reads that grew with the layers, each a sync on a GPU. Then block=
    # made each layer whole blocks by a topk_mask call of its own, each reading its counts back (Triton's, as on a
    # GPU; the compiled CPU kernels read nothing through Python).
    monkeypatch.setenv("SPARSEKERN_BACKEND", backend)
    assert _host_reads_at_construction(6, block=block) == _host_reads_at_construction(2, block=block)


def test_block_structured_construction_selects_every_layers_blocks_in_one_call(monkeypatch):
    model = small_model()
    calls = []
    original = sparsekern.ops.topk_mask
    monkeypatch.setattr(sparsekern.ops, "topk_mask", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    sparsekern.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=100, block=(2, 2))
    assert len(calls) == 1


def test_the_settings_table_holds_every_setting_a_state_saves_and_no_other():
    """`_SETTINGS` (the entries a state may hold) and `DST._settings()` (those it holds) come from one table: a
    setting added to the one only would be refused at load, or never checked."""
    from sparsekern.algorithms.dst import _SETTINGS
    mine = criteria.Criterion("mine", lambda weights, grads, masks, *, generator: weights, reads_gradient=False,
                              elementwise=True)
    saved = set()
    for prune in (*criteria.PRUNE, mine):
        for grow in (*criteria.GROW, mine):
            model = small_model()
            algo = sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), prune=prune, grow=grow,
                                  total_steps=100)
            saved |= set(algo._settings())
    assert sorted(saved) == sorted(_SETTINGS)


@pytest.mark.parametrize("build", [sparsekern.DST, sparsekern.RigL, sparsekern.SET, sparsekern.MEST])
@pytest.mark.parametrize("options", [
    dict(block=(1, 3)),                                     # a block that does not tile the 10x20 weight
    dict(update_every=50),                                  # no update before the end
    dict(drop_fraction=0.0),
    dict(drop_fraction=0.004, schedule="constant"),         # every swap count rounds to 0
])
def test_a_construction_warning_names_the_line_that_built_the_dst_or_its_preset(build, options):
    # The presets call DST, one frame more: a stacklevel counted for them named the caller's caller under DST
    # itself (at a script's top level, "sys:1").
    if "block" in options and build is sparsekern.SET:
        pytest.skip("SET's pruning criterion takes no block")
    model = _two_layers()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        build(model, optimizer, total_steps=20, **{"update_every": 5, **options})
    assert caught and [(w.filename, w.lineno) for w in caught] == [(__file__, line)] * len(caught)


def test_a_step_warning_names_the_line_that_called_step():
    # step() runs under torch.no_grad()'s decorator and warns from a helper: a fixed count named a line of dst.py.
    model = _two_layers()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.DST(model, optimizer, total_steps=10, update_every=1)
    model[0].weight.requires_grad_(False)
    model(torch.randn(3, 20)).sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        algo.step()
    assert [str(w.message) for w in caught] == ["DST leaves the masks of ['0'] alone while their weights do not "
                                                "require grad (frozen after DST was built)"]
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_an_update_hook_sees_each_update_s_masks_before_and_after_and_changes_no_mask(scope):
    # What a researcher logs (weights dropped and grown per layer, the overlap of successive masks) without copying
    # every mask before every step; the run's masks are those of a run without the hook.
    runs = []
    for hooked in (False, True):
        model = small_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        algo = sparsekern.RigL(model, optimizer, update_every=5, total_steps=30, scope=scope)
        seen = []
        if hooked:
            algo.register_update_hook(lambda dst, changes: seen.append(
                (dst.step_count, {name: (before.clone(), after.clone()) for name, (before, after) in changes.items()})))
        expected = []
        for step in range(30):
            previous = masks(model)
            if train_step(model, optimizer, algo, step):
                expected.append((algo.step_count, dict(zip([name for name, _ in algo.modules],
                                                           zip(previous, masks(model))))))
        runs.append(masks(model))
    assert [step for step, _ in seen] == [step for step, _ in expected] == [5, 10, 15, 20]
    for (_, changes), (_, wanted) in zip(seen, expected):
        assert list(changes) == list(wanted)
        for name, (before, after) in changes.items():
            assert torch.equal(before, wanted[name][0]) and torch.equal(after, wanted[name][1]), name
    assert any((before & ~after).any() for _, changes in seen for before, after in changes.values())
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_an_update_hook_removed_is_not_called_and_one_that_raises_leaves_the_step_complete():
    model, optimizer, algo = one_step_before_an_update(sparsekern.RigL)
    calls = []
    algo.register_update_hook(lambda dst, changes: calls.append(dst.step_count)).remove()

    def failing(dst, changes):
        raise RuntimeError("logger down")
    algo.register_update_hook(failing)
    with pytest.raises(RuntimeError, match="logger down"):
        train_step(model, optimizer, algo, 4)
    assert calls == [] and algo.step_count == 5
    assert all(not module.dense_grad for _, module in algo.modules)   # the step's own bookkeeping was done
    with pytest.raises(TypeError, match="hook must be callable, got str"):
        algo.register_update_hook("print")
