"""`to_inference(model)` / `to_training(model)`: SparseLinear's inference mode (`SparseLinear.to_inference`, forward
through the packed weight and `sparsekern.ops.sparse_linear`) switched for a whole model in one call."""
from __future__ import annotations

import warnings

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import ops
from .attention import SparseMultiheadAttention
from .modules import SparseLinear, refuse_meta
from .recurrent import SparseRNNBase
from .sharding import refuse_sharded


def to_inference(model: nn.Module) -> list[str]:
    """Puts every SparseLinear of `model` that runs its own forward in inference mode (`SparseLinear.to_inference`)
    and returns their names, in `named_modules()` order. A layer already there is packed again: the pack is a
    snapshot of weight and mask, which sparsekern's own writes (set_mask, load_state_dict, sparsify, ...) pack again
    themselves, but a write of your own into either tensor in place (`.data`, `copy_`) goes unseen until this call
    (`SparseLinear.to_inference`).

    Left in training mode: the projections of a SparseMultiheadAttention and the weight layers of a
    SparseRNN/LSTM/GRU, whose parent hands their weights to a fused op of torch without running them (and refuses
    one in inference mode, naming it), and the sparse convolutions, which have no inference mode (they cost the
    dense convolution's). nn.TransformerEncoderLayer's fused eval-mode kernel reads its linear layers' weights
    directly too: where it runs, they compute what they did, from their weights.

    Outputs are the training-mode forward's (to rounding); a switched layer refuses gradients: its weight gets none,
    and none flows through it to its input (a frozen part of a model under a part still training). So a loss reached
    through switched layers alone (the whole model switched, or its output layer) has no graph, and its backward
    raises torch's own "element 0 of tensors does not require grad and does not have a grad_fn", which names no
    layer: call `to_training(model)` before training. Nothing of sparsekern runs at that backward to say more, and a
    graph node of the switched layers' that raised when reached would also fail the frozen part's use.

    The packs are non-persistent buffers: the state dict is unchanged, and they follow `.to(device)`, `.half()` and
    `.to(dtype)`. Names carry a wrapper's prefix: a torch.compile'd model's layers are `_orig_mod.<name>` (it
    recompiles at its next call). A model wrapped in DistributedDataParallel, which trains it, is refused
    (ValueError): switch an evaluation copy of `model.module`, or `model.module` itself; a sharded one (FSDP,
    fully_shard) too, whose ranks hold no whole weight to pack: switch an unsharded copy.

    Every layer is packed before any switches: a layer that cannot be (weights on the meta device, sharded weights)
    raises naming it, the model unchanged. TypeError unless `model` is an nn.Module; a model with no layer to switch
    (no sparse layers, or only projections) warns and returns []. `to_training(model)` switches back."""
    layers = _own_forward_linears(model, "to_inference")
    if isinstance(model, DistributedDataParallel):
        raise ValueError("to_inference: model is wrapped in DistributedDataParallel, which trains it, and a layer in "
                         "inference mode gives its weight no gradient (DDP's next backward would fail on that unused "
                         "weight): switch an evaluation copy (copy.deepcopy(model.module)), or switch model.module "
                         "and to_training(model) before training again")
    refuse_sharded(model, "to_inference", "inference mode packs each layer's whole masked weight, which a sharded "
                   "rank does not hold: switch an unsharded copy of the model (one built without sharding, its full "
                   "state dict loaded)")
    refuse_meta(layers, "to_inference")
    if not layers:
        warnings.warn("to_inference: model has no SparseLinear that runs its own forward (no sparse layers, or only "
                      "the projections of attention or recurrent modules, which stay in training mode): nothing "
                      "switched", stacklevel=2)
        return []
    packs = [ops.pack(layer.weight, layer.mask) for _, layer in layers]
    for (_, layer), packed in zip(layers, packs):
        layer._hold_packed(packed)
    return [name for name, _ in layers]


def to_training(model: nn.Module) -> list[str]:
    """Takes every SparseLinear of `model` in inference mode back to training mode (`SparseLinear.to_training`),
    projections of attention and recurrent modules included, and returns their names in `named_modules()` order:
    [] when none was (no warning: there is nothing to undo). TypeError unless `model` is an nn.Module."""
    switched = [(name, layer) for name, layer in _named_linears(model, "to_training")
                if layer._in_inference_mode]
    for _, layer in switched:
        layer.to_training()
    return [name for name, _ in switched]


def _own_forward_linears(model: nn.Module, who: str) -> list[tuple[str, SparseLinear]]:
    """(name, layer) of every SparseLinear of `model` that runs its own forward: not a projection that a
    SparseMultiheadAttention or SparseRNNBase multiplies by itself."""
    named = _named_linears(model, who)
    read_by_parent = {id(layer) for _, parent in model.named_modules()
                      if isinstance(parent, (SparseMultiheadAttention, SparseRNNBase))
                      for _, layer in parent.named_projections()}
    return [(name, layer) for name, layer in named if id(layer) not in read_by_parent]


def _named_linears(model: nn.Module, who: str) -> list[tuple[str, SparseLinear]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be an nn.Module, got {type(model).__name__}")
    return [(name, module) for name, module in model.named_modules() if isinstance(module, SparseLinear)]
