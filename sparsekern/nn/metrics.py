"""Measurements of a (sparse) model: the gradient-flow metric and a per-layer summary."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .modules import SparseModule, refuse_meta, sparse_modules


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
    lines = [(row["name"] or "(root)", _type_cell(row), "x".join(map(str, row["shape"])), str(row["parameters"]),
              str(row["nonzeros"]), f"{row['density']:.4f}",
              "" if row["weight_density"] is None else f"{row['weight_density']:.4f}") for row in result["layers"]]
    for label in ("sparse_weights", "total"):
        t = result[label]
        lines.append((label.replace("_", " "), "", "", str(t["parameters"]), str(t["nonzeros"]), f"{t['density']:.4f}",
                      ""))
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def fmt(cells) -> str:  # text columns left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, lines[:-2]), rule, *map(fmt, lines[-2:])])
