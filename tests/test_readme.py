"""README.md stays runnable: its Python blocks run as written, each given only the tensors its
placeholders stand for (`x, y = ...`, the ops' `weight`, `mask`, ...), and every command-line option it names is
one of a sparsekern command's."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
BATCH_PLACEHOLDER = "x, y = ..."


def _block(first_line: str) -> str:
    found = [block for block in BLOCKS if block.splitlines()[0].startswith(first_line)]
    assert len(found) == 1, f"README.md has {len(found)} Python blocks starting {first_line!r}"
    return found[0]


def _ops_placeholders() -> dict:
    """The tensors the ops block names without making them: two layers' weights (zero off their masks, as
    every sparse layer's are), masks, scores, gradients and optimizer state."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(6, 8), (5, 4)]
    masks = [torch.rand(shape, generator=generator) < 0.5 for shape in shapes]
    weights = [torch.randn(shape, generator=generator) * mask for shape, mask in zip(shapes, masks)]
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    momenta = [torch.randn(shape, generator=generator) * mask for shape, mask in zip(shapes, masks)]
    weight, mask = weights[0].clone(), masks[0]
    return {"s1": torch.randn(shapes[0], generator=generator), "s2": torch.randn(shapes[1], generator=generator),
            "k": 20, "weight": weight, "mask": mask, "prune_score": weight.abs(), "grow_score": grads[0].abs(),
            "n": 3, "momentum": momenta[0].clone(), "weights": weights, "grads": grads, "n1": 3, "n2": 2,
            "m1": momenta[0], "m2": momenta[1], "g1": grads[0].clone(), "g2": grads[1].clone(),
            "x": torch.randn(3, 8, generator=generator), "bias": torch.randn(6, generator=generator)}


def test_the_python_api_block_runs(tmp_path, monkeypatch, one_thread, capsys):
    code = _block("import torch")
    assert code.count(BATCH_PLACEHOLDER) == 1
    code = code.replace(BATCH_PLACEHOLDER, "x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))")
    monkeypatch.chdir(tmp_path)   # it writes ckpt.pt
    namespace = {}
    exec(compile(code, f"{README}:python-api", "exec"), namespace)
    assert (tmp_path / "ckpt.pt").exists()
    assert "sparse weights" in capsys.readouterr().out   # sk.summary's table
    assert all(type(layer) in (torch.nn.Linear, torch.nn.ReLU) for layer in namespace["model"])   # densified


def test_the_ops_block_runs():
    import sparsekern as sk

    namespace = {"sk": sk, **_ops_placeholders()}
    exec(compile(_block("masks = sk.ops.topk_mask"), f"{README}:ops", "exec"), namespace)
    assert sum(int(mask.sum()) for mask in namespace["masks"]) == 20   # topk_mask's k
    assert isinstance(namespace["packed"], sk.ops.PackedWeight)
    assert namespace["y"].shape == (3, 6)


def test_the_criterion_block_runs(one_thread):
    namespace = {}
    exec(compile(_block("import sparsekern as sk"), f"{README}:criterion", "exec"), namespace)
    algo, model = namespace["algo"], namespace["model"]
    assert namespace["state"]["prune"] == "jittered_snip(0.2)" and algo.step_count == 300
    for layer in (model[0], model[2]):   # whole 1x4 blocks
        blocks = layer.mask.view(layer.mask.shape[0], -1, 4)
        assert torch.equal(blocks.all(-1), blocks.any(-1))


# Options of other tools in README's commands: pip's, torchrun's and pytest's.
OTHER_TOOLS_OPTIONS = {"--no-build-isolation", "--no-deps", "--no-index", "--standalone", "--nproc-per-node",
                       "--benchmark-enable"}


def test_every_option_the_readme_names_is_one_of_a_sparsekern_command(capsys):
    from sparsekern.cli.main import main

    known = set()
    for command in ("train", "compare", "reproduce", "bench"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        known |= set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", README.read_text())) - OTHER_TOOLS_OPTIONS
    assert named <= known, f"README.md names options no sparsekern command has: {sorted(named - known)}"
