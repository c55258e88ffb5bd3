"""Masks stay identical across ranks under DDP (gloo, CPU, 2 processes via torch.distributed.run)."""
import copy

import pytest
import torch
import torch.distributed

import sparsekern

from ..helpers import BAD_OWN_MASKS, assert_unchanged, damage_mask, everything, torchrun

gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                          reason="needs torch.distributed with gloo")


def rank_results(worker: str, tmp_path) -> list[dict]:
    """What each of the two ranks of `worker` (a module of tests.algorithms) saved, once both ended well."""
    finished = torchrun(f"tests.algorithms.{worker}", str(tmp_path))
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


@gloo
def test_ddp_rigl_set_and_criteria_and_a_schedule_of_a_users_own_keep_masks_identical_on_two_ranks(tmp_path):
    ranks = rank_results("distributed_worker", tmp_path)
    for algorithm in ("RigL", "SET", "custom"):
        first, second = ranks[0]["results"][algorithm], ranks[1]["results"][algorithm]
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name][0], second[name][0]), (algorithm, name)
            assert torch.equal(first[name][1], second[name][1]), (algorithm, name)
    assert all(rank["disagreed"] and rank["repaired"] for rank in ranks)


@gloo
def test_per_rank_seeds_are_refused_and_diverged_replicas_are_detected(tmp_path):
    for rank, result in enumerate(rank_results("divergence_worker", tmp_path)):
        # ZeroRedundancyOptimizer: each rank holds the state of other weights than the other's, by design.
        assert result.pop("holds_a_share"), rank
        assert result == {"refused": True, "diverged_detected": True, "lopsided_refused": True, "repaired": True,
                          "stays_repaired": True, "zero_repaired": True}, \
            (rank, result)


@gloo
def test_ddps_default_buffer_sync_costs_no_host_read_per_forward_and_computes_through_the_masks(tmp_path):
    # Under torch 2.11 DDP's copy of rank 0's masks at every forward moves their version counters, and every sparse
    # layer read its weight again at every forward (a host sync per layer per step on a GPU): reads [3, 3, 3, ...].
    for rank, result in enumerate(rank_results("buffer_sync_worker", tmp_path)):
        layers, static, dst = result["layers"], result["static"], result["set"]
        # Read once after DDP's construction (whose copy moves the versions under every torch), and once after each
        # mask update where DDP's per-forward copy moves them (SET updates after steps 2 and 4).
        assert static["reads"] == [layers] + [0] * 5, (rank, static)
        diverged = result["diverged"]
        assert dst["reads"] == ([layers, 0] * 3 if diverged["copy_seen"] else [layers] + [0] * 5), (rank, dst)
        assert static["correct"] and dst["correct"] and dst["identical"], (rank, result)
        # A mask that DDP overwrites on one rank: computed through where DDP's copy is seen (torch 2.11); torch 2.13
        # hides it from the layer. masks_identical sees the divergence under both.
        assert diverged["detected"] and (diverged["correct"] or not diverged["copy_seen"]), (rank, diverged)


@gloo
def test_masks_drawn_per_rank_and_sharded_models_are_refused_and_a_load_on_one_rank_is_repaired(tmp_path):
    for rank, result in enumerate(rank_results("replica_worker", tmp_path)):
        assert all(result["refused"].values()) and result["accepted_after_broadcast"], (rank, result)
        assert all(result["sharded"].values()), (rank, result["sharded"])
        assert result["load_on_rank_0_repaired"], rank
        assert result["built_by_objects_alone"], rank
        assert result["stages_built"], rank
        assert result["finish_kept_through_a_broadcast"], rank


@gloo
def test_settings_that_differ_across_ranks_are_refused_on_every_rank_and_equal_ones_train_as_before(tmp_path):
    # The construction compared masks and random streams, not settings: ranks built with other criteria, schedules,
    # scopes... trained on with masks that diverged at the first update, or (SWAMP) collectives paired wrongly.
    ranks = rank_results("settings_worker", tmp_path)
    for scenario, message in ranks[0]["refused"].items():
        setting = scenario.split()[1]
        assert message is not None and ranks[1]["refused"][scenario] == message, (scenario, ranks[1]["refused"])
        assert f"{scenario.split()[0]} was built with other settings on some ranks ({setting}: " in message, message
        assert all(rank["unchanged"][scenario] for rank in ranks), scenario
    for scenario, shown in (("DST prune", "prune: 'magnitude' on rank 0, 'set' on rank 1)"),
                            ("DST grow", "grow: 'gradient' on rank 0, 'mine' on rank 1;"),
                            ("DST prune_elementwise", "prune_elementwise: True on rank 0, False on rank 1)"),
                            ("DST prune_decides_count", "prune_decides_count: False on rank 0, True on rank 1)"),
                            ("DST prune_score", "prune_score: '_magnitude' on rank 0, '_square' on rank 1)"),
                            ("DST schedule_function", "schedule_function: '_linear' on rank 0, '_halving' on rank 1)"),
                            ("DST block", "block: None on rank 0, (2, 2) on rank 1)"),
                            ("DST end_step", "end_step: 10 on rank 0, 12 on rank 1)"),
                            ("OptG lr", "lr: 0.1 on rank 0, 0.2 on rank 1)"),
                            ("SWAMP particles", "particles: 2 on rank 0, 4 on rank 1)")):
        assert shown in ranks[0]["refused"][scenario], ranks[0]["refused"][scenario]
    # Nor the layers they update: ranks freezing different layers built, and DST's and OptG's masks diverged.
    for scenario, shown in (("DST", "DST updates other sparse layers on some ranks ('0' updated on rank 0, left "
                                    "alone on rank 1)"),
                            ("DST, each rank its own layer", "('2' updated on rank 0, left alone on rank 1; '0' "
                                                             "updated on rank 1, left alone on rank 0)"),
                            ("OptG", "OptG updates other sparse layers on some ranks ('2' updated on rank 1, left "
                                     "alone on rank 0)"),
                            # Frozen on one rank after construction: the copy would diverge again at the next update.
                            ("DST frozen later", "DST updates other sparse layers on some ranks ('0' updated on "
                                                 "rank 0, left alone on rank 1)"),
                            ("OptG frozen later", "OptG updates other sparse layers on some ranks ('0' updated on "
                                                  "rank 0, left alone on rank 1)")):
        message, unchanged = ranks[0]["frozen_apart"][scenario]
        assert message is not None and shown in message, (scenario, message)
        assert "freeze the same layers on every rank" in message and unchanged, message
        assert ranks[1]["frozen_apart"][scenario] == (message, True), scenario
    for rank in ranks:
        assert all(rank["accepted"].values()), rank["accepted"]
        assert rank["gathers"] == 1   # the settings travel in the replica check's one all_gather_object
        assert rank["trains_as_unchecked"]


@gloo
def test_a_step_inside_ddps_no_sync_is_refused_on_every_rank_and_accumulating_before_it_keeps_masks_identical(
        tmp_path):
    # Inside no_sync each rank's gradients are its own: RigL's and OptG's steps there drew masks (scores) apart on
    # each rank, silently.
    for rank, result in enumerate(rank_results("no_sync_worker", tmp_path)):
        for name in ("RigL", "OptG"):
            assert result[name] == {"refused": [True] * 3, "identical": True}, (rank, name, result[name])


@pytest.mark.parametrize("compiled", [False, True], ids=["ddp", "compiled ddp"])
@pytest.mark.parametrize("name", ["RigL", "OptG"])
def test_a_step_inside_no_sync_is_refused_on_an_algorithm_built_on_the_compiled_ddp_model_too(one_rank, name,
                                                                                             compiled):
    from torch.nn.parallel import DistributedDataParallel
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)),
                                0.5, generator=torch.Generator().manual_seed(0))
    ddp = DistributedDataParallel(model)
    wrapped = torch.compile(ddp) if compiled else ddp   # the README allows building on either
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    algo = (sparsekern.RigL(wrapped, optimizer, update_every=1, total_steps=8) if name == "RigL"
            else sparsekern.OptG(wrapped, density=0.3, epochs=4))
    with ddp.no_sync(), pytest.raises(RuntimeError, match=r"step\(\) inside DistributedDataParallel.no_sync\(\)"):
        algo.step()


def test_differing_settings_are_named_with_the_ranks_holding_each_value():
    from sparsekern.algorithms import distributed
    distributed.check_same_settings("DST", [{"prune": "set", "scope": "layer"}] * 3)   # equal: nothing raised
    with pytest.raises(ValueError) as refused:
        distributed.check_same_settings("DST", [{"prune": "mest", "mest_gamma": 1.0, "scope": "layer"},
                                                {"prune": "set", "scope": "layer"},
                                                {"prune": "mest", "mest_gamma": 1.0, "scope": "layer"}])
    assert ("DST was built with other settings on some ranks (prune: 'mest' on ranks [0, 2], 'set' on rank 1; "
            "mest_gamma: 1.0 on ranks [0, 2], unset on rank 1)") in str(refused.value)


def test_layers_updated_on_some_ranks_only_are_named_with_the_ranks_updating_each():
    from sparsekern.algorithms import distributed
    distributed.check_same_layers_updated("DST", [["a", "b"]] * 3)   # alike: nothing raised
    distributed.check_same_layers_updated("IMP", [None] * 2)         # every layer on every rank
    with pytest.raises(ValueError) as refused:
        distributed.check_same_layers_updated("OptG", [["a", "b"], ["b"], ["a"]])
    assert ("OptG updates other sparse layers on some ranks ('a' updated on ranks [0, 2], left alone on rank 1; "
            "'b' updated on ranks [0, 1], left alone on rank 2)") in str(refused.value)


def test_broadcast_masks_refuses_an_algorithm_whose_state_is_per_rank_before_any_collective():
    # No process group here: the refusal must come before the first collective. SWAMP's ranks hold
    # different particles, so loading rank 0's state everywhere would train particle 0 on every rank.
    import sparsekern
    from sparsekern.algorithms import distributed
    model = sparsekern.sparsify(torch.nn.Linear(4, 4), 1.0)
    swamp = sparsekern.SWAMP(model, lambda parameters: torch.optim.SGD(parameters, lr=0.1), particles=1)
    for algorithm in (swamp, object()):
        with pytest.raises(TypeError, match="algorithm must be a DST, IMP or OptG"):
            distributed.broadcast_masks(model, algorithm=algorithm)


@gloo
@pytest.mark.parametrize("src, error, match", [(1, ValueError, r"^src must be a rank of the group, one of "
                                                               r"\[0\], got 1$"),
                                               ("0", TypeError, r"^src must be an integer, got str")])
def test_broadcast_masks_refuses_a_src_outside_the_group_naming_it_with_nothing_changed(one_rank, src, error,
                                                                                       match):
    import sparsekern
    from sparsekern.algorithms import distributed
    model = sparsekern.sparsify(torch.nn.Linear(4, 4), 0.5, generator=torch.Generator().manual_seed(0))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        distributed.broadcast_masks(model, src=src)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


@gloo
def test_broadcast_masks_leaves_the_pruned_weights_optg_keeps_and_their_momentum(one_rank):
    # OptG keeps pruned weights' values (they come back with them when their scores rise) and the layers
    # do not promise zero_off_mask; set_mask zeroed them, and the momentum there, on every rank, src's
    # included: a broadcast that had nothing to repair changed the run.
    import sparsekern
    from sparsekern.algorithms import distributed
    torch.manual_seed(0)
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)),
                                1.0)
    optg = sparsekern.OptG(model, sparsity=0.5, epochs=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for _ in range(3):
            optimizer.zero_grad()
            model(torch.randn(5, 8)).square().sum().backward()
            optg.step()
            optimizer.step()
        optg.next_epoch()
    layers = [module for _, module in sparsekern.nn.sparse_modules(model)]
    assert any(((layer.weight != 0) & ~layer.mask).any() for layer in layers)   # pruned values kept
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict(), [layer.zero_off_mask for layer in layers]))
    distributed.broadcast_masks(model, optimizer=optimizer, algorithm=optg)
    after = (model.state_dict(), optimizer.state_dict(), [layer.zero_off_mask for layer in layers])
    assert after[2] == before[2] == [False, False]
    for name, value in before[0].items():
        assert torch.equal(after[0][name], value), name
    for index, state in before[1]["state"].items():
        assert torch.equal(after[1]["state"][index]["momentum_buffer"], state["momentum_buffer"]), index


@gloo
def test_broadcast_masks_resets_rprops_step_sizes_off_the_masks_to_the_lr(one_rank):
    # Zeroed, a weight grown there later would move by Rprop's minimum step size (1e-6) for dozens of steps.
    from sparsekern.algorithms import distributed
    torch.manual_seed(0)
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)),
                                0.3, distribution="uniform")
    optimizer = torch.optim.Rprop(model.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 8)).square().sum().backward()
        optimizer.step()
    layers = [module for _, module in sparsekern.nn.sparse_modules(model)]
    for layer in layers:
        optimizer.state[layer.weight]["step_size"].fill_(3.0)   # state off the masks, as a diverged replica's
    distributed.broadcast_masks(model, optimizer=optimizer)
    for layer in layers:
        step_size = optimizer.state[layer.weight]["step_size"]
        assert torch.all(step_size[~layer.mask] == 0.01) and torch.all(step_size[layer.mask] == 3.0)


@gloo
def test_a_call_that_fails_on_one_rank_fails_on_every_rank_and_changes_nothing(tmp_path):
    # Where one rank raised and the other went on into the next collective, the run hung (the timeout).
    for rank, result in enumerate(rank_results("agreement_worker", tmp_path)):
        assert all(result.values()), (rank, [name for name, ok in result.items() if not ok])


@gloo
def test_masks_identical_of_a_model_without_sparse_layers_makes_no_tensor_collective(one_rank, monkeypatch):
    # Its verdict travelled as a CPU tensor (no sparse layer to take a device from), which NCCL refuses:
    # a dense model on GPUs failed where there was nothing to compare.
    from sparsekern.algorithms import distributed

    def no_tensor_collective(*args, **kwargs):
        raise AssertionError("a tensor collective with nothing to compare")

    monkeypatch.setattr(torch.distributed, "all_reduce", no_tensor_collective)
    monkeypatch.setattr(torch.distributed, "broadcast", no_tensor_collective)
    assert distributed.masks_identical(torch.nn.Sequential(torch.nn.Linear(3, 2)))


class _ReportsAGpu(torch.Tensor):
    """A CPU tensor that reports a GPU, as the state of a model on one holds; moved to the CPU (cpu(), to()), it
    is a plain CPU tensor, as a CUDA tensor's copy is. Lets a machine without a GPU see what the object
    collectives would carry."""

    @property
    def device(self):
        return torch.device("cuda", 1)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        result = super().__torch_function__(func, types, args, kwargs)
        return result.as_subclass(torch.Tensor) if func in (torch.Tensor.cpu, torch.Tensor.to) else result


def _reporting_a_gpu(value):
    """`value` (nested dicts, lists and tuples) with every tensor reporting a GPU."""
    from sparsekern.algorithms._tickets import map_tensors
    return map_tensors(lambda tensor: tensor.as_subclass(_ReportsAGpu), value)


def _devices(value) -> set[str]:
    """The device types of the tensors in `value` (nested dicts, lists and tuples)."""
    from sparsekern.algorithms._tickets import map_tensors
    found = set()
    map_tensors(lambda tensor: found.add(tensor.device.type), value)
    return found


@pytest.fixture
def carried(monkeypatch):
    """What each broadcast_object_list call carried (rank src's list)."""
    sent, broadcast = [], torch.distributed.broadcast_object_list

    def recorded(objects, *args, **kwargs):
        sent.append(list(objects))
        return broadcast(objects, *args, **kwargs)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", recorded)
    return sent


@pytest.fixture
def tensors(monkeypatch):
    """The tensors each torch.distributed.broadcast call sent or received."""
    sent, broadcast = [], torch.distributed.broadcast

    def recorded(tensor, *args, **kwargs):
        sent.append(tensor)
        return broadcast(tensor, *args, **kwargs)
    monkeypatch.setattr(torch.distributed, "broadcast", recorded)
    return sent


@gloo
def test_broadcast_masks_sends_the_algorithm_and_optimizer_state_as_cpu_tensors(one_rank, carried, monkeypatch):
    # Pickled as they were, the CUDA tensors of a model on GPUs (DST's masks) were rebuilt on each receiving rank
    # on the sender's GPU index: another rank's GPU, or one its machine lacks.
    import sparsekern
    from sparsekern.algorithms import distributed
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for algorithm in (sparsekern.SET(model, optimizer, update_every=2, total_steps=10),
                      sparsekern.IMP(model, lambda parameters: torch.optim.SGD(parameters, lr=0.1)),
                      sparsekern.OptG(model, sparsity=0.5, epochs=3)):
        state = algorithm.state_dict()
        monkeypatch.setattr(algorithm, "state_dict", lambda state=state: _reporting_a_gpu(state))
        distributed.broadcast_masks(model, algorithm=algorithm)
        assert _devices(carried[-1]) == {"cpu"}, type(algorithm).__name__
    adam = torch.optim.Adam(model.parameters())   # its step, not shaped like the weight, goes by the object
    model(torch.randn(3, 8)).sum().backward()
    adam.step()
    for _, module in sparsekern.nn.sparse_modules(model):
        adam.state[module.weight]["step"] = adam.state[module.weight]["step"].as_subclass(_ReportsAGpu)
    distributed.broadcast_masks(model, optimizer=adam)
    assert _devices(carried[-1]) == {"cpu"}


@gloo
def test_join_catch_up_sends_the_optimizer_state_tensors_by_tensor_broadcasts(one_rank, carried, tensors):
    # The catching up copied the optimizer's whole state a second time, pickled: a state_dict of CPU copies in one
    # object broadcast, besides the tensor broadcasts of the sparse weights' state. Now every state tensor shaped
    # like its parameter travels once, by a tensor broadcast in place; the object carries Adam's step counts and
    # the parameter groups' settings.
    import sparsekern
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    algorithm = sparsekern.RigL(model, optimizer, update_every=2, total_steps=10)
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    before = copy.deepcopy(optimizer.state_dict())
    algorithm._catch_up(True, None)
    (_, entries, settings, _), = carried[-1]   # the algorithm's state, the optimizer's, no scheduler's
    pickled = []
    from sparsekern.algorithms._tickets import map_tensors
    map_tensors(pickled.append, (entries, settings))
    assert len(pickled) == 4 and all(tensor.dim() == 0 for tensor in pickled), [tuple(t.shape) for t in pickled]
    moments = [optimizer.state[p][name] for p in model.parameters() for name in ("exp_avg", "exp_avg_sq")]
    assert all(any(moment is sent for sent in tensors) for moment in moments)
    assert len(tensors) == len(moments) + 2 * len(sparsekern.nn.sparse_modules(model))   # + masks and weights
    assert settings == [{key: value for key, value in group.items() if key != "params"}
                        for group in before["param_groups"]]


@gloo
def test_join_catch_up_sends_a_scalar_parameters_step_in_the_object(one_rank, carried, tensors):
    # A 0-d parameter (a learned temperature, CLIP's logit_scale) is shaped like Adam's step, which sits on the CPU
    # whatever the parameter's device: the catching up sent that step by a tensor broadcast, which NCCL refuses for
    # a CPU tensor (on every rank, after the object broadcast's settings were installed). A 0-d parameter's state,
    # scalars only, travels in the object, as Adam's step of every other parameter does.
    import sparsekern
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    temperature = torch.nn.Parameter(torch.tensor(1.0))
    optimizer = torch.optim.Adam([*model.parameters(), temperature], lr=0.01)
    algorithm = sparsekern.RigL(model, optimizer, update_every=2, total_steps=10)
    (model(torch.randn(3, 8)) * temperature).sum().backward()
    optimizer.step()
    algorithm._catch_up(True, None)
    (_, entries, _, _), = carried[-1]
    steps = [state["step"] for state in optimizer.state.values()]
    assert not any(sent is step for sent in tensors for step in steps)
    assert sorted(len(values) for values, _ in entries.values()) == [1] * 4 + [3]   # the steps; the temperature's all


@gloo
def test_swamp_sends_its_ticket_optimizer_state_as_cpu_tensors(one_rank, carried, monkeypatch):
    import sparsekern
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)), 1.0)
    swamp = sparsekern.SWAMP(model, lambda parameters: torch.optim.SGD(parameters, lr=0.1, momentum=0.9),
                             particles=1)
    model(torch.randn(3, 8)).sum().backward()
    swamp.optimizer.step()
    state = swamp.optimizer.state_dict()
    monkeypatch.setattr(swamp.optimizer, "state_dict", lambda: _reporting_a_gpu(state))
    swamp._adopt_rank0_state()   # at the rewind step, on two ranks or more
    assert len(carried) == 1 and _devices(carried[0]) == {"cpu"}


def test_join_names_the_optimizer_training_optgs_weights_and_dst_and_imp_their_own():
    # Join hands its keywords to every joinable's join_hook, before any collective: checked there, on every rank.
    import sparsekern
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = sparsekern.SET(model, optimizer, update_every=2, total_steps=10)
    imp = sparsekern.IMP(model, lambda parameters: torch.optim.SGD(parameters, lr=0.1))
    optg = sparsekern.OptG(model, sparsity=0.5, epochs=3)
    assert dst.join_hook(optimizer=optimizer).optimizer is None   # its own, which it copies anyway
    assert imp.join_hook(optimizer=imp.optimizer).optimizer is None   # in its state
    assert optg.join_hook(optimizer=optimizer).optimizer is optimizer
    for algorithm in (dst, imp):
        with pytest.raises(ValueError, match=r"names another optimizer than the (DST|IMP)'s own"):
            algorithm.join_hook(optimizer=other)
    with pytest.raises(ValueError, match="LBFGS"):
        optg.join_hook(optimizer=torch.optim.LBFGS(model.parameters()))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        optg.join_hook(optimizer="sgd")


def test_join_names_a_scheduler_of_the_optimizer_whose_state_is_copied():
    import sparsekern
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    other = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(model.parameters(), lr=0.1), 2)
    dst = sparsekern.SET(model, optimizer, update_every=2, total_steps=10)
    imp = sparsekern.IMP(model, lambda parameters: torch.optim.SGD(parameters, lr=0.1))
    optg = sparsekern.OptG(model, sparsity=0.5, epochs=3)
    assert dst.join_hook(lr_scheduler=scheduler).lr_scheduler is scheduler
    assert optg.join_hook(optimizer=optimizer, lr_scheduler=scheduler).lr_scheduler is scheduler
    with pytest.raises(TypeError, match="lr_scheduler must be a torch.optim.lr_scheduler.LRScheduler"):
        dst.join_hook(lr_scheduler=lambda step: 0.1)
    with pytest.raises(ValueError, match="lr_scheduler schedules another optimizer"):
        dst.join_hook(lr_scheduler=other)
    with pytest.raises(ValueError, match="lr_scheduler needs Join's keyword optimizer"):
        optg.join_hook(lr_scheduler=scheduler)
    with pytest.raises(ValueError, match="the IMP's catching up makes a new optimizer"):
        imp.join_hook(lr_scheduler=torch.optim.lr_scheduler.StepLR(imp.optimizer, 2))


@gloo
def test_fully_shard_swapping_shards_and_whole_weights_reads_no_weight(one_rank, monkeypatch):
    # fully_shard assigns each layer's unsharded weight Parameter before its forward and backward, and its
    # shard after: the promise of zeros off the mask passes between them, where a check of the values cost a
    # pass over the weight and a host sync per layer, twice a step.
    import sparsekern
    from torch.distributed.fsdp import fully_shard
    from sparsekern.nn.modules import SparseModule
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)),
                                0.5, generator=torch.Generator().manual_seed(0))
    unsharded = copy.deepcopy(model)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    reads = []
    off_mask_nonzero = SparseModule._off_mask_nonzero
    monkeypatch.setattr(SparseModule, "_off_mask_nonzero", lambda self: reads.append(self) or off_mask_nonzero(self))
    x = torch.randn(3, 8)
    for _ in range(2):
        y = model(x)
        y.sum().backward()
    torch.testing.assert_close(y, unsharded(x))
    assert not reads and model[0].zero_off_mask


@gloo
def test_set_mask_refuses_a_layer_sharded_by_fully_shard_before_the_mask_changes(one_rank):
    # torch refused zeroing the DTensor weight off the mask ("got mixed torch.Tensor and DTensor") after the new
    # mask was copied in: the layer promised zeros off a mask its weight did not follow.
    import sparsekern
    from torch.distributed.fsdp import fully_shard
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)),
                                0.5, generator=torch.Generator().manual_seed(0))
    fully_shard(model[2])
    mask = model[2].mask.clone()
    with pytest.raises(ValueError, match="SparseLinear's weight is sharded across ranks"):
        model[2].set_mask(torch.ones(4, 16, dtype=torch.bool))
    assert torch.equal(model[2].mask, mask) and model[2].zero_off_mask


@gloo
@pytest.mark.parametrize("kind", BAD_OWN_MASKS)
def test_broadcast_masks_refuses_a_layer_whose_mask_was_put_in_place_through_data_naming_it(one_rank, kind):
    # torch refused an expanded one as the mask was copied in (the weights broadcast already), and ~ a float one.
    import sparsekern
    from sparsekern.algorithms import distributed
    torch.manual_seed(0)
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)),
                                0.5, distribution="uniform")
    error, match = damage_mask(model[2], kind)
    before = everything(model)
    with pytest.raises(error, match="^broadcast_masks: layer '2'" + match):
        distributed.broadcast_masks(model)
    assert_unchanged(before, everything(model))
