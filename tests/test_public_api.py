"""The public API is documented: every name that sparsekern, sparsekern.nn, sparsekern.ops and
sparsekern.algorithms export (`__all__`) has a docstring of its own and is named in README.md's code."""
import re
import types
from pathlib import Path

import pytest

import sparsekern
import sparsekern.algorithms
import sparsekern.nn
import sparsekern.ops

README = Path(__file__).resolve().parent.parent / "README.md"
PACKAGES = (sparsekern, sparsekern.nn, sparsekern.ops, sparsekern.algorithms)
PUBLIC = [(package, name) for package in PACKAGES for name in getattr(package, "__all__", ())]


def _readme_code() -> str:
    """README.md's fenced blocks and inline code, with `SparseConv1d/2d/3d` spelled out as three names."""
    text = README.read_text()
    blocks = re.findall(r"```\w*\n(.*?)```", text, re.S)
    prose = re.sub(r"```\w*\n.*?```", "", text, flags=re.S)
    code = "\n".join(blocks + re.findall(r"`([^`\n]+)`", prose))
    return re.sub(r"(\w+)1d/2d/3d", r"\g<1>1d \g<1>2d \g<1>3d", code)


def _named(name: str, obj, code: str) -> bool:
    if isinstance(obj, types.ModuleType):   # a module by its path (`sk.init`), not a word (`--init`, `init=`)
        return re.search(rf"\b(sk|sparsekern)\.(\w+\.)?{name}\b", code) is not None
    return re.search(rf"(?<![-\w]){name}\b(?!=)", code) is not None


@pytest.mark.parametrize("package", PACKAGES, ids=lambda package: package.__name__)
def test_package_declares_its_public_names(package):
    assert isinstance(getattr(package, "__all__", None), list), f"{package.__name__} has no __all__"
    missing = [name for name in package.__all__ if not hasattr(package, name)]
    assert not missing, missing


@pytest.mark.parametrize("package, name", PUBLIC, ids=lambda value: getattr(value, "__name__", value))
def test_public_name_has_a_docstring(package, name):
    obj = getattr(package, name)
    if isinstance(obj, (dict, tuple, list, str, int, float)):
        pytest.skip("a constant: its comment documents it")
    assert (obj.__doc__ or "").strip(), f"{package.__name__}.{name} has no docstring of its own"


@pytest.mark.parametrize("package, name", PUBLIC, ids=lambda value: getattr(value, "__name__", value))
def test_public_name_is_in_the_readme(package, name):
    assert _named(name, getattr(package, name), _readme_code()), f"README.md names no {package.__name__}.{name}"
