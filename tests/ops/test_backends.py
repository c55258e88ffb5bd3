"""Backend choice: what auto picks on CPU, the SPARSEKERN_BACKEND override, and determinism."""
import os

import pytest
import torch

import sparsekern
from sparsekern.ops import COMPILED_OPS, _backend, _extension

from ..helpers import BACKENDS, random_scores

CPP_DISABLED = os.environ.get("SPARSEKERN_CPP") == "0"


@pytest.mark.skipif(CPP_DISABLED, reason="built with SPARSEKERN_CPP=0")
def test_extension_is_loaded():
    # A broken C++ build falls back quietly at import; here it fails CI instead.
    assert sparsekern.backends()["extension"] == "loaded"


@pytest.mark.skipif(CPP_DISABLED, reason="built with SPARSEKERN_CPP=0")
@pytest.mark.parametrize("op", COMPILED_OPS)
def test_auto_chooses_the_compiled_cpu_kernels_on_cpu(op, monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op}", "CPU")
    report = sparsekern.backends()
    assert report["requested"] == "auto"
    assert report["ops"][op]["cpu"]["chosen"] == "compiled"
    assert report["ops"][op]["cpu"]["compiled"] is None


def test_reference_is_always_usable(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    for op, devices in sparsekern.backends()["ops"].items():
        assert devices["cpu"]["reference"] is None, op
        assert devices["cpu"]["chosen"] is not None, op


def test_the_report_prints_readably_and_stays_a_dict(monkeypatch):
    import json

    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    report = sparsekern.backends()
    assert isinstance(report, dict) and json.loads(json.dumps(report)) == report   # programs read it as before
    text = str(report)
    assert text == repr(report) and text.startswith(f"{_backend.ENV_VAR}=auto; compiled extension: ")
    lines = text.splitlines()
    for op, devices in report["ops"].items():
        at = lines.index(op)   # each op on a line of its own, then one line per device: the chosen backend
        for device, entry in devices.items():
            chosen = next(line for line in lines[at + 1:] if line.startswith(f"  {device} "))
            assert chosen.split() == [device, entry["chosen"]]
            for name in _backend.AUTO_ORDER:
                if entry[name] is not None:
                    assert f"        not {name}: {entry[name]}" in lines


@pytest.mark.parametrize("name", ["fastest", "cuda:0"])
def test_unknown_backend_name_lists_the_valid_ones(name, monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, name)
    for call in (sparsekern.backends, lambda: sparsekern.ops.topk_mask([torch.randn(3)], 1)):
        with pytest.raises(ValueError, match=r"SPARSEKERN_BACKEND.*auto, compiled, triton, reference"):
            call()


@pytest.mark.parametrize("alias", ["cuda", "cpp", "CUDA"])
def test_earlier_names_are_aliases_of_the_compiled_backend(alias, monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, alias)
    assert _backend.requested() == "compiled"


def test_every_change_of_the_variable_is_followed(monkeypatch):
    # requested() remembers the name of the value it last read: a change, an unset variable and a value
    # that names no backend must each be read as such.
    for value, name in (("reference", "reference"), ("triton", "triton"), (" CPP ", "compiled"), ("", "auto"),
                        ("reference", "reference")):
        monkeypatch.setenv(_backend.ENV_VAR, value)
        assert _backend.requested() == name
    monkeypatch.delenv(_backend.ENV_VAR)
    assert _backend.requested() == "auto"
    monkeypatch.setenv(_backend.ENV_VAR, "fastest")
    for _ in range(2):
        with pytest.raises(ValueError, match="got 'fastest'"):
            _backend.requested()
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert _backend.requested() == "reference"


@pytest.mark.parametrize("environ", [{}, {"SPARSEKERN_BACKEND": "reference"}])
def test_the_variable_is_read_from_a_plain_mapping_put_in_place_of_os_environ(environ, monkeypatch):
    # requested() reads os.environ's own dict; a test's mock.patch("os.environ", {...}) puts a plain
    # dict there, which has none, and every sparse layer call failed with AttributeError.
    monkeypatch.setattr(os, "environ", environ)
    assert _backend.requested() == environ.get(_backend.ENV_VAR, "auto")
    weight = torch.randn(4, 6)
    mask = torch.rand(4, 6) < 0.5
    x = torch.randn(3, 6)
    assert torch.equal(sparsekern.ops.masked_linear(x, weight, mask),
                       torch.nn.functional.linear(x, torch.where(mask, weight, 0)))


def test_reports_say_which_kernels_of_the_compiled_backend_ran():
    assert _backend.label("compiled", "cpu") == "compiled/cpu"
    assert _backend.label("compiled", "cuda") == "compiled/cuda"
    assert _backend.label("triton", "cuda") == "triton"


def unusable_pairs():
    """(op, backend, reason) for every backend that implements an op but cannot run it on CPU tensors here."""
    return [(op, name, why) for op in _backend._REGISTRY for name, why in _backend._reasons(op, "cpu").items()
            if why is not None and name in _backend._REGISTRY[op]]


def test_asking_for_an_unusable_backend_raises(monkeypatch):
    pairs = unusable_pairs()
    if not pairs:
        pytest.skip("every backend can run every op it implements here")
    for op, name, why in pairs:
        monkeypatch.setenv(_backend.ENV_VAR, name)
        with pytest.raises(RuntimeError, match=rf"{_backend.ENV_VAR}={name} cannot run {op} on cpu"):
            _backend.choose(op, "cpu")
        assert sparsekern.backends()["ops"][op]["cpu"]["chosen"] is None


@pytest.mark.parametrize("name", ["compiled", "cuda", "triton"])
def test_a_named_backend_that_lacks_an_op_hands_it_to_the_next(name, monkeypatch, generator):
    # The compiled extension has no masked_linear: SPARSEKERN_BACKEND=cuda used to make every
    # SparseLinear forward raise. Triton has no sparse_linear.
    op = "masked_linear" if name != "triton" else "sparse_linear"
    monkeypatch.setenv(_backend.ENV_VAR, name)
    assert not _backend.is_forced(op)
    chosen, _ = _backend.choose(op, "cpu")
    assert chosen == "reference"
    entry = sparsekern.backends()["ops"][op]["cpu"]
    assert entry["chosen"] == "reference"
    assert f"{_backend.ENV_VAR}={_backend.ALIASES.get(name, name)} does not implement {op}" in entry["fallback"]
    if name == "triton" and (reason := _backend.triton_missing_with_loaded_loops("cpu")) is not None:
        pytest.skip(f"the layer's masked_linear on the named Triton backend: {reason}")
    layer = sparsekern.nn.SparseLinear(8, 4)
    layer.set_mask(torch.rand(4, 8, generator=generator) < 0.5)
    for zero_off_mask in (True, False):
        layer.zero_off_mask = zero_off_mask
        y = layer(torch.randn(3, 8, generator=generator))
        y.sum().backward()
        assert y.shape == (3, 4) and not layer.weight.grad[~layer.mask].any()


def test_an_implementation_may_decline_a_call_the_automatic_choice_offers(monkeypatch):
    # Triton's masked_linear takes only masks it can skip tiles on; named, it takes every call.
    calls = []
    fast = _backend.Implementation(run=lambda: "fast", missing=_backend.never_missing,
                                   takes=lambda mask: calls.append(mask) or mask == "blocks")
    monkeypatch.setitem(_backend._REGISTRY, "fake_op", {
        "triton": fast, "reference": _backend.Implementation(run=lambda: "plain", missing=_backend.never_missing)})
    monkeypatch.setenv(_backend.ENV_VAR, "auto")
    assert _backend.choose("fake_op", "cpu", args=("blocks",))[0] == "triton"
    assert _backend.choose("fake_op", "cpu", args=("unstructured",))[0] == "reference"
    assert _backend.choose("fake_op", "cpu")[0] == "triton"  # no call to judge: a report's choice
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    assert _backend.choose("fake_op", "cpu", args=("unstructured",))[0] == "triton"
    assert calls == ["blocks", "unstructured"]


def test_asking_for_the_compiled_backend_without_it_raises(monkeypatch):
    # Simulates an install whose extension failed to build: the kernel reports itself missing.
    monkeypatch.setattr(_extension, "kernel_missing", lambda op, device_type: "extension not loaded (simulated)")
    monkeypatch.setenv(_backend.ENV_VAR, "compiled")
    with pytest.raises(RuntimeError, match=r"simulated.*usable backends: .*reference"):
        sparsekern.ops.topk_mask([torch.randn(4)], 2)
    monkeypatch.setenv(_backend.ENV_VAR, "auto")
    assert _backend.choose("topk_mask", "cpu")[0] != "compiled"


def draw_masks(seed, backend, monkeypatch):
    """Masks of topk_mask and prune_grow on inputs drawn from `seed`, computed by one backend."""
    monkeypatch.setenv(_backend.ENV_VAR, backend)
    generator = torch.Generator().manual_seed(seed)
    scores = [random_scores(generator, shape, torch.float32, "ties") for shape in [(40, 30), (7,), (5, 3, 3)]]
    weight = torch.randn(40, 30, generator=generator)
    mask = torch.rand(40, 30, generator=generator) < 0.2
    grow_score = random_scores(generator, (40, 30), torch.float32, "ties")
    return (sparsekern.ops.topk_mask(scores, 500) + sparsekern.ops.topk_mask(scores, [100, 3, 20])
            + [sparsekern.ops.prune_grow(weight, mask, weight.abs(), grow_score, 50)])


def test_same_seed_gives_the_same_masks_on_every_backend(monkeypatch):
    usable = [b for b in BACKENDS
              if all(_backend._reasons(op, "cpu")[b] is None for op in ("topk_mask", "prune_grow"))]
    runs = {backend: draw_masks(1234, backend, monkeypatch) for backend in usable}
    runs["again"] = draw_masks(1234, usable[0], monkeypatch)
    first = runs[usable[0]]
    for backend, masks in runs.items():
        assert all(torch.equal(a, b) for a, b in zip(masks, first)), backend
    other_seed = draw_masks(4321, usable[0], monkeypatch)
    assert not all(torch.equal(a, b) for a, b in zip(other_seed, first)), "a different seed must change the masks"


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.0", True), ("3.5.1", "2.5.2", True), ("3.6.0+git1a2b", "2.4.0rc1", True),
    ("3.7.0", "2.4.6", False), ("3.9.0", "2.5.5", False), ("3.6.0", "2.3.5", False), ("3.2.0", "1.26.4", False)])
def test_the_triton_interpreter_loop_bug_is_told_by_release(triton_version, numpy_version, broken):
    # triton-lang/triton#9171: Triton < 3.7 interprets loaded loop bounds through int() of a
    # one-element array, which NumPy >= 2.4 refuses.
    reason = _backend.interpreter_loop_bug(triton_version, numpy_version)
    assert (reason is not None) == broken
    if broken:
        assert triton_version in reason and numpy_version in reason and "triton>=3.7" in reason


def test_masked_linear_on_a_broken_triton_interpreter_is_refused_by_name_and_passed_over(monkeypatch):
    monkeypatch.setattr(_backend, "_installed_interpreter_loop_bug", lambda: "loop bug")
    monkeypatch.setattr(_backend, "triton_missing", _backend.never_missing)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend._reasons("masked_linear", "cpu")["triton"] == "loop bug"
    assert _backend._reasons("topk_mask", "cpu")["triton"] != "loop bug"  # its loops have constant bounds
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="cannot run masked_linear on cpu: loop bug"):
        _backend.choose("masked_linear", "cpu")
    monkeypatch.setenv(_backend.ENV_VAR, "auto")
    assert _backend.choose("masked_linear", "cpu")[0] == "reference"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _backend.triton_missing_with_loaded_loops("cuda") is None  # compiled kernels run such loops


def compiled_layer_and_inputs():
    """A masked_linear layer compiled whole, the functions each of its graphs calls (a list that grows
    with every compilation), and its inputs, weights 0 off the mask."""
    graphs = []

    def record(graph, example_inputs):
        graphs.append([str(node.target) for node in graph.graph.nodes if node.op == "call_function"])
        return graph.forward

    def layer(x, weight, mask):
        return sparsekern.ops.masked_linear(x, weight, mask, zero_off_mask=True)

    x, mask = torch.randn(2, 8), torch.rand(4, 8) < 0.5
    weight = torch.where(mask, torch.randn(4, 8), 0)
    return torch.compile(layer, backend=record, fullgraph=True), graphs, (x, weight, mask)


def test_a_compiled_call_follows_the_variable_set_after_it_compiled(monkeypatch, fresh_compiler):
    # Dynamo guards the value of a variable that is set, but not the absence of one that is not:
    # a model compiled with SPARSEKERN_BACKEND unset ignored it once set (torch 2.13).
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    compiled, graphs, (x, weight, mask) = compiled_layer_and_inputs()
    compiled(x, weight, mask)  # automatic: the dense kernel on the weight itself
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    torch.testing.assert_close(compiled(x, weight, mask), x @ weight.T)
    assert len(graphs) == 2 and any("masked_linear_reference" in target for target in graphs[1]), graphs
    assert not any("masked_linear_reference" in target for target in graphs[0]), graphs


def test_a_compiled_call_recompiles_for_no_other_variable(monkeypatch, fresh_compiler):
    # The absence of SPARSEKERN_BACKEND, guarded as the absence of one key (a key computed in the traced
    # code): guarded through a key read from a module global, it was the match of the environment's
    # whole key set, and setting any variable recompiled every compiled sparse model (torch 2.13),
    # each step paying ~45 guards more.
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    compiled, graphs, (x, weight, mask) = compiled_layer_and_inputs()
    compiled(x, weight, mask)
    monkeypatch.setenv("SPARSEKERN_TEST_UNRELATED_VARIABLE", "1")
    compiled(x, weight, mask)
    assert len(graphs) == 1


@pytest.mark.parametrize("op", ["topk_mask", "prune_grow", "masked_linear", "sparse_linear"])
def test_the_automatic_backends_start_with_the_automatic_choice_and_leave_out_triton_on_cpu(op, monkeypatch):
    # What the benchmarks time: every backend the automatic choice may take, the one it takes first.
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend, "triton_missing", _backend.never_missing)  # Triton could run here,
    monkeypatch.setattr(_backend, "_installed_interpreter_loop_bug", lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    candidates = _backend.automatic_backends(op, "cpu")
    # ...but only in the interpreter, which says nothing of speed.
    compiled = op in COMPILED_OPS and _extension.kernel_missing(op, "cpu") is None
    assert candidates == (["compiled"] if compiled else []) + ["reference"]
    assert candidates[0] == _backend.choose(op, "cpu")[0]
