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


class StaleLockError(RuntimeError):
    """A torch C++-extension build lock that no process holds: every later build would wait on it forever."""


def extension_build_root() -> Path:
    """Where torch (and so DeepSpeed's JIT ops) builds C++ extensions: $TORCH_EXTENSIONS_DIR or ~/.cache."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def _builders_in(folder: Path) -> bool:
    """Whether a live process works in `folder` (ninja and the compiler run there) or names it."""
    target = str(folder.resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.readlink(proc / "cwd").startswith(target):
                return True
            if target.encode() in (proc / "cmdline").read_bytes():
                return True
        except OSError:
            continue  # gone, or not ours to read
    return False


def check_extension_locks(root: Path | None = None, wait_s: float = 5.0, poll_s: float = 0.5) -> None:
    """Raise StaleLockError (one line, with the path to remove) when an extension build folder holds a
    `lock` that no live process is building under. torch's FileBaton never expires: a build that
    was killed leaves the lock, and every later DeepSpeed start then waits in silence.

    A lock is given `wait_s` to go away or to show a builder (a build that just took it)."""
    import time

    root = extension_build_root() if root is None else root
    if not root.is_dir():
        return
    locks = [p for p in list(root.glob("*/lock")) + list(root.glob("*/*/lock")) if p.is_file()]
    deadline = time.monotonic() + wait_s
    while locks:
        locks = [p for p in locks if p.exists() and not _builders_in(p.parent)]
        if not locks or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    if locks:
        raise StaleLockError(f"stale torch extension build lock {locks[0]} (a killed build; no process is building "
                             f"there): remove it (rm {locks[0]}) and start again")
