"""SparseMultiheadAttention: nn.MultiheadAttention on masked projection weights, its gradients, sparsify of
transformers, DST on them, autocast, conversions and state dicts, bad arguments."""
import contextlib
import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import sparsekern
from sparsekern.nn import SparseLinear, SparseMultiheadAttention, sparse_modules

E, HEADS, L, S, N = 8, 2, 4, 5, 3

CONFIGS = {
    "default": (dict(), dict()),
    "batch_first": (dict(batch_first=True), dict()),
    "kdim_vdim": (dict(kdim=3, vdim=5), dict()),
    "kdim_vdim_batch_first": (dict(kdim=3, vdim=5, batch_first=True), dict()),
    "bias_kv_zero_attn": (dict(add_bias_kv=True, add_zero_attn=True), dict()),
    "no_bias": (dict(bias=False), dict()),
    "masks": (dict(), dict(attn_mask="float", key_padding_mask=True)),
    "bool_attn_mask_batch_first": (dict(batch_first=True), dict(attn_mask="bool")),
    "weights_per_head": (dict(), dict(average_attn_weights=False)),
    "no_weights": (dict(batch_first=True), dict(need_weights=False)),
    "causal": (dict(batch_first=True), dict(attn_mask="causal", is_causal=True, need_weights=False)),
    "self_attention": (dict(batch_first=True), dict(self_attention=True)),
    "unbatched": (dict(), dict(unbatched=True)),
}


def _dense(config, generator):
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
    dense = nn.MultiheadAttention(E, HEADS, dtype=torch.float64, **config)
    if dense.in_proj_bias is not None:   # nn.MultiheadAttention starts them at 0, where a mix-up would not show
        with torch.no_grad():
            dense.in_proj_bias.normal_(generator=generator)
            dense.out_proj.bias.normal_(generator=generator)
    return dense


def _sparse(dense, generator, zero_off_mask=True):
    """A SparseMultiheadAttention from a copy of `dense`, with random half masks; with zero_off_mask False its
    weights hold 3 off the masks."""
    sparse = SparseMultiheadAttention.from_dense(copy.deepcopy(dense))
    for projection in (*sparse.input_projections(), sparse.out_proj):
        projection.set_mask(torch.rand(projection.weight.shape, generator=generator) < 0.5)
        if not zero_off_mask:
            with torch.no_grad():
                projection.weight.masked_fill_(~projection.mask, 3.0)
            projection.zero_off_mask = False
    return sparse


def _masked_dense(dense, sparse):
    """A copy of `dense` holding `sparse`'s masked weights, made without the code under test."""
    reference = copy.deepcopy(dense)
    names = ["in_proj_weight"] if sparse._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    with torch.no_grad():
        for name, projection in zip(names, sparse.input_projections()):
            getattr(reference, name).copy_(torch.where(projection.mask, projection.weight, 0.0))
        reference.out_proj.weight.copy_(torch.where(sparse.out_proj.mask, sparse.out_proj.weight, 0.0))
    return reference


def _inputs(attention, call, generator):
    def make(length, features):
        shape = ((length, features) if call.get("unbatched") else
                 (N, length, features) if attention.batch_first else (length, N, features))
        return torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True)
    if call.get("self_attention"):
        x = make(L, E)
        return x, x, x
    length = L if call.get("attn_mask") == "causal" else S
    return make(L, E), make(length, attention.kdim), make(length, attention.vdim)


def _call_arguments(call, generator):
    arguments = {key: call[key] for key in ("need_weights", "average_attn_weights", "is_causal") if key in call}
    length = L if call.get("attn_mask") == "causal" else S
    if call.get("attn_mask") == "float":
        arguments["attn_mask"] = torch.randn(L, length, dtype=torch.float64, generator=generator)
    elif call.get("attn_mask") == "bool":
        arguments["attn_mask"] = torch.rand(L, length, generator=generator) < 0.3
    elif call.get("attn_mask") == "causal":
        arguments["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    if call.get("key_padding_mask"):
        # of the attn_mask's kind: torch deprecates mixing a float mask with a bool one
        padding = torch.zeros(N, length, dtype=torch.float64)
        padding[0, -2:] = -math.inf
        arguments["key_padding_mask"] = padding
    return arguments


def _run(attention, inputs, arguments):
    output, weights = attention(*inputs, **arguments)
    loss = output.square().sum() + (0 if weights is None else weights.sum())
    grads = torch.autograd.grad(loss, [x for x in dict.fromkeys(inputs)] + list(attention.parameters()))
    return output, weights, grads


@pytest.mark.parametrize("zero_off_mask", [True, False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_and_gradients_are_the_dense_attentions_on_the_masked_weights(name, zero_off_mask, generator):
    config, call = CONFIGS[name]
    dense = _dense(config, generator)
    sparse = _sparse(dense, generator, zero_off_mask)
    reference = _masked_dense(dense, sparse)
    inputs = _inputs(sparse, call, generator)
    arguments = _call_arguments(call, generator)
    output, weights, grads = _run(sparse, inputs, arguments)
    expected_output, expected_weights, expected_grads = _run(reference, inputs, arguments)
    torch.testing.assert_close(output, expected_output)
    if call.get("need_weights", True):
        torch.testing.assert_close(weights, expected_weights)
    else:
        assert weights is None and expected_weights is None
    inputs_count = len(dict.fromkeys(inputs))
    for grad, expected in zip(grads[:inputs_count], expected_grads[:inputs_count]):
        torch.testing.assert_close(grad, expected)
    sparse_grads = dict(zip([name for name, _ in sparse.named_parameters()], grads[inputs_count:]))
    dense_grads = dict(zip([name for name, _ in reference.named_parameters()], expected_grads[inputs_count:]))
    renamed = {"in_proj.weight": "in_proj_weight", "q_proj.weight": "q_proj_weight",
               "k_proj.weight": "k_proj_weight", "v_proj.weight": "v_proj_weight"}
    assert len(sparse_grads) == len(dense_grads)
    masks = {name: module.mask for name, module in sparse.named_modules() if isinstance(module, SparseLinear)}
    for key, grad in sparse_grads.items():
        expected = dense_grads[renamed.get(key, key)]
        if key.endswith(".weight"):   # the masked gradient: zero off the mask
            expected = torch.where(masks[key.removesuffix(".weight")], expected, 0.0)
        torch.testing.assert_close(grad, expected, msg=key)


@pytest.mark.parametrize("name", ["default", "kdim_vdim"])
def test_weight_gradients_are_zero_off_the_masks_and_dense_with_dense_grad(name, generator):
    config, call = CONFIGS[name]
    dense = _dense(config, generator)
    sparse = _sparse(dense, generator)
    reference = _masked_dense(dense, sparse)
    inputs = _inputs(sparse, call, generator)
    projections = [*sparse.input_projections(), sparse.out_proj]
    for dense_grad in (False, True):
        for projection in projections:
            projection.dense_grad = dense_grad
            projection.weight.grad = None
        reference.zero_grad()
        sparse(*inputs)[0].square().sum().backward()
        reference(*inputs)[0].square().sum().backward()
        wanted = [reference.in_proj_weight] if sparse._qkv_same_embed_dim else [
            reference.q_proj_weight, reference.k_proj_weight, reference.v_proj_weight]
        wanted.append(reference.out_proj.weight)
        for projection, dense_weight in zip(projections, wanted):
            grad = projection.weight.grad
            if dense_grad:   # the gradient at every position, as a growth criterion reads it
                torch.testing.assert_close(grad, dense_weight.grad)
                assert grad[~projection.mask].abs().sum() > 0
            else:
                assert not grad[~projection.mask].any()
                torch.testing.assert_close(grad, torch.where(projection.mask, dense_weight.grad, 0.0))


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _encoder(seed=0, layers=2, batch_first=True):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _densified(model):
    """A copy of `model` whose sparse layers are plain ones holding the masked weights."""
    dense = copy.deepcopy(model)
    for parent in list(dense.modules()):
        for child_name, child in list(parent._modules.items()):
            if isinstance(child, (SparseLinear, SparseMultiheadAttention)):
                parent._modules[child_name] = child.to_dense()
    return dense


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_sparsify_of_a_transformer_encoder_sparsifies_the_attention_projections(distribution, generator):
    model = _encoder()
    weights = {name: parameter for name, parameter in model.named_parameters()}
    with _no_warning():
        sparsekern.sparsify(model, 0.2, distribution, generator=generator)
    layers = sparse_modules(model)
    names = ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")
    assert [name for name, _ in layers] == [f"layers.{i}.{name}" for i in range(2) for name in names]
    assert all(isinstance(model.layers[i].self_attn, SparseMultiheadAttention) for i in range(2))
    # the Parameters are the dense model's (an optimizer built before keeps training them)
    assert model.layers[0].self_attn.in_proj.weight is weights["layers.0.self_attn.in_proj_weight"]
    assert model.layers[1].self_attn.out_proj.weight is weights["layers.1.self_attn.out_proj.weight"]
    shapes = [tuple(module.weight.shape) for _, module in layers]
    assert shapes[:2] == [(48, 16), (16, 16)]
    densities = sparsekern.distributions.layer_densities(shapes, 0.2, distribution)
    assert [module.nnz for _, module in layers] == [round(d * math.prod(s)) for d, s in zip(densities, shapes)]
    if distribution == "erk":   # (n_in + n_out) / (n_in n_out), scaled alike for every layer
        raw = [(s[0] + s[1]) / (s[0] * s[1]) for s in shapes]
        assert [d / r for d, r in zip(densities, raw)] == pytest.approx([densities[0] / raw[0]] * len(shapes))
    total = sum(math.prod(s) for s in shapes)
    assert sum(module.nnz for _, module in layers) == pytest.approx(0.2 * total, abs=len(shapes))
    for _, module in layers:
        assert not module.weight[~module.mask].any()
    x = torch.randn(2, 5, 16, generator=generator)
    torch.testing.assert_close(model(x), _densified(model)(x))


def test_sparsify_converts_decoder_layers_and_patterns_name_the_attention(generator):
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0)
    sparsekern.sparsify(model, 0.5, generator=generator)
    assert [name for name, _ in sparse_modules(model)] == [
        "self_attn.in_proj", "self_attn.out_proj", "multihead_attn.in_proj", "multihead_attn.out_proj",
        "linear1", "linear2"]
    torch.manual_seed(0)
    excluded = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0)
    with _no_warning():   # the attention excluded by its name: its out_proj goes with it, silently
        sparsekern.sparsify(excluded, 0.5, exclude="*attn", generator=generator)
    assert type(excluded.self_attn) is type(excluded.multihead_attn) is nn.MultiheadAttention
    assert [name for name, _ in sparse_modules(excluded)] == ["linear1", "linear2"]
    torch.manual_seed(0)
    included = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0)
    with _no_warning():
        sparsekern.sparsify(included, 0.5, include="self_attn", generator=generator)
    assert isinstance(included.self_attn, SparseMultiheadAttention)
    assert type(included.multihead_attn) is nn.MultiheadAttention and type(included.linear1) is nn.Linear


def test_a_pattern_naming_a_projection_layer_says_which_module_to_name(generator):
    # "*.in_proj" is how densities() and DST name the layer, but no module has that name before sparsify: the
    # warning said only that it matched nothing, and exclude="*.in_proj" sparsified the projection all the same.
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), nn.LSTM(8, 8))
    with pytest.warns(UserWarning, match=r"exclude pattern '\*\.in_proj' matches no module of the model, only weight "
                                         r"layers of '0\.self_attn', which sparsify converts whole: include/exclude "
                                         r"must name the attention or recurrent module itself"):
        sparsekern.sparsify(model, 0.5, exclude="*.in_proj", generator=generator)
    with pytest.warns(UserWarning, match=r"'1\.hh_l0' matches no module of the model, only weight layers of '1',"):
        sparsekern.sparsify(nn.Sequential(nn.Linear(8, 8), nn.LSTM(8, 8)), 0.5, exclude="1.hh_l0", generator=generator)
    with pytest.warns(UserWarning, match=r"'in_proj' matches no module of the model, only weight layers of '', "):
        sparsekern.sparsify(nn.MultiheadAttention(8, 2), 0.5, exclude="in_proj", generator=generator)   # the root
    with pytest.warns(UserWarning, match=r"'fc\*' matches no module of the model$"):   # a mere typo: no module named
        sparsekern.sparsify(nn.Sequential(nn.Linear(8, 8)), 0.5, exclude="fc*", generator=generator)


def test_sparsify_again_matches_a_converted_attention_by_its_own_name(generator):
    torch.manual_seed(0)
    model = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0)
    sparsekern.sparsify(model, 0.5, generator=generator)
    masks = {name: module.mask.clone() for name, module in sparse_modules(model)}
    sparsekern.sparsify(model, 0.3, exclude="*attn", generator=generator)   # the attentions' masks stay
    for name, module in sparse_modules(model):
        assert torch.equal(module.mask, masks[name]) == ("attn" in name), name
    sparsekern.sparsify(model, 0.3, include="self_attn", generator=generator)
    assert torch.equal(model.multihead_attn.in_proj.mask, masks["multihead_attn.in_proj"])
    assert not torch.equal(model.self_attn.in_proj.mask, masks["self_attn.in_proj"])


def test_sparsify_carries_what_a_user_attached_to_an_attention(generator):
    # Only the hooks moved: a parameter, buffer, submodule or plain attribute attached to the attention was lost
    # (and with it its state dict entries, and the optimizer's hold on the parameter).
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    attention = model.self_attn
    attention.temperature = nn.Parameter(torch.ones(()))
    attention.register_buffer("calls", torch.zeros(()), persistent=False)
    attention.register_buffer("scale", torch.full((), 2.0))
    attention.gate = nn.Linear(8, 8)
    attention.note = "rotary"
    sparsekern.sparsify(model, 0.5, exclude="self_attn.gate", generator=generator)
    sparse = model.self_attn
    assert isinstance(sparse, SparseMultiheadAttention)
    assert sparse.temperature is attention.temperature and sparse.calls is attention.calls
    assert sparse.scale is attention.scale and sparse.gate is attention.gate and sparse.note == "rotary"
    assert "self_attn.scale" in model.state_dict() and "self_attn.calls" not in model.state_dict()
    assert [name for name, _ in sparse_modules(sparse)] == ["in_proj", "out_proj"]   # the gate excluded
    sparsekern.sparsify(model, 0.5, exclude="self_attn", generator=generator)    # the gate is no projection
    assert isinstance(model.self_attn.gate, SparseLinear)


@pytest.mark.parametrize("attach, name", [(lambda m: setattr(m, "in_proj", nn.Linear(2, 2)), "in_proj"),
                                          (lambda m: setattr(m, "input_projections", 1), "input_projections")])
def test_sparsify_refuses_an_attention_holding_a_name_its_sparse_twin_uses(attach, name):
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    attach(model[0])
    with pytest.raises(ValueError, match=f"'0' \\(MultiheadAttention\\) holds '{name}', a name its "
                                         "SparseMultiheadAttention uses itself"):
        sparsekern.sparsify(model, 0.5)
    assert type(model[0]) is nn.MultiheadAttention and type(model[1]) is nn.Linear


def test_sparsify_carries_what_a_user_attached_to_an_attentions_out_proj(generator):
    # Only its hooks moved: an attribute, buffer or submodule attached to the dense out_proj was lost with it.
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    out_proj = model[0].out_proj
    out_proj.scale = 2.0
    out_proj.register_buffer("calibration", torch.ones(8))
    out_proj.adapter = nn.Linear(8, 8)
    calls = []
    out_proj.register_forward_hook(lambda *args: calls.append(1))
    sparsekern.sparsify(model, 0.5, generator=generator)
    sparse = model[0].out_proj
    assert isinstance(sparse, SparseLinear) and sparse.scale == 2.0 and sparse.calibration is out_proj.calibration
    assert isinstance(sparse.adapter, SparseLinear)   # sparsified by its own name, "0.out_proj.adapter"
    assert "0.out_proj.calibration" in model.state_dict()
    sparse(torch.randn(1, 8))
    assert calls == [1]
    clashing = nn.Sequential(nn.MultiheadAttention(8, 2))
    clashing[0].out_proj.register_buffer("mask", torch.ones(8, 8))
    with pytest.raises(ValueError, match=r"'0\.out_proj' \(NonDynamicallyQuantizableLinear\) holds 'mask'"):
        sparsekern.sparsify(clashing, 0.5)
    assert type(clashing[0]) is nn.MultiheadAttention


def test_sparsify_converts_an_attention_at_the_root_and_with_kdim_vdim(generator):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, kdim=3, vdim=5)
    hook_calls = []
    attention.register_forward_hook(lambda *args: hook_calls.append(1))
    sparse = sparsekern.sparsify(attention, 0.5, generator=generator)
    assert isinstance(sparse, SparseMultiheadAttention)
    assert [name for name, _ in sparse_modules(sparse)] == ["q_proj", "k_proj", "v_proj", "out_proj"]
    q, k, v = torch.randn(4, 2, 8), torch.randn(5, 2, 3), torch.randn(5, 2, 5)
    torch.testing.assert_close(sparse(q, k, v)[0], sparse.to_dense()(q, k, v)[0])
    assert hook_calls == [1]   # the hook moved to the sparse attention (to_dense makes one without it)


def test_sparsify_leaves_an_attention_dense_whose_projection_is_tied_to_a_dense_layer(generator):
    # Converted without its out_proj, the attention would hold a SparseLinear of density 1 there, which the
    # algorithms would then prune.
    model = nn.ModuleDict({"attention": nn.MultiheadAttention(4, 2), "tied": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
    model["tied"].weight = model["attention"].out_proj.weight
    with pytest.warns(UserWarning, match=r"^attention \(MultiheadAttention\) stays dense as a whole: its "
                                         r"out_proj weight is tied to tied \(Linear\)"):
        sparsekern.sparsify(model, 0.5, exclude="tied", generator=generator)
    assert type(model["attention"]) is nn.MultiheadAttention
    assert [name for name, _ in sparse_modules(model)] == ["head"]


class _Counting:
    """Counts the calls of torch._transformer_encoder_layer_fwd, nn.TransformerEncoderLayer's fused kernel."""

    def __init__(self, monkeypatch):
        self.calls = 0
        fused = torch._transformer_encoder_layer_fwd

        def counted(*args):
            self.calls += 1
            return fused(*args)
        monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counted)


def test_eval_mode_encoder_layer_computes_with_the_masked_weights(monkeypatch, generator):
    # In eval mode without gradients nn.TransformerEncoderLayer hands self_attn.in_proj_weight and
    # out_proj.weight to one fused kernel, which multiplies by them directly: exact while they are 0 off their
    # masks; a projection holding values off its mask must keep the layer off that kernel.
    model = _encoder(layers=1)
    sparsekern.sparsify(model, 0.3, generator=generator)
    layer = model.layers[0].eval()
    x = torch.randn(2, 5, 16, generator=generator)
    with torch.no_grad():
        expected = _densified(layer)(x)
        fused = _Counting(monkeypatch)
        torch.testing.assert_close(layer(x), expected)
        assert fused.calls == 1   # the fused kernel, on weights equal to the masked ones
        attention = layer.self_attn
        for projection in (attention.in_proj, attention.out_proj):
            projection.weight.masked_fill_(~projection.mask, 5.0)
            projection.zero_off_mask = False
        torch.testing.assert_close(layer(x), expected)
        attention.in_proj.zero_weights_off_mask()   # out_proj alone still holds values off its mask
        torch.testing.assert_close(layer(x), expected)
        assert fused.calls == 1
        attention.out_proj.zero_weights_off_mask()
        torch.testing.assert_close(layer(x), expected)
        assert fused.calls == 2


def test_rigl_on_a_small_transformer_keeps_the_density_and_zeros_off_the_masks(generator):
    torch.manual_seed(0)
    model = nn.Sequential(_encoder(layers=1), nn.Flatten(), nn.Linear(5 * 16, 3))
    sparsekern.sparsify(model, 0.3, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    algorithm = sparsekern.RigL(model, optimizer, update_every=2, total_steps=20)
    layers = sparse_modules(model)
    assert [name for name, _ in layers][:2] == ["0.layers.0.self_attn.in_proj", "0.layers.0.self_attn.out_proj"]
    counts = [module.nnz for _, module in layers]
    first_masks = [module.mask.clone() for _, module in layers]
    x, y = torch.randn(64, 5, 16, generator=generator), torch.randint(3, (64,), generator=generator)
    for step in range(6):
        rows = torch.randint(64, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        algorithm.step()
        optimizer.step()
        assert [module.nnz for _, module in layers] == counts
        for name, module in layers:
            assert not module.weight[~module.mask].any(), name
            assert not module.weight.grad[~module.mask].any(), name
    moved = [not torch.equal(module.mask, first) for (_, module), first in zip(layers, first_masks)]
    assert moved[0] and moved[1]   # the attention projections' masks were updated too


@pytest.mark.parametrize("zero_off_mask", [True, False])
def test_cpu_autocast_bfloat16(zero_off_mask, generator):
    config, call = CONFIGS["masks"]
    dense = _dense(config, generator).float()
    sparse = _sparse(dense, generator, zero_off_mask)
    reference = _masked_dense(dense, sparse)
    query, key, value = (x.detach().float() for x in _inputs(sparse, call, generator))
    arguments = {name: value.float() if value.is_floating_point() else value
                 for name, value in _call_arguments(call, generator).items()}
    outputs = []
    for attention in (sparse, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output, weights = attention(query, key, value, **arguments)
        output.float().square().sum().backward()
        outputs.append(output)
    assert outputs[0].dtype == outputs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outputs[0], outputs[1])
    for projection, dense_weight in ((sparse.in_proj, reference.in_proj_weight),
                                     (sparse.out_proj, reference.out_proj.weight)):
        assert projection.weight.grad.dtype == torch.float32
        torch.testing.assert_close(projection.weight.grad, torch.where(projection.mask, dense_weight.grad, 0.0))


@pytest.mark.parametrize("name", ["default", "kdim_vdim", "bias_kv_zero_attn", "no_bias"])
def test_from_dense_to_dense_and_state_dict_round_trips(name, generator):
    config, call = CONFIGS[name]
    dense = _dense(config, generator)
    sparse = SparseMultiheadAttention.from_dense(dense)
    own = ["in_proj_weight"] if dense._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    for attribute, projection in zip(own, sparse.input_projections()):   # shared, as SparseLinear.from_dense does
        assert projection.weight is getattr(dense, attribute) is getattr(sparse, attribute)
        assert projection.mask.all()
    assert sparse.out_proj.weight is dense.out_proj.weight and sparse.in_proj_bias is dense.in_proj_bias
    assert sparse.bias_k is dense.bias_k and sparse.batch_first == dense.batch_first
    inputs = [x.detach() for x in _inputs(sparse, call, generator)]
    for projection in (*sparse.input_projections(), sparse.out_proj):
        projection.set_mask(torch.rand(projection.weight.shape, generator=generator) < 0.5)

    plain = sparse.to_dense()
    assert type(plain) is nn.MultiheadAttention and type(plain.out_proj) is type(dense.out_proj)
    for attribute, projection in zip(own, sparse.input_projections()):
        assert torch.equal(getattr(plain, attribute), projection.masked_weight())
        assert getattr(plain, attribute) is not projection.weight
    torch.testing.assert_close(plain(*inputs), sparse(*inputs))

    # a plain nn.MultiheadAttention state dict loads (masks all True), and the sparse one round-trips
    fresh = SparseMultiheadAttention(E, HEADS, dtype=torch.float64, **config)
    fresh.load_state_dict(plain.state_dict())
    assert all(module.mask.all() for _, module in sparse_modules(fresh))
    torch.testing.assert_close(fresh(*inputs), plain(*inputs))
    again = SparseMultiheadAttention(E, HEADS, dtype=torch.float64, **config)
    again.load_state_dict(sparse.state_dict())
    for (_, loaded), (_, saved) in zip(sparse_modules(again), sparse_modules(sparse)):
        assert torch.equal(loaded.mask, saved.mask) and torch.equal(loaded.weight, saved.weight)
        assert loaded.zero_off_mask
    torch.testing.assert_close(again(*inputs), sparse(*inputs))
    other_bias = {**config, "bias": not config.get("bias", True)}
    with pytest.raises(RuntimeError, match="in_proj_bias|bias_k|Missing key"):
        SparseMultiheadAttention(E, HEADS, dtype=torch.float64, **other_bias).load_state_dict(sparse.state_dict())


def test_a_sparsified_transformer_round_trips_through_a_checkpoint(tmp_path, generator):
    model = sparsekern.sparsify(_encoder(), 0.3, generator=generator)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    other = sparsekern.sparsify(_encoder(seed=1), 0.3, generator=torch.Generator().manual_seed(5))
    other.load_state_dict(torch.load(path))
    for (_, loaded), (_, saved) in zip(sparse_modules(other), sparse_modules(model)):
        assert torch.equal(loaded.mask, saved.mask) and torch.equal(loaded.weight, saved.weight)
    x = torch.randn(2, 5, 16, generator=generator)
    torch.testing.assert_close(other(x), model(x))


@pytest.mark.parametrize("arguments, error, message", [
    (dict(embed_dim=0, num_heads=2), ValueError, "embed_dim must be >= 1, got 0"),
    (dict(embed_dim=8.0, num_heads=2), TypeError, "embed_dim must be an integer, got float"),
    (dict(embed_dim=8, num_heads=0), ValueError, "num_heads must be >= 1"),
    (dict(embed_dim=8, num_heads=3), ValueError, r"embed_dim \(8\) must be divisible by num_heads \(3\)"),
    (dict(embed_dim=8, num_heads=2, kdim=-1), ValueError, "kdim must be >= 1"),
    (dict(embed_dim=8, num_heads=2, vdim=True), TypeError, "vdim must be an integer, got bool"),
    (dict(embed_dim=8, num_heads=2, dropout=1.5), ValueError, r"dropout must be a finite number in \[0, 1\]"),
    (dict(embed_dim=8, num_heads=2, dropout=float("nan")), ValueError, "dropout must be a finite number in"),
    (dict(embed_dim=8, num_heads=2, dropout="0.1"), TypeError, "dropout must be a number, got str"),
    (dict(embed_dim=8, num_heads=2, bias="yes"), TypeError, "bias must be a bool"),
    (dict(embed_dim=8, num_heads=2, batch_first=1), TypeError, "batch_first must be a bool"),
])
def test_bad_arguments_get_clear_errors(arguments, error, message):
    with pytest.raises(error, match=message):
        SparseMultiheadAttention(**arguments)


def test_from_dense_refuses_what_it_cannot_hold():
    with pytest.raises(TypeError, match="from_dense takes an nn.MultiheadAttention, got Linear"):
        SparseMultiheadAttention.from_dense(nn.Linear(4, 4))

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight
    attention = nn.MultiheadAttention(4, 2)
    torch.nn.utils.parametrize.register_parametrization(attention, "in_proj_weight", Doubled())
    with pytest.raises(TypeError, match="projection weights are Parameters"):
        SparseMultiheadAttention.from_dense(attention)
    model = nn.Sequential(attention, nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=r"0 \(MultiheadAttention\) stays dense: a projection weight is computed"):
        sparsekern.sparsify(model, 0.5)
    assert model[0] is attention and isinstance(model[1], SparseLinear)


@pytest.mark.parametrize("owner, name", [("", "in_proj_bias"), ("", "bias_k"), ("out_proj.", "bias")])
def test_an_attention_with_a_computed_bias_is_refused_by_from_dense_and_left_dense_by_sparsify(owner, name):
    # from_dense checked only the projection weights, and failed on assigning prune's plain tensor in_proj_bias
    attention = nn.MultiheadAttention(4, 2, add_bias_kv=True)
    prune.random_unstructured(attention.get_submodule(owner.rstrip(".")), name, 0.5)
    with pytest.raises(TypeError, match=f"from_dense takes an nn.MultiheadAttention whose {owner}{name} is a "):
        SparseMultiheadAttention.from_dense(attention)
    model = nn.Sequential(attention, nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=fr"^0 \(MultiheadAttention\) stays dense: {owner}{name} is computed"):
        sparsekern.sparsify(model, 0.5)
    assert model[0] is attention and isinstance(model[1], SparseLinear)


@pytest.mark.parametrize("name", ["default", "kdim_vdim"])
def test_an_attention_pruned_by_torch_loads_its_masks_and_pruned_weights(name, generator):
    # torch.nn.utils.prune saves a pruned in_proj_weight as in_proj_weight_orig and in_proj_weight_mask
    config, _ = CONFIGS[name]
    dense = _dense(config, generator)
    own = ["in_proj_weight"] if dense._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    for attribute in own:
        prune.random_unstructured(dense, attribute, 0.5)
    prune.random_unstructured(dense.out_proj, "weight", 0.5)
    sparse = SparseMultiheadAttention(E, HEADS, dtype=torch.float64, **config)
    sparse.load_state_dict(dense.state_dict())
    for attribute, projection in zip(own, sparse.input_projections()):
        assert torch.equal(projection.mask, getattr(dense, f"{attribute}_mask").bool())
        assert torch.equal(projection.weight, getattr(dense, attribute)) and projection.zero_off_mask
    assert torch.equal(sparse.out_proj.mask, dense.out_proj.weight_mask.bool())
    inputs = [x.detach() for x in _inputs(sparse, {}, generator)]
    torch.testing.assert_close(sparse(*inputs), dense(*inputs))


def test_an_attention_whose_biases_torch_pruned_loads_the_pruned_values(generator):
    # prune saves a pruned in_proj_bias, bias_k or bias_v of the attention itself as <name>_orig and <name>_mask
    dense = _dense(dict(add_bias_kv=True), generator)
    for name in ("in_proj_bias", "bias_k", "bias_v"):
        prune.random_unstructured(dense, name, 0.5)
    prune.random_unstructured(dense.out_proj, "bias", 0.5)
    sparse = SparseMultiheadAttention(E, HEADS, dtype=torch.float64, add_bias_kv=True)
    sparse.load_state_dict(dense.state_dict())
    for name in ("in_proj_bias", "bias_k", "bias_v"):
        assert isinstance(getattr(sparse, name), nn.Parameter)
        assert torch.equal(getattr(sparse, name), getattr(dense, name))
    assert torch.equal(sparse.out_proj.bias, dense.out_proj.bias)
    inputs = [x.detach() for x in _inputs(sparse, {}, generator)]
    torch.testing.assert_close(sparse(*inputs), dense(*inputs))


def test_a_pruned_bias_whose_mask_is_not_0_or_1_changes_nothing(generator):
    dense = _dense({}, generator)
    prune.random_unstructured(dense, "in_proj_bias", 0.5)
    state = dense.state_dict()
    state["in_proj_bias_mask"] = torch.full_like(state["in_proj_bias_mask"], 0.5)
    sparse = SparseMultiheadAttention(E, HEADS, dtype=torch.float64)
    before = copy.deepcopy(sparse.state_dict())
    with pytest.raises(ValueError, match="'in_proj_bias_mask'"):
        sparse.load_state_dict(state)
    assert all(torch.equal(value, sparse.state_dict()[key]) for key, value in before.items())


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
@pytest.mark.parametrize("apply", [lambda layer: prune.l1_unstructured(layer, "weight", 0.5),
                                   lambda layer: torch.nn.utils.weight_norm(layer)], ids=["prune", "weight_norm"])
def test_a_projection_weight_computed_by_a_forward_pre_hook_is_refused_by_name(apply):
    # The attention multiplies by its projections' weights without running their forwards, so the hook never
    # recomputed the weight: the second training step failed in autograd ("Trying to backward through the graph a
    # second time"), and evaluation multiplied by the weight of the hook's registration.
    attention = SparseMultiheadAttention(8, 2)
    apply(attention.out_proj)
    x = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="^out_proj's weight is computed by a forward pre-hook"):
        attention(x, x, x)


def test_a_parametrized_projection_weight_is_computed_at_every_forward(generator):
    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    attention = _sparse(_dense({}, generator), generator)
    x = torch.randn(3, 2, E, dtype=torch.float64, generator=generator)
    want = attention(x, x, x)[0]
    torch.nn.utils.parametrize.register_parametrization(attention.in_proj, "weight", Doubled())
    with torch.no_grad():
        attention.in_proj.parametrizations.weight.original.mul_(0.5)
    torch.testing.assert_close(attention(x, x, x)[0], want)


@pytest.mark.parametrize("kdim", [None, 3], ids=["in_proj", "q_k_v_proj"])
def test_a_projection_assigned_or_deleted_is_what_the_next_forward_reads(kdim, generator):
    # Forward reads its projections from nn.Module's dict of children at every call, keeping nothing between
    # calls: one assigned in place of another is multiplied by at once, and one deleted raises as an attribute
    # read of it would.
    attention = SparseMultiheadAttention(E, HEADS, kdim=kdim, vdim=kdim, dtype=torch.float64)
    x = torch.randn(3, 2, E, dtype=torch.float64, generator=generator)
    kv = torch.randn(4, 2, kdim or E, dtype=torch.float64, generator=generator)
    attention(x, kv, kv)
    out_proj = SparseLinear(E, E, dtype=torch.float64)
    attention.out_proj = out_proj
    assert attention.named_projections()[-1] == ("out_proj", out_proj)
    dense = attention.to_dense()
    torch.testing.assert_close(attention(x, kv, kv)[0], dense(x, kv, kv)[0])
    name = "in_proj" if kdim is None else "k_proj"
    delattr(attention, name)
    with pytest.raises(AttributeError, match=name):
        attention(x, kv, kv)


def test_an_encoder_given_a_padding_mask_in_eval_mode_runs_layers_kept_off_their_fused_kernel(generator):
    # nn.TransformerEncoder (enable_nested_tensor) hands its layers a nested tensor in eval mode with a
    # src_key_padding_mask; a layer whose sparse layers hold values off their masks keeps off its fused kernel
    # and calls its attention with that nested tensor, which nn.MultiheadAttention takes (its fast path).
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2)
    sparsekern.sparsify(model, 0.3, generator=generator)
    model.eval()
    with torch.no_grad():
        for _, module in sparse_modules(model):
            module.weight.masked_fill_(~module.mask, 5.0)
            module.zero_off_mask = False
        x = torch.randn(2, 5, 16, generator=generator)
        padding = torch.zeros(2, 5, dtype=torch.bool)
        padding[0, 3:] = True
        expected = _densified(model)(x, src_key_padding_mask=padding)
        torch.testing.assert_close(model(x, src_key_padding_mask=padding), expected)


def test_a_nested_input_is_refused_where_nn_multihead_attention_refuses_it():
    attention = SparseMultiheadAttention(8, 2, batch_first=True)
    query = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(2, 8)])
    with pytest.raises(ValueError, match="query is a NestedTensor"):
        attention(query, query, query)   # in training mode


@pytest.mark.parametrize("kdim", [None, 6], ids=["in_proj", "q_k_v_proj"])
def test_reset_parameters_keeps_the_projections_masks_and_promises(kdim, generator):
    # nn.MultiheadAttention's _reset_parameters (which initialisation code calls) drew every input-projection weight
    # anew, off the masks too, under the promise.
    attention = sparsekern.sparsify(nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim), 0.3, generator=generator)
    masks = {name: layer.mask.clone() for name, layer in sparse_modules(attention)}
    attention._reset_parameters()
    for name, layer in sparse_modules(attention):
        assert torch.equal(layer.mask, masks[name]) and layer.zero_off_mask, name
        layer.verify_zero_off_mask()
