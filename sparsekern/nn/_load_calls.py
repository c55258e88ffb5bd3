"""What a load_state_dict call does once, at its end, for the sparse layers it loaded: one warning naming every layer
that loaded a dense checkpoint, and one pack per layer in inference mode whose weight or mask it wrote.

A pretrained dense checkpoint loaded into a sparsified model gives each sparse layer whose mask the state dict lacks
a mask of all True: the model would train dense, silently; a warning per layer would print a dozen for a ResNet. And
a SparseLinear in inference mode serves a pack of its weight and mask, which must be made again from what the call
wrote, once: tied twins write one weight, so a pack made at each twin's load was made twice, the first from a mask the
call had not loaded yet. Each layer learns what it loaded in its own `_load_from_state_dict`, which sees neither the
other layers nor the end of the call. So the first layer of a call with work of this kind finds the module the call
loads into (the frame of its `nn.Module.load_state_dict`: `_loading_into`) and registers a post-hook there (`_Call`),
which torch runs once every module has loaded; each layer of the call adds to it. Where no call is found (a direct
`_load_from_state_dict`), a layer warns and packs at once.

A call that raises before its end (a refused entry) runs no post-hook: `refusing` packs, as the refusal is raised,
what the call loaded before it, and a later call ends one that raised otherwise, as it starts.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
import threading
import warnings

from torch import nn

# The layers named in full; beyond, a count.
_NAMED = 5
# The call under way (per thread): torch hands one missing-keys list to every module of a call, so its identity tells
# that call's later layers from a new call's.
_current = threading.local()


def note_dense(missing_keys: list, key: str, layer: nn.Module) -> None:
    """Records that `layer` loads as dense: its state dict has no `key` (its mask's full key) in the
    load_state_dict call that owns `missing_keys`; the call warns once at its end (module docstring)."""
    entry = (key, type(layer).__name__, layer.density)
    call = _call(missing_keys)
    if call is None:   # this function, the layer's loading and its _load_from_state_dict, then the caller's code
        warnings.warn(_message([entry]), stacklevel=4)
        return
    call.dense.append(entry)


def pack_at_end(missing_keys: list, layers: list[nn.Module]) -> None:
    """Packs each of `layers` (SparseLinear layers in inference mode, whose weight or mask the load_state_dict call
    that owns `missing_keys` wrote) again at the call's end, once however many of its loads wrote it; at once
    where no call is found."""
    call = _call(missing_keys)
    if call is None:
        _pack(layers)
        return
    call.to_pack.update((id(layer), layer) for layer in layers)


@contextlib.contextmanager
def refusing(missing_keys: list):
    """Around a layer's checks of what it loads: a refusal ends the call that owns `missing_keys` (packing the layers
    it loaded before, which go on serving what they hold) as it is raised."""
    try:
        yield
    except BaseException:
        call = getattr(_current, "call", None)
        if call is not None and call.missing_keys is missing_keys:
            call.end()
        raise


def _call(missing_keys: list) -> _Call | None:
    """The call that owns `missing_keys`, its post-hook registered at its first request; None outside one."""
    call = getattr(_current, "call", None)
    if call is not None and call.missing_keys is missing_keys:
        return call
    root = _loading_into(missing_keys)
    if root is None:
        return None
    if call is not None:
        call.end()   # one that raised before its end (a refusal of no sparse layer's)
    call = _current.call = _Call(missing_keys)
    call.handle = root.register_load_state_dict_post_hook(call)
    return call


def _loading_into(missing_keys: list) -> nn.Module | None:
    """The module whose load_state_dict call owns `missing_keys`, from that call's frame, or None.

    torch offers no other way to it: no load hook of every module (its global hooks are of forward, backward and
    registration), and a layer knows nothing of the modules holding it. So the frame is found by its code (through
    any wrapper of functools.wraps's) and holding the list, and the module is its first argument: no local is read
    by name, which torch is free to change. A torch whose call holds the list elsewhere finds None, and each layer
    warns and packs for itself."""
    code = inspect.unwrap(nn.Module.load_state_dict).__code__
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is code:
            values = frame.f_locals
            root = values.get(code.co_varnames[0])
            if isinstance(root, nn.Module) and any(value is missing_keys for value in values.values()):
                return root
        frame = frame.f_back
    return None


class _Call:
    """A load_state_dict post-hook: packs the layers of its call to pack, warns of those that loaded as dense, and
    removes itself. A class, not a closure, so that a module it is registered on still pickles."""

    def __init__(self, missing_keys: list):
        self.missing_keys, self.dense, self.to_pack, self.handle = missing_keys, [], {}, None

    def __call__(self, module: nn.Module, incompatible_keys) -> None:
        if incompatible_keys.missing_keys is not self.missing_keys:
            return
        self.end()   # the last post-hook of its root (registered during the call): removed while torch runs them
        if self.dense:
            # This hook, in torch's load (inside load_state_dict), in the caller's code.
            warnings.warn(_message(self.dense), stacklevel=4)

    def end(self) -> None:
        """Removes the hook and packs the layers to pack; the call is over."""
        self.handle.remove()
        if getattr(_current, "call", None) is self:
            _current.call = None
        layers, self.to_pack = list(self.to_pack.values()), {}
        _pack(layers)


def _pack(layers: list[nn.Module]) -> None:
    for layer in layers:
        if layer._in_inference_mode:   # one a later write took out of it (to_training in a hook) stays out
            layer.to_inference()


def _message(layers: list[tuple[str, str, float]]) -> str:
    """The warning for `layers`, (mask key, module type, density) each."""
    named = ", ".join(f"{key!r} ({kind}, density {density:.3g})" for key, kind, density in layers[:_NAMED])
    more = f" and {len(layers) - _NAMED} more" if len(layers) > _NAMED else ""
    count = "1 sparse layer" if len(layers) == 1 else f"{len(layers)} sparse layers"
    return (f"state dict has no mask for {count}, {named}{more}: load_state_dict loads each as a dense layer (mask "
            f"all True), replacing its mask; to start sparse from dense weights, load them into the dense model and "
            f"sparsify it then (mask='magnitude' keeps the largest)")
