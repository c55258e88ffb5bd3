"""Sparse layers under torch.autocast give what nn.Linear / nn.Conv1d/2d/3d / nn.ConvTranspose2d give, and a
DST loop under torch.amp.GradScaler leaves the masks alone on the steps the scaler skips."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern.nn import SparseConv1d, SparseConv2d, SparseConv3d, SparseConvTranspose2d, SparseLinear, sparse_modules

LAYERS = {
    "linear": (lambda: nn.Linear(24, 16), (2, 5, 24)),
    "conv1d": (lambda: nn.Conv1d(4, 8, 3, padding=1), (2, 4, 7)),
    "conv2d": (lambda: nn.Conv2d(4, 8, 3, padding=1), (2, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(4, 8, 3, padding=1), (2, 4, 5, 4, 3)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 8, 3, stride=2, padding=1), (2, 4, 5, 6)),
}
SPARSE_OF = {nn.Linear: SparseLinear, nn.Conv1d: SparseConv1d, nn.Conv2d: SparseConv2d, nn.Conv3d: SparseConv3d,
             nn.ConvTranspose2d: SparseConvTranspose2d}
CUDA_DTYPES = [torch.float16, torch.bfloat16]


def sparse_and_dense(make, generator, zero_off_mask, device):
    """(sparse module, nn module with the masked weight): copies of one layer, on `device`."""
    dense = make().to(device)
    sparse = SPARSE_OF[type(dense)].from_dense(copy.deepcopy(dense))
    sparse.set_mask((torch.rand(sparse.weight.shape, generator=generator) < 0.4).to(device))
    if not zero_off_mask:  # values off the mask that the masked path must ignore
        with torch.no_grad():
            sparse.weight.masked_fill_(~sparse.mask, 3.0)
        sparse.zero_off_mask = False
    with torch.no_grad():
        dense.weight.copy_(torch.where(sparse.mask, sparse.weight, 0.0))
    return sparse, dense


def check_autocast(layer_name, zero_off_mask, device_type, dtype, generator):
    make, shape = LAYERS[layer_name]
    sparse, dense = sparse_and_dense(make, generator, zero_off_mask, device_type)
    x = torch.randn(shape, generator=generator).to(device_type)
    outputs = []
    for module in (sparse, dense):
        with torch.autocast(device_type, dtype=dtype):
            y = module(x)
        y.float().square().sum().backward()
        outputs.append(y)
    assert outputs[0].dtype == outputs[1].dtype == dtype
    torch.testing.assert_close(outputs[0], outputs[1])
    assert sparse.weight.grad.dtype == torch.float32
    torch.testing.assert_close(sparse.weight.grad, torch.where(sparse.mask, dense.weight.grad, 0.0))
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad)


@pytest.mark.parametrize("layer_name", LAYERS)
@pytest.mark.parametrize("zero_off_mask", [True, False])
def test_cpu_autocast_bfloat16(layer_name, zero_off_mask, generator):
    # SparseLinear raised "weight has dtype torch.float32 but x has torch.bfloat16".
    check_autocast(layer_name, zero_off_mask, "cpu", torch.bfloat16, generator)


@pytest.mark.gpu
@pytest.mark.parametrize("layer_name", LAYERS)
@pytest.mark.parametrize("zero_off_mask", [True, False])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_autocast(layer_name, zero_off_mask, dtype, generator):
    check_autocast(layer_name, zero_off_mask, "cuda", dtype, generator)


def mlp():
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def train_with_grad_scaler(device_type, dtype, generator, poisoned_step, host_checks=True):
    """A RigL loop (update every 2 steps) under autocast and GradScaler whose `poisoned_step` sees an
    inf input. Returns, per step, (whether DST updated, masks changed, weights changed)."""
    torch.manual_seed(0)
    model = sparsekern.sparsify(mlp(), 0.3, generator=torch.Generator().manual_seed(1)).to(device_type)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.RigL(model, optimizer, update_every=2, total_steps=100, drop_fraction=0.5,
                           host_checks=host_checks)
    scaler = torch.amp.GradScaler(device_type)
    history = []
    for step in range(1, 7):
        x = torch.randn(16, 20, generator=generator).to(device_type)
        if step == poisoned_step:
            x[0, 0] = float("inf")
        y = torch.randint(0, 5, (16,), generator=generator).to(device_type)
        masks = [m.mask.clone() for _, m in sparse_modules(model)]
        weights = [m.weight.detach().clone() for _, m in sparse_modules(model)]
        with torch.autocast(device_type, dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        updated = algo.step()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        modules = [m for _, m in sparse_modules(model)]
        history.append((updated, any(not torch.equal(m.mask, old) for m, old in zip(modules, masks)),
                        any(not torch.equal(m.weight, old) for m, old in zip(modules, weights))))
        for module in modules:
            assert module.zero_off_mask and not module.weight[~module.mask].any()
    return history


def test_dst_does_not_update_masks_on_a_step_the_grad_scaler_skips(generator):
    # Before: DST updated the masks on the inf step (the scaler skipped only the optimizer step).
    history = train_with_grad_scaler("cpu", torch.bfloat16, generator, poisoned_step=4)
    assert history[3] == (False, False, False)  # step 4: an update step, skipped by both
    assert history[1][:2] == (True, True) and history[5][:2] == (True, True)  # steps 2 and 6 update


def test_dst_without_host_checks_trusts_the_gradients(generator):
    # host_checks=False reads nothing back: the update of the inf step runs (the scaler still skips
    # its optimizer step), and the weights stay 0 off the new masks.
    history = train_with_grad_scaler("cpu", torch.bfloat16, generator, poisoned_step=4, host_checks=False)
    assert history[3][:2] == (True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_dst_does_not_update_masks_on_a_step_the_grad_scaler_skips(dtype, generator):
    history = train_with_grad_scaler("cuda", dtype, generator, poisoned_step=4)
    assert history[3] == (False, False, False)
    assert history[1][:2] == (True, True) and history[5][:2] == (True, True)


def mest_masks_after_one_update(generator, scale: float | None, unscale: bool):
    """MEST's masks after one update of an MLP, its gradients scaled by `scale` (a GradScaler's
    factor), unscaled before DST.step() or not."""
    torch.manual_seed(0)
    model = sparsekern.sparsify(mlp(), 0.3, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.MEST(model, optimizer, update_every=1, total_steps=10, drop_fraction=0.5)
    x, y = torch.randn(16, 20, generator=generator), torch.randint(0, 5, (16,), generator=generator)
    loss = F.cross_entropy(model(x), y)
    if scale is None:
        loss.backward()
    else:
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        scaler.scale(loss).backward()
        if unscale:
            scaler.unscale_(optimizer)
    assert algo.step()
    return [m.mask.clone() for _, m in sparse_modules(model)]


def test_mest_under_a_grad_scaler_needs_the_gradients_unscaled_first():
    plain = mest_masks_after_one_update(torch.Generator().manual_seed(3), None, False)
    unscaled = mest_masks_after_one_update(torch.Generator().manual_seed(3), 2.0 ** 16, True)
    scaled = mest_masks_after_one_update(torch.Generator().manual_seed(3), 2.0 ** 16, False)
    assert all(torch.equal(a, b) for a, b in zip(plain, unscaled))   # what the docstring asks for
    assert not all(torch.equal(a, b) for a, b in zip(plain, scaled))  # why it asks
