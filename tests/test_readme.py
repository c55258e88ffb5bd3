"""README.md stays runnable: its Python blocks run as written, each given only the tensors its
placeholders stand for (`x, y = ...`, the ops' `weight`, `mask`, ...), its set-up commands are two and the tests'
is the one CI runs, its command-line examples are accepted, and every command-line option it names is one of a
sparsekern command's."""
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
SHELL_BLOCKS = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
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


def _check_python_api(namespace: dict, tmp_path: Path, printed: str) -> None:
    assert (tmp_path / "ckpt.pt").exists()
    assert "sparse weights" in printed   # sk.summary's table
    assert all(type(layer) in (torch.nn.Linear, torch.nn.ReLU) for layer in namespace["model"])   # densified


def _check_ops(namespace: dict, tmp_path: Path, printed: str) -> None:
    import sparsekern as sk

    assert sum(int(mask.sum()) for mask in namespace["masks"]) == 20   # topk_mask's k
    assert isinstance(namespace["packed"], sk.ops.PackedWeight)
    assert namespace["y"].shape == (3, 6)


def _check_criterion(namespace: dict, tmp_path: Path, printed: str) -> None:
    algo, model = namespace["algo"], namespace["model"]
    assert namespace["state"]["prune"] == "jittered_snip(0.2)" and algo.step_count == 300
    for layer in (model[0], model[2]):   # whole 1x4 blocks
        blocks = layer.mask.view(layer.mask.shape[0], -1, 4)
        assert torch.equal(blocks.all(-1), blocks.any(-1))


def _check_threshold_rule(namespace: dict, tmp_path: Path, printed: str) -> None:
    for layer, (old, small) in zip(namespace["layers"], namespace["before"]):
        assert small.any() and not (old & ~small & ~layer.mask).any()   # it dropped some, and kept every other
        assert int(layer.mask.sum()) == int(old.sum())   # and grew as many
    assert namespace["algo"].state_dict()["prune_decides_count"] is True


def _check_schedule_function(namespace: dict, tmp_path: Path, printed: str) -> None:
    algo, step_decay = namespace["algo"], namespace["step_decay"]
    assert algo.schedule.function is step_decay and algo.step_count == 300
    assert [step for step in range(301) if algo.schedule.is_update(step)] == [50, 100, 150, 200, 250]
    assert namespace["state"]["schedule"] == {"name": "function", "update_every": 50, "end_step": 270,
                                              "total_steps": 300, "drop_fraction": None, "final_drop_fraction": None}


def _train_a_run(tmp_path: Path) -> None:
    """The checkpoint the block that reads a command-line run loads: a CNN, as the block says."""
    from sparsekern.cli.main import main

    main(["train", "--model", "cnn", "--epochs", "1", "--threads", "1", "--quiet", "--out", "runs/rigl"])


def _check_command_line_run(namespace: dict, tmp_path: Path, printed: str) -> None:
    assert float(namespace["accuracy"]) == namespace["state"]["history"][-1]["test_accuracy"]


# What each block's results must be, by the block's first line; every block runs whether or not it has an entry.
def _check_reinitialised_ticket(namespace: dict, tmp_path: Path, printed: str) -> None:
    ticket, reinit = namespace["ticket"], namespace["reinit"]
    for layer in (0, 2):
        assert torch.equal(reinit[layer].mask, ticket[layer].mask)
        assert not torch.equal(reinit[layer].weight, ticket[layer].weight)


CHECKS = {"import torch": _check_python_api, "masks = sk.ops.topk_mask": _check_ops,
          "import sparsekern as sk": _check_criterion, "# A threshold rule": _check_threshold_rule,
          "from sparsekern.cli.data": _check_command_line_run, "# A lottery ticket's": _check_reinitialised_ticket,
          "# A drop-fraction schedule of one's own": _check_schedule_function}
# What a block needs made before it runs (in its working directory), by the block's first line.
SETUPS = {"from sparsekern.cli.data": _train_a_run}


def _namespace(code: str) -> dict:
    """What a block needs that README.md gives only in prose: the ops block continues the Python API's (`sk`)
    and names the tensors of its placeholders; a block that imports sparsekern itself gets nothing."""
    if "import sparsekern" in code:
        return {}
    import sparsekern as sk

    return {"sk": sk, **_ops_placeholders()}


@pytest.mark.parametrize("code", BLOCKS, ids=lambda code: code.splitlines()[0][:40])
def test_every_python_block_runs(code, tmp_path, monkeypatch, one_thread, capsys):
    assert code.count(BATCH_PLACEHOLDER) <= 1
    code = code.replace(BATCH_PLACEHOLDER, "x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))")
    monkeypatch.chdir(tmp_path)   # the Python API's block writes ckpt.pt
    for first_line, setup in SETUPS.items():
        if code.startswith(first_line):
            setup(tmp_path)
    namespace = _namespace(code)
    exec(compile(code, f"{README}:{code.splitlines()[0]}", "exec"), namespace)
    check = next((check for first_line, check in CHECKS.items() if code.startswith(first_line)), None)
    if check is not None:
        check(namespace, tmp_path, capsys.readouterr().out)


def test_each_block_check_has_its_block():
    for first_line in (*CHECKS, *SETUPS):
        _block(first_line)


def test_set_up_is_two_commands_and_the_tests_one_is_what_ci_runs():
    section = README.read_text().split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    commands = [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]
    assert len(commands) == 2 and not any("\n" in command for command in commands), commands
    main_job, tests = commands
    assert main_job.endswith("&& sparsekern") and tests.endswith("&& python -m pytest")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines(), "README's test command is not .ci/run's"


def _example_commands() -> list[list[str]]:
    """The arguments of every sparsekern command in README.md's shell blocks (torchrun's launch of one rank
    included), comments cut, in order."""
    commands = []
    for line in "\n".join(SHELL_BLOCKS).splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["sparsekern"]:
            commands.append(words[1:])
        elif words[:1] == ["torchrun"]:
            commands.append(words[words.index("sparsekern.cli") + 1:])
    return commands


def test_the_example_commands_are_accepted(tmp_path, monkeypatch, one_thread):
    """Each example's inputs pass every check a command makes before it trains; the one that stops after
    epoch 5 trains, for the next to resume."""
    from sparsekern.cli.main import _prepare_compare, _prepare_reproduce, _prepare_train, build_parser

    prepare = {"train": _prepare_train, "compare": _prepare_compare, "reproduce": _prepare_reproduce}
    monkeypatch.chdir(tmp_path)
    commands = _example_commands()
    assert len(commands) >= 9
    for argv in commands:
        args = build_parser().parse_args(argv)
        if args.device == "cuda" and not torch.cuda.is_available():
            continue
        start = prepare[args.command](args)
        if getattr(args, "stop_after", None) is not None:
            start()


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
