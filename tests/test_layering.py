"""The floors of docs/architecture.md hold: no module imports from a floor above its own, and its table names every
module; and the project stands alone: no file cites the team's documents, which live outside the repository."""
import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "sparsekern"
# Floor of each top-level part of sparsekern; a module may import its own floor and the floors below.
FLOORS = {"_C": 0, "triton_kernels": 0, "checkpoint": 0, "ops": 1, "nn": 2, "algorithms": 3, "cli": 4, "bench": 4}


def part_of(module: str) -> str:
    """'ops' for 'sparsekern.ops.reference', 'checkpoint' for 'sparsekern.checkpoint'."""
    return module.split(".")[1]


def module_name(path: pathlib.Path, package: pathlib.Path) -> str:
    return "sparsekern." + ".".join(path.relative_to(package).with_suffix("").parts)


def package_of(path: pathlib.Path, package_root: pathlib.Path) -> str:
    """'sparsekern.ops' for sparsekern/ops/reference.py and for sparsekern/ops/__init__.py."""
    module = module_name(path, package_root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    return package.removesuffix(".__init__")


def import_source(node: ast.ImportFrom, package: str) -> str:
    """The absolute name of the module a `from ... import` in `package` imports from (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def imported_modules(path: pathlib.Path, package_root: pathlib.Path = PACKAGE) -> set[str]:
    """Absolute names of the sparsekern modules or packages a file imports from (relative imports resolved)."""
    package = package_of(path, package_root)
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = import_source(node, package)
            if target == "sparsekern":  # `from .. import ops`: each alias is a module
                names.update(f"sparsekern.{alias.name}" for alias in node.names)
            elif target.startswith("sparsekern."):
                names.add(target)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("sparsekern."))
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def assert_imports_run_down(path: pathlib.Path, package_root: pathlib.Path = PACKAGE) -> None:
    own = part_of(module_name(path, package_root))
    for name in imported_modules(path, package_root):
        assert FLOORS[part_of(name)] <= FLOORS[own], f"{path.relative_to(package_root)} ({own}) imports {name}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_down_the_floors(path):
    assert_imports_run_down(path)


def test_the_check_sees_an_upward_import(tmp_path):
    # A test that cannot fail proves nothing: an ops module importing the algorithms must be caught.
    fake = tmp_path / "sparsekern"
    (fake / "ops").mkdir(parents=True)
    (fake / "ops" / "bad.py").write_text("from ..algorithms import dst\nfrom . import reference\nfrom .. import nn\n")
    assert imported_modules(fake / "ops" / "bad.py", fake) == {"sparsekern.algorithms", "sparsekern.ops",
                                                               "sparsekern.nn"}
    with pytest.raises(AssertionError, match="imports sparsekern.(algorithms|nn)"):
        assert_imports_run_down(fake / "ops" / "bad.py", fake)


def is_module(name: str, package_root: pathlib.Path) -> bool:
    """Whether `name` (sparsekern.ops._checks) is a module or package of the tree at `package_root`."""
    path = package_root.joinpath(*name.split(".")[1:])
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def private_names_borrowed(path: pathlib.Path, package_root: pathlib.Path = PACKAGE) -> list[str]:
    """The underscore names of other floors' modules that a file imports (`from ..algorithms.dst import _Warning`)
    or reads off an imported module (`_tickets._refuse`): names their module may rename at will. An internal
    module itself (`_tickets`, `_checks`) may be imported: the names it shares carry no underscore."""
    own = part_of(module_name(path, package_root))
    tree = ast.parse(path.read_text())
    borrowed, modules = [], set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        source = import_source(node, package_of(path, package_root))
        if source != "sparsekern" and (not source.startswith("sparsekern.") or part_of(source) == own):
            continue
        for alias in node.names:
            if is_module(f"{source}.{alias.name}", package_root):
                modules.add(alias.asname or alias.name)
            elif alias.name.startswith("_"):
                borrowed.append(f"{source}.{alias.name}")
    borrowed += [f"{node.value.id}.{node.attr}" for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and isinstance(node.value, ast.Name) and node.value.id in modules and node.attr.startswith("_")]
    return borrowed


# The tools on the top floor use the library as its users could: through names it shares.
TOOLS = sorted(path for part in ("cli", "bench") for path in (PACKAGE / part).rglob("*.py"))


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_tools_borrow_no_private_name_of_the_library(path):
    borrowed = private_names_borrowed(path)
    assert not borrowed, f"{path.relative_to(PACKAGE)} uses private names of other parts of sparsekern: {borrowed}"


def test_the_private_name_check_sees_a_borrowed_name(tmp_path):
    fake = tmp_path / "sparsekern"
    for part in ("cli", "algorithms", "ops"):
        (fake / part).mkdir(parents=True)
        (fake / part / "__init__.py").write_text("")
    (fake / "algorithms" / "_tickets.py").write_text("")
    (fake / "ops" / "_checks.py").write_text("")
    (fake / "cli" / "mine.py").write_text("")
    (fake / "cli" / "bad.py").write_text(
        "from ..algorithms.dst import _Warning, Public\nfrom ..algorithms import _tickets\nfrom ..ops import _checks\n"
        "from . import mine\nfrom .mine import _own\n_tickets._refuse()\n_tickets.shared()\nmine._helper()\n")
    assert private_names_borrowed(fake / "cli" / "bad.py", fake) == ["sparsekern.algorithms.dst._Warning",
                                                                     "_tickets._refuse"]


ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def modules_the_map_lacks(package: pathlib.Path, map_text: str) -> list[str]:
    """The modules (and sub-packages) of `package` that docs/architecture.md's table of modules does not name in its
    row: a newcomer reading the map would not know they exist, nor what they are for."""
    row = next((line for line in map_text.splitlines() if line.startswith(f"| `{package.name}` | ")), "")
    named = set(re.findall(r"`([\w/]+)`", row))
    present = [path.stem for path in package.glob("*.py") if path.stem not in ("__init__", "__main__")]
    present += [f"{path.name}/" for path in package.iterdir() if (path / "__init__.py").exists()]
    return sorted(name for name in present if name not in named)


@pytest.mark.parametrize("package", ["ops", "nn", "algorithms", "cli", "bench"])
def test_the_map_names_every_module(package):
    lacking = modules_the_map_lacks(PACKAGE / package, ARCHITECTURE.read_text())
    assert not lacking, f"docs/architecture.md's table of modules does not name {package}'s {lacking}"


def test_the_map_check_sees_a_module_it_lacks(tmp_path):
    (tmp_path / "cli").mkdir()
    for name in ("__init__.py", "__main__.py", "main.py", "new.py"):
        (tmp_path / "cli" / name).write_text("")
    table = "| `cli` | `main` (parser), `newer` |\n| `bench` | `new` |"   # `new` is named, but in another row
    assert modules_the_map_lacks(tmp_path / "cli", table) == ["new"]


def test_at_most_four_modules_sit_loose_at_the_top():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(loose) <= 4, loose


ROOT = PACKAGE.parent
# The team's own documents live outside the repository: a clone has none of them, so nothing here may
# read or cite them. Spelled in pieces so that this file does not match itself.
TEAM_DOCUMENTS = ("." + "./shared", "GPU_" + "REVIEW", *(name + ".md" for name in ("ALGO" + "RITHMS", "DE" + "SIGN",
                                                                                  "STY" + "LE", "PLAT" + "FORM")))
PROJECT_FILES = [path for part in ("sparsekern", "triton_kernels", "csrc", "benchmarks", "tests", "docs", ".ci")
                 for path in sorted((ROOT / part).rglob("*")) if path.is_file() and path.suffix != ".so"
                 and "__pycache__" not in path.parts] + [ROOT / name for name in (
                     "README.md", "setup.py", "pyproject.toml", "CMakeLists.txt")]


def test_no_file_cites_a_team_document_a_clone_lacks():
    citing = [f"{path.relative_to(ROOT)}: {name}" for path in PROJECT_FILES if path.exists()
              for name in TEAM_DOCUMENTS if name in path.read_text(errors="replace")]
    assert not citing, citing
