"""One warning per load_state_dict call that loads a dense checkpoint into sparse layers, naming every such layer.

A pretrained dense checkpoint loaded into a sparsified model gives each sparse layer whose mask the state dict lacks
a mask of all True: the model would train dense, silently. Each layer learns this in its own `_load_from_state_dict`,
which sees neither the other layers nor the end of the call, and a warning per layer would print a dozen for a
ResNet. So the first such layer of a call finds the module the call loads into (the frame of its
`nn.Module.load_state_dict`: `_loading_into`) and registers a post-hook there, which torch runs once every module has
loaded; each layer of the call adds itself to the hook's list, and the hook warns once, naming them.

Layers sharing one weight (tied) load one mask, and a state dict may hold it under one layer's keys while another
layer's weight comes without a mask (torch loads the layers in model order, each seeing its own keys only). The mask
the state dict holds is the tie's, whichever layer comes first: a layer that loads one records its tie in the call's
report (`mask_loaded`), which withdraws a dense load noted earlier for any of them, and a twin loading its weight
later keeps the mask (`mask_loaded_in_call`). So the warning names exactly the layers that end dense. A state dict
holding different masks under two of the tie's keys is refused before the tie loads (`check_tie_masks`, which reads
the call's whole state dict from the same frame): each layer would copy its own into the tie, the last one winning.
"""
from __future__ import annotations

import inspect
import sys
import threading
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

# The layers named in full; beyond, a count.
_NAMED = 5
# The report of the call that last loaded a dense layer or a tied layer's mask (per thread): torch hands one
# missing-keys list to every module of a call, so its identity tells that call's later layers from a new call's.
_current = threading.local()


def note(missing_keys: list, key: str, layer: nn.Module, twins: list[nn.Module]) -> None:
    """Records that `layer` loads as dense, with `twins` (the layers sharing its weight): its state dict has no `key`
    (its mask's full key) in the load_state_dict call that owns `missing_keys`; the call warns once at its end (module
    docstring), unless a twin loads a mask later in the call (`mask_loaded`)."""
    entry = _Dense(key, type(layer).__name__, layer.density, len(twins), {id(module) for module in (layer, *twins)})
    report = _report(missing_keys)
    if report.handle is None:
        root = _loading_into(missing_keys)
        if root is None:   # not under nn.Module.load_state_dict (a direct _load_from_state_dict): warn now
            warnings.warn(_message([entry]), stacklevel=3)
            return
        report.handle = root.register_load_state_dict_post_hook(report)
    report.layers.append(entry)


def mask_loaded(missing_keys: list, tie: list[nn.Module]) -> None:
    """Records that the layers of `tie` (a layer and its twins) took a mask from the state dict of the call that owns
    `missing_keys`: a dense load noted for any of them earlier in the call is withdrawn, as they end on that mask."""
    report = _report(missing_keys)
    report.masked.update(id(module) for module in tie)
    report.layers = [entry for entry in report.layers if not entry.modules & report.masked]


def mask_loaded_in_call(missing_keys: list, layer: nn.Module) -> bool:
    """Whether `layer`'s mask came from the state dict of the call that owns `missing_keys` (`mask_loaded`)."""
    report = getattr(_current, "report", None)
    return report is not None and report.missing_keys is missing_keys and id(layer) in report.masked


def _report(missing_keys: list) -> _DenseLoads:
    """The report of the call that owns `missing_keys`, made on its first use."""
    report = getattr(_current, "report", None)
    if report is None or report.missing_keys is not missing_keys:
        report = _current.report = _DenseLoads(missing_keys)
    return report


def check_tie_masks(missing_keys: list, tie: list[nn.Module], assign: bool) -> None:
    """ValueError naming two entries of the state dict of the load_state_dict call that owns `missing_keys` that hold
    different masks for the layers of `tie` (a layer and the twins sharing its weight), raised before the first of
    them loads: the weight has one mask, and each layer's load copies its own into the whole tie, so the layer torch
    loads last won, silently. A layer whose weight the call assigns in place (`assign`) leaves the tie, and may hold a
    mask of its own. Outside nn.Module.load_state_dict (a direct _load_from_state_dict) the other layers' entries are
    unknown, and nothing is checked."""
    call = _loading_call(missing_keys)
    if call is None or not isinstance(call[1], Mapping):
        return
    root, state_dict = call
    members = {id(module) for module in tie}
    masks = []   # (key, mask): the masks the state dict holds for the tie's layers, in torch's loading order
    for name, module in root.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        # A mask, or torch.nn.utils.prune's weight_mask (which the layer's load takes as its mask)
        key = next((prefix + entry for entry in ("mask", "weight_mask") if prefix + entry in state_dict), None)
        mask = None if key is None else state_dict[key]
        if (id(module) in members and isinstance(mask, Tensor) and not mask.is_meta
                and not (assign and prefix + "weight" in state_dict)):
            masks.append((key, mask))
    for (first_key, first), (key, mask) in zip(masks, masks[1:]):
        # Of another shape, torch refuses one of them, naming it.
        if mask.shape == first.shape and not torch.equal(first.bool(), mask.to(first.device).bool()):
            raise ValueError(f"load_state_dict: state dict entries {first_key!r} and {key!r} hold different masks for "
                             f"layers sharing one weight, which has one mask: give them the same mask (a tied model's "
                             f"state_dict() holds it under both); their weight and masks are left as they were")


def _loading_into(missing_keys: list) -> nn.Module | None:
    """The module whose load_state_dict call owns `missing_keys` (`_loading_call`), or None."""
    call = _loading_call(missing_keys)
    return None if call is None else call[0]


def _loading_call(missing_keys: list) -> tuple[nn.Module, object] | None:
    """(the module whose load_state_dict call owns `missing_keys`, the state dict it loads), from that call's frame,
    or None.

    torch offers no other way to it: no load hook of every module (its global hooks are of forward, backward and
    registration), and a layer knows nothing of the modules holding it, nor sees other layers' entries. So the frame
    is found by its code (through any wrapper of functools.wraps's) and holding the list, and the module and state
    dict are its first two arguments: no local is read by name, which torch is free to change. A torch whose call
    holds the list elsewhere finds None, and each layer warns for itself."""
    code = inspect.unwrap(nn.Module.load_state_dict).__code__
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is code:
            values = frame.f_locals
            root, state_dict = values.get(code.co_varnames[0]), values.get(code.co_varnames[1])
            if isinstance(root, nn.Module) and any(value is missing_keys for value in values.values()):
                return root, state_dict
        frame = frame.f_back
    return None


class _Dense(NamedTuple):
    """A layer that loads as dense: its mask's key, type, density before the load, how many layers share its weight,
    and the ids of those layers and itself (ids, not the modules: the report outlives its call, and would keep a
    model alive)."""
    key: str
    kind: str
    density: float
    tied: int
    modules: set[int]


class _DenseLoads:
    """A load_state_dict call's report: the layers that load as dense (`layers`) and the ids of those whose mask the
    state dict holds (`masked`). Also its post-hook (`handle`, registered on the first dense layer): warns of the
    layers left in `layers`, then removes itself. A class, not a closure, so that a module it was left on (a call that
    raised before its end) still pickles; a later call's run of it, whose missing keys are another list, only removes
    it."""

    def __init__(self, missing_keys: list):
        self.missing_keys, self.layers, self.masked, self.handle = missing_keys, [], set(), None

    def __call__(self, module: nn.Module, incompatible_keys) -> None:
        self.handle.remove()
        if incompatible_keys.missing_keys is self.missing_keys and self.layers:
            # This hook, in torch's load (inside load_state_dict), in the caller's code.
            warnings.warn(_message(self.layers), stacklevel=4)


def _message(layers: list[_Dense]) -> str:
    """The warning for `layers`."""
    named = ", ".join(f"{layer.key!r} ({layer.kind}, density {layer.density:.3g}{_tied(layer.tied)})"
                      for layer in layers[:_NAMED])
    more = f" and {len(layers) - _NAMED} more" if len(layers) > _NAMED else ""
    count = "1 sparse layer" if len(layers) == 1 else f"{len(layers)} sparse layers"
    return (f"state dict has no mask for {count}, {named}{more}: load_state_dict loads each as a dense layer (mask "
            f"all True), replacing its mask; to start sparse from dense weights, load them into the dense model and "
            f"sparsify it then (mask='magnitude' keeps the largest)")


def _tied(count: int) -> str:
    """What the warning says of the layers sharing a dense-loaded layer's weight, which load dense with it."""
    if not count:
        return ""
    return f", with the {'layer' if count == 1 else f'{count} layers'} sharing its weight"
