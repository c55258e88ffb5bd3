import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates, so it must be set before any kernel
# module is imported; without a GPU the Triton backend then runs on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sparsekern import _backend  # noqa: E402  (after TRITON_INTERPRET)

BACKENDS = _backend.AUTO_ORDER


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend(name, op, device_type): route sparsekern.ops to one backend, or skip if it cannot run."""

    def use(name: str, op: str, device_type: str = "cpu") -> None:
        reason = _backend._reasons(op, device_type)[name]
        if reason is not None:
            pytest.skip(f"{name} backend for {op} on {device_type}: {reason}")
        monkeypatch.setenv(_backend.ENV_VAR, name)

    return use


@pytest.fixture
def generator(request):
    """A torch.Generator seeded from the test's id, so each case draws fresh but repeatable inputs."""
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
