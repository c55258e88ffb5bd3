"""Masks stay identical across ranks under DDP (gloo, CPU, 2 processes via torch.distributed.run)."""
import pytest
import torch
import torch.distributed

from ..helpers import torchrun

gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                          reason="needs torch.distributed with gloo")


def rank_results(worker: str, tmp_path) -> list[dict]:
    """What each of the two ranks of `worker` (a module of tests.algorithms) saved, once both ended well."""
    finished = torchrun(f"tests.algorithms.{worker}", str(tmp_path))
    assert finished.returncode == 0, finished.stdout[-4000:] + finished.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


@gloo
def test_ddp_rigl_and_set_keep_masks_identical_on_two_ranks(tmp_path):
    ranks = rank_results("distributed_worker", tmp_path)
    for algorithm in ("RigL", "SET"):
        first, second = ranks[0]["results"][algorithm], ranks[1]["results"][algorithm]
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name][0], second[name][0]), (algorithm, name)
            assert torch.equal(first[name][1], second[name][1]), (algorithm, name)
    assert all(rank["disagreed"] and rank["repaired"] for rank in ranks)


@gloo
def test_per_rank_seeds_are_refused_and_diverged_replicas_are_detected(tmp_path):
    for rank, result in enumerate(rank_results("divergence_worker", tmp_path)):
        # ZeroRedundancyOptimizer: each rank holds the state of other weights than the other's, by design.
        assert result.pop("holds_a_share"), rank
        assert result == {"refused": True, "diverged_detected": True, "lopsided_refused": True, "repaired": True,
                          "stays_repaired": True, "zero_repaired": True}, \
            (rank, result)


@gloo
def test_masks_drawn_per_rank_and_sharded_models_are_refused_and_a_load_on_one_rank_is_repaired(tmp_path):
    for rank, result in enumerate(rank_results("replica_worker", tmp_path)):
        assert all(result["refused"].values()) and result["accepted_after_broadcast"], (rank, result)
        assert all(result["sharded"].values()), (rank, result["sharded"])
        assert result["load_on_rank_0_repaired"], rank
        assert result["built_by_objects_alone"], rank
        assert result["stages_built"], rank


def test_broadcast_masks_refuses_an_algorithm_whose_state_is_per_rank_before_any_collective():
    # No process group here: the refusal must come before the first collective. SWAMP's ranks hold
    # different particles, so loading rank 0's state everywhere would train particle 0 on every rank.
    import sparsekern
    from sparsekern.algorithms import distributed
    model = sparsekern.sparsify(torch.nn.Linear(4, 4), 1.0)
    swamp = sparsekern.SWAMP(model, lambda parameters: torch.optim.SGD(parameters, lr=0.1), particles=1)
    for algorithm in (swamp, object()):
        with pytest.raises(TypeError, match="algorithm must be a DST, IMP or OptG"):
            distributed.broadcast_masks(model, algorithm=algorithm)


@gloo
def test_a_call_that_fails_on_one_rank_fails_on_every_rank_and_changes_nothing(tmp_path):
    # Where one rank raised and the other went on into the next collective, the run hung (the timeout).
    for rank, result in enumerate(rank_results("agreement_worker", tmp_path)):
        assert all(result.values()), (rank, result)
