"""A SparseLinear in inference mode (`to_inference`) computes with a packed snapshot of its weight and mask and gives
its weight no gradient: the algorithms and broadcast_masks refuse it by name, saying to call to_training(model), at
construction and at every call that would write its weight or mask (their packed copy would go stale), before
anything changes, and every algorithm's step() refuses one still training. A frozen layer that DST, or OptG's learned
scores, leave out may stay in it; IMP and SWAMP, which prune it, refuse it only where they would."""
import copy

import pytest
import torch

import sparsekern
from sparsekern.algorithms.distributed import broadcast_masks

from ..helpers import assert_unchanged, everything, mlp
from .test_computed_weights import BUILD, _sgd, _sparse_model

REFUSAL = r"layer '2' is in inference mode \(to_inference\(\)\).*call sparsekern.nn.to_training\(model\) before"


# The calls of each algorithm refused once a training layer is in inference mode: those that write masks, and every
# step() (the layer gives its weight no gradient: it would stop training, silently).
WRITES = {
    "DST": lambda dst, state: [dst.step, lambda: dst.load_state_dict(state)],
    "IMP": lambda imp, state: [imp.step, imp.next_cycle, imp.prune_masks, lambda: imp.load_state_dict(state)],
    "SWAMP": lambda swamp, state: [swamp.step, swamp.next_particle, swamp.prune_masks,
                                   lambda: swamp.load_state_dict(state)],
    "OptG": lambda optg, state: [optg.step, optg.next_epoch, lambda: optg.load_state_dict(state)],
}


@pytest.mark.parametrize("who", BUILD)
def test_an_algorithm_refuses_a_model_with_a_layer_in_inference_mode_by_name(who):
    model = _sparse_model()
    model[2].to_inference()
    before = everything(model)
    with pytest.raises(ValueError, match=f"^{who}: {REFUSAL}"):
        BUILD[who](model)
    assert_unchanged(before, everything(model))
    assert model[2].packed is not None
    sparsekern.nn.to_training(model)
    BUILD[who](model)   # the remedy the message gives


@pytest.mark.parametrize("who", BUILD)
def test_a_layer_put_in_inference_mode_after_the_algorithm_was_built_is_refused_changing_nothing(who):
    model = _sparse_model()
    algorithm = BUILD[who](model)
    state = copy.deepcopy(algorithm.state_dict())
    model(torch.randn(5, 8)).sum().backward()   # gradients for DST's and OptG's steps
    sparsekern.nn.to_inference(model)
    packed = model[2].packed
    before = everything(model)
    for call in WRITES[who](algorithm, state):
        with pytest.raises(ValueError, match=f"^{who}: layer '0' is in inference mode"):
            call()
    assert_unchanged(before, everything(model))
    assert model[2].packed is packed


def test_broadcast_masks_refuses_a_layer_in_inference_mode_changing_nothing(one_rank):
    model = _sparse_model()
    model[2].to_inference()
    before = everything(model)
    with pytest.raises(ValueError, match=f"^broadcast_masks: {REFUSAL}"):
        broadcast_masks(model)
    assert_unchanged(before, everything(model))


@pytest.mark.parametrize("who", ["DST", "OptG"])
def test_a_frozen_layer_may_serve_in_inference_mode_under_an_algorithm_that_leaves_its_mask(who):
    # DST, and OptG's learned scores, leave a layer frozen after construction alone: a frozen part of the model may
    # be switched (to_inference's use: a frozen part under a part still training).
    # The frozen layer the smaller: OptG's next epoch keeps its active weights within the epoch's budget.
    model = sparsekern.sparsify(mlp(0, inputs=2, hidden=12, outputs=4), 0.5, generator=torch.Generator().manual_seed(0))
    algorithm = BUILD[who](model)
    model[0].weight.requires_grad_(False)
    model[0].to_inference()
    packed, mask = model[0].packed, model[0].mask.clone()
    with pytest.warns(UserWarning, match="alone"):
        for _ in range(2):
            model(torch.randn(5, 2)).sum().backward()
            algorithm.step()
            if who == "OptG":
                algorithm.next_epoch()
    assert model[0].packed is packed and torch.equal(model[0].mask, mask)


def test_dst_refuses_a_training_layer_left_in_inference_mode_at_a_step_that_updates_nothing():
    # An evaluation through to_inference with to_training forgotten: the layer gives its weight no gradient, and
    # would stop training silently until the next mask update (never, after end_step).
    model = _sparse_model()
    dst = sparsekern.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=100, update_every=50)
    model[0].to_inference()
    with pytest.raises(ValueError, match="^DST: layer '0' is in inference mode"):
        dst.step()
    assert dst.step_count == 0


@pytest.mark.parametrize("who", ["IMP", "SWAMP"])
def test_imp_and_swamp_refuse_a_training_layer_left_in_inference_mode_at_step_counting_nothing(who):
    # Their steps only counted and kept θ_k, and SWAMP's its average: a layer left in inference mode after an
    # evaluation trained no more, with nothing said, until the cycle's end (SWAMP: the particle's) refused it.
    model = _sparse_model()
    algorithm = BUILD[who](model) if who == "IMP" else sparsekern.SWAMP(model, _sgd, particles=2, rewind_step=1,
                                                                         swa_start=1)
    model[0].to_inference()
    before = everything(model)
    for _ in range(2):   # step 1 would keep θ_1, step 2 take SWAMP's first SWA sample
        with pytest.raises(ValueError, match=f"^{who}: layer '0' is in inference mode"):
            algorithm.step()
    assert algorithm.step_in_cycle == 0 and (who == "IMP" or algorithm.rewind_state is None)
    assert getattr(algorithm, "average_count", 0) == 0
    assert_unchanged(before, everything(model))
    sparsekern.nn.to_training(model)   # the remedy the message gives
    algorithm.step()
    assert algorithm.step_in_cycle == 1


@pytest.mark.parametrize("who", ["IMP", "SWAMP"])
def test_a_frozen_layer_in_inference_mode_passes_imp_and_swamp_steps_and_is_refused_where_they_prune(who):
    # As DST's and OptG's steps: a frozen layer gets no gradient anyway. IMP and SWAMP prune it with the rest, so the
    # end of the cycle (the particle's) refuses it, before anything changes.
    model = _sparse_model()
    algorithm = BUILD[who](model)
    model[0].weight.requires_grad_(False)
    model[0].to_inference()
    algorithm.step()
    before = everything(model)
    with pytest.raises(ValueError, match=f"^{who}: layer '0' is in inference mode"):
        algorithm.next_cycle() if who == "IMP" else algorithm.next_particle()
    assert_unchanged(before, everything(model))


LEAVING_OUT_FROZEN_LAYERS = {"DST": BUILD["DST"], "OptG": BUILD["OptG"]}
PRUNING_FROZEN_LAYERS = {"IMP": BUILD["IMP"], "SWAMP": BUILD["SWAMP"],
                         "OptG": lambda model: sparsekern.OptG(model, sparsity=0.5, epochs=2, criterion="magnitude")}


@pytest.mark.parametrize("who", LEAVING_OUT_FROZEN_LAYERS)
def test_a_layer_frozen_at_construction_may_serve_in_inference_mode_where_the_algorithm_leaves_it_out(who):
    # DST leaves out the layers it does not train, OptG's learned scores those frozen when it is built: OptG refused
    # one in inference mode all the same (its check of the model's layers took in every layer), DST did not.
    model = _sparse_model()
    model[0].weight.requires_grad_(False)
    model[0].to_inference()
    packed, mask = model[0].packed, model[0].mask.clone()
    with pytest.warns(UserWarning, match=rf"^{who} leaves the masks of \['0'\] alone"):
        algorithm = LEAVING_OUT_FROZEN_LAYERS[who](model)
    model(torch.randn(5, 8)).sum().backward()
    algorithm.step()
    if who == "OptG":
        algorithm.next_epoch()
    assert model[0].packed is packed and torch.equal(model[0].mask, mask)


@pytest.mark.parametrize("who", PRUNING_FROZEN_LAYERS)
def test_a_frozen_layer_in_inference_mode_is_refused_where_the_algorithm_prunes_it(who):
    # IMP and SWAMP prune every layer (frozen ones by magnitude), as does OptG with criterion="magnitude".
    model = _sparse_model()
    model[0].weight.requires_grad_(False)
    model[0].to_inference()
    before = everything(model)
    with pytest.raises(ValueError, match=f"^{who}: layer '0' is in inference mode"):
        PRUNING_FROZEN_LAYERS[who](model)
    assert_unchanged(before, everything(model))
