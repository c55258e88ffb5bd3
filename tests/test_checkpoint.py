import os

import pytest
import torch

from sparsekern import checkpoint


def test_round_trip_is_exact(tmp_path, generator):
    state = {"mask": torch.rand(7, 5, generator=generator) < 0.3, "step": 12,
             "weights": [torch.randn(3, generator=generator, dtype=torch.bfloat16)]}
    checkpoint.save(state, tmp_path / "ckpt.pt")
    loaded = checkpoint.load(tmp_path / "ckpt.pt")
    assert loaded["step"] == 12
    assert torch.equal(loaded["mask"], state["mask"])
    assert torch.equal(loaded["weights"][0], state["weights"][0])


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        checkpoint.save({"step": 2, "bad": Unpicklable()}, path)
    assert checkpoint.load(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]
