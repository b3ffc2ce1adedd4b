"""All MLflow access goes through here: tracking (rank 0 only) and the model registry.

A registered model version is a LetsTalkPipeline bundle stored as the run artifact
`bundle/` and registered under a name with an alias (e.g. `models:/letstalk@candidate`);
`resolve_bundle` turns such a URI (or a plain folder) into a local bundle directory.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field

MODEL_URI = re.compile(r"^models:/(?P<name>[A-Za-z0-9_.-]+)@(?P<alias>[A-Za-z0-9_-]+)$")


def start_run(uri: str, experiment: str, run_name: str | None, params: dict[str, Any]) -> str:
    """Create a run (driver side), log flat params; returns the run id the workers log into."""
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None and uri.startswith("sqlite:///"):
        # keep a local store's artifacts next to its database, not in whatever the cwd is
        root = Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / experiment
        mlflow.create_experiment(experiment, artifact_location=root.as_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    return run.info.run_id


def flat_params(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings -> MLflow params with dotted names ({"optim": {"lr": 1e-4}} -> {"optim.lr": 1e-4})."""
    flat: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, dict):
            flat |= flat_params(v, f"{prefix}{k}.")
        else:
            flat[f"{prefix}{k}"] = v
    return flat


class RegisterConfig(BaseModel):
    """Settings of jobs/register.py (YAML keys; flags override them)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="a checkpoint folder written by jobs/train.py")
    data: str = Field(description="the shard folder the model was trained on")
    mlflow_uri: str = Field(description="the tracking and registry store")
    name: str = Field("letstalk", description="registered model name")
    alias: str = Field("candidate", description="alias the new version gets")
    experiment: str = "letstalk"
    run_id: str | None = Field(None, description="attach to this run (None: a new run named register-<name>)")


class RankZeroLogger:
    """Metrics and artifacts into an existing run, from world rank 0 only (a no-op elsewhere)."""

    def __init__(self, uri: str, run_id: str, rank: int):
        self.enabled = rank == 0
        self.client = MlflowClient(uri) if self.enabled else None
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.enabled:
            for k, v in values.items():
                if math.isfinite(v):
                    self.client.log_metric(self.run_id, k, float(v), step=step)

    def tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.client.set_tag(self.run_id, key, value)

    def artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), folder)

    def text(self, text: str, name: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, name)


def register_bundle(uri: str, run_id: str, bundle_dir: str | os.PathLike, name: str, alias: str) -> int:
    """Upload a bundle folder as run artifact `bundle/`, register it as `name`, point `alias` at it."""
    client = MlflowClient(uri)
    client.log_artifacts(run_id, str(bundle_dir), "bundle")
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run_id}/bundle", run_id=run_id)
    client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def resolve_bundle(model: str, uri: str | None = None, cache: str | os.PathLike | None = None) -> Path:
    """A bundle folder, or `models:/<name>@<alias>` from the registry (`uri`, else $MLFLOW_TRACKING_URI)
    downloaded to this node's cache. Processes that resolve the same version at once (workers, actors)
    each download to a temporary folder; the first rename wins."""
    m = MODEL_URI.match(model)
    if m is None:
        path = Path(model)
        if not (path / "pipeline.json").is_file():
            raise ValueError(f"{model!r} is neither a bundle folder (no pipeline.json) nor models:/<name>@<alias>")
        return path
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    client = MlflowClient(uri)
    try:
        version = client.get_model_version_by_alias(m["name"], m["alias"])
    except mlflow.exceptions.MlflowException as e:
        raise ValueError(f"{model}: not in the registry at {uri or mlflow.get_tracking_uri()} "
                         f"({' '.join(str(e).split())[:200]})") from None
    # keyed by the registry and the version's source too: two registries both have a "letstalk" v1
    key = hashlib.sha1(f"{uri or mlflow.get_tracking_uri()}|{version.source}".encode()).hexdigest()[:12]
    dst = Path(cache or Path.home() / ".cache" / "letstalk" / "models") / f"{m['name']}-v{version.version}-{key}"
    if not (dst / "pipeline.json").is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp), tracking_uri=uri)
            inner = tmp / "bundle"  # download keeps the artifact folder's name
            if inner.is_dir():
                for child in inner.iterdir():
                    child.rename(tmp / child.name)
                inner.rmdir()
            if dst.is_dir() and not (dst / "pipeline.json").is_file():
                shutil.rmtree(dst, ignore_errors=True)  # a partial folder (a killed download of an older version)
            try:
                tmp.rename(dst)
            except OSError:  # another process renamed its copy first: the same bytes
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dst
