"""`sparsify(model, density, ...)`: turn a model's Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d,
MultiheadAttention and RNN/LSTM/GRU layers into sparse ones, in place."""
from __future__ import annotations

import fnmatch
import warnings
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from .. import ops
from ..ops import _checks
from . import distributions, init as sparse_init, tying
from .attention import DENSE_ENTRIES, SparseMultiheadAttention, computed_biases
from .convolutions import (SparseConv1d, SparseConv2d, SparseConv3d, SparseConvTranspose1d, SparseConvTranspose2d,
                           SparseConvTranspose3d)
from .modules import (SparseLinear, SparseModule, check_own_masks, is_computed, refuse_meta, sparse_modules,
                      weight_type_problem)
from .optimizer_state import check_optimizer, check_state_writable, reset_state_off_mask, trained_parameters
from .recurrent import SparseGRU, SparseLSTM, SparseRNN, SparseRNNBase, _layer_and_kind
from .sharding import refuse_sharded

# Exact types: a subclass of nn.Linear may read its weight outside forward (MultiheadAttention's
# out_proj does), where a mask would not apply.
_SPARSE_OF = {nn.Linear: SparseLinear, nn.Conv1d: SparseConv1d, nn.Conv2d: SparseConv2d, nn.Conv3d: SparseConv3d,
              nn.ConvTranspose1d: SparseConvTranspose1d, nn.ConvTranspose2d: SparseConvTranspose2d,
              nn.ConvTranspose3d: SparseConvTranspose3d}
# The dense layer types sparsify replaces (each sparse module is an instance of its own).
SPARSIFIABLE = tuple(_SPARSE_OF)
MASKS = ("random", "magnitude")
# Exact types, as above: each becomes a sparse module whose weight matrices are sparse layers of their own.
_SPARSE_RECURRENT_OF = {nn.RNN: SparseRNN, nn.LSTM: SparseLSTM, nn.GRU: SparseGRU}


def sparsify(model: nn.Module, density: float | None, distribution: str | Mapping[str, float] | Callable = "erk",
             include: Sequence[str] | str | None = None, exclude: Sequence[str] | str | None = None,
             init: str | Callable | None = None, power: float = 1.0, dense_first_layer: bool = False,
             generator: torch.Generator | None = None, mask: str | Mapping[str, Tensor] = "random",
             optimizer: torch.optim.Optimizer | None = None) -> nn.Module:
    """Replaces the nn.Linear, nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, nn.MultiheadAttention and
    nn.RNN/LSTM/GRU modules of `model` by sparse ones, with random masks, masks that keep each layer's largest
    weights, or masks given per layer.

    Args:
        model: modified in place. Modules of exactly nn.Linear, nn.Conv1d/2d/3d or
            nn.ConvTranspose1d/2d/3d and sparse modules already present (their masks are drawn again) are sparsified. An
            nn.MultiheadAttention (exactly; those inside nn.TransformerEncoderLayer/DecoderLayer too)
            becomes a `SparseMultiheadAttention` whose projections are sparse layers of their own, each
            one layer of the distribution: "<attention>.in_proj" (the (3*embed_dim, embed_dim) input
            projection; "<attention>.q_proj", ".k_proj", ".v_proj" when kdim/vdim differ from embed_dim) and
            "<attention>.out_proj". An nn.RNN, nn.LSTM or nn.GRU (exactly) becomes a `SparseRNN`,
            `SparseLSTM` or `SparseGRU` whose weight matrices are sparse layers of their own, each one layer
            of the distribution: "<rnn>.ih_l0" (weight_ih_l0 and bias_ih_l0), "<rnn>.hh_l0", LSTM's
            "<rnn>.hr_l0" (proj_size), "<rnn>.ih_l0_reverse", ...; it is matched by its own name, as an
            attention is (exclude="*.rnn"). Other weight-bearing layers stay dense, named in one warning unless
            include/exclude leave them out: subclasses of those types, nn.Bilinear, recurrent cells (norms and
            embeddings stay dense silently, unless include names them exactly).
            One whose weight or bias is computed from other parameters (torch.nn.utils.parametrize,
            weight_norm, spectral_norm, prune) stays dense (a sparse layer keeps its mask), with a
            warning; a Lazy one that has not made its weight yet raises ValueError; a weight of a dtype
            other than float16, bfloat16, float32 or float64 raises TypeError. Hooks registered on a
            replaced module (an attention or a recurrent module included) move to its sparse replacement,
            and so do the parameters, buffers, submodules and plain attributes a user added to a Linear,
            a convolution, an attention (its out_proj too) or a recurrent module (a learned initial state;
            ValueError for one named like an attribute of the sparse module); a submodule added to an
            attention or a recurrent module is no projection of it, and is sparsified (or not) by its own
            name.
            A model sharded across ranks (FSDP, fully_shard, tensor parallelism) raises ValueError:
            sparsify, then wrap in DistributedDataParallel.
        density: overall fraction of active weights over the sparsified layers, in (0, 1] (up to
            each layer's rounding), except with distribution="uniform" and dense_first_layer, where
            every layer but the first holds `density` (RigL's uniform setting) and the total is higher.
            None with a mapping as `distribution`, whose densities set the total, or as `mask`.
        distribution: "erk" or "uniform", how density is spread over layers (see
            `sparsekern.nn.distributions`); `power` is ERK's exponent, > 0 (ValueError unless 1.0 with
            "uniform") and `dense_first_layer` keeps the first sparsified layer (in model order)
            dense (with "erk" the others share the rest of the same total). Or a mapping {layer name:
            density in (0, 1]} (a paper's per-layer table, a profile that `densities(model)` read off a
            sparsified model), naming exactly the layers
            selected (after include/exclude; tied layers by their first name, an attention's projections
            and a recurrent module's weight matrices as above), else ValueError naming the missing and
            unexpected ones; `power` and `dense_first_layer` must then keep their defaults (and so
            must `distribution` itself with a mapping as `mask`). Or a rule of your own,
            a function `rule(shapes, density, *, names)` returning one density in (0, 1] per layer: it is called with
            the weight shapes (tuples) and names (as the mapping names them) of the layers selected, in model order,
            and `density`, which it may follow or not (the total is what its densities make); a function that cannot
            take that call raises TypeError naming `distribution`, an error it raises is raised as RuntimeError naming
            the rule, what it returns is checked (TypeError or ValueError naming the rule and the layer), and `power`
            and `dense_first_layer` must keep their defaults.
        include, exclude: fnmatch patterns on qualified module names ("features.*", "fc"); a
            module is sparsified if one of its names matches some `include` pattern (all do when
            None) and none matches an `exclude` pattern. A pattern that matches no module's name
            at all warns (a typo would otherwise change nothing), naming the attention or recurrent module
            whose layer it names ("*.in_proj", "rnn.hh_l0": see below). An nn.MultiheadAttention is matched
            by its own name and sparsified as a whole, its out_proj with it (its forward reads the
            out_proj's weight directly): exclude="*.self_attn" keeps the attentions dense, and
            include="*.self_attn.out_proj" alone sparsifies nothing there (named in the warning).
            The SparseMultiheadAttention it becomes is matched by its own name too, when sparsify
            runs again (exclude="*.self_attn" then leaves its masks as they are).
        init: "sparse" (sparsity-aware, Evci et al. 2022), "layer-scaled", "dense" (keep the
            module's current weights, masked: on an already sparse module the newly active
            positions start at 0), or a callable init(module, generator=...) (`sparsekern.nn.init`),
            run under torch.no_grad(); whatever it writes off the mask is set to 0. None (the
            default): "sparse" with random or given masks, "dense" with magnitude masks (the weights
            they were chosen by are kept).
        generator: CPU torch.Generator for the masks and the init (the global one if None); the
            same seed gives the same masks and weights.
        mask: "random" (uniformly random active positions) or "magnitude": the layer's largest
            |weight| entries, for pruning a trained model once by magnitude before sparse training
            or fine-tuning (per layer, at the distribution's densities; `sparsekern.IMP` prunes
            globally over several cycles). Weights must be finite; an already sparse layer ranks
            its current, masked weights, so a lower density keeps a subset of its active entries.
            Or a mapping {layer name: bool tensor of the layer's weight shape} (a lottery ticket's masks, a
            mask read off another run or a paper's release), naming exactly the layers selected, as a
            `distribution` mapping does (ValueError naming the missing and unexpected ones), with `density`
            None and `distribution`, `power` and `dense_first_layer` at their defaults. Each mask must
            hold an active entry (ValueError naming it); one on another device than its layer's weight is
            copied there (masks saved on the CPU start a model on the GPU); the model never holds the
            tensors given, only copies. The init runs on them as on random masks (init="sparse" reads
            each layer's own density); an already sparse model gets them in place of its masks.
        optimizer: an optimizer that already trains the model and has stepped (pruning a trained
            model to fine-tune it): its per-weight state (momentum, Adam moments: every state
            tensor shaped like a sparsified weight) is zeroed off the new masks (Rprop's step_size set to the
            lr of the weight's group, Adagrad's sum to its initial_accumulator_value instead: where a fresh state
            starts, so that a weight grown there later starts as a fresh one). Left there, it
            would move pruned weights off 0 at the next step, and the layers, which then still
            promise `zero_off_mask`, would compute with them. Not an LBFGS (ValueError): its
            history is flattened over all parameters; build it after sparsify. Nor one that trains
            none of the weights sparsify masks (ValueError: another model's, say), nor one holding such a state
            tensor that cannot be written in place (ValueError naming it: an expanded view, an inference tensor).
    Returns:
        `model`, or its replacement if `model` itself is one of those layers.

    Layer l holds exactly round(d_l * N_l) active weights: the top entries, through
    `sparsekern.ops.topk_mask`, of uniform random scores or of |weight| (ties to the lower flat
    position); a density so low that some layer would keep no weight raises ValueError. Parameters are
    shared with the replaced modules, so an optimizer built before keeps training them; pass it as
    `optimizer` once it has state. A gradient still pending on a weight (sparsify called between
    backward and the optimizer's step) is zeroed off the new mask too, as the layer's backward would.
    Biases, norms and embeddings stay dense.

    Given masks: the random-reinitialisation control of a lottery ticket trains its mask from a fresh init:

        tickets = sparsekern.masks(model)   # copies, named as sparsify names the layers (tied ones once)
        sparsekern.sparsify(fresh_model, None, mask=tickets, generator=torch.Generator().manual_seed(1))

    Shared modules and tied weights: every reference to a replaced module (a module used twice
    in a Sequential, say; a converted attention's out_proj registered elsewhere too) becomes the
    sparse one. Modules that share one weight Parameter form one layer with one mask. A weight
    that a module staying dense also holds (an Embedding tied to an output Linear, an excluded
    layer) is left dense, with a warning: masking it would prune the dense module too. Sparsified
    again with one of two tied sparse layers left out, both keep their one mask, with a warning. A SparseLinear
    in inference mode (`to_inference`) sparsified again stays in it, packed from its new mask and weight.
    An attention or recurrent module holding such a weight stays dense as a whole (converted, it
    would hold a sparse layer of density 1 there), and the warning names it.

    Under FakeTensorMode, or given a model whose weights are fake tensors (made under it), sparsify raises
    ValueError: the masks are made from values, which fake tensors do not hold.

    Under torch.inference_mode the masks are made as normal tensors (the model can be trained afterwards), unless
    the model's weights are inference tensors (built under it); such a model is refused (RuntimeError) outside it,
    which cannot write them in place.

    Nothing changes unless everything succeeds: the arguments are checked, and masks and initial
    weights computed on copies, before the model is touched; on any error the model and the
    random generator (`generator`, or the global one) are as before.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _refuse_fake_mode()
    refuse_sharded(model, "sparsify")
    given = isinstance(mask, Mapping)
    if given:
        _check_given_mask_settings(density, distribution, power, dense_first_layer)
        mask = _checked_mask_entries(mask)
    else:
        distribution, density = distributions.check_distribution(distribution, density, power=power,
                                                                 dense_first_layer=dense_first_layer)
        mask = _mask_rule(mask)
    if init is None:
        # Magnitude masks keep the weights they were chosen by; random or given ones start from a fresh init.
        init = "dense" if mask == "magnitude" else "sparse"
    init_function = sparse_init.resolve(init)
    include = _patterns(include, "include")
    exclude = _patterns(exclude, "exclude")
    sparse_init.check_generator(generator)
    check_optimizer(optimizer, "build the LBFGS after sparsify")

    groups, wholes = _layers(model, include, exclude)
    inference = [group[0][0] or "(root)" for group in groups if group[0][1].weight.is_inference()]
    if inference and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"sparsify: layer {inference[0]!r}'s weight is an inference tensor (the model was built "
                           f"under torch.inference_mode()), which cannot be masked in place outside it: call sparsify "
                           f"under torch.inference_mode()")
    if optimizer is not None and groups:
        trained = trained_parameters(optimizer)
        if not any(id(group[0][1].weight) in trained for group in groups):
            # Its state could be zeroed off no mask: another model's optimizer, passed by mistake.
            raise ValueError("optimizer trains none of the weights sparsify masks: pass the optimizer that trains "
                             "this model, or None")
        for group in groups:
            check_state_writable(optimizer, group[0][1].weight, None, group[0][0] or "(root)")
    for group in groups:
        _check_grad_writable(group[0][1].weight, group[0][0] or "(root)")
    if mask == "magnitude":
        _check_finite(groups)
    if given:
        _check_given_masks(groups, mask)
    else:
        counts = _layer_counts(groups, density, distribution, power, dense_first_layer)

    # An init callable may draw from the global generator even when `generator` is given.
    global_state = torch.get_rng_state()
    generator_state = generator.get_state() if generator is not None else None
    # Made under torch.inference_mode, the masks would be inference tensors, which training cannot save for backward
    # nor set_mask write: they are made as the weights were, normal unless the model was built under it.
    with torch.inference_mode(bool(inference)):
        try:
            if given:
                # Copies: the caller's tensors may be another layer's mask, which commit rewrites as it goes.
                masks = [mask[group[0][0]].to(group[0][1].weight.device, copy=True) for group in groups]
            else:
                masks = ops.topk_mask([torch.rand(tuple(group[0][1].weight.shape), generator=generator)
                                       for group in groups] if mask == "random"
                                      else [_magnitudes(group) for group in groups], counts)
            staged = _stage(groups, masks, init_function, init, generator)
        except BaseException:
            torch.set_rng_state(global_state)
            if generator is not None:
                generator.set_state(generator_state)
            raise
        return _commit(model, staged, optimizer, wholes)


def _layer_counts(groups: list[tying.Group], density, distribution, power: float, dense_first_layer: bool) -> list[int]:
    """Each group's number of active weights under the distribution; ValueError naming the layers it leaves none."""
    shapes = [tuple(group[0][1].weight.shape) for group in groups]
    per_layer = distributions.layer_densities(shapes, density, distribution, power=power,
                                              dense_first_layer=dense_first_layer,
                                              names=[group[0][0] for group in groups])
    counts = distributions.layer_counts(shapes, per_layer)
    empty = [group[0][0] or "(root)" for group, count in zip(groups, counts) if count == 0]
    if empty:
        # A mapping's or a rule's densities are its own (a rule may ignore density): raising density fixes neither.
        if isinstance(distribution, str):
            cause, under, remedy = f"density={density} leaves", f" under distribution={distribution!r}", "density"
        else:
            source = ("given" if isinstance(distribution, Mapping)
                      else f"of distribution {_checks.qualified_name(distribution)}")
            cause, under, remedy = f"the densities {source} leave", "", "their densities"
        raise ValueError(f"{cause} {len(empty)} layer(s) with no active weight "
                         f"({', '.join(map(repr, empty[:5]))}{', ...' if len(empty) > 5 else ''}){under}: raise "
                         f"{remedy} or exclude those layers")
    return counts


def _check_given_mask_settings(density, distribution, power, dense_first_layer) -> None:
    """ValueError (TypeError for a flag or power of the wrong type) unless the settings that make masks keep their
    defaults beside a mapping of masks, which fix every layer: a second figure could only disagree with them."""
    distributions.check_power(power)
    _checks.flag(dense_first_layer, "dense_first_layer")
    if density is not None:
        raise ValueError(f"density must be None when mask is a mapping of masks (they set every layer's density), "
                         f"got {density!r}")
    if not (isinstance(distribution, str) and distribution == "erk"):
        shown = repr(distribution) if isinstance(distribution, str) else f"a {type(distribution).__name__}"
        raise ValueError(f"distribution must keep its default 'erk' when mask is a mapping of masks (they set every "
                         f"layer's density), got {shown}")
    if power != 1.0:
        raise ValueError(f"power is ERK's exponent and must stay 1.0 when mask is a mapping of masks, got {power!r}")
    if dense_first_layer:
        raise ValueError("dense_first_layer must be False when mask is a mapping of masks: give the first layer an "
                         "all-True mask instead")


def _checked_mask_entries(masks: Mapping) -> dict[str, Tensor]:
    """`masks` as a dict, each entry checked before any layer is looked at: a dense bool tensor holding values (not
    on the meta device, not a fake tensor). TypeError or ValueError naming the entry otherwise."""
    masks = dict(masks)
    for name, value in masks.items():
        entry = f"mask[{name!r}]"
        _checks.tensor(value, entry)
        if value.dtype != torch.bool:
            raise TypeError(f"{entry} must be a bool tensor, got {value.dtype}")
        _checks.holds_values(value, entry)
        _checks.not_fake(value, entry, "its active entries set the layer's mask")
    return masks


def _check_given_masks(groups: list[tying.Group], masks: dict[str, Tensor]) -> None:
    """ValueError unless `masks` gives every group (by its first name) a mask of its weight's shape with an active
    entry, and nothing else. A mask on another device than its weight is fine: a copy moves there."""
    distributions.check_layer_names(masks, [group[0][0] for group in groups], "mask", "a mask", "masks")
    for group in groups:
        name, module = group[0]
        entry = f"mask[{name!r}]"
        _checks.same_shape(masks[name], entry, module.weight, f"layer {name or '(root)'!r}'s weight")
        if not masks[name].any():
            raise ValueError(f"{entry} has no active entry: the layer would keep no weight; exclude it instead")


# Why sparsify refuses fake tensors (FakeTensorMode), whose values it would read: torch raised
# DataDependentOutputException (or an assertion on a real tensor) from inside it, naming neither the model nor the mode.
_FAKE_REMEDY = ("sparsify ranks and counts values to make the masks; sparsify the real model, then fake it "
                "(FakeTensorMode.from_tensor) or trace it")


# Where `mask=` names no rule of sparsify's: how masks of one's own (from a score of one's own) go in.
_OWN_MASKS = ("masks of your own go by layer name, mask={layer name: bool tensor} with density=None (init='dense' "
              "keeps the trained weights), or layer by layer: set_mask(mask, optimizer=optimizer)")


def _mask_rule(mask) -> str:
    """`mask`, one of MASKS (a mapping of masks is taken before): TypeError for what is no str (a list of masks or
    scores, which the repr of would flood the message), ValueError for another name, each saying how to give masks
    of one's own."""
    if not isinstance(mask, str):
        raise TypeError(f"mask must be one of {MASKS} or a mapping, got a {type(mask).__name__}: {_OWN_MASKS}")
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS} or a mapping, got {mask!r}: {_OWN_MASKS}")
    return str.__str__(mask)


def _refuse_fake_mode() -> None:
    """ValueError under an active FakeTensorMode, where every tensor sparsify makes (the scores of the masks, the
    masks themselves) is a fake tensor (`_FAKE_REMEDY`)."""
    if isinstance(torch.empty(()), FakeTensor):
        raise ValueError(f"sparsify(model, ...) was called under FakeTensorMode, whose tensors hold no values: "
                         f"{_FAKE_REMEDY}")


def densities(model: nn.Module) -> dict[str, float]:
    """{layer name: density of its weight's mask} of `model`'s sparse layers, in model order, named as `sparsify`
    names its layers (`_named_layers`). A profile to save and pass back as `sparsify(fresh_model, None,
    distribution=profile)`, which gives every layer the same number of active weights. TypeError for a `model`
    that is no nn.Module; ValueError naming the layers whose masks are on the meta device (`refuse_meta`)."""
    return {name: module.density for name, module in _named_layers(model)}


def masks(model: nn.Module) -> dict[str, Tensor]:
    """{layer name: copy of its weight's mask} of `model`'s sparse layers, in model order, named as `sparsify`
    names its layers (`_named_layers`): a lottery ticket's masks, to pass as `sparsify(fresh_model, None,
    mask=masks(model))`, which gives every layer the same mask. The copies (clones, on the masks' device) are the
    caller's: changing them changes no layer. TypeError for a `model` that is no nn.Module; ValueError naming the
    layers whose masks are on the meta device (`refuse_meta`)."""
    return {name: module.mask.clone() for name, module in _named_layers(model)}


def _named_layers(model: nn.Module) -> list[tuple[str, SparseModule]]:
    """`model`'s sparse layers, in model order, one per mask, named as `sparsify` names its layers (and as a
    `distribution` or `mask` mapping names them): a weight shared by several (tied) layers once, by its first name;
    an attention's projections "<attention>.in_proj", ...; a recurrent module's "<rnn>.ih_l0", ...; a model that
    is itself a layer "". Checks `model` as `densities` and `masks` document."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = sparse_modules(model)
    refuse_meta(layers, tensors=("mask",))   # no values to count or copy (torch's .item() error named no layer)
    named, seen = [], set()
    for name, module in layers:
        if id(module.weight) not in seen:   # a tied layer's mask is its first name's (sparsify makes one per weight)
            seen.add(id(module.weight))
            named.append((name, module))
    return named


def _check_grad_writable(weight: Tensor, layer: str) -> None:
    """ValueError naming it for a gradient of `weight` still pending (sparsify called between backward and the
    optimizer's step) that sparsify could not zero off the new mask in place, checked before anything changes. Left
    dense, that step would move pruned weights off 0, as optimizer state would. Its shape is checked too: torch
    checks it when `.grad` is set, not when its `.data` is."""
    grad = weight.grad
    if grad is None:
        return
    name = f"{layer}.weight.grad"
    if grad.layout != torch.strided or grad.device != weight.device or grad.shape != weight.shape:
        raise ValueError(f"{name} is a {grad.layout} tensor of shape {tuple(grad.shape)} on {grad.device}, its weight "
                         f"a strided one of shape {tuple(weight.shape)} on {weight.device}: it cannot be zeroed off "
                         f"the mask; set it to None (optimizer.zero_grad()) before sparsify")
    with torch.no_grad():   # as the write is: a gradient made with create_graph=True is no refusal
        _checks.writable_in_place(grad, name)


def _patterns(patterns, name: str) -> list[str] | None:
    if patterns is None:
        return None if name == "include" else []
    if isinstance(patterns, str):
        return [patterns]
    if isinstance(patterns, (bytes, dict)) or not hasattr(patterns, "__iter__"):
        raise TypeError(f"{name} must be a str pattern or an iterable of them, got {type(patterns).__name__}")
    patterns = list(patterns)
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise TypeError(f"{name}[{i}] must be a str pattern, got {type(pattern).__name__}")
    return patterns


def _projection_names(model: nn.Module) -> dict[str, str]:
    """{layer name: its module's name} of the layers that an exact nn.MultiheadAttention or nn.RNN/LSTM/GRU of
    `model` will hold once converted ("attn.in_proj", "rnn.hh_l0"), named as `densities` names them: not yet
    modules, so no include/exclude pattern can match them."""
    names = {}
    for name, module in model.named_modules():
        if _exactly(module, (nn.MultiheadAttention,)):
            children = ("in_proj",) if module._qkv_same_embed_dim else ("q_proj", "k_proj", "v_proj")
        elif _exactly(module, tuple(_SPARSE_RECURRENT_OF)):
            children = [layer for layer, kind in map(_layer_and_kind, module._flat_weights_names) if kind == "weight"]
        else:
            continue
        names.update({f"{name}.{child}" if name else child: repr(name) for child in children})
    return names


def _matches(names: list[str], patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for name in names for pattern in patterns)


def _layers(model: nn.Module, include: list[str] | None,
            exclude: list[str]) -> tuple[list[tying.Group], list[tuple[nn.Module, nn.Module]]]:
    """The modules to sparsify, grouped by weight Parameter (one group per mask), in model order, and each
    nn.MultiheadAttention and nn.RNN/LSTM/GRU to convert as a whole with the SparseMultiheadAttention or
    SparseRNNBase (not yet in the model) that will replace it, whose projections are among the modules.

    Warns about patterns that match no module name and about weights tied to a dense module.
    """
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    every_name = [name for module_names in names.values() for name in module_names]
    projections = _projection_names(model)
    for label, patterns in (("include", include or []), ("exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in every_name):
                # A name that `densities` and DST report ("attn.in_proj") but that no module has yet: say which
                # module the pattern must name, since that layer is sparsified (or not) with it as a whole.
                owners = list(dict.fromkeys(owner for name, owner in projections.items()
                                            if fnmatch.fnmatchcase(name, pattern)))
                hint = (f", only weight layers of {' and '.join(owners)}, which sparsify converts whole: "
                        f"include/exclude must name the attention or recurrent module itself" if owners else "")
                warnings.warn(f"{label} pattern {pattern!r} matches no module of the model{hint}", stacklevel=3)

    # A converted attention (sparsify called again) is matched by its own name too, as the nn.MultiheadAttention
    # it was: exclude="*.self_attn" leaves its projections as they are, include="*.self_attn" selects them. So is
    # a converted recurrent module, by the name of the nn.LSTM it was.
    for module in model.modules():
        if isinstance(module, (SparseMultiheadAttention, SparseRNNBase)):
            for _, projection in module.named_projections():
                names[id(projection)] = [*names[id(projection)], *names[id(module)]]
    selected = [(name, module) for name, module in model.named_modules()
                if (include is None or _matches(names[id(module)], include))
                and not _matches(names[id(module)], exclude)]
    # An exact nn.MultiheadAttention is sparsified as a whole, by its own name: SparseMultiheadAttention.from_dense
    # makes its projections SparseLinear layers (sharing its Parameters), which join the targets under the names
    # they will have ("attention.in_proj", "attention.out_proj"). Its dense out_proj goes with it whatever its
    # type (F.multi_head_attention_forward reads that weight directly, so it cannot be sparsified alone): silent
    # when the attention is selected or excluded (patterns match exact names, so exclude="attention" leaves
    # "attention.out_proj" selected); named as left dense only when include picks it without its attention.
    selected_ids = {id(module) for _, module in selected}
    attentions = [module for module in model.modules() if isinstance(module, nn.MultiheadAttention)]
    out_projs = {id(module.out_proj) for module in attentions}
    folded = {id(module.out_proj) for module in attentions
              if id(module) in selected_ids or _matches(names[id(module)], exclude)}
    # A module include names exactly (no pattern) was asked for: one sparsify cannot make sparse is named too.
    named = {id(module) for _, module in selected if include is not None and set(names[id(module)]) & set(include)}
    left_dense = _left_dense([(name, module) for name, module in selected if id(module) not in folded], out_projs,
                             named)
    converted = {id(module): (module, _sparse_attention(name, module))
                 for name, module in _maskable_attentions(selected)}
    # An exact nn.RNN/LSTM/GRU likewise, by its own name: its weight matrices become SparseLinear children.
    for name, module in _maskable_recurrent(selected):
        kind = _SPARSE_RECURRENT_OF[type(module)]
        sparse = _carry_extras(name, module, kind.from_dense(module), kind.dense_entries(module))
        converted[id(module)] = (module, sparse)
    targets = []
    # A converted module's projections by id: (the module's name, the module, the projection's name in it).
    owners = {}
    for name, module in selected:
        if id(module) in converted:
            for child, projection in converted[id(module)][1].named_projections():
                targets.append((f"{name}.{child}" if name else child, projection))
                owners[id(projection)] = (name, module, child)
        elif id(module) not in out_projs and (type(module) in _SPARSE_OF or isinstance(module, SparseModule)
                                              or _reparametrized(module)):
            targets.append((name, module))
    targets = _maskable(targets)
    target_ids = {id(module) for _, module in targets}
    held = tying.holders(model)
    tied_to_dense = {}
    # The attentions being converted, and their dense out_projs, hold the weights their sparse projections share.
    replaced = {*converted, *(id(module.out_proj) for module in attentions if id(module) in converted)}
    for name, module in targets:
        dense = [(other_name, other) for other_name, other in held[id(module.weight)]
                 if id(other) not in target_ids and id(other) not in replaced]
        if dense:
            tied_to_dense[id(module)] = dense
            other_name, other = dense[0]
            # A projection of a module converted whole names that module, which stays dense with all its weights.
            owner_name, owner, weight = owners.get(id(module), (name, module, None))
            # Sparsified again with one of a tied pair of sparse layers left out: both keep their one mask.
            outcome = "keeps its mask" if isinstance(owner, SparseModule) else "stays dense"
            layer = f"{owner_name or '(root)'} ({type(owner).__name__}) {outcome}"
            layer += ": its weight" if weight is None else f" as a whole: its {weight} weight"
            other_outcome = ("which is left out and keeps its mask, and a new mask would change that module's too"
                             if isinstance(other, SparseModule)
                             else "which is not sparsified, and a mask would prune that module too")
            # Leaving a tied decoder dense is the usual intent (a language model's): say what silences the warning.
            warnings.warn(f"{layer} is tied to {other_name or '(root)'} ({type(other).__name__}), {other_outcome}; "
                          f"exclude {owner_name or '(root)'} to silence this warning", stacklevel=3)
    # A group is left dense as a whole when any of its members is tied to a dense module.
    groups = [group for group in tying.group_by_weight(targets)
              if not any(id(module) in tied_to_dense for _, module in group)]
    # An attention is converted only with all its projections: one left out (tied to a dense module) would
    # sit in it as a sparse layer of density 1, which the algorithms would then prune.
    kept = {id(module) for group in groups for _, module in group}
    whole, parts = [], set()
    for original, attention in converted.values():
        projections = {id(projection) for _, projection in attention.named_projections()}
        if projections <= kept:
            whole.append((original, attention))
        else:
            parts |= projections
    groups = [group for group in groups if not any(id(module) in parts for _, module in group)]
    if not groups:
        raise ValueError("model has no nn.Linear, nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d, "
                         "nn.MultiheadAttention or nn.RNN/LSTM/GRU module to sparsify"
                         + ("" if include is None and not exclude else " matching include/exclude")
                         + (" whose weight is not tied to a dense module" if tied_to_dense else "")
                         + (f"; {left_dense}" if left_dense else ""))
    if left_dense:
        warnings.warn(f"{left_dense}; exclude them to silence this warning", stacklevel=3)
    for group in groups:
        name, module = group[0]
        _check_weight_type(name, module.weight)
        if module.weight.numel() == 0:
            raise ValueError(f"layer {name or '(root)'!r} has an empty weight of shape "
                             f"{tuple(module.weight.shape)}: exclude it")
    # Before any sparse layer exists: the dense layers to convert (a group's members share one weight).
    refuse_meta([group[0] for group in groups], "sparsify")
    for name, module in (group[0] for group in groups):
        _checks.not_fake(module.weight, f"sparsify: the weight of layer {name or '(root)'!r}", _FAKE_REMEDY)
    # A sparse layer sparsified again gets its new mask written in place (set_mask), after the layers before it.
    check_own_masks([pair for group in groups for pair in group if isinstance(pair[1], SparseModule)], "sparsify")
    return groups, whole


# Weight-bearing layers a user may expect sparsify to mask, which it leaves dense. Norms, embeddings
# and other per-feature parameters (PReLU, biases) are not listed: sparse training keeps them dense by
# convention (RigL, SET, the lottery-ticket papers), as they hold few of the weights and an
# embedding's rows are looked up, not multiplied.
_LEFT_DENSE = (
    ((nn.Bilinear,), "nn.Bilinear has no sparse module"),
    # An exact nn.MultiheadAttention becomes a SparseMultiheadAttention; only a subclass gets here.
    ((nn.MultiheadAttention,), "a subclass of nn.MultiheadAttention may read its weights outside forward, where a "
                               "mask would not apply (only the exact type is sparsified)"),
    # An exact nn.RNN/LSTM/GRU becomes a SparseRNN/SparseLSTM/SparseGRU; only a subclass (or nn.RNNBase) gets here.
    ((nn.RNNBase,), "a subclass of nn.RNN, nn.LSTM or nn.GRU may read its weights outside forward, where a mask would "
                    "not apply (only the exact types are sparsified)"),
    ((nn.RNNCellBase,), "recurrent cells have no sparse module"),
)


_NO_SPARSE_MODULE = ("named by include, but sparsify has no sparse module of its type (embeddings, norms and other "
                     "layers but Linear, convolutions, attention and recurrent modules stay dense)")

_OUT_PROJ = ("F.multi_head_attention_forward reads the weight of nn.MultiheadAttention's out_proj directly: it is "
             "sparsified with its attention module, which include must name")


def _left_dense(selected: list[tuple[str, nn.Module]], out_projs: set[int], named: set[int]) -> str:
    """One sentence naming the modules of `selected` that stay dense although a user may expect them
    sparsified, grouped by why ("" if none). `out_projs`: ids of the MultiheadAttention out_proj modules;
    `named`: ids of the modules include names exactly, whose parameters (an embedding's, a norm's, a custom
    module's own) are named too where no sparse module takes them."""
    reasons: dict[str, list[str]] = {}
    for name, module in selected:
        if id(module) in out_projs:
            reasons.setdefault(_OUT_PROJ, []).append(f"{name or '(root)'} ({type(module).__name__})")
            continue
        if (isinstance(module, SparseModule) or type(module) in _SPARSE_OF
                or _exactly(module, (nn.MultiheadAttention, *_SPARSE_RECURRENT_OF)) or _reparametrized(module)):
            continue  # sparsified, or stays dense with a warning of its own
        if isinstance(module, SPARSIFIABLE):
            base = next(kind for kind in _SPARSE_OF if isinstance(module, kind))
            reason = (f"a subclass of nn.{base.__name__} may read its weight outside forward, where a mask "
                      f"would not apply (only the exact type is sparsified)")
        else:
            reason = next((why for kinds, why in _LEFT_DENSE if isinstance(module, kinds)), None)
            if reason is None and id(module) in named and next(module.parameters(recurse=False), None) is not None:
                reason = _NO_SPARSE_MODULE
        if reason is not None:
            reasons.setdefault(reason, []).append(f"{name or '(root)'} ({type(module).__name__})")
    if not reasons:
        return ""
    count = sum(map(len, reasons.values()))
    return (f"sparsify leaves {count} weight-bearing layer(s) dense: "
            + "; ".join(f"{', '.join(names)}: {why}" for why, names in reasons.items()))


def _reparametrized(module: nn.Module) -> bool:
    """A Linear/Conv whose weight a mask cannot hold, or whose weight or bias a sparse module cannot share: computed
    by torch.nn.utils.parametrize, or by a forward hook from other parameters (torch.nn.utils.weight_norm,
    spectral_norm, prune), or not made yet (a Lazy module before its first forward). A sparse layer too (sparsify
    again), whose mask cannot be written into a computed weight."""
    if not isinstance(module, SPARSIFIABLE):
        return False
    return _unmade(module) or is_computed(module, "weight") or is_computed(module, "bias")


def _unmade(module: nn.Module) -> bool:
    """A Lazy module that has not made its weight yet (before its first forward)."""
    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def _maskable_attentions(selected: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.MultiheadAttention]]:
    """The exact nn.MultiheadAttention modules of `selected` whose projection weights a mask can hold; one
    whose weight or bias is computed (torch.nn.utils.parametrize, prune) stays dense, with a warning.
    TypeError naming the attention for a weight dtype sparse layers do not take, before anything changes."""
    kept = []
    for name, module in selected:
        if not _exactly(module, (nn.MultiheadAttention,)):
            continue
        weights = [module.in_proj_weight, module.q_proj_weight, module.k_proj_weight, module.v_proj_weight,
                   module.out_proj.weight]
        biases = computed_biases(module)
        if biases or parametrize.is_parametrized(module) or is_computed(module.out_proj, "weight") or not all(
                isinstance(weight, nn.Parameter) for weight in weights if weight is not None):
            what = f"{biases[0]} is" if biases else "a projection weight is"
            warnings.warn(f"{name or '(root)'} (MultiheadAttention) stays dense: {what} computed from other "
                          f"parameters (a parametrization, weight_norm, spectral_norm or torch.nn.utils.prune), "
                          f"not a Parameter that a sparse module can share", stacklevel=4)
            continue
        for weight in weights:
            if weight is not None:
                _check_weight_type(name, weight)
        kept.append((name, module))
    return kept


def _sparse_attention(name: str, attention: nn.MultiheadAttention) -> SparseMultiheadAttention:
    """The SparseMultiheadAttention (not yet in the model) that replaces `attention`, its out_proj with it, given
    what a user attached to either (`_carry_extras`)."""
    sparse = SparseMultiheadAttention.from_dense(attention)
    _carry_extras(f"{name}.out_proj" if name else "out_proj", attention.out_proj, sparse.out_proj)
    return _carry_extras(name, attention, sparse, DENSE_ENTRIES)


def _exactly(module: nn.Module, kinds) -> bool:
    """Whether `module` is of one of `kinds` exactly, or of the class torch.nn.utils.parametrize derives from one
    (which `_maskable_attentions` and `_maskable_recurrent` leave dense with a warning of their own)."""
    kind = type(module)
    return kind in kinds or (parametrize.is_parametrized(module) and kind.__mro__[1] in kinds)


def _maskable_recurrent(selected: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.RNNBase]]:
    """The exact nn.RNN/LSTM/GRU modules of `selected` whose weights a mask can hold; one whose weight or bias is
    computed (torch.nn.utils.parametrize, weight_norm, prune) stays dense, with a warning. TypeError naming the
    module for a dtype sparse layers do not take, before anything changes."""
    kept = []
    for name, module in selected:
        if not _exactly(module, _SPARSE_RECURRENT_OF):
            continue
        parameters = [module._parameters.get(parameter) for parameter in module._flat_weights_names]
        if parametrize.is_parametrized(module) or not all(isinstance(parameter, nn.Parameter)
                                                          for parameter in parameters):
            kind = type(module).__mro__[1] if parametrize.is_parametrized(module) else type(module)
            warnings.warn(f"{name or '(root)'} ({kind.__name__}) stays dense: a weight or bias is computed from "
                          f"other parameters (a parametrization, weight_norm or torch.nn.utils.prune), not a Parameter "
                          f"that a mask can hold", stacklevel=4)
            continue
        for parameter in parameters:
            _check_weight_type(name, parameter)
        kept.append((name, module))
    return kept


def _maskable(targets: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """`targets` without the reparametrized layers, which stay dense (a sparse one keeps its mask) with a warning;
    ValueError (before anything changes) for a Lazy layer not yet materialised, which would silently stay dense."""
    kept = []
    for name, module in targets:
        if not _reparametrized(module):
            kept.append((name, module))
        elif _unmade(module):
            raise ValueError(f"layer {name or '(root)'!r} ({type(module).__name__}) has not made its weight yet: "
                             f"run one forward pass before sparsify, or exclude it")
        else:
            type_name = type(module).__name__
            if type_name.startswith("Parametrized"):  # parametrize's generated class: name the layer kind
                type_name = type(module).__mro__[1].__name__
            what = "weight" if is_computed(module, "weight") else "bias"
            outcome = "keeps its mask" if isinstance(module, SparseModule) else "stays dense"
            warnings.warn(f"{name or '(root)'} ({type_name}) {outcome}: its {what} is computed from other "
                          f"parameters (a parametrization, weight_norm, spectral_norm or torch.nn.utils.prune), "
                          f"not a Parameter that a sparse module can share", stacklevel=4)
    return kept


def _check_weight_type(name: str, weight: Tensor) -> None:
    problem = weight_type_problem(weight)
    if problem is not None:
        raise TypeError(f"layer {name or '(root)'!r} has {problem}; exclude it")


def _carry_hooks(original: nn.Module, sparse: nn.Module) -> None:
    """Gives `sparse` the hooks registered on the module it replaces (the same dicts, so that the handles
    the caller holds still remove them)."""
    for attribute, value in vars(original).items():
        if attribute.endswith(("hooks", "hooks_with_kwargs", "hooks_always_called")) and isinstance(value, dict):
            sparse.__dict__[attribute] = value
    if "_is_full_backward_hook" in vars(original):
        sparse.__dict__["_is_full_backward_hook"] = original._is_full_backward_hook


def _carry_extras(name: str, original: nn.Module, sparse: nn.Module, own: Sequence[str] = ("weight", "bias"),
                  remedy: str = "rename it or exclude the layer"):
    """Gives `sparse`, not yet in the model, what a user attached to the module it replaces: extra
    parameters, buffers (persistence kept) and submodules, the same objects, so that the state dict
    keeps their keys and an optimizer holding them still trains them (a child that sparsify converts
    itself is then replaced there by `_replace`); and plain attributes
    (`layer.scale = 2`), so that code reading them keeps working. Not the hooks (`_carry_hooks`, at
    commit), nor torch's own attributes, which `sparse` holds itself (training). ValueError, before
    anything changes, for a name the sparse module uses itself (a buffer "mask", an attribute "density",
    "dense_grad", "zero_off_mask" or "forward"; an attention's "in_proj", "input_projections"): either
    meaning would be lost; and for a layer compiled in place (nn.Module.compile), whose compiled forward
    is the dense one's. `own`: the entries and attributes of `original` that `sparse` shares already
    (from_dense) or replaces; `remedy`: the way out the error names (densify has no layer to exclude).
    Returns `sparse`."""
    if vars(original).get("_compiled_call_impl") is not None:
        # nn.Module.compile's forward of the dense layer, bound to it: the sparse one cannot run it.
        raise ValueError(f"layer {name or '(root)'!r} ({type(original).__name__}) was compiled in place "
                         f"(nn.Module.compile): sparsify the model first, then compile")
    extras = [(slot, key, value) for slot in ("_parameters", "_buffers", "_modules")
              for key, value in getattr(original, slot).items() if key not in own]
    # A plain attribute the sparse module also holds is nn.Module's or the dense layer's own (training,
    # in_features), except the ones SparseModule declares (dense_grad, zero_off_mask): set on a dense layer,
    # those are the user's, and dropping them would be as silent as overwriting them.
    extras += [("__dict__", key, value) for key, value in vars(original).items()
               if key not in own and (key not in vars(sparse) or key in SparseModule.__annotations__)]
    for _, key, _ in extras:
        if key in vars(sparse) or hasattr(type(sparse), key) or any(key in getattr(sparse, slot) for slot in
                                                                     ("_parameters", "_buffers", "_modules")):
            raise ValueError(f"layer {name or '(root)'!r} ({type(original).__name__}) holds {key!r}, a name "
                             f"its {type(sparse).__name__} uses itself: {remedy}")
    for slot, key, value in extras:
        getattr(sparse, slot)[key] = value
        if slot == "_buffers" and key in original._non_persistent_buffers_set:
            sparse._non_persistent_buffers_set.add(key)
    return sparse


def _sparse_like(module: nn.Module) -> SparseModule:
    """A new sparse module sharing `module`'s Parameters (nothing of `module` changes)."""
    kind = next(sparse for dense, sparse in _SPARSE_OF.items() if isinstance(module, dense))
    return kind.from_dense(module)


def _magnitudes(group: tying.Group) -> Tensor:
    """|weight| of a group's shared weight as the mask's scores: float64 on the CPU, like every layer's, since
    topk_mask ranks one dtype on one device (float64 holds every weight dtype exactly, so no ties are made)."""
    return group[0][1].weight.detach().abs().to(device="cpu", dtype=torch.float64)


def _check_finite(groups: list[tying.Group]) -> None:
    """ValueError naming the first layer whose weight holds NaN or inf, which mask='magnitude' cannot rank (a layer
    on the meta device, with no values at all, `_layers` has refused already)."""
    for group in groups:
        name, module = group[0]
        if not torch.isfinite(module.weight.detach()).all():
            raise ValueError(f"mask='magnitude' ranks weights, but layer {name or '(root)'!r} holds NaN or inf")


def _stage(groups: list[tying.Group], masks: list[Tensor], init_function: Callable, init, generator):
    """Everything sparsify will write, computed without touching the model: for each group its
    sparse modules (sharing the original Parameters), its mask (of `masks`), and its new weight and bias values."""
    staged = []
    for group, mask in zip(groups, masks):
        name, module = group[0]
        weight, bias = module.weight, module.bias
        mask = mask.to(weight.device)
        trial = _sparse_like(module)
        # The trial runs the init on copies of the Parameters, so a failing init changes nothing.
        trial.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        if bias is not None:
            trial.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        trial.set_mask(mask)
        with torch.no_grad():
            try:
                init_function(trial, generator=generator)
            except torch.OutOfMemoryError:   # as it is, for a handler that retries smaller (nothing has changed)
                raise
            except Exception as error:
                kind = TypeError if isinstance(error, (TypeError, AttributeError)) else RuntimeError
                raise kind(f"init={init!r} failed on layer {name or '(root)'!r}: {type(error).__name__}: "
                           f"{error} (an init callable is called as init(module, generator=...) with the "
                           f"sparse module)") from error
        new_weight = _checked_output(trial, "weight", weight, mask, name, init)
        new_bias = None if bias is None else _checked_output(trial, "bias", bias, None, name, init)
        modules = [(module if isinstance(module, SparseModule) else _carry_extras(name, module, _sparse_like(module)))
                   for name, module in group]
        staged.append(([original for _, original in group], modules, mask, new_weight, new_bias))
    return staged


def _checked_output(trial: SparseModule, attribute: str, original: Tensor, mask: Tensor | None, name: str,
                    init) -> Tensor:
    """The trial's new weight (zeroed off `mask`) or bias, checked: written in place, finite."""
    value = getattr(trial, attribute)
    if (not isinstance(value, Tensor) or value.shape != original.shape or value.dtype != original.dtype
            or value.device != original.device):
        raise TypeError(f"init={init!r} replaced the {attribute} of layer {name or '(root)'!r} by "
                        f"{type(value).__name__ if not isinstance(value, Tensor) else tuple(value.shape)}; "
                        f"it must write the module's {attribute} in place")
    value = value.detach()
    if mask is not None:
        value.masked_fill_(~mask, 0)
    if not torch.isfinite(value).all():
        raise ValueError(f"the {attribute} of layer {name or '(root)'!r} holds non-finite values after "
                         f"init={init!r}")
    return value


@torch.no_grad()
def _commit(model: nn.Module, staged, optimizer: torch.optim.Optimizer | None,
            wholes: list[tuple[nn.Module, nn.Module]]) -> nn.Module:
    """Writes what `_stage` computed and puts the sparse modules in place of the dense ones; `wholes`: the
    attentions and recurrent modules converted as a whole, each with its sparse replacement."""
    replacements = {}
    for original, sparse in wholes:
        _carry_hooks(original, sparse)
        replacements[id(original)] = sparse
        if isinstance(original, nn.MultiheadAttention):
            # Its dense out_proj may be registered elsewhere too (model.projection = attention.out_proj): left
            # there, its forward would give the shared weight a dense gradient.
            _carry_hooks(original.out_proj, sparse.out_proj)
            replacements[id(original.out_proj)] = sparse.out_proj
    for originals, modules, mask, new_weight, new_bias in staged:
        primary = modules[0]
        primary.weight.copy_(new_weight)
        if optimizer is not None:
            reset_state_off_mask(optimizer, primary.weight, mask.to(primary.weight.device))
        if primary.weight.grad is not None:
            primary.weight.grad.masked_fill_(~mask.to(primary.weight.grad.device), 0)
        if new_bias is not None:
            primary.bias.copy_(new_bias)
        for original, sparse in zip(originals, modules):
            sparse.set_mask(mask)
            if sparse is not original:
                _carry_hooks(original, sparse)
            replacements[id(original)] = sparse
        tying.record(modules)
    _replace(model, replacements)
    return replacements.get(id(model), model)


def _replace(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    # Every parent and every slot of it: named_children() would skip a module's second reference. The sparse
    # modules are parents too: a child carried from a replaced layer (a Linear attached to a Linear) may be
    # replaced itself.
    for parent in [*model.modules(), *replacements.values()]:
        if replacements.get(id(parent), parent) is not parent:
            continue   # it leaves the model, holding what it held (a converted attention its dense out_proj)
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[child_name] = replacements[id(child)]
