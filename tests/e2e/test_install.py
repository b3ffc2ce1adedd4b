"""The project installs and works outside the checkout. One fresh venv, filled in three steps (the
tests run in file order and share it; each installs what it needs, so each also runs alone):

1. the core dependency list alone, resolved by pip from pyproject.toml's `dependencies` against the
   package index: every module of `letstalk` (subpackages included) must import there; so must the
   `letstalk` console script. `letstalk_platform` is installed too (setuptools packages it) but needs
   the [platform] extra: each of its modules must either import or fail only because a package that
   extra brings is missing, so nothing else in it is broken.
2. a non-editable install (a wheel built from a copy, the copy then deleted), run from a folder
   outside the checkout: `letstalk render PORTRAIT AUDIO -o OUT.mp4` with no --model renders with the
   demo model shipped as package data, and says so on stderr.
3. the way cluster/docker/Dockerfile does it: a folder holding only what its COPY lines copy before
   the project install, then its `pip install -e ".[platform]"` and its `python -c` check line; every
   module of both packages must import, and every job script (copied after the install, as the
   Dockerfile does) must load. The paths come from the Dockerfile itself, so the test fails when
   the Dockerfile stops copying something the install or a job needs. torch: the Dockerfile installs
   the CUDA build of the pinned version first; here the pinned CPU build that step 1 installed
   satisfies the same `torch==` pin, so the install leaves it alone in both places.

The project is copied to tmp_path (the files setuptools reads) and installed from there, so the
in-tree build (build/, *.egg-info) never touches the shared checkout. `--no-compile` skips pip's
byte-compiling of every installed .py file (about 37 s of a ~1 min install on 2 cores, measured):
what gets installed is the same, modules are compiled when imported."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import soundfile as sf
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.install, pytest.mark.heavy]
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
DOCKERFILE = ROOT / "cluster" / "docker" / "Dockerfile"
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")

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


# run by the image's python from its WORKDIR as JOBS SCRIPT...: each job script loads as `python SCRIPT`
# would load it (its folder first on sys.path), without running main()
JOBS = r"""
import os, runpy, sys
for script in sys.argv[1:]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__job__")
    sys.path.pop(0)
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
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=SKIP)
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
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=_env(),
                              **kw)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: no end after {timeout} s")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        pytest.fail(f"{what} exited {proc.returncode}:\n{tail}")
    return proc


def _pip_install(venv: Path, *args, what: str, cwd: Path) -> None:
    _run([venv / "bin" / "python", "-m", "pip", "install", "--no-compile", "--progress-bar", "off", *args],
         what, 1800, cwd=cwd)


def _walk(venv: Path, tmp: Path) -> dict:
    """Import every module of both packages in the venv's python, from a folder outside any project copy."""
    out = tmp / "walk.json"
    _run([venv / "bin" / "python", "-I", "-c", WALK, out, ",".join(EXTRAS_ONLY), *PACKAGES],
         "walking the installed packages", 900, cwd=tmp)
    return json.loads(out.read_text())


def _tracebacks(result: dict, names) -> str:
    return "\n\n".join(f"{name}: {result['failures'][name]['traceback']}" for name in sorted(names))


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """One fresh venv for the module (the tests add to it in turn); removed afterwards (about 2.5 GB with the
    [platform] extra, and pytest keeps 3 runs' tmp dirs)."""
    tmp = tmp_path_factory.mktemp("install")
    reason = _index_unreachable(tmp)
    if reason:
        pytest.skip(reason)
    path = tmp / "venv"
    _run([sys.executable, "-m", "venv", path], "python -m venv", 300)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_core_install_imports_every_module(tmp_path, venv):
    src = _copy_project(tmp_path / "src")
    # the core dependencies only: no [platform], no [dev]
    _pip_install(venv, src, what="pip install (no extras)", cwd=tmp_path)
    result = _walk(venv, tmp_path)

    assert result["extras_present"] == [], f"an extra's package is in the fresh venv: {result['extras_present']}"
    lib = result["letstalk"]
    assert not lib["failures"], ("letstalk modules that do not import with the core dependencies alone:\n"
                                 + _tracebacks(lib, lib["failures"]))
    assert Path(lib["file"]).is_relative_to(venv), f"letstalk imported from {lib['file']}, not the fresh venv"
    unpacked = _source_modules(src, "letstalk") - set(lib["modules"])
    assert not unpacked, f"in letstalk/ but not in the installed package (no __init__.py?): {sorted(unpacked)}"
    assert len(lib["modules"]) > 10, lib["modules"]

    plat = result["letstalk_platform"]
    unexpected = [name for name, f in plat["failures"].items()
                  if (f["missing"] or "").split(".")[0] not in PLATFORM_ONLY]
    assert not unexpected, ("letstalk_platform modules that fail without the [platform] extra for another reason "
                            "than a missing platform package:\n" + _tracebacks(plat, unexpected))
    unpacked = _source_modules(src, "letstalk_platform") - set(plat["modules"])
    assert not unpacked, f"in platform/letstalk_platform/ but not in the installed package: {sorted(unpacked)}"

    helped = _run([venv / "bin" / "letstalk", "--help"], "letstalk --help", 300, cwd=tmp_path)
    assert "usage:" in helped.stdout and "render" in helped.stdout, helped.stdout


def test_wheel_install_renders_with_the_shipped_demo_model(tmp_path, venv):
    """`letstalk render PORTRAIT AUDIO -o OUT.mp4`, nothing else, after a non-editable install whose source is
    gone, from a folder outside the checkout: the demo model comes from the installed package."""
    from letstalk.media import load_video_frames
    from letstalk.synthetic import draw_portrait, speech_like_audio

    src = _copy_project(tmp_path / "src")
    _pip_install(venv, src, what="pip install (non-editable)", cwd=tmp_path)
    shutil.rmtree(src)  # nothing installed may point back at the source
    work = tmp_path / "elsewhere"
    work.mkdir()
    Image.fromarray(draw_portrait(64, seed=0)).save(work / "portrait.png")
    sf.write(work / "speech.wav", speech_like_audio(0.4, seed=0), 16000)  # 0.4 s at 25 fps: 10 frames

    run = _run([venv / "bin" / "letstalk", "render", "portrait.png", "speech.wav", "-o", "out.mp4"],
               "letstalk render (no --model)", 600, cwd=work)
    assert (work / "out.mp4").is_file() and "10 frames" in run.stdout, run.stdout
    assert len(load_video_frames(work / "out.mp4")) == 10
    notice = re.search(r"model: the demo model \((.+?)\), trained on drawn faces", run.stderr)
    assert notice and "will not look real" in run.stderr, run.stderr
    shipped = Path(notice[1])
    assert shipped.is_relative_to(venv.resolve()), f"the demo model came from {shipped}, not the installed package"
    # every file of the bundle, weights and configs, is in the wheel
    files = {str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file()}
    source = ROOT / "letstalk" / "models" / "demo"
    assert files == {str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()}


@dataclass
class DockerSteps:
    """What cluster/docker/Dockerfile does from its WORKDIR on: COPY (sources, dest) pairs before and after
    its project install, that install's pip arguments and its `python -c` check (ARG defaults filled in)."""
    workdir: str = "/"
    before: list[tuple[list[str], str]] = field(default_factory=list)
    install: list[str] = field(default_factory=list)
    check: str = ""
    after: list[tuple[list[str], str]] = field(default_factory=list)


def _docker_steps(text: str) -> DockerSteps:
    instructions, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):  # a continuation: joined with the next line
            pending += line.rstrip()[:-1] + " "
            continue
        word, _, rest = (pending + line).strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    args: dict[str, str] = {}
    steps = DockerSteps()
    for instr, rest in instructions:
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), rest)
        if instr == "ARG":
            name, _, default = rest.partition("=")
            if default:
                args.setdefault(name.strip(), default.strip().strip('"'))
        elif instr == "WORKDIR":
            steps.workdir = rest
        elif instr == "COPY" and "--from" not in rest:
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            (steps.after if steps.install else steps.before).append((words[:-1], words[-1]))
        elif instr == "RUN" and re.search(r"pip install (-\S+ )*-e ", rest):
            for part in rest.split("&&"):
                argv = shlex.split(part)
                if argv[:2] == ["pip", "install"]:
                    steps.install = argv[2:]
                elif argv[:2] == ["python", "-c"]:
                    steps.check = argv[2]
    assert steps.install and steps.check, "no `pip install -e ... && python -c ...` RUN in the Dockerfile"
    return steps


def _docker_copy(sources: list[str], dest: str, workdir: str, image: Path) -> None:
    """COPY from the build context (the repository root) into `image` (the WORKDIR): a folder's contents go
    into dest; a file goes into dest when dest ends with / (or is a folder), else becomes dest."""
    if dest.startswith("/"):
        dest = str(Path(dest).relative_to(workdir))
    target = image / dest
    for name in sources:
        src = ROOT / name
        assert src.exists(), f"the Dockerfile copies {name}, which is not in the repository"
        if src.is_dir():
            shutil.copytree(src, target, ignore=SKIP, dirs_exist_ok=True)
        else:
            into = dest.endswith("/") or target.is_dir()
            (target if into else target.parent).mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target / src.name if into else target)


def test_dockerfile_install_imports_every_module(tmp_path, venv):
    steps = _docker_steps(DOCKERFILE.read_text())
    image = tmp_path / "image"  # the image's WORKDIR
    image.mkdir()
    for sources, dest in steps.before:
        _docker_copy(sources, dest, steps.workdir, image)
    _pip_install(venv, *steps.install, what=f"pip install {shlex.join(steps.install)} (as the Dockerfile)",
                 cwd=image)
    # the Dockerfile's own check, less its CUDA assertion (torch here is the CPU build of the same pin)
    check = "; ".join(s for s in map(str.strip, steps.check.split(";")) if "torch.version.cuda" not in s)
    assert re.match(r"import \w", check), check
    _run([venv / "bin" / "python", "-c", check], "the Dockerfile's python -c check", 600, cwd=image)

    result = _walk(venv, tmp_path)
    for top in PACKAGES:
        walked = result[top]
        assert not walked["failures"], (f"{top} modules that do not import in the Dockerfile's install:\n"
                                        + _tracebacks(walked, walked["failures"]))
        assert Path(walked["file"]).is_relative_to(image), f"{top} imported from {walked['file']}, not the copy"
        missing = _source_modules(image, top) - set(walked["modules"])
        assert not missing, f"{top} modules in the checkout but not in the image: {sorted(missing)}"

    # the rest of the image (jobs/, cluster/), then each job script loads as `python jobs/NAME.py` does there
    for sources, dest in steps.after:
        _docker_copy(sources, dest, steps.workdir, image)
    jobs = sorted(str(p.relative_to(image)) for p in (image / "jobs").glob("*.py"))
    assert {"jobs/evaluate.py", "jobs/render_batch.py", "jobs/serve.py"} <= set(jobs), jobs
    _run([venv / "bin" / "python", "-c", JOBS, *jobs], "loading the job scripts in the image", 600, cwd=image)
