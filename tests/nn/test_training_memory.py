"""A sparse training step allocates no more memory than the dense one, on the masked path and under OptG
too: no persistent dense gradient, no mask-sized temporary (the masks themselves, bool, are held between
steps), no fresh scores' gradient while the last one is held."""
import pytest
import torch

from sparsekern.bench.cases.training_step import DENSE, MASKED, OPTG, RIGL, STATIC, mlp, step_peaks, training_runs


def assert_sparse_steps_peak_at_most_dense(device: torch.device, width: int, monkeypatch) -> None:
    runs = training_runs(lambda: mlp(width), (64, width), device)
    peaks = step_peaks(runs, device)
    assert all(peaks[run] <= peaks[DENSE] for run in (STATIC, RIGL, MASKED, OPTG)), peaks
    # The measure sees a masked weight's temporaries: the reference op, forced, holds them in backward.
    monkeypatch.setenv("SPARSEKERN_BACKEND", "reference")
    assert step_peaks({MASKED: runs[MASKED]}, device)[MASKED] > peaks[DENSE], peaks


def test_cpu_sparse_step_peak_memory_is_the_dense_steps(monkeypatch):
    assert_sparse_steps_peak_at_most_dense(torch.device("cpu"), 256, monkeypatch)


@pytest.mark.gpu
def test_cuda_sparse_step_peak_memory_is_the_dense_steps(monkeypatch):
    assert_sparse_steps_peak_at_most_dense(torch.device("cuda"), 1024, monkeypatch)
