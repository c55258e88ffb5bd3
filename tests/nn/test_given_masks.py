"""sparsify with given masks (mask={layer name: bool tensor}): the same model as sparsifying with every mask all
True and then setting each mask and running the init by hand, every bad input refused with nothing changed."""
import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import init as sparse_init

from .naming_models import convnet, mixed, tied


def masks_of(model) -> dict:
    return {name: module.mask.clone() for name, module in sparsekern.nn.sparse_modules(model)}


def ticket(build, density: float = 0.3, seed: int = 7) -> dict:
    """Masks of another model of `build`'s kind: what a lottery ticket's random reinitialisation starts from."""
    model = build(seed)
    sparsekern.sparsify(model, density, generator=torch.Generator().manual_seed(seed))
    return masks_of(model)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    return a.state_dict().keys() == b.state_dict().keys() and all(
        torch.equal(value, b.state_dict()[name]) for name, value in a.state_dict().items())


INITS = {"sparse": sparse_init.sparse_, "layer-scaled": sparse_init.layer_scaled_, "dense": sparse_init.dense_}


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("build", [convnet, mixed], ids=["convnet", "attention and LSTM"])
def test_given_masks_give_the_manual_loops_masks_and_weights_bit_for_bit(build, init):
    masks = ticket(build)
    model = build()
    sparsekern.sparsify(model, None, mask=masks, init=init, generator=torch.Generator().manual_seed(5))

    by_hand = build()
    sparsekern.sparsify(by_hand, 1.0, init="dense")
    generator = torch.Generator().manual_seed(5)
    for name, module in sparsekern.nn.sparse_modules(by_hand):
        module.set_mask(masks[name])
        with torch.no_grad():
            INITS[init](module, generator=generator)
        module.zero_weights_off_mask()
    assert masks_of(model).keys() == masks.keys()
    assert all(torch.equal(mask, masks[name]) for name, mask in masks_of(model).items())
    assert same_state(model, by_hand)
    if init != "dense":   # a fresh draw, not the weights the model was built with
        assert not torch.equal(model[0].weight, build()[0].weight * masks["0"])


def test_the_sparse_init_reads_each_layers_own_density():
    # The masks' stream is not the init's: the same seed's uniform draws would pick the small normal ones.
    masks = {"0": torch.ones(16, 3, 3, 3, dtype=torch.bool),
             "2": torch.rand(32, 16, 3, 3, generator=torch.Generator().manual_seed(1)) < 0.05,
             "4": torch.ones(10, 32, dtype=torch.bool)}
    model = sparsekern.sparsify(convnet(), None, mask=masks, generator=torch.Generator().manual_seed(0))
    for name, module in sparsekern.nn.sparse_modules(model):
        assert module.density == int(masks[name].sum()) / masks[name].numel()
    # sparse_: variance 1 / (active fan-in), about 1/27 in the dense layer 0 and 1/7 in layer 2 (density 0.05).
    assert model[2].weight[masks["2"]].std() > 1.5 * model[0].weight.std()


def test_the_same_seed_gives_the_same_weights_and_the_model_holds_copies():
    masks = ticket(convnet)
    first = sparsekern.sparsify(convnet(1), None, mask=masks, generator=torch.Generator().manual_seed(2))
    second = sparsekern.sparsify(convnet(2), None, mask=masks, generator=torch.Generator().manual_seed(2))
    for (name, a), (_, b) in zip(sparsekern.nn.sparse_modules(first), sparsekern.nn.sparse_modules(second)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, masks[name]) and torch.equal(b.mask, masks[name])
    masks["0"].fill_(True)
    assert not first[0].mask.all()


def test_dense_init_keeps_the_current_weights_masked():
    masks = ticket(convnet)
    model = convnet()
    weights = {name: module.weight.detach().clone() for name, module in model.named_children()
               if isinstance(module, (nn.Conv2d, nn.Linear))}
    sparsekern.sparsify(model, None, mask=masks, init="dense")
    for name, weight in weights.items():
        assert torch.equal(model.get_submodule(name).weight, weight * masks[name])


def test_masks_of_another_layer_of_the_same_model_are_read_before_any_is_written():
    # The caller's tensors may be this model's own masks, swapped between two layers of one shape.
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    first, second = model[0].mask.clone(), model[1].mask.clone()
    assert not torch.equal(first, second)
    sparsekern.sparsify(model, None, mask={"0": model[1].mask, "1": model[0].mask}, init="dense")
    assert torch.equal(model[0].mask, second) and torch.equal(model[1].mask, first)


def test_an_already_sparse_model_gets_the_new_masks_and_its_momentum_is_zeroed_off_them():
    model = sparsekern.sparsify(convnet(), 0.5, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 5, 5)).sum().backward()
    optimizer.step()
    weights = {name: module.weight.detach().clone() for name, module in sparsekern.nn.sparse_modules(model)}
    masks = ticket(convnet, 0.2)
    sparsekern.sparsify(model, None, mask=masks, init="dense", optimizer=optimizer)
    for name, module in sparsekern.nn.sparse_modules(model):
        assert torch.equal(module.mask, masks[name])
        assert torch.equal(module.weight, weights[name] * masks[name])   # newly active entries start at 0
        momentum = optimizer.state[module.weight]["momentum_buffer"]
        assert momentum[~masks[name]].eq(0).all() and momentum[masks[name]].ne(0).any()
        assert module.weight.grad[~masks[name]].eq(0).all()


def test_tied_layers_take_one_mask_by_their_first_name():
    mask = torch.rand(12, 12, generator=torch.Generator().manual_seed(0)) < 0.25
    model = sparsekern.sparsify(tied(), None, mask={"0": mask})
    assert torch.equal(model[0].mask, mask) and torch.equal(model[1].mask, mask)
    assert model[0].weight is model[1].weight


def test_include_and_exclude_select_the_layers_the_mapping_must_name():
    masks = ticket(convnet)
    model = sparsekern.sparsify(convnet(), None, mask={"0": masks["0"], "4": masks["4"]}, exclude="2")
    assert type(model[2]) is nn.Conv2d and torch.equal(model[4].mask, masks["4"])


def test_a_model_that_is_itself_a_layer_is_named_by_the_empty_name():
    mask = torch.eye(5, dtype=torch.bool)
    layer = sparsekern.sparsify(nn.Linear(5, 5), None, mask={"": mask})
    assert torch.equal(layer.mask, mask)


def test_masks_made_under_inference_mode_train_outside_it():
    with torch.inference_mode():
        masks = {name: mask.clone() for name, mask in ticket(convnet).items()}
    model = sparsekern.sparsify(convnet(), None, mask=masks)
    assert not any(module.mask.is_inference() for _, module in sparsekern.nn.sparse_modules(model))
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    assert model[0].weight.grad[~masks["0"]].eq(0).all()


@pytest.mark.gpu
def test_masks_on_the_cpu_are_copied_onto_the_weights_device():
    masks = ticket(convnet)
    model = sparsekern.sparsify(convnet().cuda(), None, mask=masks, generator=torch.Generator().manual_seed(0))
    assert all(module.mask.is_cuda and torch.equal(module.mask.cpu(), masks[name])
               for name, module in sparsekern.nn.sparse_modules(model))


def _refused_unchanged(model, error, match, density=None, **options):
    generator = torch.Generator().manual_seed(0)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    kinds = [type(module) for module in model.modules()]
    rng, generator_state = torch.get_rng_state(), generator.get_state()
    with pytest.raises(error, match=match) as refused:
        sparsekern.sparsify(model, density, generator=generator, **options)
    assert "\n" not in str(refused.value)
    assert [type(module) for module in model.modules()] == kinds
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(generator.get_state(), generator_state)


GOOD = ticket(convnet)


def _with(name, value):
    return {**GOOD, name: value}


@pytest.mark.parametrize("mask, error, match", [
    ({"0": GOOD["0"], "4": GOOD["4"], "9": GOOD["2"]}, ValueError,
     r"^mask must give a mask to exactly the layers sparsified; missing: '2'; not among them: '9' \(layers are named"),
    (_with("2", GOOD["2"].tolist()), TypeError, r"^mask\['2'\] must be a Tensor, got list"),
    (_with("2", GOOD["2"].float()), TypeError, r"^mask\['2'\] must be a bool tensor, got torch.float32"),
    (_with("2", GOOD["2"].to_sparse()), TypeError, r"^mask\['2'\] must be a dense \(strided\) tensor"),
    (_with("2", GOOD["2"][:, :8]), ValueError,
     r"^mask\['2'\] must have the shape of layer '2''s weight \(32, 16, 3, 3\), got \(32, 8, 3, 3\)"),
    (_with("2", GOOD["2"].to("meta")), ValueError, r"^mask\['2'\] is on the meta device, which holds no values"),
    (_with("2", torch.zeros_like(GOOD["2"])), ValueError, r"^mask\['2'\] has no active entry"),
    # A float-valued entry in an otherwise good mapping is found before the names are compared.
    ({**GOOD, "9": torch.ones(3)}, TypeError, r"^mask\['9'\] must be a bool tensor"),
], ids=["names", "not a tensor", "float", "sparse layout", "shape", "meta", "empty", "bad unexpected entry"])
def test_a_bad_mapping_is_refused_naming_the_argument_and_layer_with_nothing_changed(mask, error, match):
    _refused_unchanged(convnet(), error, match, mask=mask)


@pytest.mark.parametrize("density, options, error, match", [
    (0.3, {}, ValueError, r"^density must be None when mask is a mapping of masks"),
    (None, {"distribution": "uniform"}, ValueError, r"^distribution must keep its default 'erk' when mask is a "
                                                     r"mapping"),
    (None, {"distribution": {"0": 0.5, "2": 0.5, "4": 0.5}}, ValueError, r"^distribution must keep its default .*got "
                                                                           r"a dict"),
    (None, {"power": 2.0}, ValueError, r"^power is ERK's exponent and must stay 1\.0 when mask is a mapping"),
    (None, {"power": "2"}, TypeError, r"^power must be a number"),
    (None, {"dense_first_layer": True}, ValueError, r"^dense_first_layer must be False when mask is a mapping"),
    (None, {"dense_first_layer": 1}, TypeError, r"^dense_first_layer must be a bool"),
    (0.3, {"mask": ["0", "2", "4"]}, TypeError, r"^mask must be one of \('random', 'magnitude'\) or a mapping, got "
                                                  r"a list: masks of your own go by layer name"),
    (None, {"init": lambda module, generator: 1 / 0}, RuntimeError, r"^init=.* failed on layer '0'"),
], ids=["density", "uniform", "distribution mapping", "power", "power type", "dense_first_layer",
        "dense_first_layer type", "mask a list", "failing init"])
def test_contradicting_settings_are_refused_with_nothing_changed(density, options, error, match):
    _refused_unchanged(convnet(), error, match, density, **{"mask": GOOD, **options})


def test_an_already_sparse_model_and_its_optimizer_are_unchanged_on_refusal():
    model = sparsekern.sparsify(convnet(), 0.5, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3, 5, 5)).sum().backward()
    optimizer.step()
    momenta = [optimizer.state[parameter]["momentum_buffer"].clone() for parameter in model.parameters()]
    _refused_unchanged(model, ValueError, r"^mask\['4'\] has no active entry",
                       mask=_with("4", torch.zeros(10, 32, dtype=torch.bool)), optimizer=optimizer)
    assert all(torch.equal(optimizer.state[parameter]["momentum_buffer"], momentum)
               for parameter, momentum in zip(model.parameters(), momenta))


def test_tied_attention_and_recurrent_layers_are_named_as_elsewhere_in_sparsify():
    _refused_unchanged(tied(), ValueError, r"not among them: '1'.*tied layers by their first name",
                       mask={"0": torch.ones(12, 12, dtype=torch.bool), "1": torch.ones(12, 12, dtype=torch.bool)})
    masks = ticket(mixed)
    assert list(masks) == ["0", "1.self_attn.in_proj", "1.self_attn.out_proj", "1.linear1", "1.linear2", "2.ih_l0",
                           "2.hh_l0"]
    by_module = {**{name: mask for name, mask in masks.items() if not name.startswith(("1.self_attn", "2."))},
                 "1.self_attn": masks["1.self_attn.in_proj"], "2": masks["2.ih_l0"]}
    _refused_unchanged(mixed(), ValueError, r"missing: '1\.self_attn\.in_proj', '1\.self_attn\.out_proj', "
                                            r"'2\.ih_l0', '2\.hh_l0'; not among them: '1\.self_attn', '2'",
                       mask=by_module)
    _refused_unchanged(mixed(), ValueError, r"^mask\['2\.hh_l0'\] must have the shape of layer '2\.hh_l0''s weight "
                                            r"\(32, 8\), got \(32, 16\)",
                       mask={**masks, "2.hh_l0": torch.ones(32, 16, dtype=torch.bool)})


def test_masks_read_across_a_wrapper_are_refused_naming_its_prefix():
    wrapped = {f"_orig_mod.{name}": mask for name, mask in GOOD.items()}
    _refused_unchanged(convnet(), ValueError, r"the masks' names carry the prefix '_orig_mod\.' of a wrapper.*read "
                                              r"the masks from the model", mask=wrapped)


def layer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(12, 12)


# Each model's masks as sparsekern.masks names them: tied layers once (by their first name), the root as "".
READ_NAMES = {convnet: ["0", "2", "4"], mixed: ["0", "1.self_attn.in_proj", "1.self_attn.out_proj", "1.linear1",
                                                "1.linear2", "2.ih_l0", "2.hh_l0"],
              tied: ["0"], layer: [""]}


@pytest.mark.parametrize("build", READ_NAMES, ids=["convnet", "attention and LSTM", "tied", "itself a layer"])
def test_masks_read_off_a_model_start_a_fresh_one_with_every_mask_exactly(build):
    model = sparsekern.sparsify(build(7), 0.3, generator=torch.Generator().manual_seed(7))
    read = sparsekern.masks(model)
    assert list(read) == READ_NAMES[build] == list(sparsekern.densities(model))
    fresh = sparsekern.sparsify(build(1), None, mask=read, generator=torch.Generator().manual_seed(5))
    expected, got = masks_of(model), masks_of(fresh)   # every layer, the second name of a tied one too
    assert list(got) == list(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_masks_are_copies_on_the_masks_device():
    model = sparsekern.sparsify(tied(), 0.3, generator=torch.Generator().manual_seed(7))
    before = masks_of(model)
    read = sparsekern.masks(model)
    assert all(mask.device == model[0].mask.device and mask.dtype == torch.bool for mask in read.values())
    for mask in read.values():
        mask.logical_not_()
    assert all(torch.equal(mask, before[name]) for name, mask in masks_of(model).items())
    assert sparsekern.nn.masks is sparsekern.masks


@pytest.mark.parametrize("value", [5, "model", nn.Sequential, None, {"0": torch.ones(2, dtype=torch.bool)}])
def test_masks_refuses_a_non_module(value):
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparsekern.masks(value)


def test_an_init_running_out_of_memory_raises_out_of_memory_with_nothing_changed():
    # Review 28c: it became RuntimeError 'init=... failed', which a handler catching torch.OutOfMemoryError missed.
    def init(module, generator):
        raise torch.OutOfMemoryError("CUDA out of memory")
    _refused_unchanged(convnet(), torch.OutOfMemoryError, "out of memory", mask=GOOD, init=init)
