"""The serving application's settings and the check of its `serve run` configs.

`AppArgs` are the arguments of `build_app` (serve.py): the `args:` of a Serve config, or jobs/serve.py's
flags; the Ingress and its job table take them. `check_serve_config` checks a `serve run` config (or a
RayService's serveConfigV2) of this application: tests/platform/test_cluster_configs.py runs it on every
one under cluster/. Neither needs FastAPI or a running Serve.
"""


import importlib.util
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema, ServeApplicationSchema,
                              ServeDeploySchema)

from letstalk.accel import InferenceOptions

from .configs import ConfigError, check_known, error_line, parse_config, require
from .render import RenderDefaults, check_renderer_device

TOKEN_ENV = "LETSTALK_API_TOKEN"


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of a Serve config, or jobs/serve.py's flags)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="bundle folder or models:/<name>@<alias>")
    mlflow_uri: str | None = Field(None, description="registry for models:/ URIs (default: MLFLOW_TRACKING_URI)")
    token: SecretStr | None = Field(None, description=f"bearer token; default: ${TOKEN_ENV} in the replica's env")
    use_gpu: bool = Field(False, description="one GPU per Renderer replica")
    renderer_cpus: float = Field(1.0, ge=0, description="CPUs per Renderer replica")
    num_replicas: int = Field(1, ge=1, description="Renderer replicas (the minimum when autoscaling)")
    max_replicas: int | None = Field(None, ge=1, description="autoscale Renderer replicas up to this many")
    max_jobs_per_replica: int = Field(2, ge=1, description="renders one replica runs at once")
    max_queued_jobs: int = Field(0, ge=0, description="accepted jobs beyond the running ones before 503")
    max_upload_mb: float = Field(50.0, gt=0, description="largest upload per file (413 above it)")
    max_audio_seconds: float = Field(600.0, gt=0, description="longest audio (413 above it)")
    max_image_pixels: int = Field(40_000_000, gt=0, description="largest portrait (413 above it)")
    retry_after_s: int = Field(10, ge=1)
    job_ttl_s: float = Field(24 * 3600, gt=0, description="finished jobs (and videos) kept this long")
    work_dir: str | None = Field(None, description="the job table (jobs.db) and the finished videos: they outlive "
                                 "a restart (default: TMP/letstalk-serve)")
    jobs_db: str | None = Field(None, description="SQLAlchemy URL of the job table, SQLite or PostgreSQL (default: "
                                "sqlite:///WORK_DIR/jobs.db)")
    storage: str | None = Field(None, description="where finished videos go: a folder (default WORK_DIR/videos) or a "
                                "pyarrow filesystem URI, e.g. s3://bucket/prefix?region=eu-west-1 (credentials from "
                                "the environment), which Renderers on any node upload to")
    ingress_replicas: int = Field(1, ge=1, description="Ingress (HTTP) replicas sharing the job table and its one "
                                  "count of the render slots; WORK_DIR must be one folder for all of them")
    heartbeat_s: float = Field(5.0, gt=0, description="how often an Ingress replica records that its jobs live; a job "
                               "whose replica is gone (or silent 3 beats) is failed")
    defaults: RenderDefaults = RenderDefaults()
    inference: dict = Field(default_factory=lambda: InferenceOptions().to_dict(), description=(
        "speed switches (letstalk.accel.InferenceOptions): dtype fp32|bf16|fp16, sdpa_backend "
        "auto|flash|efficient|math, compile none|regional|full, overlap_decode, batch_clips, max_batch, "
        "batch_wait_ms"))

    @field_validator("inference")
    @classmethod
    def _check_inference(cls, value: dict) -> dict:
        return InferenceOptions.from_dict(value).to_dict()  # one source of truth for names and ranges

    @model_validator(mode="after")
    def _fp16_needs_a_gpu(self) -> "AppArgs":
        check_renderer_device(self.inference, self.use_gpu)
        return self


def check_serve_config(cfg: Any, gpus_per_pod: dict[str, int] | None = None, where: str = "serve config") -> None:
    """A Serve config (`serve run` YAML, a RayService's serveConfigV2) through Ray Serve's schema models
    (they allow unknown keys, so those are checked here), and our application's builder args through
    AppArgs / RenderDefaults. `gpus_per_pod`: GPUs per pod of each worker group (None: no GPU needed).
    Raises ConfigError."""
    require(isinstance(cfg, dict), f"{where}: a Serve config must be a mapping")
    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as e:
        raise ConfigError(f"{where}: {error_line(e)}") from None
    check_known(cfg, set(ServeDeploySchema.model_fields), where)
    check_known(cfg.get("http_options") or {}, set(HTTPOptionsSchema.model_fields), f"{where} http_options")
    apps = cfg.get("applications") or []
    require(apps, f"{where}: no applications")
    gpu_replica_max = 0.0
    for app in apps:
        awhere = f"{where} app {app.get('name')}"
        check_known(app, set(ServeApplicationSchema.model_fields), awhere)
        module, _, attr = app["import_path"].partition(":")
        require(module and attr.isidentifier(), f"{awhere}: import_path must be 'module:builder'")
        # The module itself may not exist yet; its top-level package must.
        require(importlib.util.find_spec(module.split(".")[0]) is not None, f"{awhere}: no package for {module}")
        if app["import_path"] == "letstalk_platform.serve:build_app":
            parse_config(AppArgs, app.get("args") or {})
            names = {d.get("name") for d in app.get("deployments") or []}
            require(names <= {"Ingress", "Renderer"}, f"{awhere}: build_app makes Ingress and Renderer, not {names}")
            for dep in app.get("deployments") or []:
                if dep.get("name") == "Ingress":  # the job table lives in its one replica
                    require(dep.get("num_replicas", 1) == 1 and "autoscaling_config" not in dep,
                            f"{awhere}: Ingress must have exactly one replica")
                if dep.get("name") == "Renderer" and "user_config" in dep:
                    parse_config(RenderDefaults, dep["user_config"])
        for dep in app.get("deployments") or []:
            dwhere = f"{awhere} deployment {dep.get('name')}"
            check_known(dep, set(DeploymentSchema.model_fields), dwhere)
            if "autoscaling_config" in dep:
                check_known(dep["autoscaling_config"], set(AutoscalingConfig.model_fields), f"{dwhere} autoscaling")
                try:
                    AutoscalingConfig(**dep["autoscaling_config"])  # e.g. max_replicas >= min_replicas
                except (ValidationError, ValueError) as e:
                    raise ConfigError(f"{dwhere} autoscaling: {error_line(e)}") from None
            opts = dep.get("ray_actor_options") or {}
            check_known(opts, set(RayActorOptionsSchema.model_fields), f"{dwhere} ray_actor_options")
            gpu_replica_max = max(gpu_replica_max, float(opts.get("num_gpus", 0)))
    if gpus_per_pod is None:
        return
    require(gpu_replica_max > 0, f"{where}: no deployment asks for a GPU (num_gpus)")
    require(max(gpus_per_pod.values(), default=0) >= gpu_replica_max,
            f"{where}: no worker group has {gpu_replica_max} GPU(s) per pod for a replica")
