"""sparsify with explicit per-layer densities (distribution={layer name: density}) and `densities(model)`, the
profile read off a sparsified model in the same naming."""
import math

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import distributions

from .naming_models import convnet, mixed, tied


def masks(model):
    return {name: module.mask.clone() for name, module in sparsekern.nn.sparse_modules(model)}


def counts(model):
    return {name: module.nnz for name, module in sparsekern.nn.sparse_modules(model)}


def test_a_mapping_of_erks_densities_reproduces_erks_masks_and_weights():
    reference, model = convnet(), convnet()
    sparsekern.sparsify(reference, 0.2, generator=torch.Generator().manual_seed(3))
    names = [name for name, _ in sparsekern.nn.sparse_modules(reference)]
    shapes = [tuple(module.weight.shape) for _, module in sparsekern.nn.sparse_modules(reference)]
    erk = dict(zip(names, distributions.erk(shapes, 0.2)))
    sparsekern.sparsify(model, None, distribution=erk, generator=torch.Generator().manual_seed(3))
    assert masks(model).keys() == masks(reference).keys()
    assert all(torch.equal(masks(model)[name], masks(reference)[name]) for name in names)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_each_layer_holds_round_d_times_n():
    model = convnet()
    given = {"0": 0.3, "2": 1.0, "4": 0.05}
    sparsekern.sparsify(model, None, distribution=given)
    sizes = {"0": 16 * 3 * 9, "2": 32 * 16 * 9, "4": 320}
    assert counts(model) == {name: round(given[name] * sizes[name]) for name in given}


def test_round_trip_through_densities():
    model = mixed()
    sparsekern.sparsify(model, 0.3, generator=torch.Generator().manual_seed(0))
    profile = sparsekern.densities(model)
    assert list(profile) == ["0", "1.self_attn.in_proj", "1.self_attn.out_proj", "1.linear1", "1.linear2", "2.ih_l0",
                             "2.hh_l0"]
    fresh = mixed(1)
    sparsekern.sparsify(fresh, None, distribution=profile, generator=torch.Generator().manual_seed(5))
    assert sparsekern.densities(fresh) == profile
    assert counts(fresh) == counts(model)
    assert sparsekern.nn.densities is sparsekern.densities


@pytest.mark.parametrize("compiled_side", ["profile", "model"])
def test_a_profile_read_across_a_wrapper_is_refused_naming_its_prefix(compiled_side):
    # densities() of a torch.compile'd model names its layers '_orig_mod.0', ...: the refusal listed every name
    # as missing and unexpected, without saying why.
    def fresh():
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    source, target = fresh(), fresh()
    sparsekern.sparsify(source, 0.5, generator=torch.Generator().manual_seed(0))
    if compiled_side == "profile":
        source = torch.compile(source)
    else:
        target = torch.compile(target)
    with pytest.raises(ValueError, match=rf"the {compiled_side}'s names carry the prefix '_orig_mod\.' of a wrapper"):
        sparsekern.sparsify(target, None, distribution=sparsekern.densities(source))
    assert not sparsekern.nn.sparse_modules(target)


def test_densities_of_a_model_that_is_itself_a_layer_names_it_as_the_root():
    layer = sparsekern.sparsify(nn.Linear(10, 10), 0.5)
    assert sparsekern.densities(layer) == {"": 0.5}
    fresh = sparsekern.sparsify(nn.Linear(10, 10), None, distribution={"": 0.25})
    assert fresh.nnz == 25


def test_include_exclude_select_the_layers_the_mapping_must_name():
    model = convnet()
    sparsekern.sparsify(model, None, distribution={"0": 0.5, "4": 0.5}, exclude="2")
    assert type(model[2]) is nn.Conv2d and counts(model) == {"0": 216, "4": 160}
    model = convnet()
    with pytest.raises(ValueError, match=r"not among them: '2'"):
        sparsekern.sparsify(model, None, distribution={"0": 0.5, "2": 0.5, "4": 0.5}, include=["0", "4"])
    with pytest.raises(ValueError, match=r"missing: '0'"):
        sparsekern.sparsify(model, None, distribution={"2": 0.5, "4": 0.5}, exclude="2")


def test_tied_layers_are_one_layer_named_by_their_first_name():
    model = tied()
    sparsekern.sparsify(model, None, distribution={"0": 0.25})
    assert model[0].mask is not None and torch.equal(model[0].mask, model[1].mask) and model[0].nnz == 36
    assert sparsekern.densities(model) == {"0": 0.25}
    with pytest.raises(ValueError, match=r"not among them: '1'.*tied layers by their first name"):
        sparsekern.sparsify(tied(), None, distribution={"0": 0.25, "1": 0.25})


def test_attention_and_recurrent_layers_by_their_projections_names():
    model = mixed()
    given = {"0": 0.5, "1.self_attn.in_proj": 0.25, "1.self_attn.out_proj": 1.0, "1.linear1": 0.5,
             "1.linear2": 0.5, "2.ih_l0": 0.125, "2.hh_l0": 0.75}
    sparsekern.sparsify(model, None, distribution=given)
    assert sparsekern.densities(model) == given
    with pytest.raises(ValueError, match=r"missing: '1\.self_attn\.in_proj'.*not among them: '1\.self_attn'"):
        sparsekern.sparsify(mixed(), None, distribution={**{k: v for k, v in given.items()
                                                            if k != "1.self_attn.in_proj"}, "1.self_attn": 0.5})


def _refused_unchanged(model, error, match, density=None, **options):
    generator = torch.Generator().manual_seed(0)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    kinds = [type(module) for module in model.modules()]
    rng, generator_state = torch.get_rng_state(), generator.get_state()
    with pytest.raises(error, match=match):
        sparsekern.sparsify(model, density, generator=generator, **options)
    assert [type(module) for module in model.modules()] == kinds
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(generator.get_state(), generator_state)


GOOD = {"0": 0.5, "2": 0.5, "4": 0.5}


@pytest.mark.parametrize("value, error, match", [
    (True, TypeError, r"distribution\['2'\] must be a number, got bool"),
    ("0.5", TypeError, r"distribution\['2'\] must be a number, got str"),
    (None, TypeError, r"distribution\['2'\] must be a number, got NoneType"),
    (math.nan, ValueError, r"distribution\['2'\] must be a finite number in \(0, 1\], got nan"),
    (0, ValueError, r"distribution\['2'\] must be a finite number in \(0, 1\], got 0\.0"),
    (-0.5, ValueError, r"distribution\['2'\] .*got -0\.5"),
    (1.5, ValueError, r"distribution\['2'\] .*got 1\.5"),
])
def test_a_bad_density_in_the_mapping_is_refused_naming_its_layer_with_nothing_changed(value, error, match):
    _refused_unchanged(convnet(), error, match, distribution={**GOOD, "2": value})


@pytest.mark.parametrize("density, options, match", [
    (0.5, {}, r"density must be None when distribution is a mapping"),
    (None, {"power": 2.0}, r"power .* must stay 1\.0 with a mapping"),
    (None, {"dense_first_layer": True}, r"dense_first_layer must be False with a mapping"),
    (None, {"distribution": {"0": 0.5, "4": 0.5, "9": 0.5}}, r"missing: '2'; not among them: '9'"),
    (None, {"distribution": {"0": 0.001, "2": 0.5, "4": 0.5}}, r"densities given leave 1 layer\(s\) with no active "
                                                                  r"weight \('0'\): raise their densities"),
])
def test_bad_companions_and_names_are_refused_with_nothing_changed(density, options, match):
    _refused_unchanged(convnet(), ValueError, match, density, **{"distribution": GOOD, **options})


def test_power_with_the_uniform_distribution_is_refused_with_nothing_changed():
    # Only ERK reads its exponent: uniform would ignore it silently.
    _refused_unchanged(convnet(), ValueError, r"power is ERK's exponent and must stay 1\.0 with "
                       r"distribution='uniform', got 2\.0", 0.5, distribution="uniform", power=2.0)


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_no_density_with_a_named_distribution_points_to_the_mapping(distribution):
    _refused_unchanged(convnet(), TypeError, rf"density must be a number with distribution='{distribution}', got "
                       r"None \(None goes with a mapping", distribution=distribution)


def test_a_missing_layer_of_an_attention_model_is_refused_unchanged():
    _refused_unchanged(mixed(), ValueError, r"missing: '2\.hh_l0'",
                       distribution={"0": 0.5, "1.self_attn.in_proj": 0.5, "1.self_attn.out_proj": 0.5,
                                     "1.linear1": 0.5, "1.linear2": 0.5, "2.ih_l0": 0.5})


def test_layer_densities_takes_a_mapping_with_names():
    shapes = [(10, 10), (4, 5)]
    assert distributions.layer_densities(shapes, None, {"b": 0.5, "a": 0.25}, names=["a", "b"]) == [0.25, 0.5]
    with pytest.raises(ValueError, match="needs names"):
        distributions.layer_densities(shapes, None, {"a": 0.25, "b": 0.5})
    with pytest.raises(TypeError, match="density must be a number"):
        distributions.layer_densities(shapes, None, "erk")


def test_densities_refuses_a_non_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sparsekern.densities({"0": 0.5})


def test_a_distribution_function_of_ones_own_sees_the_selected_layers_and_sets_their_densities():
    # A per-layer rule the package does not offer: the first layer dense, the attention's projections at twice the
    # rest. It sees the layers sparsify selected, named as a mapping names them, with their weight shapes.
    seen = []

    def rule(shapes, density, *, names):
        seen.append((list(shapes), density, list(names)))
        return [1.0 if index == 0 else min(1.0, density * (2 if ".self_attn." in name else 1))
                for index, name in enumerate(names)]
    model = sparsekern.sparsify(mixed(), 0.25, distribution=rule, generator=torch.Generator().manual_seed(0))
    profile = sparsekern.densities(model)
    layers = dict(sparsekern.nn.sparse_modules(model))
    assert seen == [([tuple(layers[name].weight.shape) for name in profile], 0.25, list(profile))]
    expected = rule(seen[0][0], 0.25, names=seen[0][2])
    assert list(profile.values()) == pytest.approx(expected, abs=1 / 64)
    # ... and gives the masks that the mapping of its densities gives.
    given = sparsekern.sparsify(mixed(), None, distribution=dict(zip(seen[0][2], expected)),
                                generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(masks(model)[name], mask) for name, mask in masks(given).items())


@pytest.mark.parametrize("rule, error, match", [
    (lambda shapes, density, *, names: [0.5], ValueError, r"returned 1 densities for 7 layers \('0'"),
    (lambda shapes, density, *, names: {name: 0.5 for name in names}, TypeError, "must return a list of densities"),
    (lambda shapes, density, *, names: [0.5] * 6 + [1.5], ValueError,
     r"density of layer '2.hh_l0' must be .* \(0, 1\]"),
    (lambda shapes, density, *, names: [0.5] * 6 + ["half"], TypeError, "density of layer '2.hh_l0' must be a number")])
def test_a_distribution_function_s_densities_are_checked_before_the_model_changes(rule, error, match):
    model = mixed()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(error, match=match):
        sparsekern.sparsify(model, 0.5, distribution=rule)
    assert not sparsekern.nn.sparse_modules(model)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_a_distribution_function_refuses_erk_s_options():
    def rule(shapes, density, *, names):
        return [density] * len(shapes)
    for options in (dict(power=0.5), dict(dense_first_layer=True)):
        with pytest.raises(ValueError, match="leave them at their defaults with a distribution function"):
            sparsekern.sparsify(mixed(), 0.5, distribution=rule, **options)


def test_a_distribution_function_leaving_a_layer_empty_is_named_not_density():
    # The rule's densities are its own (it may ignore density): raising density would not help.
    def rule(shapes, density, *, names):
        return [0.5] * (len(shapes) - 1) + [1e-9]
    model = mixed()
    with pytest.raises(ValueError, match=r"^the densities of distribution .*rule leave 1 layer\(s\) .*raise their "
                                         r"densities or exclude"):
        sparsekern.sparsify(model, 0.5, distribution=rule)
    assert not sparsekern.nn.sparse_modules(model)
