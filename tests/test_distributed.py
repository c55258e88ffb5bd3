"""Masks stay identical across ranks under DDP (gloo, CPU, 2 processes via torch.distributed.run)."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_ddp_rigl_and_set_keep_masks_identical_on_two_ranks(tmp_path):
    environment = dict(os.environ, OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "distributed_worker.py"), str(tmp_path)]
    finished = subprocess.run(command, env=environment, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for algorithm in ("RigL", "SET"):
        first, second = ranks[0]["results"][algorithm], ranks[1]["results"][algorithm]
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name][0], second[name][0]), (algorithm, name)
            assert torch.equal(first[name][1], second[name][1]), (algorithm, name)
    assert all(rank["disagreed"] and rank["repaired"] for rank in ranks)
