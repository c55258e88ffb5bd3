"""What IMP and SWAMP share (sparsekern.algorithms._tickets), tested once for both."""
import pytest
import torch

from sparsekern.algorithms import IMP, SWAMP

from ..helpers import mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9, weight_decay=1e-3)


# Each algorithm keeping θ_k after its first step (rewind_step=1), given the model and a batch.
KEEPING_THE_STATE_AFTER_STEP_1 = {
    "IMP": lambda model, x: IMP(model, _sgd, rewind_step=1),
    "SWAMP": lambda model, x: SWAMP(model, _sgd, particles=2, rewind_step=1, swa_start=1, bn_loader=[x]),
}


@pytest.mark.parametrize("who", KEEPING_THE_STATE_AFTER_STEP_1)
def test_a_lazy_module_the_forward_never_made_is_refused_by_name_before_the_state_is_kept_at_step_k(who):
    # rewind_step >= 1: θ_k is kept after the forwards made the lazy modules they use; one left unused (here a
    # submodule of a layer, which its forward does not call) made torch refuse the clone naming no module, after
    # step_in_cycle had counted the step.
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 64, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    model = mlp(0, hidden=12)
    model[0].unused = torch.nn.LazyLinear(2)
    algorithm = KEEPING_THE_STATE_AFTER_STEP_1[who](model, x)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    algorithm.optimizer.step()
    with pytest.raises(ValueError, match=rf"^{who}.step\(\) keeps the model's state now \(rewind_step=1\), but the "
                                         r"lazy modules '0.unused' \(LazyLinear\) have not made their parameters "
                                         r"yet.*: run each of them once \(on a dummy batch\) before, or take them "
                                         r"out of the model$"):
        algorithm.step()
    assert algorithm.step_in_cycle == 0 and algorithm.rewind_state is None
    model[0].unused(torch.zeros(1, 3))
    algorithm.step()
    assert algorithm.step_in_cycle == 1 and algorithm.rewind_state["0.unused.weight"].shape == (2, 3)


def test_a_state_of_an_optimizer_whose_groups_lack_differentiable_loads():
    # torch's Optimizer.__setstate__ adds `differentiable` to every class's defaults, and only some classes put it in
    # their groups: Adafactor's do not, and its states (those of a class of one's own alike) were refused as lacking
    # it.
    model = mlp(0, inputs=8, hidden=6, outputs=3)
    imp = IMP(model, lambda parameters: torch.optim.Adafactor(parameters, lr=0.01), rewind_step=0)
    model(torch.randn(4, 8)).sum().backward()
    imp.optimizer.step()
    imp.step()
    imp.load_state_dict(imp.state_dict())
    assert imp.step_in_cycle == 1


@pytest.mark.parametrize("who", KEEPING_THE_STATE_AFTER_STEP_1)
@pytest.mark.parametrize("choices", [{"foreach": False, "fused": False}, {"foreach": True, "fused": None},
                                     {"foreach": None, "fused": None}])
def test_a_state_holding_none_or_a_bool_for_the_optimizers_implementation_choices_loads_and_trains(who, choices):
    # foreach and fused default to None (torch chooses); a state of an older torch holds False for them, and any
    # state may hold a bool. Of another kind ('x', 1) they are refused (tests/test_bad_inputs.py).
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 64, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    model = mlp(0, hidden=12)
    algorithm = KEEPING_THE_STATE_AFTER_STEP_1[who](model, x)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    algorithm.optimizer.step()
    algorithm.step()
    state = algorithm.state_dict()
    for group in state["optimizer"]["param_groups"]:
        group.update(choices)
    algorithm.load_state_dict(state)
    assert {key: algorithm.optimizer.param_groups[0][key] for key in choices} == choices
    torch.nn.functional.cross_entropy(model(x), y).backward()
    algorithm.optimizer.step()
    algorithm.step()
