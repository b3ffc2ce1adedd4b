"""Config checks that jobs run at start-up, before Ray starts, and that
tests/platform/test_cluster_configs.py runs on every file under cluster/.

- `load_documents` / `load_mapping`: YAML and JSON that refuse duplicate keys (PyYAML and json
  keep the last one silently).
- `parse_config`: a pydantic settings model from a mapping; its errors are one line.
- `check_deepspeed`: a DeepSpeed JSON through DeepSpeed's own parser, plus what it leaves unchecked:
  unknown top-level keys, "auto" values, optimizer params against the class DeepSpeed would build.
- `check_train`: a TrainConfig's DeepSpeed base JSON, and the DeepSpeed config the run builds from
  it (`letstalk_platform.train.deepspeed_config`).
- `check_serve_config`: a `serve run` config (or a RayService's serveConfigV2) through Ray Serve's
  schema models and our AppArgs / RenderDefaults.

Every check raises ConfigError, a ValueError with a one-line message (jobs exit with code 2).
What only makes sense for this repository (the presets' house rules, Ray launcher and KubeRay
manifests, the Dockerfile against pyproject.toml) stays in the test.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from .train import TrainConfig

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config that a job must not start with; the message is one line."""


def _require(ok: Any, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _problems(error: ValidationError) -> str:
    """Each bad key of a pydantic ValidationError and why, on one line."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())


def _one_line(error: Any) -> str:
    """An exception (a pydantic ValidationError: each bad key and why) as one line."""
    if isinstance(error, ValidationError):
        return f"{error.title}: {_problems(error)}"
    return " ".join(str(error).split())


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------

class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _json_no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ConfigError(f"duplicate keys {dupes}")  # DeepSpeed's own loader refuses them too
    return dict(pairs)


def parse_yaml(text: str) -> Any:
    """One YAML document; duplicate keys are an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_documents(path: str | os.PathLike) -> list[Any]:
    """The documents of a .json file (one) or a YAML file (empty ones skipped); duplicate keys are an error."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        return [json.loads(text, object_pairs_hook=_json_no_duplicates)]
    return [doc for doc in yaml.load_all(text, Loader=_UniqueKeyLoader) if doc is not None]


def load_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """A config file holding one mapping of settings (an empty file is an empty mapping)."""
    path = Path(path)
    _require(path.is_file(), f"config file {str(path)!r} not found")
    try:
        docs = load_documents(path)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: {_one_line(e)}") from None
    _require(len(docs) <= 1, f"{path}: expected one document, found {len(docs)}")
    data = docs[0] if docs else {}
    _require(isinstance(data, dict), f"{path}: the top level must be a mapping of settings")
    return data


def parse_config(model: type[T], data: Any) -> T:
    """A settings model from a mapping; a validation error becomes one line naming each bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid {model.__name__}: {_problems(e)}") from None


# ------------------------------------------------------------------------------------------
# DeepSpeed
# ------------------------------------------------------------------------------------------

@functools.cache
def deepspeed_top_level_keys() -> frozenset[str]:
    """Every key name DeepSpeed's config code knows (constants and config-model fields): a typo guard."""
    import pydantic

    importlib.import_module("deepspeed.runtime.config")  # loads DeepSpeed's config modules

    keys: set[str] = set()
    for name, mod in list(sys.modules.items()):
        if not name.startswith("deepspeed") or not name.endswith(("constants", "config")) or mod is None:
            continue
        for attr, value in vars(mod).items():
            if attr.isupper() and isinstance(value, str):
                keys.add(value)
            elif (inspect.isclass(value) and issubclass(value, pydantic.BaseModel)
                  and value.__module__ == name):
                for fname, fld in value.model_fields.items():
                    keys.add(fname)
                    if fld.alias:
                        keys.add(fld.alias)
    return frozenset(keys)


def _find_auto(node: Any, where: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{where}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, f"{where}[{i}]")]
    return [where.lstrip(".")] if node == "auto" else []


def _check_optimizer(cfg: dict, where: str) -> None:
    """Params must fit the optimizer class DeepSpeed builds from them (engine._configure_basic_optimizer)."""
    import torch
    from deepspeed.ops.adam import FusedAdam

    opt = cfg.get("optimizer")
    _require(isinstance(opt, dict) and opt.get("type"), f"{where}: set an optimizer (jobs/train.py overrides its lr)")
    _require(opt["type"].lower() in {"adam", "adamw"},
             f"{where}: optimizer {opt['type']!r}: LetsTalk trains with AdamW")
    params = dict(opt.get("params") or {})
    torch_adam = params.pop("torch_adam", False)
    params.pop("adam_w_mode", None)
    params.pop("fp32_optimizer_states", None)
    offload = ((cfg.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device", "none")
    if torch_adam:
        params.pop("foreach", None)
        cls = torch.optim.AdamW
    elif offload != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam as cls
    else:
        cls = FusedAdam
    try:
        inspect.signature(cls.__init__).bind(None, [], **params)
    except TypeError as e:
        raise ConfigError(f"{where}: optimizer params {sorted(params)} do not fit {cls.__name__}: {e}") from None
    # Value ranges (lr, betas, eps, weight_decay) checked by torch's own AdamW constructor.
    shared = {k: v for k, v in params.items() if k in ("lr", "betas", "eps", "weight_decay", "amsgrad")}
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], **shared)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where}: optimizer params: {e}") from None


def check_deepspeed(cfg: Any, where: str = "DeepSpeed config"):
    """A DeepSpeed config dict as DeepSpeed parses it (world size 1); returns its DeepSpeedConfig."""
    from deepspeed.runtime.config import DeepSpeedConfig

    _require(isinstance(cfg, dict), f"{where}: the top level must be an object")
    autos = _find_auto(cfg)
    _require(not autos, f'{where}: "auto" is resolved only by the HF Trainer integration; use numbers: {autos}')
    unknown = sorted(set(cfg) - deepspeed_top_level_keys())
    _require(not unknown, f"{where}: unknown top-level DeepSpeed key(s) {unknown} (DeepSpeed would ignore them "
             "silently)")
    try:
        ds = DeepSpeedConfig(copy.deepcopy(cfg))
    except Exception as e:  # DeepSpeed raises AssertionError, ValueError and pydantic errors alike
        raise ConfigError(f"{where}: {_one_line(e)}") from None
    _check_optimizer(cfg, where)
    return ds


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------

def check_train(cfg: TrainConfig, root: str | os.PathLike | None = None) -> None:
    """What the TrainConfig model cannot see: optim.deepspeed names a DeepSpeed JSON that DeepSpeed
    accepts, and the config the workers will hand DeepSpeed (that JSON with this run's batch size,
    lr, clipping, ZeRO stage, precision and AdamW kernel on top) is valid too.

    root: the folder relative paths are under (default: the working directory)."""
    from .train import deepspeed_config

    if cfg.optim.deepspeed is not None:
        path = Path(root or ".") / cfg.optim.deepspeed
        _require(path.is_file() and path.suffix == ".json",
                 f"optim.deepspeed: {cfg.optim.deepspeed} is not a DeepSpeed .json file")
        base = load_mapping(path)
        base.pop("train_batch_size", None)  # checked below against this run's world size, not 1
        check_deepspeed(base, f"optim.deepspeed {cfg.optim.deepspeed}")
        cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"deepspeed": str(path)})})
    run = deepspeed_config(cfg)
    # DeepSpeed checks train_batch_size = micro batch × accumulation × world size; the world here is 1
    total = run.pop("train_batch_size", None)
    per_step = run["train_micro_batch_size_per_gpu"] * run["gradient_accumulation_steps"] * cfg.scaling.num_workers
    _require(total is None or total == per_step,
             f"optim.deepspeed: train_batch_size {total} is not data.batch_size × gradient_accumulation_steps × "
             f"scaling.num_workers = {per_step} (leave it out: jobs/train.py sets the batch)")
    check_deepspeed(run, "the run's DeepSpeed config (optim.deepspeed + this config)")


# ------------------------------------------------------------------------------------------
# Serve
# ------------------------------------------------------------------------------------------

def check_known(fields: Any, known: set[str], where: str) -> None:
    """Fail on keys outside `known` (a misspelled field that a schema would drop or ignore)."""
    extra = sorted(set(fields) - known)
    _require(not extra, f"{where}: unknown field(s) {extra}")


def check_serve_config(cfg: Any, gpus_per_pod: dict[str, int] | None = None, where: str = "serve config") -> None:
    """A Serve config (`serve run` YAML, a RayService's serveConfigV2) through Ray Serve's schema models
    (they allow unknown keys, so those are checked here), and our application's builder args through
    AppArgs / RenderDefaults. `gpus_per_pod`: GPUs per pod of each worker group (None: no GPU needed)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema,
                                  ServeApplicationSchema, ServeDeploySchema)

    _require(isinstance(cfg, dict), f"{where}: a Serve config must be a mapping")
    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as e:
        raise ConfigError(f"{where}: {_one_line(e)}") from None
    check_known(cfg, set(ServeDeploySchema.model_fields), where)
    check_known(cfg.get("http_options") or {}, set(HTTPOptionsSchema.model_fields), f"{where} http_options")
    apps = cfg.get("applications") or []
    _require(apps, f"{where}: no applications")
    gpu_replica_max = 0.0
    for app in apps:
        awhere = f"{where} app {app.get('name')}"
        check_known(app, set(ServeApplicationSchema.model_fields), awhere)
        module, _, attr = app["import_path"].partition(":")
        _require(module and attr.isidentifier(), f"{awhere}: import_path must be 'module:builder'")
        # The module itself may not exist yet; its top-level package must.
        _require(importlib.util.find_spec(module.split(".")[0]) is not None, f"{awhere}: no package for {module}")
        if app["import_path"] == "letstalk_platform.serve:build_app":
            from .render import RenderDefaults
            from .serve import AppArgs

            parse_config(AppArgs, app.get("args") or {})
            names = {d.get("name") for d in app.get("deployments") or []}
            _require(names <= {"Ingress", "Renderer"}, f"{awhere}: build_app makes Ingress and Renderer, not {names}")
            for dep in app.get("deployments") or []:
                if dep.get("name") == "Ingress":  # the job table lives in its one replica
                    _require(dep.get("num_replicas", 1) == 1 and "autoscaling_config" not in dep,
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
                    raise ConfigError(f"{dwhere} autoscaling: {_one_line(e)}") from None
            opts = dep.get("ray_actor_options") or {}
            check_known(opts, set(RayActorOptionsSchema.model_fields), f"{dwhere} ray_actor_options")
            gpu_replica_max = max(gpu_replica_max, float(opts.get("num_gpus", 0)))
    if gpus_per_pod is None:
        return
    _require(gpu_replica_max > 0, f"{where}: no deployment asks for a GPU (num_gpus)")
    _require(max(gpus_per_pod.values(), default=0) >= gpu_replica_max,
             f"{where}: no worker group has {gpu_replica_max} GPU(s) per pod for a replica")
