"""MLflow through a real tracking server on 127.0.0.1 and a plain sqlite store: runs, registry, aliases."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from letstalk_platform import tracking

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d}/m.db",
                             "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(uri + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not start")
    yield uri
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:  # a loaded machine: uvicorn workers can be slow to stop
        proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("store", ["server", "sqlite"])
def test_run_registry_and_alias(store, request, bundle, tmp_path):
    uri = request.getfixturevalue("server") if store == "server" else f"sqlite:///{tmp_path}/m.db"
    run_id = tracking.start_run(uri, "exp", "r1", {"preset": "tiny", "lr": 1e-3})
    log = tracking.RankZeroLogger(uri, run_id, rank=0)
    log.metrics({"loss": 0.5, "nan": float("nan")}, step=3)
    tracking.RankZeroLogger(uri, run_id, rank=1).metrics({"loss": 9.0}, step=3)  # not rank 0: ignored
    client = MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(3, 0.5)]
    assert client.get_run(run_id).data.params["lr"] == "0.001"
    v1 = tracking.register_bundle(uri, run_id, bundle, "talk", "candidate")
    v2 = tracking.register_bundle(uri, run_id, bundle, "talk", "production")
    assert (v1, v2) == (1, 2)
    local = tracking.resolve_bundle("models:/talk@production", uri, cache=tmp_path / "cache")
    assert (local / "pipeline.json").is_file() and local.name.startswith("talk-v2-")
    assert (local / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(ValueError, match="not in the registry"):
        tracking.resolve_bundle("models:/talk@nope", uri, cache=tmp_path / "cache")
    with pytest.raises(ValueError, match="neither a bundle folder"):
        tracking.resolve_bundle("../etc/passwd", uri)


def test_the_library_resolves_registry_names_through_the_platforms_entry_point(bundle, tmp_path, monkeypatch):
    """`letstalk render --model models:/NAME@ALIAS`: letstalk.cli finds `resolve_bundle` as the `models`
    resolver of the letstalk.model_resolvers entry-point group (pyproject.toml), not by importing it."""
    from importlib.metadata import entry_points

    from letstalk.cli import RESOLVERS, resolve_model

    (registered,) = entry_points(group=RESOLVERS, name="models")
    assert registered.value == "letstalk_platform.tracking:resolve_bundle"
    assert registered.load() is tracking.resolve_bundle
    uri = f"sqlite:///{tmp_path}/m.db"
    tracking.register_bundle(uri, tracking.start_run(uri, "exp", "r1", {}), bundle, "talk", "production")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # resolve_bundle's default cache: ~/.cache/letstalk/models
    local = resolve_model("models:/talk@production", uri)
    assert local.parent == tmp_path / "home" / ".cache" / "letstalk" / "models" and local.name.startswith("talk-v1-")
    assert (local / "pipeline.json").is_file()
    with pytest.raises(ValueError, match=r"^models:/talk@nope: not in the registry"):
        resolve_model("models:/talk@nope", uri)
