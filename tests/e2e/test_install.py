"""The core dependency list alone is enough for the model library: a fresh venv gets the project
installed without extras, resolved by pip from pyproject.toml's `dependencies` against the package
index, and every module of `letstalk` (subpackages included) must import there; so must the
`letstalk` console script. `letstalk_platform` is installed too (setuptools packages it) but needs
the [platform] extra: each of its modules must either import or fail only because a package that
extra brings is missing, so nothing else in it is broken.

The project is copied to tmp_path (the files setuptools reads) and installed from there, so the
in-tree build (build/, *.egg-info) never touches the shared checkout. `--no-compile` skips pip's
byte-compiling of every installed .py file (about 37 s of a ~1 min install on 2 cores, measured):
what gets installed is the same, modules are compiled when imported."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.install]
ROOT = Path(__file__).resolve().parents[2]
# what setuptools needs to build the wheel: the metadata, its readme and the two package trees
PROJECT_FILES = ("pyproject.toml", "README.md", "letstalk", "platform")
PACKAGES = {"letstalk": "letstalk", "letstalk_platform": "platform/letstalk_platform"}
# top-level modules that only the [platform] extra brings (fastapi and starlette come with ray[serve],
# multipart with python-multipart, the job table's sqlalchemy with mlflow): a letstalk_platform module
# may fail to import for these alone
PLATFORM_ONLY = {"ray", "deepspeed", "mlflow", "pyarrow", "fastapi", "starlette", "multipart", "python_multipart",
                 "sqlalchemy", "fastapi_offline"}
# present only when an extra was installed: proves the venv got the core dependencies alone
EXTRAS_ONLY = ("ray", "pytest")

# run by the venv's python (-I: no cwd, PYTHONPATH or user site on sys.path) as
# WALK OUT.json EXTRAS_ONLY(comma-separated) PACKAGE...
WALK = r"""
import importlib, importlib.util, json, pkgutil, sys, traceback

def walk(top):
    out = {"file": None, "modules": [], "failures": {}}

    def record(name):
        exc = sys.exc_info()[1]
        out["failures"][name] = {
            "missing": exc.name if isinstance(exc, ModuleNotFoundError) else None,
            "error": "".join(traceback.format_exception_only(exc)).strip(),
            "traceback": traceback.format_exc(),
        }

    try:
        pkg = importlib.import_module(top)
    except (Exception, SystemExit):
        record(top)
        return out
    out["file"] = pkg.__file__
    out["modules"].append(top)
    # walk_packages imports each package to find its submodules (onerror: one that fails to)
    for info in pkgutil.walk_packages(pkg.__path__, top + ".", onerror=record):
        out["modules"].append(info.name)
        try:
            importlib.import_module(info.name)
        except (Exception, SystemExit):
            record(info.name)
    return out

result = {top: walk(top) for top in sys.argv[3:]}
result["extras_present"] = [m for m in sys.argv[2].split(",") if importlib.util.find_spec(m)]
with open(sys.argv[1], "w") as f:
    json.dump(result, f)
"""


def _env() -> dict:
    """The machine's environment (its pip config included) without anything pointing at the dev tree."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONUSERBASE")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _index_unreachable(tmp: Path) -> str | None:
    """Why the package index can't be used (a reason to skip), or None. `--isolated`: this machine's pip
    config also lists local mirrors, which would answer for six and hide an index that is down."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")
    cmd = [sys.executable, "-m", "pip", "download", "--isolated", "--no-deps", "--no-cache-dir",
           "--timeout", "10", "--retries", "0", "--index-url", index, "-d", str(tmp / "probe"), "six"]
    if os.environ.get("PIP_CERT"):
        cmd += ["--cert", os.environ["PIP_CERT"]]
    try:
        probe = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env())
    except subprocess.TimeoutExpired:
        return f"package index {index} did not answer within 60 s"
    if probe.returncode != 0:
        return f"package index {index} unreachable: {(probe.stdout + probe.stderr).strip().splitlines()[-1:]}"
    return None


def _copy_project(dest: Path) -> Path:
    """The files setuptools reads, without caches or an earlier build's output."""
    dest.mkdir(parents=True)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=skip)
        else:
            shutil.copy2(src, dest / name)
    return dest


def _source_modules(src: Path, top: str) -> set[str]:
    """Module names of the .py files in the copied tree (what the installed package should hold)."""
    base = src / PACKAGES[top]
    names = set()
    for path in base.rglob("*.py"):
        parts = path.relative_to(base).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.add(".".join((top, *parts)))
    return names


def _run(cmd, what: str, timeout: int, **kw) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), **kw)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: no end after {timeout} s")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        pytest.fail(f"{what} exited {proc.returncode}:\n{tail}")
    return proc


@pytest.fixture
def venv(tmp_path):
    """Where the fresh venv goes; removed afterwards (about 1.8 GB, and pytest keeps 3 runs' tmp dirs)."""
    path = tmp_path / "venv"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_core_install_imports_every_module(tmp_path, venv):
    reason = _index_unreachable(tmp_path)
    if reason:
        pytest.skip(reason)
    src = _copy_project(tmp_path / "src")
    _run([sys.executable, "-m", "venv", str(venv)], "python -m venv", 300)
    py = venv / "bin" / "python"
    # the core dependencies only: no [platform], no [dev]
    _run([str(py), "-m", "pip", "install", "--no-compile", "--progress-bar", "off", str(src)],
         "pip install (no extras)", 1800, cwd=tmp_path)

    out = tmp_path / "walk.json"
    _run([str(py), "-I", "-c", WALK, str(out), ",".join(EXTRAS_ONLY), *PACKAGES],
         "walking the installed packages", 900, cwd=tmp_path)
    result = json.loads(out.read_text())

    assert result["extras_present"] == [], f"an extra's package is in the fresh venv: {result['extras_present']}"
    lib = result["letstalk"]
    broken = {name: f["error"] for name, f in lib["failures"].items()}
    assert not broken, "letstalk modules that do not import with the core dependencies alone:\n" + "\n\n".join(
        f"{name}: {lib['failures'][name]['traceback']}" for name in sorted(broken))
    assert Path(lib["file"]).is_relative_to(venv), f"letstalk imported from {lib['file']}, not the fresh venv"
    unpacked = _source_modules(src, "letstalk") - set(lib["modules"])
    assert not unpacked, f"in letstalk/ but not in the installed package (no __init__.py?): {sorted(unpacked)}"
    assert len(lib["modules"]) > 10, lib["modules"]

    plat = result["letstalk_platform"]
    unexpected = {name: f["error"] for name, f in plat["failures"].items()
                  if (f["missing"] or "").split(".")[0] not in PLATFORM_ONLY}
    assert not unexpected, ("letstalk_platform modules that fail without the [platform] extra for another reason "
                            "than a missing platform package:\n" + "\n\n".join(
                                f"{name}: {plat['failures'][name]['traceback']}" for name in sorted(unexpected)))
    unpacked = _source_modules(src, "letstalk_platform") - set(plat["modules"])
    assert not unpacked, f"in platform/letstalk_platform/ but not in the installed package: {sorted(unpacked)}"

    helped = _run([str(venv / "bin" / "letstalk"), "--help"], "letstalk --help", 300, cwd=tmp_path)
    assert "usage:" in helped.stdout and "render" in helped.stdout, helped.stdout
