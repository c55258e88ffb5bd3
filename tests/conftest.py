import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when @triton.jit decorates, so it must be set before any kernel
# module is imported; without a GPU the Triton backend then runs on CPU tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sparsekern.ops import _backend  # noqa: E402  (after TRITON_INTERPRET)


def _check_kernels_are_this_checkouts() -> None:
    """Stops the run when sparsekern comes from a checkout (a git worktree on PYTHONPATH, say) whose triton_kernels/
    is not the one loaded: an editable install maps sparsekern.triton_kernels to the installed checkout's folder by
    name, so the tests would check another tree's kernels, silently."""
    import pathlib

    import sparsekern
    import sparsekern.triton_kernels as kernels
    beside = pathlib.Path(sparsekern.__file__).resolve().parent.parent / "triton_kernels"
    loaded = pathlib.Path(kernels.__file__).resolve().parent
    if beside.is_dir() and beside != loaded:
        pytest.exit(f"sparsekern is imported from {beside.parent}, but sparsekern.triton_kernels from {loaded}: "
                    f"install this checkout (pip install --no-build-isolation --no-deps -e .) instead of putting it "
                    f"on PYTHONPATH", returncode=2)


_check_kernels_are_this_checkouts()


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


@pytest.fixture
def one_thread():
    """Runs a test on one intra-op thread: tiny models on 2 shared cores run ~10x faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_compiler():
    """Forgets what torch.compile compiled before: Dynamo allows 8 recompiles of one code object per
    process, and every compile test compiles the forward the sparse convolutions share anew (new
    shapes, groups, zero_off_mask), so a session of them would otherwise hit that limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def one_rank(tmp_path):
    """A gloo process group of this process alone."""
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'rendezvous'}")
    yield
    dist.destroy_process_group()
