"""DST on layers that get no gradient in an update step (an unrouted expert, a block dropped by
stochastic depth, a layer frozen after construction), under zero_grad(set_to_none=True) and
(set_to_none=False), on one process and under DDP; and the masks of ordinary runs, which the rule for
such layers leaves as they were."""
import hashlib
import warnings

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import sparse_modules

from ..helpers import torchrun
from .test_dst import small_model

pytestmark = pytest.mark.usefixtures("one_thread")

# (prune, grow): every pair that reads the gradient keeps an ungraded layer's mask, the others update it.
GRADIENT_CRITERIA = [("magnitude", "gradient"), ("mest", "random"), ("snip", "gradient"),
                     ("sensitivity", "random"), ("rsensitivity", "gradient")]
GRADIENT_FREE = [("set", "random"), ("magnitude", "random"), ("random", "random")]


class MoE(nn.Module):
    """Two experts and a head; the experts named in `absent` get no token."""

    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(8, 16), nn.Linear(8, 16)])
        self.head = nn.Linear(16, 3)

    def forward(self, x, absent=()):
        return self.head(torch.relu(sum(e(x) for i, e in enumerate(self.experts) if i not in absent)))


class StochasticDepth(nn.Module):
    """Residual blocks between a stem and a head; the blocks named in `absent` are dropped."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
        self.head = nn.Linear(16, 3)

    def forward(self, x, absent=()):
        h = torch.relu(self.stem(x))
        for index, block in enumerate(self.blocks):
            if index not in absent:
                h = h + torch.relu(block(h))
        return self.head(h)


def build(net, momentum=0.9, **options):
    torch.manual_seed(0)
    model = sparsekern.sparsify(net(), 0.3, distribution="uniform", generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    options = {"update_every": 2, "total_steps": 40, "schedule": "constant", **options}
    return model, optimizer, sparsekern.DST(model, optimizer, **options)


def snapshot(model, optimizer):
    """(mask, weight, momentum or None) of every sparse layer, by name."""
    def momentum(weight):
        buffer = optimizer.state.get(weight, {}).get("momentum_buffer")
        return None if buffer is None else buffer.clone()
    return {name: (m.mask.clone(), m.weight.detach().clone(), momentum(m.weight)) for name, m in sparse_modules(model)}


def train(model, optimizer, algo, set_to_none, absent, steps=8, check=None):
    """Trains `steps` steps; on update steps the model's `absent` layers get no input. check(before)
    runs right after each update (before the optimizer step), `before` the snapshot taken before it.
    Returns the masks after every update."""
    history = []
    for step in range(steps):
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad(set_to_none=set_to_none)
        due = algo.schedule.is_update(algo.step_count + 1)
        nn.functional.cross_entropy(model(x, absent if due else ()), y).backward()
        before = snapshot(model, optimizer)
        assert algo.step() == due
        if due:
            history.append([m.mask.clone() for _, m in sparse_modules(model)])
            if check is not None:
                check(before)
        optimizer.step()
    return history


def changed(before, model, name):
    return not torch.equal(before[name][0], dict(sparse_modules(model))[name].mask)


def assert_left_as_it_was(before, model, optimizer, name, set_to_none):
    """The layer's mask, weight and momentum are those before the update, and its gradient is none
    (set_to_none) or 0 everywhere."""
    after = snapshot(model, optimizer)[name]
    for was, now in zip(before[name], after):
        assert (was is None and now is None) or torch.equal(was, now), name
    grad = dict(sparse_modules(model))[name].weight.grad
    assert grad is None if set_to_none else torch.count_nonzero(grad) == 0, name


@pytest.mark.parametrize("host_checks", [True, False])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("prune, grow", GRADIENT_CRITERIA)
def test_an_unrouted_expert_keeps_its_mask_and_the_others_update(prune, grow, set_to_none, host_checks):
    model, optimizer, algo = build(MoE, prune=prune, grow=grow, host_checks=host_checks)
    updated = []

    def check(before):
        assert_left_as_it_was(before, model, optimizer, "experts.1", set_to_none)
        updated.append(changed(before, model, "experts.0") and changed(before, model, "head"))
    train(model, optimizer, algo, set_to_none, absent={1}, check=check)
    assert len(updated) == 4 and all(updated)


def same_masks(first, second):
    return all(torch.equal(a, b) for masks_a, masks_b in zip(first, second) for a, b in zip(masks_a, masks_b))


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("prune, grow", GRADIENT_CRITERIA + GRADIENT_FREE)
def test_both_zero_grad_settings_and_both_host_checks_give_the_same_masks(prune, grow, scope):
    """host_checks=False marks the layers without a gradient on the device, True reads which they are."""
    # Without momentum: SGD's momentum moves an expert that a zero gradient reaches, and skips one without.
    first, *others = [train(*build(MoE, momentum=0.0, prune=prune, grow=grow, scope=scope, host_checks=checks),
                            set_to_none=set_to_none, absent={1})
                      for set_to_none in (True, False) for checks in (True, False)]
    assert all(same_masks(first, other) for other in others)


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("prune, grow", GRADIENT_FREE)
def test_a_criterion_that_reads_no_gradient_updates_an_unrouted_expert_as_usual(prune, grow, set_to_none):
    model, optimizer, algo = build(MoE, prune=prune, grow=grow)
    moved = []
    train(model, optimizer, algo, set_to_none, absent={1},
          check=lambda before: moved.append(changed(before, model, "experts.1")))
    assert len(moved) == 4 and all(moved)


@pytest.mark.parametrize("host_checks", [True, False])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("block", [None, (1, 4)])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_block_dropped_by_stochastic_depth_keeps_its_mask(scope, block, set_to_none, host_checks):
    model, optimizer, algo = build(StochasticDepth, scope=scope, block=block, prune="magnitude", grow="gradient",
                                   host_checks=host_checks)
    total = sum(int(m.mask.sum()) for _, m in sparse_modules(model))
    moved = []

    def check(before):
        assert_left_as_it_was(before, model, optimizer, "blocks.1", set_to_none)
        moved.append([changed(before, model, name) for name in ("stem", "blocks.0", "blocks.2", "head")])
        assert sum(int(m.mask.sum()) for _, m in sparse_modules(model)) == total
    history = train(model, optimizer, algo, set_to_none, absent={1}, check=check)
    assert len(history) == 4 and any(map(any, moved))


@pytest.mark.parametrize("host_checks", [True, False])
def test_a_global_update_grows_no_inactive_entry_of_a_layer_without_gradient_on_ties(host_checks):
    """The other layer's gradient is 0 at all but one inactive entry, so most of the growth is decided
    among ties at 0, which would go to the earlier layer's entries by position."""
    torch.manual_seed(0)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.RigL(model, optimizer, update_every=1, total_steps=10, scope="global", drop_fraction=0.5,
                           host_checks=host_checks)
    first, second = model[0], model[1]
    before = first.mask.clone()
    first.weight.grad = torch.zeros_like(first.weight)
    second.weight.grad = torch.zeros_like(second.weight)
    second.weight.grad.view(-1)[(~second.mask).view(-1).nonzero()[0]] = 1.0
    assert algo.step()
    assert torch.equal(first.mask, before)


@pytest.mark.parametrize("host_checks", [True, False])
def test_a_gradient_that_sums_to_0_or_holds_tiny_entries_is_a_gradient(host_checks):
    """Only a gradient 0 everywhere counts as none: one whose entries cancel in its sum (the host checks
    read sums first), or whose squares would round to 0, updates its layer."""
    torch.manual_seed(0)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.RigL(model, optimizer, update_every=1, total_steps=10, host_checks=host_checks)
    before = [m.mask.clone() for m in model]
    cancelling = torch.zeros(64)
    cancelling[(~model[0].mask).view(-1).nonzero()[:2, 0]] = torch.tensor([1.0, -1.0])
    model[0].weight.grad = cancelling.view(8, 8)
    model[1].weight.grad = torch.full((8, 8), 1e-30) * torch.arange(64.0).view(8, 8)
    model[2].weight.grad = torch.zeros(8, 8)
    assert algo.step()
    assert [torch.equal(a, m.mask) for a, m in zip(before, model)] == [False, False, True]


def _sparse_body_dense_head():
    """Sparse residual blocks and a dense head, SGD and RigL updating at every step."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": sparsekern.sparsify(StochasticDepth().blocks, 0.3,
                                                       generator=torch.Generator().manual_seed(0)),
                           "head": nn.Linear(16, 3)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, sparsekern.RigL(model, optimizer, update_every=1, total_steps=10)


def test_a_step_with_no_gradient_on_any_sparse_layer_keeps_every_mask():
    """The sparse layers all dropped, the dense head alone trained: no mask moves, and no error (a
    step() before backward, where no trained parameter has a gradient, is refused: test_dst)."""
    model, optimizer, algo = _sparse_body_dense_head()
    before = [m.mask.clone() for _, m in sparse_modules(model)]
    optimizer.zero_grad(set_to_none=True)
    model["head"](torch.randn(4, 16)).sum().backward()
    assert algo.step()
    assert all(torch.equal(a, m.mask) for a, (_, m) in zip(before, sparse_modules(model)))


@pytest.mark.parametrize("prune, grow", [("magnitude", "gradient"), ("set", "random")])
def test_a_layer_frozen_after_construction_is_left_alone_until_unfrozen(prune, grow):
    """Under every criterion (grown weights would never train), warned once; the dense gradient it got
    before it was frozen is masked. Unfrozen, it updates again."""
    model, optimizer, algo = build(StochasticDepth, prune=prune, grow=grow)
    train(model, optimizer, algo, set_to_none=True, absent=(), steps=1)   # the next step updates
    frozen = model.blocks[1]
    optimizer.zero_grad()
    model(torch.randn(16, 8)).square().mean().backward()   # dense gradients: an update is due
    frozen.weight.requires_grad_(False)
    before = snapshot(model, optimizer)
    with pytest.warns(UserWarning, match=r"leaves the masks of \['blocks.1'\] alone"):
        assert algo.step()
    assert all(torch.equal(was, now) for was, now in zip(before["blocks.1"], snapshot(model, optimizer)["blocks.1"]))
    assert torch.count_nonzero(frozen.weight.grad[~frozen.mask]) == 0 and frozen.weight.grad.any()
    assert changed(before, model, "blocks.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # warned once
        train(model, optimizer, algo, set_to_none=True, absent=(), steps=2,
              check=lambda before: assert_left_as_it_was(before, model, optimizer, "blocks.1", set_to_none=True))
    frozen.weight.requires_grad_(True)
    moved = []
    train(model, optimizer, algo, set_to_none=True, absent=(), steps=2,
          check=lambda before: moved.append(changed(before, model, "blocks.1")))
    assert moved == [True]


def test_same_seed_same_masks_with_layers_left_out():
    first, second = (train(*build(MoE, prune="mest", grow="random", seed=5), set_to_none=True, absent={1})
                     for _ in range(2))
    assert same_masks(first, second)


# Masks after three updates of planted gradients (some entries exactly 0, as a ReLU network's are), recorded
# before layers without a gradient kept their masks: layers with one update exactly as they did.
RECORDED = {
    "rigl-layer": ("f61e6754a269b37c", dict(prune="magnitude", grow="gradient")),
    "rigl-global": ("229c8d1482270fac", dict(prune="magnitude", grow="gradient", scope="global")),
    "rigl-block": ("f912422f1c8180cf", dict(prune="magnitude", grow="gradient", block=(2, 2))),
    "set": ("c4c8766eca70d63b", dict(prune="set", grow="random")),
    "mest": ("2215a56c15c03826", dict(prune="mest", grow="random")),
    "snip-gradient-global": ("986abcbc11d59c32", dict(prune="snip", grow="gradient", scope="global")),
    "sensitivity-random": ("67835b96f089dc3e", dict(prune="sensitivity", grow="random")),
    "rsensitivity-gradient-adam": ("0be96eec75ce2133", dict(prune="rsensitivity", grow="gradient", reset_state=False)),
}


@pytest.mark.filterwarnings("ignore:block=.* does not tile")
@pytest.mark.parametrize("case", sorted(RECORDED))
def test_layers_with_a_gradient_get_the_masks_they_got_before(case):
    expected, options = RECORDED[case]
    model = small_model()
    adam = not options.get("reset_state", True)
    optimizer = (torch.optim.Adam(model.parameters(), lr=0.1) if adam
                 else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    algo = sparsekern.DST(model, optimizer, schedule="constant", update_every=2, total_steps=20, seed=3, **options)
    planted = torch.Generator().manual_seed(7)
    digest = hashlib.sha256()
    for _ in range(6):
        for _, module in sparse_modules(model):
            grad = torch.randn(module.weight.shape, generator=planted)
            grad[grad.abs() < 0.3] = 0
            module.weight.grad = grad
        algo.step()
        optimizer.step()
        for _, module in sparse_modules(model):
            digest.update(module.mask.numpy().tobytes())
    assert digest.hexdigest()[:16] == expected


def test_ddp_masks_stay_identical_with_experts_unrouted_on_some_ranks(tmp_path):
    finished = torchrun("tests.algorithms.no_gradient_worker", str(tmp_path))
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for key, masks in results[0].items():
        assert all(torch.equal(a, b) for a, b in zip(masks, results[1][key])), key


@pytest.mark.gpu
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_cuda_update_keeps_an_unrouted_experts_mask_without_waiting_for_the_device(scope, set_to_none):
    """host_checks=False finds the expert without a gradient on the device: no read, the masks of
    host_checks=True, which reads which layers have none."""
    masks = {}
    for host_checks in (True, False):
        torch.manual_seed(0)
        model = sparsekern.sparsify(MoE(), 0.3, generator=torch.Generator().manual_seed(0)).cuda()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        algo = sparsekern.RigL(model, optimizer, update_every=1, total_steps=100, scope=scope,
                               host_checks=host_checks)
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)).cuda()
        model(x).square().mean().backward()
        optimizer.step()  # momentum buffers exist
        algo.step()       # the first update counts the masks (one read), later ones do not
        optimizer.zero_grad(set_to_none=set_to_none)
        model(x, absent={1}).square().mean().backward()
        before = model.experts[1].mask.clone()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("default" if host_checks else "error")
        try:
            assert algo.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.equal(model.experts[1].mask, before)
        masks[host_checks] = [m.mask.cpu() for _, m in sparse_modules(model)]
    assert same_masks([masks[True]], [masks[False]])


def test_a_step_before_backward_is_refused_though_a_frozen_parameter_holds_an_old_gradient():
    # Review 28d: a gradient left on a parameter frozen since counted as this step's backward, and the update ran
    # (counted, no mask moved), where OptG refuses the same step.
    model, _, algo = _sparse_body_dense_head()
    model["head"](torch.randn(4, 16)).sum().backward()
    model["head"].requires_grad_(False)   # its gradient stays
    with pytest.raises(RuntimeError, match="no trained parameter has a gradient at update step 1"):
        algo.step()
