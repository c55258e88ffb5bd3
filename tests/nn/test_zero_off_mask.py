"""The zero-off-mask promise: sparsify, DST and IMP keep every inactive weight exactly 0 under every
common optimizer, the modules run the dense kernel on the weight itself when they promise it, and
the masked path when they do not."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern.nn import (SparseConv1d, SparseConv2d, SparseConv3d, SparseConvTranspose1d, SparseConvTranspose2d,
                           SparseConvTranspose3d, SparseLinear, sparse_modules)

from ..helpers import counting_host_reads

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "sgd-weight-decay": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-2),
    "adadelta": lambda p: torch.optim.Adadelta(p, weight_decay=1e-2),
    "adamax": lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=1e-2),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=1e-2),
    "radam": lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=1e-2),
}


def small_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, groups=2, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def batch(generator):
    return torch.randn(5, 3, 6, 6, generator=generator), torch.randint(0, 4, (5,), generator=generator)


def assert_zero_off_mask(model):
    for name, module in sparse_modules(model):
        assert module.zero_off_mask, name
        assert torch.equal(module.weight[~module.mask], torch.zeros_like(module.weight[~module.mask])), name
        module.verify_zero_off_mask()


@pytest.mark.parametrize("optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS)
def test_sparsify_and_dst_keep_inactive_weights_exactly_zero(optimizer, generator, one_thread):
    model = sparsekern.sparsify(small_model(), 0.3, generator=generator)
    opt = optimizer(model.parameters())
    # Updates at steps 3 and 6: dense gradients before each, masks and optimizer state changed at each.
    algo = sparsekern.RigL(model, opt, update_every=3, total_steps=100, drop_fraction=0.5)
    updates = 0
    for _ in range(7):
        x, y = batch(generator)
        F.cross_entropy(model(x), y).backward()
        updates += algo.step()
        opt.step()
        opt.zero_grad()
        assert_zero_off_mask(model)
    assert updates == 2
    # The dense kernel on the weight gives what the masked weight would.
    dense = copy.deepcopy(model)
    for name, module in sparse_modules(model):
        dense.set_submodule(name, module.to_dense())
    model.eval(), dense.eval()
    x, _ = batch(generator)
    torch.testing.assert_close(model(x), dense(x))


@pytest.mark.parametrize("name", ["sgd-weight-decay", "adamw", "adagrad"])
def test_imp_keeps_inactive_weights_exactly_zero(name, generator, one_thread):
    model = sparsekern.sparsify(small_model(), 1.0)
    imp = sparsekern.IMP(model, OPTIMIZERS[name], prune_fraction=0.5, rewind_step=1)
    for cycle in range(2):
        for _ in range(3):
            x, y = batch(generator)
            F.cross_entropy(model(x), y).backward()
            imp.optimizer.step()
            imp.optimizer.zero_grad()
            imp.step()
            assert_zero_off_mask(model)
        if cycle == 0:
            imp.next_cycle()
            assert_zero_off_mask(model)
    assert all(not module.mask.all() for _, module in sparse_modules(model))


def test_sparsify_zeroes_what_a_callable_init_writes_off_the_mask(generator):
    def careless(module, generator=None):
        with torch.no_grad():
            module.weight.normal_(generator=generator)
    model = sparsekern.sparsify(small_model(), 0.3, init=careless, generator=generator)
    assert_zero_off_mask(model)


def test_optg_runs_the_masked_path_and_keeps_its_pruned_values(generator):
    model = sparsekern.sparsify(small_model(), 1.0)
    optg = sparsekern.OptG(model, sparsity=0.5, epochs=2, dense_while_scores_tie=False)
    layers = [module for _, module in sparse_modules(model)]
    assert all(not layer.zero_off_mask for layer in layers)
    assert any((layer.weight[~layer.mask] != 0).any() for layer in layers)
    optg.next_epoch()
    assert all(not layer.zero_off_mask for layer in layers)


@pytest.mark.parametrize("make, shape", [(lambda: SparseLinear(12, 6), (4, 12)),
                                         (lambda: SparseConv1d(4, 6, 3, padding=1), (2, 4, 5)),
                                         (lambda: SparseConv2d(4, 6, 3, padding=1), (2, 4, 5, 5)),
                                         (lambda: SparseConv3d(4, 6, 3, padding=1), (2, 4, 3, 5, 4)),
                                         (lambda: SparseConvTranspose2d(4, 6, 3, stride=2, output_padding=1),
                                          (2, 4, 5, 5))],
                         ids=["linear", "conv1d", "conv2d", "conv3d", "conv_transpose2d"])
def test_which_path_runs_follows_the_modules_state(make, shape, generator):
    layer = make()
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.5)
    x = torch.randn(shape, generator=generator)

    def forward():
        """The layer's output, and the ops its forward ran that make a masked copy of the weight
        (the profiler sees those the C++ Functions call too)."""
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            y = layer(x)
        return y, [e.name for e in profile.events() if e.name in ("sparsekern::masked_weight", "aten::where")]

    expected, selects = forward()
    assert not selects  # the weight itself, no masked copy
    # Off the mask now NaN, which only the masked weight keeps out.
    with torch.no_grad():
        layer.weight[~layer.mask] = float("nan")
    layer.zero_off_mask = False
    y, selects = forward()
    assert len(selects) == 1
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("zero_off_mask", [True, False])
def test_a_mask_whose_true_bytes_are_not_one_masks_the_gradient_by_one(zero_off_mask, generator):
    # uint8 data viewed as bool: torch reads any non-zero byte as True, and so must the in-place
    # masking of the dense path (it multiplied by the byte, 255, before).
    layer = SparseLinear(300, 500)   # more entries than one chunk of the CPU masking
    flags = torch.rand(layer.weight.shape, generator=generator) < 0.3
    layer.set_mask(flags)
    layer.mask.view(torch.uint8).mul_(255)
    layer.zero_off_mask = zero_off_mask
    x = torch.randn(7, 300, generator=generator)
    layer(x).square().sum().backward()
    weight = layer.weight.detach().clone().requires_grad_()
    F.linear(x, weight * flags, layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, weight.grad * flags)


def test_the_masked_path_of_a_linear_layer_keeps_a_step_at_the_static_paths_peak_memory(generator):
    # It remade the masked weight in Python custom ops, and held the weight gradient and its masked
    # copy at once: 1.9x this peak here, 1.5x a dense step's for the training-step benchmark's MLPs.
    from sparsekern.bench.cases.training_step import step_peak_bytes

    layer = SparseLinear(384, 512)
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.3)
    x = torch.randn(8, 384, generator=generator, requires_grad=True)

    def step():
        layer(x).square().sum().backward()

    peaks = {}
    for zero_off_mask in (True, False):
        layer.zero_off_mask = zero_off_mask
        step()  # the first call allocates what later ones reuse
        layer.weight.grad = layer.bias.grad = x.grad = None
        peaks[zero_off_mask] = step_peak_bytes(step, x.device)
        layer.weight.grad = layer.bias.grad = x.grad = None
    # Slack: an activation-sized temporary, a tenth of the weight here.
    assert peaks[False] <= peaks[True] + x.numel() * x.element_size(), peaks


def test_either_path_masks_the_weight_gradient_as_the_reference_does(generator, monkeypatch):
    # A select: an inf gradient (a step GradScaler will skip) gives 0 off the mask on both paths, as the
    # reference gives, where a product with the mask gave NaN there (the static path's, until the masked
    # path took it too): every backend masks the weight gradient alike.
    layer = SparseLinear(24, 16)
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.4)
    x = torch.randn(5, 24, generator=generator)
    upstream = torch.randn(5, 16, generator=generator)
    upstream[0, 3] = float("inf")
    grads = {}
    for backend in ("auto", "reference"):
        monkeypatch.setenv("SPARSEKERN_BACKEND", backend)
        for zero_off_mask in (True, False):
            layer.zero_off_mask = zero_off_mask
            layer.weight.grad = None
            (layer(x) * upstream).sum().backward()
            grads[backend, zero_off_mask] = layer.weight.grad
    assert grads["reference", True][3].isinf().any() and not grads["reference", True][~layer.mask].any()
    for key, grad in grads.items():
        torch.testing.assert_close(grad, grads["reference", True], rtol=0, atol=0, equal_nan=True, msg=str(key))


@pytest.mark.parametrize("make, shape", [(lambda: SparseLinear(5, 3, dtype=torch.float64), (2, 5)),
                                         (lambda: SparseConv1d(2, 2, 2, padding=1, dtype=torch.float64), (1, 2, 3)),
                                         (lambda: SparseConv2d(2, 2, 2, padding=1, dtype=torch.float64),
                                          (1, 2, 2, 2)),
                                         (lambda: SparseConv3d(2, 2, 2, padding=1, dtype=torch.float64),
                                          (1, 2, 2, 1, 2)),
                                         (lambda: SparseConvTranspose1d(2, 2, 2, stride=2, dtype=torch.float64),
                                          (1, 2, 3))], ids=["linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d"])
@pytest.mark.parametrize("zero_off_mask", [True, False])
def test_double_backward_through_the_layers(make, shape, zero_off_mask, generator):
    # SparseLinear had no autograd formula for its backward ("no autograd formula").
    layer = make()
    mask = torch.rand(layer.weight.shape, generator=generator) < 0.6
    layer.set_mask(mask)
    layer.zero_off_mask = zero_off_mask
    x = torch.randn(shape, generator=generator, dtype=torch.float64, requires_grad=True)
    active = layer.weight.detach()[mask].clone().requires_grad_()

    def function(x, active, bias):
        # Only active values vary, so the weight keeps its promise under gradcheck's nudges.
        weight = torch.zeros(mask.shape, dtype=active.dtype).masked_scatter(mask, active)
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradgradcheck(function, (x, active, layer.bias.detach().clone().requires_grad_()))


@pytest.mark.parametrize("make, shape", [(lambda: SparseLinear(16, 8), (4, 16)),
                                         (lambda: SparseConv1d(4, 8, 3, padding=1, groups=2), (2, 4, 6)),
                                         (lambda: SparseConv2d(4, 8, 3, padding=1, groups=2), (2, 4, 6, 6)),
                                         (lambda: SparseConv3d(4, 8, 3, padding=1, groups=2), (2, 4, 3, 4, 5)),
                                         (lambda: SparseConvTranspose3d(4, 8, 3, padding=1, groups=2),
                                          (2, 4, 3, 4, 5))],
                         ids=["linear", "conv1d", "conv2d", "conv3d", "conv_transpose3d"])
@pytest.mark.parametrize("zero_off_mask", [True, False])
def test_compiles_as_one_graph_on_either_path(make, shape, zero_off_mask, generator, fresh_compiler):
    layer = make()
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.5)
    layer.zero_off_mask = zero_off_mask
    x = torch.randn(shape, generator=generator)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    assert not layer.weight.grad[~layer.mask].any()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_an_inductor_compiled_convolution_saves_its_mask_as_held(memory_format, generator, fresh_compiler):
    # Inductor's layout optimization gives channels_last strides to the 4-D tensors that lead into a
    # convolution and that the forward saves for backward, as the masked path's mask does: each
    # step copied every mask, in a slow kernel of bool tile transposes (the conv net's masked step
    # ran at 0.86-0.88x the dense one's, compiled, against 0.98-1.01x with the mask saved as held).
    layer = SparseConv2d(8, 16, 3, padding=1).to(memory_format=memory_format)
    mask = torch.rand(layer.weight.shape, generator=generator) < 0.5
    layer.set_mask(mask)
    with torch.no_grad():
        layer.weight.masked_fill_(~mask, float("nan"))
    layer.zero_off_mask = False
    x = torch.randn(2, 8, 6, 6, generator=generator).contiguous(memory_format=memory_format)
    y = torch.compile(layer, fullgraph=True)(x)
    saved_masks = [t for t in y.grad_fn.saved_tensors if t.dtype == torch.bool]
    assert [(t.data_ptr(), t.stride()) for t in saved_masks] == [(layer.mask.data_ptr(), layer.mask.stride())]
    y.sum().backward()
    assert y.isfinite().all()
    grad = layer.weight.grad
    assert not grad[~mask].any() and not grad[~mask].signbit().any() and grad[mask].isfinite().all()

@pytest.mark.parametrize("zero_off_mask", [True, False])
def test_an_inductor_compiled_linear_gives_what_eager_gives(zero_off_mask, generator, fresh_compiler):
    # On CPU Inductor runs the extension's selects as they are (the masked weight, and the weight
    # gradient masked in place: _masked_linear_op._traced_select_is_opaque). What it makes of them, in
    # place or not, must give eager's values and gradients: +0.0 off the mask, NaN kept out.
    eager = SparseLinear(24, 16)
    mask = torch.rand(eager.weight.shape, generator=generator) < 0.5
    eager.set_mask(mask)
    if not zero_off_mask:
        with torch.no_grad():
            eager.weight.masked_fill_(~mask, float("nan"))
        eager.zero_off_mask = False
    compiled = copy.deepcopy(eager)
    x = torch.randn(5, 24, generator=generator, requires_grad=True)
    want = eager(x)
    got = torch.compile(compiled, fullgraph=True)(x)
    torch.testing.assert_close(got, want)
    grad_out = torch.randn(5, 16, generator=generator)
    want_grads = torch.autograd.grad(want, (x, eager.weight, eager.bias), grad_out)
    got_grads = torch.autograd.grad(got, (x, compiled.weight, compiled.bias), grad_out)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
    off = got_grads[1][~compiled.mask]
    assert not off.any() and not off.signbit().any() and got.isfinite().all()


def test_a_compiled_backward_masks_the_weight_gradient_in_one_operation(generator, fresh_compiler):
    # Eagerly the CPU gradient is masked chunk by chunk (_mask_in_place); traced, that loop would be
    # unrolled into the graph, one slice, copy, clamp and multiply per 128K entries, and the first
    # allocation of its scratch failed the fullgraph compile (a side effect in an autograd.Function).
    # The compiler gets one select instead: the extension's, in place, where it is built (see
    # _masked_linear_op._traced_select_is_opaque), else torch.where, which it fuses.
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    backward_graphs = []

    def record_backward(graph, inputs):
        backward_graphs.append(graph)
        return make_boxed_func(graph.forward)

    layer = SparseLinear(768, 512)  # three chunks of gradient
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.5)
    backend = aot_autograd(fw_compiler=lambda graph, inputs: make_boxed_func(graph.forward),
                           bw_compiler=record_backward)
    torch.compile(layer, fullgraph=True, backend=backend)(torch.randn(2, 768, generator=generator)).sum().backward()
    assert not layer.weight.grad[~layer.mask].any() and layer.weight.grad[layer.mask].all()
    (graph,) = backward_graphs
    targets = [str(node.args[0]) if "auto_functionalized" in str(node.target) else str(node.target)
               for node in graph.graph.nodes if node.op == "call_function"]
    assert not [t for t in targets if "slice" in t or "clamp" in t or "mul" in t], targets
    assert sum("where" in t or "mask_grad_" in t for t in targets) == 1, targets


@pytest.mark.parametrize("make, shape", [(lambda: SparseLinear(16, 8), (4, 16)),
                                         (lambda: SparseConv2d(4, 8, 3, padding=1), (2, 4, 6, 6))],
                         ids=["linear", "conv2d"])
@pytest.mark.parametrize("zero_off_mask", [True, False])
def test_without_a_weight_gradient_no_autograd_node_is_built(make, shape, zero_off_mask, generator, monkeypatch):
    # Evaluation under no_grad, or a frozen weight: the mask's autograd Function would do nothing
    # on the way back, and building it is a fixed cost per layer and call.
    from sparsekern.ops import _masked_linear_op

    layer = make()
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.5)
    layer.zero_off_mask = zero_off_mask
    x = torch.randn(shape, generator=generator, requires_grad=True)
    expected = layer(x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)

    def refuse(*args):
        raise AssertionError("the autograd Function ran without a weight gradient to mask")

    monkeypatch.setattr(_masked_linear_op._WeightForDenseKernel, "apply", refuse)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    layer.weight.requires_grad_(False)
    y = layer(x)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], expected_grad)


def test_a_transformer_layer_in_eval_mode_multiplies_by_the_masked_weights(generator):
    # In eval mode nn.TransformerEncoderLayer hands linear1.weight, linear2.weight and its attention's
    # projection weights to one fused kernel, unless a child has a forward hook: a sparse layer holding values
    # off its mask (OptG's) must keep it to the layers' own forwards, and one that promises zero_off_mask may
    # let it run.
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    sparsekern.sparsify(layer, 0.3, generator=generator)
    assert len(sparse_modules(layer)) == 4   # the attention's in_proj and out_proj, linear1, linear2
    with torch.no_grad():
        for _, module in sparse_modules(layer):
            module.zero_off_mask = False
            module.weight.add_(torch.randn(module.weight.shape, generator=generator))
    masked = copy.deepcopy(layer)
    for _, module in sparse_modules(masked):
        module.zero_weights_off_mask()
    assert not any(module._forward_pre_hooks for _, module in sparse_modules(masked))
    x = torch.randn(3, 5, 16, generator=generator)
    with torch.no_grad():
        want = masked.eval()(x)      # the fused kernel, on weights that are 0 off the mask
        got = layer.eval()(x)
        unpickled = pickle.loads(pickle.dumps(layer))(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(unpickled, want)


@pytest.mark.parametrize("name", ["zero_off_mask", "_zero_off_mask"])
@pytest.mark.parametrize("promised", [True, False])
def test_a_module_pickled_with_zero_off_mask_as_a_bool_loads(name, promised):
    # Pickled by older releases: a plain attribute `zero_off_mask`, then a property over `_zero_off_mask`.
    layer = SparseLinear(4, 3)
    state = layer.__getstate__()
    state = {**state, name: promised, "_forward_pre_hooks": type(state["_forward_pre_hooks"])()}
    del state["_zero_off_mask_of"]
    restored = SparseLinear.__new__(SparseLinear)
    restored.__setstate__(state)
    assert restored.zero_off_mask is promised and len(restored._forward_pre_hooks) == int(not promised)


LAYERS = pytest.mark.parametrize("make, shape", [(lambda: SparseLinear(12, 6), (4, 12)),
                                                 (lambda: SparseConv2d(4, 6, 3, padding=1), (2, 4, 5, 5))],
                                 ids=["linear", "conv2d"])


def masked_layer(make, generator):
    layer = make()
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.5)
    return layer


def dense_twin(layer, weight):
    """A plain layer holding `weight` where the mask is True, else 0."""
    dense = layer.to_dense()
    with torch.no_grad():
        dense.weight.copy_(torch.where(layer.mask, weight, 0))
    return dense


@LAYERS
def test_functional_call_with_a_weight_off_the_mask_computes_with_the_masked_weight(make, shape, generator):
    # The promise was made for the layer's own weight: the dense kernel ran on the one swapped in.
    layer = masked_layer(make, generator)
    x = torch.randn(shape, generator=generator)
    weight = torch.randn(layer.weight.shape, generator=generator)
    got = torch.func.functional_call(layer, {"weight": weight}, (x,))
    torch.testing.assert_close(got, dense_twin(layer, weight)(x))
    assert layer.zero_off_mask  # its own weight, back in place, keeps the promise
    torch.testing.assert_close(layer(x), dense_twin(layer, layer.weight)(x))


@LAYERS
def test_a_parametrized_weight_is_masked(make, shape, generator):
    class Shift(nn.Module):
        def forward(self, weight):
            return weight + 1

    layer = masked_layer(make, generator)
    x = torch.randn(shape, generator=generator)
    want = dense_twin(layer, layer.weight.detach() + 1)(x)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Shift())
    torch.testing.assert_close(layer(x), want)


def test_a_conversion_computes_no_parametrized_weight(generator):
    # Reading a spectral-normed weight in training mode runs a power iteration (it moves u and v), which
    # nn.Linear's conversions do not: the promise is about the module's own Parameter, read without one.
    layer = masked_layer(lambda: SparseLinear(12, 6), generator)
    torch.nn.utils.parametrizations.spectral_norm(layer)
    u = layer.parametrizations.weight[0]._u.clone()
    layer.to(torch.float32)
    assert torch.equal(layer.parametrizations.weight[0]._u, u) and not layer.zero_off_mask


@LAYERS
def test_a_weight_registered_in_place_of_the_old_is_masked(make, shape, generator):
    layer = masked_layer(make, generator)
    x = torch.randn(shape, generator=generator)
    weight = torch.randn(layer.weight.shape, generator=generator)
    layer.register_parameter("weight", nn.Parameter(weight))
    assert not layer.zero_off_mask
    torch.testing.assert_close(layer(x), dense_twin(layer, weight)(x))


@pytest.mark.parametrize("future", ["set_overwrite_module_params_on_conversion",
                                    "set_swap_module_params_on_conversion"])
def test_a_conversion_that_replaces_the_weight_keeps_the_promise(future, generator):
    layer = masked_layer(lambda: SparseLinear(12, 6), generator)
    setting = getattr(torch.__future__, future)
    setting(True)
    try:
        layer.double()
    finally:
        setting(False)
    assert layer.zero_off_mask and layer.weight.dtype == torch.float64


def test_copies_keep_the_promise_for_their_own_weight(generator):
    layer = masked_layer(lambda: SparseLinear(12, 6), generator)
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copied.zero_off_mask and copied.weight is not layer.weight


@pytest.mark.skipif(sparsekern.ops._extension.kernel_missing("masked_weight", "cpu") is not None,
                    reason="no C++ masked_weight")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_convolution_without_weight_gradient_selects_in_cpp(layout, generator):
    # Evaluation of OptG's masked path: torch.where reads its bool condition entry by entry, the C++
    # select vectorizes. A channels_last weight keeps torch.where, which keeps its layout.
    layer = SparseConv2d(4, 6, 3, padding=1)
    layer.set_mask(torch.rand(layer.weight.shape, generator=generator) < 0.5)
    x = torch.randn(2, 4, 5, 5, generator=generator)
    if layout == "channels_last":
        layer, x = layer.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    expected = F.conv2d(x, torch.where(layer.mask, layer.weight, 0), layer.bias, padding=1)
    with torch.no_grad():
        layer.weight[~layer.mask] = float("nan")
    layer.zero_off_mask = False
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        y = layer(x)
    selects = [e.name for e in profile.events() if e.name in ("sparsekern::masked_weight", "aten::where")]
    assert selects == (["sparsekern::masked_weight"] if layout == "contiguous" else ["aten::where"])
    torch.testing.assert_close(y, expected)


@LAYERS
def test_a_layer_made_under_inference_mode_runs(make, shape, generator):
    # Its mask is an inference tensor, which has no version counter for the promise to record.
    x = torch.randn(shape, generator=generator)
    with torch.inference_mode():
        layer = masked_layer(make, generator)
        output = layer(x)
    torch.testing.assert_close(output, dense_twin(layer, layer.weight)(x))
    with torch.inference_mode():
        layer.mask.fill_(True)    # not noticed: the weight holds 0 off the old mask, so the promise stays true
        torch.testing.assert_close(layer(x), dense_twin(layer, layer.weight)(x))


@LAYERS
def test_a_layer_made_under_inference_mode_refuses_a_new_mask_outside_it_before_anything_changes(make, shape,
                                                                                                  generator):
    # set_mask copied the mask in, then torch refused to zero the weight ("Inplace update to inference tensor
    # outside InferenceMode is not allowed"): a new mask over the old mask's weights.
    with torch.inference_mode():
        layer = masked_layer(make, generator)
    before = (layer.weight.clone(), layer.mask.clone())
    with pytest.raises(ValueError, match="weight is an inference tensor .* set its mask under torch.inference_mode"):
        layer.set_mask(torch.zeros_like(layer.mask))
    with pytest.raises(ValueError, match="weight is an inference tensor"):
        layer.zero_weights_off_mask()
    assert torch.equal(layer.weight, before[0]) and torch.equal(layer.mask, before[1])
    with torch.inference_mode():
        layer.set_mask(torch.zeros_like(layer.mask))
    assert not layer.weight.any()


@LAYERS
def test_set_mask_refuses_a_mask_buffer_assigned_under_inference_mode_naming_it_before_anything_changes(make, shape,
                                                                                                      generator):
    # The weight was checked, the mask was not: torch refused the copy into it ("Inplace update to inference tensor
    # outside InferenceMode is not allowed"), naming no layer, where a tied twin's mask got this error.
    layer = masked_layer(make, generator)
    with torch.inference_mode():
        layer.mask = layer.mask.clone()
    before = (layer.weight.detach().clone(), layer.mask.clone())
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"^set_mask: the mask of this {name} is an inference tensor .*: put a "
                                         rf"copy in its place first \(layer\.mask = layer\.mask\.clone\(\)\)"):
        layer.set_mask(torch.zeros_like(layer.mask))
    assert torch.equal(layer.weight, before[0]) and torch.equal(layer.mask, before[1])


@LAYERS
def test_a_load_into_a_mask_buffer_assigned_under_inference_mode_loads_nothing_of_the_layer(make, shape, generator):
    # torch's copy into an inference tensor writes it, then raises (naming no layer): the layer was left with the
    # loaded mask and weight, its error at the end. Now the layer loads nothing, refused naming the mask.
    layer = masked_layer(make, generator)
    with torch.inference_mode():
        layer.mask = layer.mask.clone()
    before = {key: value.clone() for key, value in layer.state_dict().items()}
    saved = {key: torch.randn_like(value) if value.is_floating_point() else ~value for key, value in before.items()}
    dense = {key: value for key, value in saved.items() if key != "mask"}   # a dense checkpoint loads an all-True mask
    for state in (saved, dense):
        with pytest.raises(ValueError, match=r"^load_state_dict: the mask of layer '\(root\)' is an inference tensor"
                                             r".*: put a copy in its place first \(layer\.mask = layer\.mask\.clone"):
            layer.load_state_dict(state)
        assert all(torch.equal(value, layer.state_dict()[key]) for key, value in before.items())
    with torch.inference_mode():   # where it can be written
        layer.load_state_dict(saved)
    assert all(torch.equal(value, layer.state_dict()[key]) for key, value in saved.items())


@LAYERS
@pytest.mark.parametrize("how", ["assign", "register_buffer", "buffers"])
def test_a_mask_put_in_place_of_the_old_is_noticed(make, shape, how, generator):
    # A new mask tensor is not the one the promise was made for, whatever its version counter says (a fresh
    # tensor's is 0, that of a new module's mask too): the weight, dense under the old mask, is masked.
    layer = make()
    x = torch.randn(shape, generator=generator)
    mask = torch.rand(layer.weight.shape, generator=generator) < 0.5
    if how == "assign":
        layer.mask = mask
    elif how == "register_buffer":
        layer.register_buffer("mask", mask)
    else:
        layer._buffers["mask"] = mask
    torch.testing.assert_close(layer(x), dense_twin(layer, layer.weight)(x))
    assert not layer.zero_off_mask


@LAYERS
def test_a_mask_copied_in_at_every_forward_is_read_once_per_promise(make, shape, generator):
    # What DDP's buffer sync does under torch 2.11 (its copy of rank 0's masks moves their version counters): each
    # forward read the weight again to check the promise, a host sync per layer per step on a GPU. Now a mask that
    # moves again before the promise is made anew takes the masked path, unread.
    layer = masked_layer(make, generator)
    x = torch.randn(shape, generator=generator)
    reads = []
    for step in range(6):
        if step == 3:   # a promise made anew, for another mask (as an algorithm's update does): read once more
            layer.set_mask(layer.mask.roll(1, 0))
        with torch.no_grad():
            layer.mask.copy_(layer.mask.clone())   # the same values; the version counter moves
        with counting_host_reads() as made:
            output = layer(x)
        reads.append(len(made))
        torch.testing.assert_close(output, dense_twin(layer, layer.weight)(x))
    assert reads == [1, 0, 0, 1, 0, 0]
    # A mask that then really changes (the active weights now off it) is masked all the same, unread.
    with torch.no_grad():
        layer.mask.logical_not_()
    with counting_host_reads() as made:
        output = layer(x)
    torch.testing.assert_close(output, dense_twin(layer, layer.weight)(x))
    assert not made and not layer.zero_off_mask


@LAYERS
def test_a_parametrization_removed_leaving_its_values_is_masked(make, shape, generator):
    # remove_parametrizations(leave_parametrized=True) writes the computed values into the original Parameter
    # (set_, so that an optimizer holding it keeps training it) and registers it again: the same tensor the
    # promise was made for, with values the module never masked.
    class Shift(nn.Module):
        def forward(self, weight):
            return weight + 1

    layer = masked_layer(make, generator)
    x = torch.randn(shape, generator=generator)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Shift())
    torch.nn.utils.parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    torch.testing.assert_close(layer(x), dense_twin(layer, layer.weight)(x))
    assert not layer.zero_off_mask


@LAYERS
def test_a_layer_moved_off_the_meta_device_by_to_empty_holds_a_new_modules_all_true_mask(make, shape, generator):
    # to_empty leaves the weight and the mask holding whatever memory held: the mask came out all False (a fully
    # pruned layer after the deferred-init recipe, to_empty then reset_parameters) or any pattern, and the
    # promise made on the meta device, where there were no values, passed to them.
    with torch.device("meta"):
        model = nn.Sequential(make())   # to_empty reaches a child through _apply
    model.to_empty(device="cpu")
    layer = model[0]
    assert layer.mask.all() and layer.zero_off_mask   # nothing off an all-True mask
    with torch.no_grad():
        layer.weight.normal_(generator=generator)   # an init that writes the weight only (reset_parameters)
    x = torch.randn(shape, generator=generator)
    torch.testing.assert_close(layer(x), dense_twin(layer, layer.weight)(x))


def test_a_mask_assigned_to_a_layer_of_a_fused_transformer_kernel_is_checked_at_once(generator):
    # nn.TransformerEncoderLayer's fused eval-mode kernel multiplies by linear1.weight without running linear1's
    # forward, which is where a mask put in place of the old one was noticed: assignment checks it at once.
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    sparsekern.sparsify(layer, 0.3, generator=generator).eval()
    x = torch.randn(3, 5, 16, generator=generator)
    for _, module in sparse_modules(layer):
        module.mask = torch.rand(module.mask.shape, generator=generator) < 0.5   # the weights are dense there
    assert not any(module.zero_off_mask for _, module in sparse_modules(layer))
    masked = copy.deepcopy(layer)
    for _, module in sparse_modules(masked):
        module.zero_weights_off_mask()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), masked(x))


@pytest.mark.parametrize("make", [lambda: SparseLinear(12, 6), lambda: SparseConv2d(4, 6, 3),
                                  lambda: SparseConvTranspose2d(4, 6, 3)], ids=["linear", "conv2d", "conv_transpose2d"])
def test_reset_parameters_draws_the_dense_init_and_keeps_the_mask_and_its_promise(make, generator):
    # A model re-initialised with model.apply(lambda m: m.reset_parameters()): torch's init over the whole weight
    # left values off the mask under the promise, and forward multiplied by them.
    layer = masked_layer(make, generator)
    mask = layer.mask.clone()
    layer.reset_parameters()
    assert torch.equal(layer.mask, mask) and layer.zero_off_mask
    assert not layer.weight[~mask].any() and layer.weight[mask].any()
    layer.verify_zero_off_mask()


def test_reset_parameters_of_a_sparsified_model_keeps_every_layer_sparse(generator):
    model = sparsekern.sparsify(small_model(), 0.3, generator=generator)
    model.apply(lambda module: module.reset_parameters() if hasattr(module, "reset_parameters") else None)
    assert_zero_off_mask(model)


def test_reset_parameters_of_a_parametrized_layer_leaves_its_weight_to_the_forward(generator):
    layer = masked_layer(lambda: SparseLinear(12, 6), generator)
    torch.nn.utils.parametrizations.weight_norm(layer)
    layer.reset_parameters()   # torch's init writes into the computed weight; nothing here to zero
    x = torch.randn(4, 12, generator=generator)
    torch.testing.assert_close(layer(x), dense_twin(layer, layer.weight)(x))
