"""The loops that IMP's, SWAMP's and OptG's docstrings show (README.md sends readers to them) run as written, given
only what their placeholders stand for: a model, a loss, data and the counts they name."""
import inspect
import textwrap

import pytest
import torch

import sparsekern as sk
from sparsekern.nn import sparse_modules

from ..helpers import batch, mlp

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, CYCLES, EPOCHS = 6, 3, 3


def documented_loop(algorithm: type) -> str:
    """The first code block (indented, after a blank line) of the paragraph of `algorithm`'s docstring that starts
    with "Loop"."""
    lines = inspect.getdoc(algorithm).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Loop"))
    first = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("    ") and not lines[i - 1].strip())
    end = next((i for i in range(first, len(lines)) if lines[i].strip() and not lines[i].startswith("    ")),
               len(lines))
    return textwrap.dedent("\n".join(lines[first:end])).rstrip()


def _data(seed: int = 0, rows: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 64, generator=g), torch.randint(0, 10, (rows,), generator=g)


def _density(model) -> float:
    layers = [layer for _, layer in sparse_modules(model)]
    return sum(int(layer.mask.sum()) for layer in layers) / sum(layer.mask.numel() for layer in layers)


def _run(algorithm: type, namespace: dict) -> dict:
    code = documented_loop(algorithm)
    exec(compile(code, f"{algorithm.__name__}'s docstring", "exec"), namespace)
    return namespace


def test_the_documented_imp_loop_prunes_once_between_cycles():
    x, y = _data()
    model = mlp(0)
    namespace = _run(sk.IMP, {"IMP": sk.IMP, "torch": torch, "model": model, "k": 2, "cycles": CYCLES,
                              "steps": STEPS, "loss_fn": torch.nn.functional.cross_entropy,
                              "x": x.view(STEPS, -1, 64), "y": y.view(STEPS, -1)})
    imp = namespace["imp"]
    assert imp.cycle == CYCLES - 1 and imp.step_in_cycle == STEPS
    assert _density(model) == pytest.approx(0.8 ** (CYCLES - 1), abs=0.01)   # prune_fraction 0.2, twice


def test_the_documented_swamp_loop_trains_every_particle_and_evaluates_each_cycle():
    x, y = _data()
    model = mlp(0)
    swamp = sk.SWAMP(model, lambda params: torch.optim.SGD(params, lr=0.05), particles=2, rewind_step=1,
                     swa_start=3)
    evaluated = []
    _run(sk.SWAMP, {"swamp": swamp, "model": model, "steps": STEPS, "cycles": CYCLES,
                    "batch": lambda data_seed, t: batch(x, y, data_seed, t, 8),
                    "loss_fn": torch.nn.functional.cross_entropy, "evaluate": lambda m: evaluated.append(_density(m))})
    assert swamp.cycle == CYCLES - 1
    assert evaluated == pytest.approx([0.8 ** cycle for cycle in range(CYCLES)], abs=0.01)


def test_the_documented_optg_loop_ends_at_its_density_with_the_weights_lr_on_the_schedule():
    x, y = _data()
    model = mlp(0)
    namespace = _run(sk.OptG, {"OptG": sk.OptG, "torch": torch, "model": model, "E": EPOCHS,
                               "loss_fn": torch.nn.functional.cross_entropy,
                               "loader": list(zip(x.split(8), y.split(8)))})
    optg, optimizer = namespace["optg"], namespace["optimizer"]
    assert optg.epoch == EPOCHS and _density(model) == pytest.approx(0.1, abs=0.01)
    assert optimizer.param_groups[0]["lr"] == optg.lr_schedule(EPOCHS - 1)


def test_documented_loop_takes_the_loops_block_only():
    class Documented:
        """Summary.

        Loop: call this.

            first()
                nested()

        Then prose.

            other()
        """

    assert documented_loop(Documented) == "first()\n    nested()"
