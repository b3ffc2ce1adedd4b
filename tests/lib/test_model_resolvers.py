"""`--model SCHEME:/...` is resolved by whatever an installed package registers for the scheme in the
`letstalk.model_resolvers` entry-point group; the library imports no resolver (the platform registers
`models`: tests/platform/test_tracking.py). Here a plug-in distribution written into tmp_path and put on
sys.path registers its own schemes, as pip would install one."""

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from letstalk import cli

PLUGIN = '''from pathlib import Path


def resolve(name, registry=None):
    """fake:/NAME -> REGISTRY/NAME"""
    return Path(registry or "default-registry") / name.split(":/", 1)[1]


def other(name, registry=None):
    return Path("other")
'''


def distribution(site: Path, name: str, entries: str) -> None:
    """A minimal installed distribution (what pip writes): METADATA and entry_points.txt."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{cli.RESOLVERS}]\n{entries}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "fake_resolvers.py").write_text(PLUGIN)
    distribution(site, "letstalk_fake_plugin", "fake = fake_resolvers:resolve\n"
                                               "broken = fake_resolvers_missing:resolve\n"
                                               "typo = fake_resolvers:nosuch")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_a_registered_scheme_is_resolved_by_its_plugin(site, tmp_path):
    assert cli.resolve_model("fake:/tiny@production", str(tmp_path)) == tmp_path / "tiny@production"
    assert cli.resolve_model("fake:/tiny") == Path("default-registry") / "tiny"
    # no scheme: a folder, as before (a drive letter is no scheme)
    assert cli.resolve_model(tmp_path / "bundle") == tmp_path / "bundle"
    assert cli.resolve_model("C:/bundles/tiny") == Path("C:/bundles/tiny")


def test_an_unregistered_scheme_is_one_line(site):
    with pytest.raises(ValueError) as e:
        cli.resolve_model("nosuch:/x@y")
    message = str(e.value)
    assert message.startswith("nosuch:/x@y: no resolver for 'nosuch:' (installed: ")
    assert "fake:" in message and "'letstalk.model_resolvers'" in message and "\n" not in message


def test_without_the_platform_models_names_say_what_to_install(monkeypatch):
    """An install without the platform registers nothing for `models`."""
    registered = entry_points

    monkeypatch.setattr(cli, "entry_points", lambda **kw: [ep for ep in registered(**kw) if ep.name != "models"])
    with pytest.raises(ValueError) as e:
        cli.resolve_model("models:/x@y")
    assert str(e.value) == "models:/x@y: no resolver for 'models:' (pip install 'letstalk[platform]')"


def test_a_resolver_that_does_not_load_is_one_line(site):
    with pytest.raises(ValueError) as e:
        cli.resolve_model("broken:/x")
    assert str(e.value).startswith("broken:/x: the resolver for 'broken:' (fake_resolvers_missing:resolve) does not "
                                   "load: No module named 'fake_resolvers_missing' (installed: ")
    with pytest.raises(ValueError, match=r"^typo:/x: the resolver for 'typo:' \(fake_resolvers:nosuch\) does not load: "):
        cli.resolve_model("typo:/x")


def test_two_resolvers_for_one_scheme_are_refused(site):
    distribution(site, "letstalk_other_plugin", "fake = fake_resolvers:other")
    with pytest.raises(ValueError, match=r"^fake:/x: 2 resolvers for 'fake:' \(fake_resolvers:other, "
                                         r"fake_resolvers:resolve\): uninstall all but one$"):
        cli.resolve_model("fake:/x")


def test_the_cli_resolves_through_a_plugin_without_importing_the_platform(site, tmp_path):
    """In a fresh interpreter: a plug-in scheme resolves and neither the platform nor MLflow is imported;
    `letstalk render` with an unregistered scheme exits 2 with one line."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run([sys.executable, "-c", "import sys; from letstalk.cli import resolve_model; "
                            "print(resolve_model('fake:/tiny', sys.argv[1])); "
                            "print(sorted(m for m in ('letstalk_platform', 'mlflow') if m in sys.modules))",
                            str(tmp_path)], env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split("\n")[:2] == [str(tmp_path / "tiny"), "[]"]
    run = subprocess.run([sys.executable, "-m", "letstalk.cli", "render", "p.png", "a.wav", "-o", "out.mp4",
                          "--model", "nosuch:/x@y", "--threads", "1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("letstalk: error: nosuch:/x@y: no resolver for 'nosuch:' (installed: ")
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
