"""Job plumbing shared by jobs/*.py: typed YAML configs with flag overrides, and attaching to Ray."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel

from .configs import ConfigError, load_mapping, parse_config

T = TypeVar("T", bound=BaseModel)


def load_config(model: type[T], path: str | os.PathLike | None, overrides: dict[str, Any]) -> T:
    """YAML file (optional) + non-None overrides -> a validated config; errors are one line.

    An override's key is a setting's dotted path ("data.batch_size" sets `batch_size` in the YAML's
    `data:` section, "steps" a top-level key)."""
    data = load_mapping(path) if path is not None else {}
    return parse_config(model, with_overrides(data, {k: v for k, v in overrides.items() if v is not None}))


def with_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `data` with each dotted key of `overrides` set (missing sections are created)."""
    out = copy.deepcopy(data)
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = out
        for i, section in enumerate(sections):
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {key}: {'.'.join(sections[:i + 1])} is a value, not a section")
        node[name] = value
    return out


def config_field(model: type[BaseModel], key: str):
    """The pydantic FieldInfo of a dotted key ("data.batch_size") of a settings model."""
    *sections, name = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
        # an optional section (`distill: DistillSection | None`): its model
        model = next((a for a in get_args(model) if isinstance(a, type) and issubclass(a, BaseModel)), model)
    return model.model_fields[name]


def flag_kwargs(kind: Any) -> dict[str, Any]:
    """argparse arguments for a setting of type `kind` (X | None counts as X): --x / --no-x for a
    bool, choices for a Literal, a repeatable flag for a list, else the type."""
    if get_origin(kind) in (Union, types.UnionType):
        kind = next(a for a in get_args(kind) if a is not type(None))
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(kind) is Literal:
        values = list(get_args(kind))
        return {"type": type(values[0]), "choices": values}
    if get_origin(kind) is list:
        return {"type": get_args(kind)[0], "action": "append"}
    return {"type": kind}


def add_config_flags(parser: argparse.ArgumentParser, model: type[BaseModel], flags: dict[str, str],
                     choices: dict[str, list] | None = None) -> None:
    """One flag per setting, e.g. {"--batch-size": "data.batch_size"}: its type, choices (a Literal)
    and help (description and default) come from the model, so no default is written twice.
    An absent flag is absent from the parsed namespace (default SUPPRESS): the YAML's value, or
    else the model's default, stands. Booleans get --x / --no-x; lists are repeatable."""
    for flag, key in flags.items():
        info = config_field(model, key)
        default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)}"
        kwargs = flag_kwargs(info.annotation)
        repeat = "; repeatable" if kwargs.get("action") == "append" else ""
        helptext = f"{info.description + ' ' if info.description else ''}({key}; {default}{repeat})"
        kwargs |= {"dest": key, "default": argparse.SUPPRESS, "help": helptext.replace("%", "%%")}
        if choices and key in choices:
            kwargs["choices"] = choices[key]
        if "type" in kwargs and "choices" not in kwargs:
            kwargs["metavar"] = key.rsplit(".", 1)[-1].upper()
        parser.add_argument(flag, **kwargs)


def init_ray(num_cpus: int | None = None, own: bool = False) -> None:
    """Attach to the cluster of `ray job submit` (RAY_ADDRESS) or start a local Ray on 127.0.0.1.

    `own`: always start a new local Ray, never attach to one that `ray start` recorded on this machine
    (the tests' Ray: a cluster someone left running must not receive their work)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS") and not own:
        ray.init(log_to_driver=True)
    else:
        ray.init(address="local" if own else None, num_cpus=num_cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", runtime_env={"worker_process_setup_hook": quiet_state_api_warnings})


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


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def this_actor() -> tuple[str, str] | None:
    """(name, namespace) of the named actor this code runs in (a Serve replica), else None."""
    import ray

    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    name = context.get_actor_name() if context.get_actor_id() else None
    if not name:
        return None
    # the actor's own namespace (Serve's replicas live in "serve"), not the job's (context.namespace)
    spaces = [a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == name]
    return (name, spaces[0]) if len(spaces) == 1 else None


def actor_alive(actor: tuple[str, str]) -> bool:
    """Whether the named actor (this_actor()'s answer) still exists: a killed or crashed one is gone
    from the registry (a replica that replaces it has a new name)."""
    import ray

    try:
        ray.get_actor(actor[0], namespace=actor[1])
        return True
    except ValueError:
        return False


def local_target(out: str | os.PathLike | None, out_node: str | None) -> str | None:
    """`out` when the caller that will serve or keep the file runs on this node (write it in place),
    else None (send the bytes back): a folder of the same name on another node is not the caller's."""
    return str(out) if out is not None and out_node and out_node == node_id() else None
