"""Config loading and checks shared by the jobs (run at start-up, before Ray starts) and by
tests/platform/test_cluster_configs.py (run on every file under cluster/).

- `load_documents` / `load_mapping`: YAML and JSON that refuse duplicate keys (PyYAML and json
  keep the last one silently).
- `parse_config`: a pydantic settings model from a mapping; its errors are one line.
- `check_known`: keys outside a schema's fields (schemas that allow unknown keys drop them silently).
- `check_deepspeed`: a DeepSpeed JSON through DeepSpeed's own parser, plus what it leaves unchecked:
  unknown top-level keys, "auto" values, optimizer params against the class DeepSpeed would build.

Every check raises ConfigError, a ValueError with a one-line message (jobs exit with code 2).
Each settings model lives with the code that runs it, and so does what checks it against the rest
of its module: `letstalk_platform.train.check_train` (a TrainConfig and its DeepSpeed config),
`letstalk_platform.serve_config.check_serve_config` (a `serve run` config and the app's AppArgs). This
module imports none of them. What only makes sense for this repository (the presets' house rules,
Ray launcher and KubeRay manifests, the Dockerfile against pyproject.toml) stays in the test.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config that a job must not start with; the message is one line."""


def require(ok: Any, message: str) -> None:
    """Raise ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def _problems(error: ValidationError) -> str:
    """Each bad key of a pydantic ValidationError and why, on one line."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())


def error_line(error: Any) -> str:
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
    require(path.is_file(), f"config file {str(path)!r} not found")
    try:
        docs = load_documents(path)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: {error_line(e)}") from None
    require(len(docs) <= 1, f"{path}: expected one document, found {len(docs)}")
    data = docs[0] if docs else {}
    require(isinstance(data, dict), f"{path}: the top level must be a mapping of settings")
    return data


def parse_config(model: type[T], data: Any) -> T:
    """A settings model from a mapping; a validation error becomes one line naming each bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid {model.__name__}: {_problems(e)}") from None


def check_known(fields: Any, known: set[str], where: str) -> None:
    """Fail on keys outside `known` (a misspelled field that a schema would drop or ignore)."""
    extra = sorted(set(fields) - known)
    require(not extra, f"{where}: unknown field(s) {extra}")


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
    require(isinstance(opt, dict) and opt.get("type"), f"{where}: set an optimizer (jobs/train.py overrides its lr)")
    require(opt["type"].lower() in {"adam", "adamw"},
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

    require(isinstance(cfg, dict), f"{where}: the top level must be an object")
    autos = _find_auto(cfg)
    require(not autos, f'{where}: "auto" is resolved only by the HF Trainer integration; use numbers: {autos}')
    unknown = sorted(set(cfg) - deepspeed_top_level_keys())
    require(not unknown, f"{where}: unknown top-level DeepSpeed key(s) {unknown} (DeepSpeed would ignore them "
            "silently)")
    try:
        ds = DeepSpeedConfig(copy.deepcopy(cfg))
    except Exception as e:  # DeepSpeed raises AssertionError, ValueError and pydantic errors alike
        raise ConfigError(f"{where}: {error_line(e)}") from None
    _check_optimizer(cfg, where)
    return ds
