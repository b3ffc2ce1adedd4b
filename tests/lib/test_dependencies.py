"""Every third-party module the code imports is installed by what pyproject.toml declares for it:
the model library by the core dependencies alone, the platform by core + [platform]. (The Docker
image installs `.[platform]`: a module that only [dev] brings would crash there at run time.)"""

import ast
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
OWN = {"letstalk", "letstalk_platform"}


def imported_modules(folder: Path) -> dict[str, str]:
    """Top-level third-party modules imported anywhere under `folder` (module -> a file that does)."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OWN:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements install, transitively (no extras of the dependencies)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo.extend(Requirement(r) for r in requires(req.name) or [])
        except PackageNotFoundError:
            pass  # declared but not installed here: its own dependencies are unknown
    return seen


@pytest.mark.parametrize("folder, extras", [("letstalk", []), ("platform/letstalk_platform", ["platform"])])
def test_imports_are_installed_by_the_declared_dependencies(folder, extras):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = closure(project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]])
    providers = packages_distributions()
    missing = {module: where for module, where in imported_modules(ROOT / folder).items()
               if not {canonicalize_name(d) for d in providers.get(module, [module])} & declared}
    assert not missing, f"imported by {folder} but not installed by its dependencies: {missing}"
