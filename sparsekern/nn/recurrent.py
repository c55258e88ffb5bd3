"""SparseLSTM, SparseGRU, SparseRNN: nn.LSTM, nn.GRU and nn.RNN whose weight matrices are SparseLinear layers.

torch's fused recurrent ops (`torch._VF.lstm`, `gru`, `rnn_tanh`, `rnn_relu`) multiply by the weights they are
handed, so nn.LSTM cannot hold a sparse layer in place of a weight. Here each weight matrix of the dense module
is a SparseLinear child of its own, named after it: `weight_ih_l{k}` and `bias_ih_l{k}` are the child
`ih_l{k}`'s weight and bias, `weight_hh_l{k}` and `bias_hh_l{k}` `hh_l{k}`'s, LSTM's `weight_hr_l{k}` (proj_size)
`hr_l{k}`'s (no bias), with `_reverse` for the second direction. Forward hands the dense class's own forward the
weight each child would multiply by (`weight_for_dense_kernel`): the outputs and final states are the dense
module's on the masked weights, and the weight gradients are masked (whole with a child's `dense_grad`). The
algorithms, sparsify's densities (each matrix a layer of the distribution), the sparsity-aware init and
checkpoints therefore see ordinary sparse layers.

The children's own forwards do not run (their forward hooks do not fire), as with SparseMultiheadAttention.

On CUDA, cuDNN wants all weights in one flat buffer of its own layout, which nn.LSTM keeps
(`flatten_parameters`). A sparse module's weights are separate Parameters, and with `zero_off_mask` False new
tensors at every call, so no buffer can be kept: cuDNN copies them into one at every call (one pass over the
weights, small next to a sequence's activations) and torch warns each time that the weights are "not part of
single contiguous chunk of memory". That warning is expected here and silenced; `flatten_parameters()` does
nothing.
"""
from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from .attention import _weight_for_dense_kernel
from .modules import DenseClass, SparseLinear, _adopt_parameters, _rename_dense_entries, weight_type_problem

# nn.RNNBase's constructor arguments, which a subclass extends (`_own_arguments`).
_ARGUMENTS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
# What nn.RNNBase's forward reads of its module as plain attributes (besides `training`).
_CONFIGURATION = ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                  "bidirectional", "proj_size")
# The dense class's methods its forward calls on its module: the input and hidden-state checks and the permutation
# of a PackedSequence's hidden state. Borrowed rather than copied, so the sparse modules check and permute exactly
# as the dense ones do.
_BORROWED = ("forward", "check_input", "check_hidden_size", "get_expected_hidden_size", "get_expected_cell_size",
             "check_forward_args", "permute_hidden")
# cuDNN's warning for weights outside one flat buffer (module docstring).
_NOT_FLAT = "RNN module weights are not part of single contiguous chunk of memory"


class _FusedCall:
    """What a dense recurrent class's forward runs on here, in place of its module: the configuration, this call's
    flat weights (what the children multiply by) and the dense class's own methods. Made at every call: it holds
    tensors of that call's graph, which the module itself must not keep (they would outlive the step, and deepcopy
    refuses them)."""

    def __init__(self, module: "SparseRNNBase", flat_weights: list[Tensor]):
        for name in _CONFIGURATION:
            setattr(self, name, getattr(module, name))
        self.training = module.training
        self._flat_weights = flat_weights

    def _update_flat_weights(self) -> None:
        """The dense forward's first call: nothing to update, the flat weights were made for this call."""


def _fused_call_class(dense: type[nn.RNNBase]) -> type:
    methods = {name: getattr(dense, name) for name in _BORROWED if hasattr(dense, name)}
    return type(f"_Fused{dense.__name__}", (_FusedCall,), methods)


class SparseRNNBase(nn.Module):
    """What SparseLSTM, SparseGRU and SparseRNN share (see the module docstring). A subclass names its dense class
    in `dense_class` and the constructor arguments that class adds to nn.RNNBase's in `_own_arguments`."""

    dense_class: type[nn.RNNBase]
    _own_arguments: tuple[str, ...] = ()
    _call_class: type

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._call_class = _fused_call_class(cls.dense_class)

    def __init__(self, *args, device=None, dtype=None, **kwargs):
        # The dense class checks and parses its own arguments (nn.RNN's positional nonlinearity, GRU's refusal of
        # proj_size, ...), with its own errors; built on the meta device, it costs nothing and draws no numbers.
        layout = self.dense_class(*args, device="meta", dtype=dtype, **kwargs)
        super().__init__()
        for name in (*_CONFIGURATION, *self._own_arguments):
            setattr(self, name, getattr(layout, name))
        # The dense module's weight names, in the order of its flat weights (those the fused op takes), and per
        # layer and direction (`all_weights`).
        self._flat_weights_names = list(layout._flat_weights_names)
        self._all_weights = [list(names) for names in layout._all_weights]
        factory = {"device": device, "dtype": dtype}
        for name in self._flat_weights_names:
            layer, kind = _layer_and_kind(name)
            if kind == "weight":
                out_features, in_features = getattr(layout, name).shape
                has_bias = self.bias and not layer.startswith("hr_")
                # Built on the meta device and given empty Parameters: SparseLinear's own init would draw numbers
                # that reset_parameters then overwrites, and a seed would not give nn.LSTM's weights.
                sparse = SparseLinear(in_features, out_features, bias=has_bias, device="meta", dtype=dtype)
                weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
                bias = nn.Parameter(torch.empty(out_features, **factory)) if has_bias else None
                self.add_module(layer, _adopt_parameters(sparse, SimpleNamespace(weight=weight, bias=bias,
                                                                                  training=True)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The dense module's initialisation: uniform on +-1/sqrt(hidden_size), drawn in the dense module's
        parameter order (the same seed gives nn.LSTM's values), then zeroed off the masks."""
        if any(parameter.is_meta for parameter in self.parameters()):
            return   # from_dense builds on the meta device and adopts the dense module's Parameters
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name in self._flat_weights_names:
            nn.init.uniform_(getattr(self, name), -bound, bound)
        for _, layer in self.named_projections():
            layer.zero_weights_off_mask()

    def __getattr__(self, name: str):
        # The dense module's names (`weight_hh_l0`, `bias_ih_l1_reverse`) read the children's Parameters, for code
        # that reads them from an nn.LSTM (a custom init). A write into one off its child's mask breaks the child's
        # promise: call its zero_weights_off_mask() after, or reset_parameters() does.
        if name in self.__dict__.get("_flat_weights_names", ()):
            layer, kind = _layer_and_kind(name)
            return getattr(self._modules[layer], kind)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        # ...and assign them on the child: a Parameter (or None) by nn.Module's rules, the child reading
        # its promise again from the new weight's values. A plain tensor takes the Parameter's place, as
        # torch.func.functional_call swaps one into an nn.LSTM by these names (and back); the child holds no
        # promise for it, so forward masks it. Kept on this module instead, the tensor would be ignored by forward
        # and would hide the child's.
        if name in self.__dict__.get("_flat_weights_names", ()):
            layer, kind = _layer_and_kind(name)
            child = self._modules[layer]
            # The fused op on CPU does not check the weights' shapes: it computed with a 3x3 weight_hh_l0 in
            # place of a 28x7 one (as nn.LSTM does), and the mask would not fit.
            expected = child.mask.shape if kind == "weight" else (child.out_features,)
            if isinstance(value, Tensor) and value.shape != expected:
                raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(value.shape)}")
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter) and kind in child._parameters:
                child._parameters[kind] = value
            else:
                setattr(child, kind, value)
        else:
            super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        # Refused: forward hands the fused op every weight and bias (nn.LSTM, whose flat weights keep the deleted
        # Parameter, goes on computing with it).
        if name in self.__dict__.get("_flat_weights_names", ()):
            layer, kind = _layer_and_kind(name)
            raise AttributeError(f"{type(self).__name__} cannot delete {name}, its child {layer}'s {kind}: the fused "
                                 f"op takes every weight and bias (to compute one, parametrize the child with "
                                 f"torch.nn.utils.parametrize)")
        super().__delattr__(name)

    def _fused_op_weights(self) -> list[Tensor]:
        """The tensors the fused op multiplies by and adds, in the dense module's order: the masked weights (what
        the children multiply by) and the biases."""
        layers = self._modules
        flat = []
        for name in self._flat_weights_names:
            layer, kind = _layer_and_kind(name)
            flat.append(_weight_for_dense_kernel(layer, layers[layer], self) if kind == "weight"
                        else layers[layer].bias)
        return flat

    # nn.RNNBase's list of that name holds its Parameters, which code outside torch.nn reads (torch.ao.ns, by index);
    # here each read computes them. Forward calls the method: an AttributeError raised in a property would be
    # reported as the property missing (nn.Module.__getattr__).
    _flat_weights = property(_fused_op_weights)

    def forward(self, input, hx=None):
        """The dense class's forward (same arguments and outputs, PackedSequence included) on the masked weights."""
        return _run(self._call_class(self, self._fused_op_weights()), input, hx)

    def named_projections(self) -> list[tuple[str, SparseLinear]]:
        """(child name, layer) of the SparseLinear layers that hold the weight matrices (as
        SparseMultiheadAttention's, for sparsify), in the dense module's order; not a submodule a user
        attached."""
        names = [_layer_and_kind(name) for name in self._flat_weights_names]
        return [(layer, self._modules[layer]) for layer, kind in names if kind == "weight"]

    def flatten_parameters(self) -> None:
        """Does nothing: the weights cannot be kept in cuDNN's flat buffer (module docstring). Here so that code
        calling it on an nn.LSTM (after DataParallel's replication, say) runs unchanged."""

    extra_repr = nn.RNNBase.extra_repr
    # nn.RNNBase's: the weights and biases of each layer and direction, by their dense names (__getattr__).
    all_weights = nn.RNNBase.all_weights

    @classmethod
    def _arguments(cls, module: nn.Module) -> dict:
        """The constructor arguments of `module` (a dense or sparse one of this kind)."""
        return {name: getattr(module, name) for name in (*_ARGUMENTS, *cls._own_arguments)}

    @classmethod
    def from_dense(cls, dense: nn.RNNBase) -> "SparseRNNBase":
        """A sparse module (masks all True) sharing `dense`'s Parameters (see SparseLinear.from_dense): each weight
        matrix and its bias become a child's."""
        if not isinstance(dense, cls.dense_class):
            raise TypeError(f"{cls.__name__}.from_dense takes an nn.{cls.dense_class.__name__}, "
                            f"got {type(dense).__name__}")
        parameters = dense._parameters
        for name in dense._flat_weights_names:
            parameter = parameters.get(name)
            if not isinstance(parameter, nn.Parameter):
                raise TypeError(f"{cls.__name__}.from_dense takes an nn.{cls.dense_class.__name__} whose weights are "
                                f"Parameters, got {name} computed (by a parametrization or a weight hook)")
            problem = weight_type_problem(parameter)
            if problem is not None:
                raise TypeError(f"{cls.__name__}.from_dense takes a layer whose weights a sparse module can hold, "
                                f"got {name} with {problem}")
        with warnings.catch_warnings():   # the dense module warned already (dropout with one layer)
            warnings.simplefilter("ignore")
            sparse = cls(**cls._arguments(dense), device="meta", dtype=parameters[dense._flat_weights_names[0]].dtype)
        for name, layer in sparse.named_children():
            _adopt_parameters(layer, SimpleNamespace(weight=parameters[f"weight_{name}"],
                                                     bias=parameters.get(f"bias_{name}"), training=dense.training))
        sparse.train(dense.training)
        return sparse

    @classmethod
    def dense_entries(cls, dense: nn.RNNBase) -> tuple[str, ...]:
        """What `dense` (a `dense_class` module) holds of its own, which its sparse module shares, computes or does
        not need: its weights and biases, and the attributes torch gives every such module (its flat weights'
        list and weak references, whatever the torch version). Anything else on it (a learned initial state, a
        submodule, an attribute) a user attached, which sparsify carries over."""
        with warnings.catch_warnings():   # the dense module warned already (dropout with one layer)
            warnings.simplefilter("ignore")
            fresh = cls.dense_class(**cls._arguments(dense), device="meta")
        return (*dense._flat_weights_names, *vars(fresh))

    def to_dense(self) -> nn.RNNBase:
        """A plain module of `dense_class` with copies of the masked weights and the biases."""
        first = self._modules[_layer_and_kind(self._flat_weights_names[0])[0]]
        with warnings.catch_warnings():   # this module warned already (dropout with one layer)
            warnings.simplefilter("ignore")
            dense = self.dense_class(**self._arguments(self), device="meta", dtype=first.weight.dtype)
        with torch.no_grad():
            for name in self._flat_weights_names:
                layer, kind = _layer_and_kind(name)
                source = getattr(self._modules[layer], kind)
                value = self._modules[layer].masked_weight() if kind == "weight" else source.detach().clone()
                # nn.RNNBase's __setattr__ keeps its flat weights up to date.
                setattr(dense, name, nn.Parameter(value, requires_grad=source.requires_grad))
        dense.train(self.training)
        return dense

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A plain nn.LSTM's state dict: its `weight_hh_l0` is this module's `hh_l0.weight`, and so on (the children's
        # missing masks load as all True, SparseModule's rule). Renamed here, before load_state_dict hands the
        # children their entries; so are torch.nn.utils.prune's `<name>_orig` and `<name>_mask` of a pruned one,
        # which the child then loads as its mask and pruned values (SparseModule's rule too).
        _rename_dense_entries(state_dict, prefix, {name: ".".join(_layer_and_kind(name))
                                                   for name in self._flat_weights_names})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def _layer_doc(dense: type[nn.RNNBase], arguments: str, children: str) -> str:
    """The docstring of the sparse module of `dense` (nn.LSTM, nn.GRU, nn.RNN), what help() shows first: one text for
    the three classes rather than three copies of it."""
    name = f"nn.{dense.__name__}"
    return f"""A drop-in for {name} (same arguments, {arguments}; same forward and outputs, PackedSequence included)
    whose weight matrices are sparse, each a SparseLinear child of its own with its own `mask` and `zero_off_mask`
    promise (see SparseLinear): {children}, `_reverse` for the second direction.

    Forward runs {name}'s own fused op on the masked weights; the weight gradients are masked. `sparsekern.sparsify`
    counts each child as one layer of the distribution, and the algorithms update their masks like any other
    layer's. `weight_hh_l0` and the other dense names read and assign the children's Parameters. `from_dense(rnn)`
    shares an {name}'s Parameters; `to_dense()` returns a plain {name} holding the masked weights
    (`sparsekern.densify(model)` turns a whole model back). A plain or torch-pruned {name}'s state dict loads into
    it. More: the docstring of `sparsekern.nn.recurrent` (cuDNN's flat buffer, torch.compile) and the README's
    Python API section."""


class SparseLSTM(SparseRNNBase):
    __doc__ = _layer_doc(nn.LSTM, "proj_size included", "`ih_l{k}`, `hh_l{k}` (and `hr_l{k}` with proj_size)")
    dense_class = DenseClass(nn.LSTM)
    _own_arguments = ("proj_size",)


class SparseGRU(SparseRNNBase):
    __doc__ = _layer_doc(nn.GRU, "num_layers, bidirectional, ...", "`ih_l{k}` and `hh_l{k}`")
    dense_class = DenseClass(nn.GRU)


class SparseRNN(SparseRNNBase):
    __doc__ = _layer_doc(nn.RNN, "nonlinearity included", "`ih_l{k}` and `hh_l{k}`")
    dense_class = DenseClass(nn.RNN)
    _own_arguments = ("nonlinearity",)


# torch.compile runs the fused op eagerly, as it does nn.LSTM's (Dynamo graph-breaks at an nn.LSTM, and its AOT
# backends fail on the fused op: aot_eager on the Parameters it saves, inductor on mkldnn_rnn_layer); the flat
# weights are still computed in the graph.
@torch.compiler.disable
def _run(call: _FusedCall, input, hx):
    if input.is_cuda:   # a PackedSequence's data too
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NOT_FLAT)
            return call.forward(input, hx)
    return call.forward(input, hx)


def _layer_and_kind(name: str) -> tuple[str, str]:
    """A dense weight name's child and attribute: "weight_hh_l0_reverse" -> ("hh_l0_reverse", "weight")."""
    kind, layer = name.split("_", 1)
    return layer, kind
