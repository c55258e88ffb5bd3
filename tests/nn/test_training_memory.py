"""A sparse training step allocates no more memory than the dense one: no persistent dense gradient,
no mask-sized temporary (the masks themselves, bool, are held between steps)."""
import pytest
import torch

import sparsekern
from sparsekern.bench.cases.training_step import learning_step, mlp, step_peak_bytes, training_step


def step_peaks(device: torch.device, width: int) -> dict[str, int]:
    """Peak bytes a step allocates above what it holds after zero_grad: dense, static sparse, sparse
    under RigL on a step that does not update, and static sparse on the masked path."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(64, width, generator=generator, device=device)
    y = torch.randint(0, 10, (64,), generator=generator, device=device)
    peaks = {}
    for name in ("dense", "static", "rigl", "masked path"):
        torch.manual_seed(0)
        model = mlp(width).to(device)
        if name != "dense":
            model = sparsekern.sparsify(model, 0.1, generator=torch.Generator().manual_seed(0))
        if name == "masked path":  # selects where(mask, W, 0) every step: mask-sized temporaries
            for _, module in sparsekern.nn.sparse_modules(model):
                module.zero_off_mask = False
        # SGD updates in place, so the step's peak is in backward, where a mask-sized temporary would show
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        algorithm = (sparsekern.RigL(model, optimizer, update_every=10 ** 9, total_steps=10 ** 10)
                     if name == "rigl" else None)
        step = training_step(model, optimizer, x, y, algorithm)
        step(), step()  # optimizer state and caches exist before the peak is measured
        optimizer.zero_grad()
        peaks[name] = step_peak_bytes(learning_step(model, optimizer, x, y, algorithm), device)
    return peaks


def test_cpu_sparse_step_peak_memory_is_the_dense_steps():
    peaks = step_peaks(torch.device("cpu"), 256)
    assert peaks["static"] <= peaks["dense"] and peaks["rigl"] <= peaks["dense"], peaks
    assert peaks["masked path"] > peaks["dense"], peaks  # the measure sees a masked weight


@pytest.mark.gpu
def test_cuda_sparse_step_peak_memory_is_the_dense_steps():
    peaks = step_peaks(torch.device("cuda"), 1024)
    assert peaks["static"] <= peaks["dense"] and peaks["rigl"] <= peaks["dense"], peaks
    assert peaks["masked path"] > peaks["dense"], peaks
