"""A sparse training step allocates no more memory than the dense one: no persistent dense gradient,
no mask-sized temporary (the masks themselves, bool, are held between steps)."""
import pytest
import torch

from sparsekern.bench.cases.training_step import DENSE, MASKED, RIGL, STATIC, mlp, step_peaks, training_runs


def assert_sparse_steps_peak_at_most_dense(device: torch.device, width: int) -> None:
    peaks = step_peaks(training_runs(lambda: mlp(width), (64, width), device), device)
    assert peaks[STATIC] <= peaks[DENSE] and peaks[RIGL] <= peaks[DENSE], peaks
    assert peaks[MASKED] > peaks[DENSE], peaks  # the measure sees a masked weight's temporaries


def test_cpu_sparse_step_peak_memory_is_the_dense_steps():
    assert_sparse_steps_peak_at_most_dense(torch.device("cpu"), 256)


@pytest.mark.gpu
def test_cuda_sparse_step_peak_memory_is_the_dense_steps():
    assert_sparse_steps_peak_at_most_dense(torch.device("cuda"), 1024)
