"""Measurements of a (sparse) model: the gradient-flow metric, a per-layer summary and the forward pass's
multiply-accumulates (`flops`)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils.rnn import PackedSequence

from .attention import SparseMultiheadAttention
from .modules import SparseModule, refuse_meta, sparse_modules
from .recurrent import SparseRNNBase


def gradient_flow(model: nn.Module, loss_fn: Callable[..., Tensor], batch) -> dict:
    """Gradient flow (Evci et al. 2022): ||g * m||_2 over the trainable parameters, on one batch.

    Every parameter that requires grad counts, sparse or not: biases, normalisation layers' scales and shifts,
    dense layers; a frozen one does not, and one shared by several modules counts once, in its first holder's
    layer.

    batch: (inputs, targets), giving loss = loss_fn(model(inputs), targets), or a single input
    tensor, giving loss = loss_fn(model(batch)). g is the gradient of that loss alone (no weight
    decay), m the mask of a sparse module's weight and all ones for every other parameter.
    Runs in the model's current train/eval mode and changes nothing: the parameters' .grad,
    the buffers (BatchNorm statistics) and the random number generators are as before.
    Returns {"total": float, "layers": {module name: float}}, each layer's norm over the
    parameters the module owns directly, in model order ("" names the root module).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, extra = batch[0], (batch[1],)
    elif isinstance(batch, Tensor):
        inputs, extra = batch, ()
    else:
        raise TypeError(f"batch must be (inputs, targets) or a Tensor, got {type(batch).__name__}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameter that requires grad: there is no gradient to measure")
    masks = {id(module.weight): module.mask for _, module in sparse_modules(model)}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for _, p in named if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            loss = loss_fn(model(inputs), *extra)
            if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError(f"loss_fn must return a one-element tensor that depends on the parameters, "
                                 f"got {_describe(loss)}")
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)

    squares: dict[str, float] = {}
    for (name, p), grad in zip(named, grads):
        if grad is None:
            continue
        if id(p) in masks:
            grad = grad * masks[id(p)]
        layer = name.rpartition(".")[0]
        squares[layer] = squares.get(layer, 0.0) + float(grad.double().square().sum())
    return {"total": sum(squares.values()) ** 0.5,
            "layers": {layer: value ** 0.5 for layer, value in squares.items()}}


def summary(model: nn.Module, print_fn: Callable[[str], object] | None = print) -> dict:
    """Per-layer shape, parameter count, non-zeros and density of `model`, printed and returned.

    One row per module that owns parameters directly, in model order: non-zeros counts the
    active entries of a sparse module's weight (its mask) plus its other parameters in full, and
    density is non-zeros / parameters, so a layer's counts its bias too; "weight_density" is the
    weight's own, its mask's mean (what a paper's per-layer table reports, and `densities` returns),
    None in the rows of other modules and of a tied weight's later holders.
    A parameter shared by several modules (tied weights) is counted once, in the row of its first
    holder; a later holder's row counts only its own other parameters and names the first holder
    in "tied_to" (None when nothing is shared).
    Returns {"layers": [{"name", "type", "shape", "parameters", "nonzeros", "density", "weight_density", "tied_to"},
    ...], "sparse_weights": {...}, "total": {...}}: the totals over the sparse modules' weights
    (the density that `sparsify` targets) and over all parameters. `print_fn=None` prints nothing. ValueError for
    a sparse module whose mask is on the meta device (no values to count).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if print_fn is not None and not callable(print_fn):
        raise TypeError(f"print_fn must be callable or None, got {type(print_fn).__name__}")
    refuse_meta(sparse_modules(model), tensors=("mask",))   # no values to count
    rows = []
    first_holder: dict[int, str] = {}
    for name, module in model.named_modules():
        own = [p for p in module._parameters.values() if p is not None]
        if not own:
            continue
        new = [p for p in own if id(p) not in first_holder]
        tied_to = next((first_holder[id(p)] for p in own if id(p) in first_holder), None)
        for p in new:
            first_holder[id(p)] = name
        parameters = sum(p.numel() for p in new)
        nonzeros = parameters
        weight_density = None
        if isinstance(module, SparseModule) and any(p is module.weight for p in new):
            nonzeros += module.nnz - module.weight.numel()
            weight_density = _ratio(module.nnz, module.weight.numel())
        weight = getattr(module, "weight", None)
        shape = tuple((weight if isinstance(weight, Tensor) else own[0]).shape)
        rows.append({"name": name, "type": type(module).__name__, "shape": shape, "parameters": parameters,
                     "nonzeros": nonzeros, "density": _ratio(nonzeros, parameters),
                     "weight_density": weight_density, "tied_to": tied_to})
    weights = {id(m.weight): m for _, m in sparse_modules(model)}.values()
    sparse_size = sum(m.weight.numel() for m in weights)
    sparse_nonzeros = sum(m.nnz for m in weights)
    parameters = sum(row["parameters"] for row in rows)
    nonzeros = sum(row["nonzeros"] for row in rows)
    result = {"layers": rows,
              "sparse_weights": {"parameters": sparse_size, "nonzeros": sparse_nonzeros,
                                 "density": _ratio(sparse_nonzeros, sparse_size)},
              "total": {"parameters": parameters, "nonzeros": nonzeros, "density": _ratio(nonzeros, parameters)}}
    if print_fn is not None:
        print_fn(_table(result))
    return result


def flops(model: nn.Module, *example_inputs, print_fn: Callable[[str], object] | None = print,
          **example_kwargs) -> dict:
    """The multiply-accumulates (MACs; FLOPs = 2 x MACs) of one forward pass of `model` on the example inputs,
    dense and sparse, per layer and in total, printed and returned: the inference cost that sparse-training papers
    (SET, RigL, MEST) report as a fraction of the dense network's.

    Runs `model(*example_inputs, **example_kwargs)` once under torch.no_grad(), in eval mode (every module's own
    training flag is set back afterwards, so a BatchNorm's running statistics are not updated and dropout draws no
    random numbers) and with torch.backends.mha's fast path off (nn.TransformerEncoder's eval-mode kernel would
    skip its layers' forwards and pack a padded batch into a NestedTensor), counting at each call of a layer with
    a forward hook; padded positions count as they are computed. The hooks are removed, and the modes and the
    fast-path setting restored, also when the forward raises (torch's error, unchanged). A module called twice
    (shared) is counted at each call, in one row.

    Counted: the weight multiplications of these layers, bias adds excluded, each weight entry times the
    positions it is applied at. `dense_macs` counts every weight entry, `sparse_macs` a sparse module's active
    (masked-in) entries and a dense layer's every entry:
    * nn.Linear, SparseLinear: at each row of the input's leading dimensions.
    * nn.Conv1d/2d/3d, SparseConv1d/2d/3d (groups, stride, padding, dilation): at each output position of each
      example (the weight holds in_channels / groups x kernel entries per output channel; products with padding
      count too, as in the papers).
    * nn.ConvTranspose1d/2d/3d, SparseConvTranspose1d/2d/3d: at each input position of each example (each input
      value is multiplied by every weight entry of its group once; outputs cropped by padding count too).
    * nn.MultiheadAttention, SparseMultiheadAttention: its input projections (q at each query token, k at each key
      token, v at each value token) and out_proj (at each query token); not the attention itself (the query-key
      products and the softmax-weighted sum of values multiply activations by activations).
    * nn.RNN/LSTM/GRU, SparseRNN/LSTM/GRU: every weight matrix (input-hidden, hidden-hidden, LSTM's projection; each
      layer and direction) at each time step of each sequence (a PackedSequence's steps, without the padding).
    Not counted: every other layer (normalisations, activations, embeddings' lookups, pooling) and whatever a
    forward computes from a weight without calling its layer (`F.linear(x, embedding.weight)`); the modules that own
    parameters and ran without being counted are listed in "not_counted".

    Returns {"layers": [{"name", "type", "calls", "dense_macs", "sparse_macs", "density"}, ...] (the counted layers
    that ran, in model order; density = sparse_macs / dense_macs), "dense_macs", "sparse_macs", "ratio"
    (sparse / dense), "batch_size", "dense_macs_per_example", "sparse_macs_per_example", "not_counted": [{"name",
    "type"}, ...]}. The counts are of the batch given. The batch size is the one the layers that know theirs agree
    on (a convolution's input's first dimension, an attention's or recurrent layer's per its batch_first, 1 for
    an unbatched input); with none of those, the first dimension of the first example input of two or more
    dimensions (nn.Linear's (N, *, features)). Where they disagree, or no input has one, batch_size and the
    per-example counts are None and the counts are per call. `print_fn=None` prints nothing.
    TypeError unless `model` is an nn.Module; ValueError for a layer on the meta device (no mask to count), a lazy
    layer not yet materialized (the forward would change it) and a forward in which no counted layer ran (the
    table would read zero for a model that is not free).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if print_fn is not None and not callable(print_fn):
        raise TypeError(f"print_fn must be callable or None, got {type(print_fn).__name__}")
    lazy = [name for name, m in model.named_modules()
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:   # its forward would materialize it (a new class, drawn values): flops changes nothing
        raise ValueError(f"flops: the lazy layers {lazy} have no weights yet: run one forward pass first")
    refuse_meta(sparse_modules(model), "flops", tensors=("weight", "mask"))
    refuse_meta([(name, m) for name, m in model.named_modules()
                 if isinstance(m, (nn.Linear, *_CONVOLUTIONS)) and not isinstance(m, SparseModule)], "flops")
    counts, batch_sizes, not_counted = _counted_forward(model, example_inputs, example_kwargs)
    if not counts:
        raise ValueError("flops: no layer it counts (Linear, Conv, ConvTranspose, MultiheadAttention, RNN/LSTM/GRU, "
                         f"dense or sparse) ran in the forward; modules with parameters that ran: {list(not_counted)}")
    layers = [{"name": name, "type": type(module).__name__, "calls": counts[name][0], "dense_macs": counts[name][1],
               "sparse_macs": counts[name][2], "density": _ratio(counts[name][2], counts[name][1])}
              for name, module in model.named_modules() if name in counts]
    dense, sparse = sum(row["dense_macs"] for row in layers), sum(row["sparse_macs"] for row in layers)
    batch_size = _batch_size(batch_sizes, example_inputs, example_kwargs)
    result = {"layers": layers, "dense_macs": dense, "sparse_macs": sparse, "ratio": _ratio(sparse, dense),
              "batch_size": batch_size,
              "dense_macs_per_example": None if batch_size is None else _per(dense, batch_size),
              "sparse_macs_per_example": None if batch_size is None else _per(sparse, batch_size),
              "not_counted": [{"name": name, "type": kind} for name, kind in not_counted.items()]}
    if print_fn is not None:
        print_fn(_flops_table(result))
    return result


_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _counted_forward(model: nn.Module, example_inputs: tuple, example_kwargs: dict) -> tuple[dict, set, dict]:
    """One forward of `model` under hooks (removed afterwards, whatever happens): {counted layer's name: [calls,
    dense MACs, sparse MACs]}, the batch sizes the counted layers saw, {name: type} of the modules owning
    parameters that ran uncounted."""
    counts: dict[str, list] = {}
    batch_sizes: set[int] = set()
    not_counted: dict[str, str] = {}
    handles = []
    try:
        for name, module in model.named_modules():
            terms = _terms_function(module)
            if terms is not None:
                handles.append(module.register_forward_hook(_counting_hook(name, terms, counts, batch_sizes),
                                                            with_kwargs=True))
            elif any(p is not None for p in module._parameters.values()):
                handles.append(module.register_forward_hook(_noting_hook(name, not_counted)))
        with _inference(model), torch.no_grad():
            model(*example_inputs, **example_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return counts, batch_sizes, not_counted


@contextlib.contextmanager
def _inference(model: nn.Module):
    """Eval mode and no MHA fast path for the block, each module's own training flag and the setting restored."""
    modes = [(module, module.training) for module in model.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        model.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for module, training in modes:
            module.training = training


def _counting_hook(name: str, terms: Callable, counts: dict, batch_sizes: set) -> Callable:
    def hook(module, args, kwargs, output) -> None:
        applied, batch_size = terms(module, args, kwargs, output)
        row = counts.setdefault(name, [0, 0, 0])
        row[0] += 1
        row[1] += sum(entries * positions for entries, _, positions in applied)
        row[2] += sum(active * positions for _, active, positions in applied)
        if batch_size is not None:
            batch_sizes.add(batch_size)
    return hook


def _noting_hook(name: str, not_counted: dict) -> Callable:
    def hook(module, args, output) -> None:   # None: a hook's return value would replace the output
        not_counted.setdefault(name, type(module).__name__)
    return hook


def _terms_function(module: nn.Module) -> Callable | None:
    """The function giving a call's ([(weight entries, active entries, positions applied at), ...], batch size or
    None) for a layer `flops` counts, None for another module."""
    if isinstance(module, (nn.MultiheadAttention, SparseMultiheadAttention)):
        return _attention_terms
    if isinstance(module, (nn.RNNBase, SparseRNNBase)):
        return _recurrent_terms
    if isinstance(module, _CONVOLUTIONS):
        return _convolution_terms
    if isinstance(module, nn.Linear):
        return _linear_terms
    return None


def _entries(weight: Tensor, mask: Tensor | None = None) -> tuple[int, int]:
    """(entries, active entries) of a weight, or of a weight's mask: all of a dense weight's are active."""
    return (weight.numel(), weight.numel()) if mask is None else (mask.numel(), int(mask.sum()))


def _layer_entries(module: nn.Module) -> tuple[int, int]:
    return _entries(module.weight, module.mask if isinstance(module, SparseModule) else None)


def _argument(args: tuple, kwargs: dict, index: int, name: str):
    return args[index] if len(args) > index else kwargs[name]


def _rows(tensor: Tensor) -> int:
    """The positions along every dimension but the last (features)."""
    return math.prod(tensor.shape[:-1])


def _linear_terms(module: nn.Module, args: tuple, kwargs: dict, output: Tensor):
    return [(*_layer_entries(module), _rows(output))], None


def _convolution_terms(module: nn.Module, args: tuple, kwargs: dict, output: Tensor):
    # An output position of an ordinary convolution, an input position of a transposed one (the docstring).
    applied_at = _argument(args, kwargs, 0, "input") if module.transposed else output
    batched = applied_at.dim() == len(module.kernel_size) + 2
    positions = math.prod(applied_at.shape) // applied_at.shape[1 if batched else 0]   # all but the channels
    return [(*_layer_entries(module), positions)], applied_at.shape[0] if batched else 1


def _attention_terms(module: nn.Module, args: tuple, kwargs: dict, output):
    query, key, value = (_argument(args, kwargs, i, name) for i, name in enumerate(("query", "key", "value")))
    if isinstance(module, SparseMultiheadAttention):
        inputs = [(p.weight, p.mask) for p in module.input_projections()]
        out = (module.out_proj.weight, module.out_proj.mask)
    else:
        inputs = [(w, None) for w in ([module.in_proj_weight] if module._qkv_same_embed_dim else
                                      [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight])]
        out = (module.out_proj.weight, None)
    if len(inputs) == 1:   # in_proj: the q, k and v rows, each applied to its own input
        weight, mask = inputs[0]
        inputs = list(zip(weight.chunk(3), mask.chunk(3) if mask is not None else [None] * 3))
    applied = [(*_entries(*pair), _rows(tensor)) for pair, tensor in zip([*inputs, out], (query, key, value, query))]
    batched = query.dim() == 3
    return applied, query.shape[0 if module.batch_first else 1] if batched else 1


def _recurrent_terms(module: nn.Module, args: tuple, kwargs: dict, output):
    input = _argument(args, kwargs, 0, "input")
    if isinstance(input, PackedSequence):
        steps, batch_size = input.data.shape[0], int(input.batch_sizes[0])
    else:
        batched = input.dim() == 3
        steps, batch_size = _rows(input), input.shape[0 if module.batch_first else 1] if batched else 1
    if isinstance(module, SparseRNNBase):
        weights = [_layer_entries(layer) for _, layer in module.named_projections()]
    else:
        weights = [_entries(getattr(module, name)) for name in module._flat_weights_names if name.startswith("weight")]
    # Each matrix of each layer and direction meets every step once (the hidden-hidden one the previous state).
    return [(entries, active, steps) for entries, active in weights], batch_size


def _batch_size(known: set[int], example_inputs: tuple, example_kwargs: dict) -> int | None:
    if known:
        size = next(iter(known)) if len(known) == 1 else None
    else:
        first = next((x for x in (*example_inputs, *example_kwargs.values()) if isinstance(x, Tensor)), None)
        size = first.shape[0] if first is not None and first.dim() >= 2 else None
    return size or None   # an empty batch has no examples to divide by


def _per(total: int, batch_size: int) -> int | float:
    return total // batch_size if total % batch_size == 0 else total / batch_size


def _flops_table(result: dict) -> str:
    header = ("layer", "type", "calls", "dense MACs", "sparse MACs", "density")
    body = [(row["name"] or "(root)", row["type"], str(row["calls"]), f"{row['dense_macs']:,}",
             f"{row['sparse_macs']:,}", f"{row['density']:.4f}") for row in result["layers"]]
    totals = [("total", "", "", f"{result['dense_macs']:,}", f"{result['sparse_macs']:,}", f"{result['ratio']:.4f}")]
    if result["batch_size"] is not None:
        totals.append((f"per example (batch {result['batch_size']})", "", "", f"{result['dense_macs_per_example']:,}",
                       f"{result['sparse_macs_per_example']:,}", ""))
    notes = [] if result["batch_size"] is not None else ["no clear batch dimension: the counts are per call"]
    if result["not_counted"]:
        notes.append("not counted: " + ", ".join(f"{u['name'] or '(root)'} ({u['type']})"
                                                 for u in result["not_counted"]))
    return "\n".join([_grid(header, body, totals, text_columns=2), *notes])


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}" + ("" if value.requires_grad else " without grad")
    return type(value).__name__


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 1.0


def _type_cell(row: dict) -> str:
    if row["tied_to"] is None:
        return row["type"]
    return f"{row['type']} (tied to {row['tied_to'] or '(root)'})"


def _table(result: dict) -> str:
    header = ("layer", "type", "shape", "parameters", "non-zeros", "density", "weight density")
    body = [(row["name"] or "(root)", _type_cell(row), "x".join(map(str, row["shape"])), str(row["parameters"]),
             str(row["nonzeros"]), f"{row['density']:.4f}",
             "" if row["weight_density"] is None else f"{row['weight_density']:.4f}") for row in result["layers"]]
    totals = [(label.replace("_", " "), "", "", str(t["parameters"]), str(t["nonzeros"]), f"{t['density']:.4f}", "")
              for label, t in ((label, result[label]) for label in ("sparse_weights", "total"))]
    return _grid(header, body, totals, text_columns=3)


def _grid(header: tuple[str, ...], body: list[tuple[str, ...]], totals: list[tuple[str, ...]],
          text_columns: int) -> str:
    """The rows under `header`, a rule, then `totals`: the first `text_columns` cells left-aligned, the numbers
    right-aligned (summary's and flops' tables)."""
    widths = [max(len(r[i]) for r in [header, *body, *totals]) for i in range(len(header))]

    def fmt(cells) -> str:
        return "  ".join(c.ljust(w) if i < text_columns else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, *map(fmt, totals)])
