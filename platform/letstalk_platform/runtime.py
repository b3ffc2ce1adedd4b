"""Job plumbing shared by jobs/*.py: typed YAML configs with flag overrides, and attaching to Ray."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


def load_config(model: type[T], path: str | os.PathLike | None, overrides: dict[str, Any]) -> T:
    """YAML file (optional) + non-None flag overrides -> a validated config; errors are one line."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {str(p)!r} not found")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{p}: the top level must be a mapping of settings")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"invalid {model.__name__}: {problems}") from None


def init_ray(num_cpus: int | None = None) -> None:
    """Attach to the cluster of `ray job submit` (RAY_ADDRESS) or start a local Ray on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env={"worker_process_setup_hook": quiet_state_api_warnings})


def quiet_state_api_warnings() -> None:
    """Worker setup hook of the local Ray: it runs without a dashboard, so the State API is never
    there, and Ray Train's placement-group watchdog would warn so every few seconds of a run."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
