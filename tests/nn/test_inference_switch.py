"""sk.nn.to_inference / to_training: SparseLinear's inference mode switched for a whole model."""
import pytest
import torch
from torch import nn

import sparsekern as sk
from sparsekern.nn import SparseLinear

# The SparseLinear layers of `Mixed` that run their own forward, which to_inference switches (not the attention's
# in_proj/out_proj, nor the LSTM's ih_l0/hh_l0).
OWN_FORWARD = ["embed", "head"]


class Mixed(nn.Module):
    """A convolution, a linear layer, self-attention, an LSTM and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.embed = nn.Linear(8, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.lstm = nn.LSTM(16, 12, batch_first=True)
        self.head = nn.Linear(12, 5)

    def forward(self, x):                     # x: (batch, 3, length)
        h = self.embed(torch.relu(self.conv(x)).transpose(1, 2))
        h = h + self.attention(h, h, h, need_weights=False)[0]
        return self.head(self.lstm(h)[0])


def sparse_mixed(generator, dtype=torch.float32):
    model = Mixed().to(dtype)
    sk.sparsify(model, density=0.3, generator=generator)
    return model.eval()


def test_switches_the_own_forward_layers_with_the_same_outputs_and_state_dict(generator):
    model = sparse_mixed(generator)
    x = torch.randn(4, 3, 6, generator=generator)
    with torch.no_grad():
        expected = model(x)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    assert sk.nn.to_inference(model) == OWN_FORWARD
    assert [name for name, layer in sk.nn.sparse_modules(model)
            if isinstance(layer, SparseLinear) and layer.packed is not None] == OWN_FORWARD
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert state.keys() == model.state_dict().keys()
    assert all(value.equal(model.state_dict()[key]) for key, value in state.items())
    assert sk.nn.to_training(model) == OWN_FORWARD
    assert all(layer.packed is None for _, layer in sk.nn.sparse_modules(model) if isinstance(layer, SparseLinear))
    assert model(x).requires_grad   # back on masked_linear, with autograd
    assert sk.nn.to_training(model) == []   # nothing left to undo, and no warning (pytest turns warnings to errors)


def test_a_switched_layer_gives_no_gradient(generator):
    model = sparse_mixed(generator).train()
    sk.nn.to_inference(model)
    x = torch.randn(4, 3, 6, generator=generator, requires_grad=True)
    output = model(x)
    assert not output.requires_grad   # the head is switched: nothing to differentiate
    with pytest.raises(RuntimeError, match="does not require grad"):
        output.sum().backward()
    # Below a layer still training, a switched one passes no gradient to its weight or its input.
    h = model.embed(torch.randn(4, 6, 8, generator=generator, requires_grad=True))
    model.attention(h, h, h)[0].sum().backward()
    assert model.embed.weight.grad is None and model.attention.in_proj.weight.grad is not None


def test_a_layer_switched_again_is_packed_anew(generator):
    model = nn.Sequential(SparseLinear(10, 6))
    sk.nn.to_inference(model)
    mask = torch.rand(6, 10, generator=generator) < 0.5
    model[0].set_mask(mask)
    assert sk.nn.to_inference(model) == ["0"]
    assert model[0].packed.values.numel() == int(mask.sum())


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float16, 1e-2)])
def test_the_packs_follow_a_dtype_conversion(generator, dtype, tolerance):
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))
    sk.sparsify(model, density=0.3, generator=generator)
    sk.nn.to_inference(model)
    model.to(dtype)
    x = torch.randn(3, 20, generator=generator).to(dtype)
    with torch.no_grad():
        switched = model(x)
        sk.nn.to_training(model)
        torch.testing.assert_close(switched, model(x), atol=tolerance, rtol=tolerance)
    assert switched.dtype == dtype


@pytest.mark.parametrize("projection", ["attention.in_proj", "attention.out_proj", "lstm.hh_l0"])
def test_a_projection_in_inference_mode_is_refused_by_its_parent(generator, projection):
    # Its parent multiplies by its weight without running it: the pack went unread, silently.
    model = sparse_mixed(generator)
    model.get_submodule(projection).to_inference()
    with pytest.raises(ValueError, match=rf"{projection.split('.')[1]} is in inference mode"), torch.no_grad():
        model(torch.randn(2, 3, 6, generator=generator))
    assert sk.nn.to_training(model) == [projection]
    with torch.no_grad():
        model(torch.randn(2, 3, 6, generator=generator))


def test_refuses_what_is_not_a_module():
    for switch in (sk.nn.to_inference, sk.nn.to_training):
        with pytest.raises(TypeError, match=f"{switch.__name__}: model must be an nn.Module, got list"):
            switch([SparseLinear(3, 3)])


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(3, 3)), sk.nn.SparseMultiheadAttention(4, 2),
                                   sk.nn.SparseLSTM(3, 4)], ids=["dense", "attention", "lstm"])
def test_a_model_with_nothing_to_switch_warns_and_returns_nothing(model):
    with pytest.warns(UserWarning, match="no SparseLinear that runs its own forward"):
        assert sk.nn.to_inference(model) == []
    assert all(layer.packed is None for _, layer in sk.nn.sparse_modules(model))


def test_a_layer_on_the_meta_device_is_refused_before_any_switches():
    model = nn.Sequential(SparseLinear(4, 4), SparseLinear(4, 4, device="meta"))
    with pytest.raises(ValueError, match=r"to_inference: the weights of layers \['1'\] are on the meta device"):
        sk.nn.to_inference(model)
    assert model[0].packed is None


def test_a_model_in_distributed_data_parallel_is_refused(one_rank):
    model = nn.Sequential(SparseLinear(4, 4))
    ddp = nn.parallel.DistributedDataParallel(model)
    with pytest.raises(ValueError, match=r"DistributedDataParallel, which trains it.*copy.deepcopy\(model.module\)"):
        sk.nn.to_inference(ddp)
    assert model[0].packed is None
    assert sk.nn.to_inference(ddp.module) == ["0"]


def test_a_compiled_model_switches_under_its_wrapper_name(generator, fresh_compiler):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    sk.sparsify(model, density=0.5, generator=generator)
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 8, generator=generator)
    with torch.no_grad():
        expected = compiled(x)
        assert sk.nn.to_inference(compiled) == ["_orig_mod.0", "_orig_mod.2"]
        torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)
    assert model[0].packed is not None   # the same layers, unwrapped


def test_a_sharded_model_is_refused_for_what_packing_needs(generator, one_rank):
    """The refusal spoke of masks ("masks are chosen over whole weights") and told to wrap the model in
    DistributedDataParallel, which to_inference refuses too."""
    fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard
    model = sk.sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), 0.5, generator=generator)
    fully_shard(model)
    packing = r"inference mode packs each layer's whole masked weight, which a sharded rank does not hold"
    with pytest.raises(ValueError, match=r"^to_inference: model is sharded across ranks \(module '0' holds DTensor "
                                         rf"parameters .*\); {packing}: switch an unsharded copy") as err:
        sk.nn.to_inference(model)
    assert "DistributedDataParallel" not in str(err.value)
    assert all(layer.packed is None for layer in (model[0], model[2]))
