"""Unusual but legal input that the second bad-input campaign found mishandled: each must now work as a demanding
user expects (test_bad_inputs.py holds that campaign's refused inputs). Every test here failed before its fix."""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sparsekern
from sparsekern import checkpoint
from sparsekern.algorithms import OptG
from sparsekern.nn import SparseConv1d, SparseConv2d, SparseLinear, distributions, sparse_modules

pytestmark = pytest.mark.usefixtures("one_thread")


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(step: int):
    generator = _generator(100 + step)
    return torch.randn(8, 12, generator=generator), torch.randint(0, 4, (8,), generator=generator)


def _mlp(density: float, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    return sparsekern.sparsify(model, density, generator=_generator(seed))


def test_sparsify_moves_the_hooks_of_a_replaced_module():
    calls = []
    layer = nn.Linear(4, 3)
    handle = layer.register_forward_hook(lambda module, inputs, output: calls.append(type(module).__name__))
    layer.register_forward_pre_hook(lambda module, inputs: calls.append("pre"))
    model = sparsekern.sparsify(nn.Sequential(layer), 0.5, generator=_generator())
    model(torch.randn(2, 4))
    assert calls == ["pre", "SparseLinear"]
    handle.remove()   # the caller's handle still removes the hook from the sparse module
    model(torch.randn(2, 4))
    assert calls == ["pre", "SparseLinear", "pre"]


def test_sparsify_keeps_what_a_user_attached_to_a_replaced_module():
    layer = nn.Linear(4, 3)
    layer.register_buffer("scale", torch.full((3,), 2.0))
    layer.register_buffer("scratch", torch.zeros(1), persistent=False)
    layer.register_parameter("gain", nn.Parameter(torch.ones(3)))
    layer.calibration = nn.Identity()
    layer.note = "fine-tuned"
    model = sparsekern.sparsify(nn.Sequential(layer), 0.5, generator=_generator())
    sparse = model[0]
    assert isinstance(sparse, SparseLinear)
    assert sorted(model.state_dict()) == ["0.bias", "0.gain", "0.mask", "0.scale", "0.weight"]
    assert sparse.scale is layer.scale and sparse.scratch is layer.scratch and sparse.gain is layer.gain
    assert sparse.calibration is layer.calibration and sparse.note == "fine-tuned"
    assert [name for name, _ in model.named_parameters()] == ["0.weight", "0.bias", "0.gain"]


def test_sparsify_converts_a_layer_attached_to_a_replaced_layer():
    """A Linear attached to a Linear (or a Conv1d to a Conv3d) is a layer sparsify counts and masks: the sparse
    parent carried the dense child, so the model kept running it dense (its masked-off weights back in training)
    and sparse_modules did not list it."""
    outer, inner, deepest = nn.Linear(4, 4), nn.Linear(4, 4), nn.Conv1d(4, 4, 1)
    outer.adapter = inner
    inner.extra = deepest
    model = sparsekern.sparsify(nn.Sequential(outer, nn.Conv3d(2, 2, 1)), 0.5, generator=_generator())
    assert isinstance(model[0].adapter, SparseLinear) and model[0].adapter.weight is inner.weight
    assert isinstance(model[0].adapter.extra, SparseConv1d) and model[0].adapter.extra.weight is deepest.weight
    assert [name for name, _ in sparse_modules(model)] == ["0", "0.adapter", "0.adapter.extra", "1"]
    layers = ("0", "0.adapter", "0.adapter.extra", "1")
    assert sorted(model.state_dict()) == sorted(f"{layer}.{key}" for layer in layers
                                                for key in ("weight", "bias", "mask"))


@pytest.mark.parametrize("layer", [lambda: nn.Linear(8, 8), lambda: nn.MultiheadAttention(8, 2)],
                         ids=["linear", "attention"])
def test_sparsify_refuses_a_layer_compiled_in_place_by_name(layer):
    """nn.Module.compile() keeps the compiled forward of the dense layer on it, which the sparse one cannot run:
    sparsify said the layer 'holds _compiled_call_impl, a name its SparseLinear uses itself: rename it'."""
    model = nn.Sequential(layer(), nn.Linear(8, 8))
    model[0].compile()
    with pytest.raises(ValueError, match=r"^layer '0' \(\w+\) was compiled in place \(nn.Module.compile\)"):
        sparsekern.sparsify(model, 0.5, generator=_generator())
    assert type(model[0]) is not SparseLinear and type(model[1]) is nn.Linear


@pytest.mark.parametrize("power", [400.0, 1e6, 1e308])
def test_erk_with_an_extreme_power_gives_its_limit(power):
    """(sum/size)**power underflowed to 0 (ZeroDivisionError): the layer of largest sum/size fills first. At 1e308
    even power * log(sum/size) overflowed, and the densities were NaN ("densities[1] must be a number in [0, 1])."""
    densities = distributions.erk([(800, 400), (400, 2)], 0.5, power=power)
    assert densities[1] == 1.0 and densities[0] == pytest.approx((0.5 * 320_800 - 800) / 320_000)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)), 0.5, power=power,
                                generator=_generator())
    assert [module.density for _, module in sparse_modules(model)] == [0.375, 1.0]


def _optg_run(split_epoch: int | None) -> dict:
    """OptG for 3 epochs of 3 steps; at `split_epoch` the run is saved, and continued on a fresh model that
    loads the checkpoint before a new OptG is built (IMP's documented order)."""
    model = _mlp(1.0)
    optg = OptG(model, sparsity=0.5, epochs=3, lr=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in range(3):
        if epoch == split_epoch:
            saved = copy.deepcopy({"model": model.state_dict(), "optg": optg.state_dict(),
                                   "optimizer": optimizer.state_dict()})
            model = _mlp(1.0, seed=5)
            model.load_state_dict(saved["model"])
            optg = OptG(model, sparsity=0.5, epochs=3, lr=0.5)   # sets the masks of epoch 0
            optg.load_state_dict(saved["optg"])
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            optimizer.load_state_dict(saved["optimizer"])
        for step in range(3):
            x, y = _batch(10 * epoch + step)
            nn.functional.cross_entropy(model(x), y).backward()
            optg.step()
            optimizer.step()
            optimizer.zero_grad()
        if epoch < 2:
            optg.next_epoch()
    return model.state_dict()


def test_optg_resumed_on_a_model_loaded_before_optg_was_built_matches_the_uninterrupted_run():
    uninterrupted, resumed = _optg_run(None), _optg_run(1)
    assert all(torch.equal(uninterrupted[name], resumed[name]) for name in uninterrupted)


def test_a_pickled_dst_trains_on():
    model = _mlp(0.3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.RigL(model, optimizer, update_every=2, total_steps=20)
    nn.functional.cross_entropy(model(_batch(0)[0]), _batch(0)[1]).backward()
    algo.step()
    model, algo = pickle.loads(pickle.dumps((model, algo)))
    optimizer = algo.optimizer
    masks = [module.mask.clone() for _, module in sparse_modules(model)]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(_batch(1)[0]), _batch(1)[1]).backward()
    assert algo.step_count == 1 and algo.step()   # step 2 updates the masks
    assert any(not torch.equal(a, m.mask) for a, (_, m) in zip(masks, sparse_modules(model)))


def test_sparse_linear_forward_on_the_meta_device_gives_the_shape():
    layer = SparseLinear(6, 4, device="meta")
    assert layer(torch.empty(3, 6, device="meta")).shape == (3, 4)



@pytest.mark.parametrize("make", [lambda: SparseLinear(0, 4), lambda: SparseLinear(3, 0), lambda: SparseConv2d(2, 4, 0)],
                         ids=["no inputs", "no outputs", "kernel size 0"])
def test_an_empty_sparse_layer_has_density_1_and_a_repr(make):
    """As its dense module, a layer with an empty weight can be made and printed: it keeps all of nothing."""
    with pytest.warns(UserWarning, match="zero-element"):  # torch's init, on the dense module too
        layer = make()
    assert layer.nnz == 0 and layer.density == 1.0
    assert repr(layer).endswith("density=1)")


def test_a_weight_parameter_assigned_after_masking_is_masked_in_forward():
    """A new weight Parameter holds values off the mask: the layer must not keep promising zero_off_mask
    (its forward multiplied by the whole new weight), and promises it again for a weight that keeps it."""
    layer = SparseLinear(6, 4)
    layer.set_mask(torch.arange(24).reshape(4, 6) % 3 == 0)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    layer.weight = nn.Parameter(torch.ones(4, 6))
    assert not layer.zero_off_mask
    assert torch.allclose(layer(x), x @ layer.mask.T.float() + layer.bias)
    layer.weight = nn.Parameter(layer.mask.float())
    assert layer.zero_off_mask


def test_a_weight_computed_by_a_forward_hook_is_not_read_at_every_forward(monkeypatch):
    """weight_norm's pre-hook sets the computed weight as a plain attribute at every forward: only a new
    Parameter is read for zero_off_mask, not each such tensor (a pass over the weight and a host sync per
    forward, which made a weight_norm'd layer's forward many times slower)."""
    layer = SparseLinear(6, 4)
    layer.set_mask(torch.arange(24).reshape(4, 6) % 3 == 0)
    with pytest.warns(FutureWarning):   # deprecated, and still in use
        torch.nn.utils.weight_norm(layer)
    reads = []
    monkeypatch.setattr(SparseLinear, "_off_mask_nonzero", lambda self: reads.append(self) or False)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    weight = layer.weight_g * layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True)
    assert torch.allclose(layer(x), x @ torch.where(layer.mask, weight, 0).T + layer.bias)
    assert reads == []

def test_checkpoint_save_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "runs" / "epoch3.pt"
    checkpoint.save({"epoch": 3}, target)
    link = tmp_path / "latest.pt"
    link.symlink_to(target)
    checkpoint.save({"epoch": 4}, link)
    assert link.is_symlink() and checkpoint.load(target) == {"epoch": 4}


def test_a_mask_loaded_by_assignment_from_an_expanded_view_can_be_set_again():
    layer = SparseLinear(6, 4)
    state = layer.state_dict()
    state["mask"] = torch.tensor([True, False, True, True, False, True]).expand(4, 6)
    layer.load_state_dict(state, assign=True)
    assert torch.equal(layer.mask, state["mask"])
    layer.set_mask(torch.ones(4, 6, dtype=torch.bool))   # raised: the buffer's entries shared memory
    assert layer.nnz == 24


@pytest.mark.parametrize("location", ["cpu:0", torch.device("cpu", 0), {"cpu": "cpu:0"}], ids=str)
def test_checkpoint_load_takes_the_cpu_by_its_index(location, tmp_path):
    """torch.load knows the CPU only as "cpu": with "cpu:0" it raised as though the file were damaged."""
    checkpoint.save({"w": torch.ones(2)}, tmp_path / "c.pt")
    assert torch.equal(checkpoint.load(tmp_path / "c.pt", map_location=location)["w"], torch.ones(2))


def test_checkpoint_load_takes_a_map_location_dict_of_devices(tmp_path):
    checkpoint.save({"w": torch.ones(2)}, tmp_path / "c.pt")
    loaded = checkpoint.load(tmp_path / "c.pt", map_location={"cpu": torch.device("cpu")})
    assert torch.equal(loaded["w"], torch.ones(2))


def test_checkpoint_load_of_a_fifo_refuses_instead_of_blocking(tmp_path):
    fifo = tmp_path / "checkpoint.pt"
    os.mkfifo(fifo)
    script = textwrap.dedent(f"""
        from sparsekern import checkpoint
        try:
            checkpoint.load({str(fifo)!r})
        except ValueError as error:
            print(error)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "is not a regular file" in done.stdout, done.stderr


def test_a_model_sparsified_under_inference_mode_is_the_one_sparsified_outside_it_and_trains():
    # Campaign 16: its masks were inference tensors, which the first backward refused to save (torch's error naming
    # no layer) and set_mask could not write.
    outside = _mlp(0.5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        dense = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.inference_mode():
        inside = sparsekern.sparsify(dense, 0.5, generator=_generator(0))
    for (_, a), (_, b) in zip(sparse_modules(outside), sparse_modules(inside)):
        assert not b.mask.is_inference() and torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)
    x, y = _batch(0)
    nn.functional.cross_entropy(inside(x), y).backward()
    inside[0].set_mask(torch.ones_like(inside[0].mask))


def test_a_dst_state_of_a_criterion_named_by_a_numpy_str_loads_back_through_checkpoint(tmp_path):
    # Campaign 17: the name, a NumPy str_ kept as given, was saved as one, which checkpoint.load (weights only, plain
    # types) refused as a damaged file.
    def score(weights, grads, masks, *, generator):
        return [weight.abs() for weight in weights]

    model = _mlp(0.5)
    criterion = sparsekern.Criterion(np.str_("noisy"), score, reads_gradient=False, elementwise=True)
    assert type(criterion.name) is str and criterion.name == "noisy"
    algo = sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), prune=criterion, total_steps=10)
    checkpoint.save(algo.state_dict(), tmp_path / "dst.pt")
    assert checkpoint.load(tmp_path / "dst.pt")["prune"] == "noisy"


def _rigl_state(**options):
    """A RigL on a small MLP after one mask update, and its state."""
    model = _mlp(0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rigl = sparsekern.RigL(model, optimizer, total_steps=20, update_every=2, **options)
    for step in range(3):
        optimizer.zero_grad()
        x, y = _batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        rigl.step()
        optimizer.step()
    return rigl, rigl.state_dict()


@pytest.mark.parametrize("count", [np.int64(3), torch.tensor(3)], ids=["numpy int", "0-d tensor"])
def test_a_dst_state_takes_its_step_count_as_any_integer_as_imp_takes_its_cycle(count):
    """DST refused a NumPy or tensor step_count ("must be an int >= 0, got np.int64(3)") that IMP, SWAMP and OptG
    take for their counters."""
    rigl, state = _rigl_state()
    rigl.load_state_dict({**state, "step_count": count})
    assert rigl.step_count == 3 and type(rigl.step_count) is int


def test_a_dst_state_saved_with_block_as_a_list_loads_into_the_dst_of_that_block():
    """DST(block=[2, 2]) is DST(block=(2, 2)); a state holding block=[2, 2] was refused as 'saved with block=[2, 2],
    not (2, 2)'."""
    rigl, state = _rigl_state(block=[2, 2])
    rigl.load_state_dict({**state, "block": [2, 2]})
    assert rigl.block == (2, 2)


def _imp(**options):
    return sparsekern.algorithms.IMP(_mlp(1.0), lambda parameters: torch.optim.SGD(parameters, lr=0.1), **options)


def _swamp(**options):
    return sparsekern.algorithms.SWAMP(_mlp(1.0), lambda parameters: torch.optim.SGD(parameters, lr=0.1), particles=2,
                                       **options)


def _dst(**options):
    model = _mlp(0.5)
    return sparsekern.DST(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10, update_every=2,
                          **options)


@pytest.mark.parametrize("build", [
    lambda: _dst(swap_rounding=np.str_("ceil")), lambda: _dst(scope=np.str_("global")),
    lambda: _dst(schedule=np.str_("constant")), lambda: _imp(scope=np.str_("layer")),
    lambda: _imp(rewind=np.str_("learning_rate")), lambda: _swamp(scope=np.str_("layer"))],
    ids=["DST swap_rounding", "DST scope", "DST schedule", "IMP scope", "IMP rewind", "SWAMP scope"])
def test_a_state_of_settings_given_as_numpy_str_loads_back_through_checkpoint(build, tmp_path):
    """Campaign 20: a setting given as NumPy's str_ was kept as one and saved in the state, which checkpoint.load
    (plain types only) refused as holding foreign objects (as campaign 17 found for a Criterion's name)."""
    algorithm = build()
    checkpoint.save(algorithm.state_dict(), tmp_path / "state.pt")
    algorithm.load_state_dict(checkpoint.load(tmp_path / "state.pt"))


class _Disguised(str):
    """A str whose own __str__ and __eq__ say another text than it holds."""

    def __str__(self):
        return "global"

    def __eq__(self, other):
        return True

    __hash__ = str.__hash__


@pytest.mark.parametrize("build, read", [
    (lambda: _dst(scope=_Disguised("layer")), lambda dst: dst.scope),
    (lambda: _imp(scope=_Disguised("layer")), lambda imp: imp.scope),
    (lambda: sparsekern.Criterion(_Disguised("noisy"), lambda w, g, m, *, generator: w, reads_gradient=False,
                                  elementwise=True), lambda criterion: criterion.name)],
    ids=["DST scope", "IMP scope", "Criterion name"])
def test_a_str_subclass_is_taken_for_its_text_not_its_own_str(build, read):
    """Campaign 21: a setting given as a str subclass was checked by its __eq__ and kept as its __str__ said:
    'layer' whose __str__ says 'global' ran (and saved) scope='global', and 'nonsense' whose __eq__ says yes to
    everything passed the check of the choices."""
    kept = read(build())
    assert type(kept) is str and kept == str.__str__(kept) and kept in ("layer", "noisy")
    with pytest.raises(ValueError, match="scope must be one of"):
        _dst(scope=_Disguised("nonsense"))


def _imp_stepped(count: int):
    imp = _imp(rewind_step=0)
    imp.load_state_dict({**imp.state_dict(), "step_in_cycle": count})
    return imp


@pytest.mark.parametrize("make, counter", [
    (lambda: (lambda rigl, state: (rigl.load_state_dict({**state, "step_count": 2 ** 63 - 1}), rigl)[1])(
        *_rigl_state()), "step_count"),
    (lambda: _imp_stepped(2 ** 63 - 1), "step_in_cycle")], ids=["DST", "IMP"])
def test_a_step_past_the_last_count_a_state_holds_is_refused_with_nothing_counted(make, counter, tmp_path):
    """Campaign 20: a state doctored to a count just below 2**63 - 1 loaded (DST warned that it is past
    total_steps), step() counted on past it, and the state saved then no longer loaded ("must be at most
    2**63 - 1")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # DST: the loaded count is past total_steps
        algorithm = make()
    with pytest.raises(RuntimeError, match=rf"step\(\): {counter} is at 2\*\*63 - 1, where the saved counters end"):
        algorithm.step()
    assert algorithm.state_dict()[counter] == 2 ** 63 - 1
    checkpoint.save(algorithm.state_dict(), tmp_path / "state.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        algorithm.load_state_dict(checkpoint.load(tmp_path / "state.pt"))
