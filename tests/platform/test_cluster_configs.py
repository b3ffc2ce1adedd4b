"""Every config under cluster/ is checked by the code that will consume it (or, offline, the closest thing).

VALIDATORS maps (folder under cluster/, suffix) to a validator. A .yaml/.yml/.json file under cluster/
without an entry fails test_every_cluster_config_has_a_validator, so a new kind of config must come with
its validator here.

The checks a job can run at start-up live in letstalk_platform.configs (loading, DeepSpeed) and beside the
config they check (letstalk_platform.train.check_train, which jobs/train.py runs before Ray starts;
letstalk_platform.serve_config.check_serve_config); the validators below call them and add what only makes sense
for this repository: the presets' house rules, the Ray launcher and KubeRay manifests, the Dockerfile.

    ray/*.yaml         Ray cluster launcher. The file as written against ray-schema.json from the installed
                       ray wheel (jsonschema), then what `ray up` does before launching anything:
                       prepare_config (provider defaults, node types) and validate_config (the schema
                       again, head_node_type, min/max workers). Plus project rules: token auth in the
                       start commands, the platform image, the repository mount, GPU workers.
    kuberay/*.yaml     KubeRay CRD schemas are not available offline: structural checks of RayJob,
                       RayService and PersistentVolumeClaim (known spec fields, images, resources, GPU
                       requests, /dev/shm, volumes, entrypoint). serveConfigV2 goes through
                       serve.check_serve_config, runtimeEnvYAML through RuntimeEnv's known fields.
    deepspeed/*.json   configs.check_deepspeed: deepspeed.runtime.config.DeepSpeedConfig (DeepSpeed's parser;
                       its pydantic models for zero_optimization, bf16, fp16 ... forbid unknown keys), plus
                       what it leaves unchecked: unknown top-level keys, "auto" values (HF-integration only),
                       optimizer params against the optimizer class DeepSpeed would build. Then the presets'
                       rules (AdamW 1e-4, clipping 1.0, file names, bf16 on GPU, torch_adam on CPU).
    preprocess/*.yaml  letstalk_platform.preprocess.PreprocessConfig (what jobs/preprocess.py loads).
    train/*.yaml       train.check_train: TrainConfig (what jobs/train.py loads), its DeepSpeed JSON, and the
                       DeepSpeed config the run builds from both.
    serve/*.yaml       `serve run` configs: serve.check_serve_config (Ray Serve's schema models + our
                       AppArgs / RenderDefaults, one Ingress replica), HTTP on 127.0.0.1.

cluster/docker/Dockerfile is checked by the test_dockerfile_* cases (FROM first, pins = pyproject's).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from letstalk_platform.configs import check_deepspeed, check_known, load_documents, parse_config, parse_yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")

# The jobs that configs may launch (jobs/*.py; not all exist yet).
JOB_SCRIPTS = {"train.py", "preprocess.py", "render_batch.py", "serve.py", "evaluate.py", "register.py"}


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------

def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pin(requirement_name: str) -> str:
    """The exact version pyproject.toml pins for a distribution (dependencies and extras)."""
    proj = pyproject()["project"]
    reqs = list(proj["dependencies"]) + [r for extra in proj["optional-dependencies"].values() for r in extra]
    for req in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*==\s*([^\s;]+)\s*", req)
        if m and m.group(1).lower() == requirement_name.lower():
            return m.group(3)
    raise AssertionError(f"pyproject.toml pins no {requirement_name}==...")


# ------------------------------------------------------------------------------------------
# Ray cluster launcher (cluster/ray/*.yaml)
# ------------------------------------------------------------------------------------------

@functools.cache
def ray_schema() -> dict:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


def validate_ray_launcher(cfg: Any, path: Path) -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config  # the `ray up` code path

    assert isinstance(cfg, dict), "the top level must be a mapping"
    raw = copy.deepcopy(cfg)
    provider = raw.get("provider") or {}
    if provider.get("type") == "local" and "min_workers" in raw:
        # Ray's local provider documents a top-level min_workers and moves it into its generated node
        # type (prepare_local) before checking the schema; the schema itself has no such key.
        min_workers = raw.pop("min_workers")
        assert isinstance(min_workers, int) and not isinstance(min_workers, bool) and min_workers >= 0, (
            f"min_workers must be a non-negative integer, got {min_workers!r}")
    jsonschema.validate(raw, ray_schema())

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)

    # Project rules: what every LetsTalk launcher config needs to run jobs/*.py.
    image = (cfg.get("docker") or {}).get("image", "")
    assert image, "docker.image must name the platform image (cluster/docker/Dockerfile)"
    assert "." in (cfg.get("file_mounts") or {}).values(), "file_mounts must sync the repository ('.')"
    setup = " ".join(cfg.get("setup_commands") or [])
    assert re.search(r"pip install .*-e ", setup), "setup_commands must install the project (pip install -e)"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg.get(key) or [] if "ray start" in c]
        assert starts, f"{key} has no `ray start`"
        for command in starts:
            assert "RAY_AUTH_MODE=token" in command, f"{key}: Ray 2.60 job API expects RAY_AUTH_MODE=token"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--head" in head_start and "--num-gpus=0" in head_start, "the head is a CPU node: --num-gpus=0"
    assert cfg.get("max_workers", 0) >= 1, "max_workers must allow at least one GPU worker"
    assert "idle_timeout_minutes" in cfg, "set idle_timeout_minutes: idle GPU nodes must be released"

    node_types = prepared["available_node_types"]
    if provider.get("type") != "local":  # local nodes report their own GPUs when they start Ray
        head = node_types[prepared["head_node_type"]]
        assert head["resources"].get("GPU", 0) == 0, "the head node type must not offer GPUs"
        gpu_types = [n for n, t in node_types.items()
                     if t["resources"].get("GPU", 0) > 0 and t.get("max_workers", 0) > 0]
        assert gpu_types, "no worker node type offers GPUs"


# ------------------------------------------------------------------------------------------
# KubeRay manifests (cluster/kuberay/*.yaml)
# ------------------------------------------------------------------------------------------

# Field names of the ray.io/v1 API (KubeRay >= 1.5): a misspelled field is pruned silently by the
# API server, so it is caught here instead.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "schedule", "shutdownAfterJobFinishes", "submissionMode",
    "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}
RAYSERVICE_SPEC_FIELDS = {
    "deploymentUnhealthySecondThreshold", "excludeHeadPodFromServeSvc", "rayClusterConfig", "serveConfigV2",
    "serveService", "serviceUnhealthySecondThreshold", "upgradeStrategy",
}
RAYCLUSTER_SPEC_FIELDS = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "upgradeStrategy", "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_GROUP_FIELDS = {
    "groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts", "rayStartParams",
    "replicas", "scaleStrategy", "suspend", "template",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def _check_pod_template(template: Any, where: str) -> int:
    """Containers have an image and cpu/memory resources; mounts name volumes; returns GPUs per pod."""
    assert isinstance(template, dict) and isinstance(template.get("spec"), dict), f"{where}: template.spec missing"
    spec = template["spec"]
    containers = spec.get("containers")
    assert isinstance(containers, list) and containers, f"{where}: no containers"
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    gpus = 0
    for c in containers:
        name = f"{where}/{c.get('name', '?')}"
        assert c.get("name") and c.get("image"), f"{name}: containers need a name and an image"
        res = c.get("resources") or {}
        assert res.get("limits") or res.get("requests"), f"{name}: set resources (requests/limits)"
        for part in ("requests", "limits"):
            for key in ("cpu", "memory"):
                assert key in (res.get(part) or {}), f"{name}: resources.{part}.{key} missing"
        req_gpu, lim_gpu = (str((res.get(p) or {}).get("nvidia.com/gpu", "0")) for p in ("requests", "limits"))
        assert req_gpu.isdigit() and lim_gpu.isdigit(), f"{name}: nvidia.com/gpu must be a whole number"
        assert req_gpu == lim_gpu or req_gpu == "0", f"{name}: GPU requests must equal limits"
        gpus += int(lim_gpu)
        for mount in c.get("volumeMounts") or []:
            assert mount.get("name") in volumes, f"{name}: volumeMount {mount.get('name')!r} has no volume"
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        if int(lim_gpu) > 0:
            shm = volumes.get(mounts.get("/dev/shm", ""), {})
            assert (shm.get("emptyDir") or {}).get("medium") == "Memory", (
                f"{name}: GPU pods need a memory-backed /dev/shm (NCCL, object store)")
    return gpus


def _check_raycluster_spec(spec: Any, where: str) -> dict[str, int]:
    """Returns GPUs per pod of each worker group."""
    assert isinstance(spec, dict), f"{where} must be a mapping"
    check_known(spec, RAYCLUSTER_SPEC_FIELDS, where)
    assert str(spec.get("rayVersion")) == pin("ray"), f"{where}.rayVersion must be pyproject's ray pin {pin('ray')}"
    assert (spec.get("authOptions") or {}).get("mode") == "token", (
        f"{where}.authOptions.mode must be token (Ray 2.60 job/dashboard API)")
    head = spec.get("headGroupSpec")
    assert isinstance(head, dict), f"{where}.headGroupSpec missing"
    check_known(head, HEAD_GROUP_FIELDS, f"{where}.headGroupSpec")
    groups = {"head": head, **{f"worker {g.get('groupName')}": g for g in spec.get("workerGroupSpecs") or []}}
    assert len(groups) > 1, f"{where}: no workerGroupSpecs"
    names = [g.get("groupName") for g in spec["workerGroupSpecs"]]
    assert all(names) and len(set(names)) == len(names), f"{where}: worker groups need unique groupName"
    gpus: dict[str, int] = {}
    for label, group in groups.items():
        gwhere = f"{where} {label}"
        params = group.get("rayStartParams")
        assert isinstance(params, dict), f"{gwhere}: rayStartParams missing (may be {{}})"
        bad = {k: v for k, v in params.items() if not isinstance(v, str)}
        assert not bad, f"{gwhere}: rayStartParams values must be strings (quote them): {bad}"
        per_pod = _check_pod_template(group.get("template"), gwhere)
        if label == "head":
            continue
        check_known(group, WORKER_GROUP_FIELDS, gwhere)
        counts = {k: group.get(k) for k in ("replicas", "minReplicas", "maxReplicas")}
        assert all(isinstance(v, int) and v >= 0 for v in counts.values()), f"{gwhere}: integer {counts}"
        assert counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"], f"{gwhere}: {counts}"
        gpus[group["groupName"]] = per_pod
    return gpus


def _check_entrypoint(entrypoint: Any, where: str) -> None:
    assert isinstance(entrypoint, str) and entrypoint.strip(), f"{where}: entrypoint missing"
    args = shlex.split(entrypoint)
    scripts = [a for a in args if re.fullmatch(r"jobs/[A-Za-z0-9_]+\.py", a)]
    assert scripts, f"{where}: entrypoint must run a jobs/*.py script: {entrypoint!r}"
    for script in scripts:
        name = Path(script).name
        # Jobs that are not written yet are allowed by name only.
        assert (REPO / script).is_file() or name in JOB_SCRIPTS, f"{where}: unknown job script {script}"
    for i, arg in enumerate(args):
        if arg == "--config" or arg.startswith("--config="):
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            assert re.fullmatch(r"cluster/[A-Za-z0-9_./-]+\.yaml", value), f"{where}: --config {value!r}"
            # A referenced config that exists must be one this test validates (it may not exist yet).
            if (REPO / value).is_file():
                assert validator_for(REPO / value) is not None, f"{where}: {value} has no validator"


def _check_runtime_env(text: Any, where: str) -> None:
    from ray.runtime_env import RuntimeEnv

    env = parse_yaml(text) if isinstance(text, str) else None
    assert isinstance(env, dict), f"{where}: runtimeEnvYAML must be a YAML mapping in a string"
    check_known(env, set(RuntimeEnv.known_fields), f"{where} runtimeEnvYAML")
    for k, v in (env.get("env_vars") or {}).items():
        assert isinstance(k, str) and isinstance(v, str), f"{where}: env_vars must map str -> str ({k}: {v!r})"


def _check_serve_config(text: Any, gpus_per_pod: dict[str, int] | None, where: str) -> None:
    """A serveConfigV2 string: YAML, then letstalk_platform.serve_config.check_serve_config."""
    from letstalk_platform.serve_config import check_serve_config

    cfg = parse_yaml(text) if isinstance(text, str) else None
    assert isinstance(cfg, dict), f"{where}: serveConfigV2 must be a YAML mapping in a string"
    check_serve_config(cfg, gpus_per_pod, where)


def validate_kuberay_manifest(doc: Any, path: Path) -> None:
    assert isinstance(doc, dict), "each document must be a mapping"
    kind, api = doc.get("kind"), doc.get("apiVersion")
    name = (doc.get("metadata") or {}).get("name", "")
    assert DNS_1123.fullmatch(name or "") and len(name) <= 63, f"metadata.name {name!r} is not a DNS-1123 label"
    where = f"{kind} {name}"
    spec = doc.get("spec")
    assert isinstance(spec, dict), f"{where}: spec missing"
    if kind == "PersistentVolumeClaim":
        assert api == "v1", f"{where}: apiVersion must be v1"
        assert "ReadWriteMany" in (spec.get("accessModes") or []), f"{where}: Ray pods share it: ReadWriteMany"
        assert (spec.get("resources") or {}).get("requests", {}).get("storage"), f"{where}: storage request"
        return
    assert api == "ray.io/v1", f"{where}: apiVersion must be ray.io/v1"
    if kind == "RayJob":
        check_known(spec, RAYJOB_SPEC_FIELDS, where)
        _check_entrypoint(spec.get("entrypoint"), where)
        if "runtimeEnvYAML" in spec:
            _check_runtime_env(spec["runtimeEnvYAML"], where)
        assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES, f"{where}: submissionMode"
        assert spec.get("shutdownAfterJobFinishes") is True, f"{where}: shutdownAfterJobFinishes: true"
        gpus = _check_raycluster_spec(spec.get("rayClusterSpec"), f"{where} rayClusterSpec")
        assert any(n > 0 for n in gpus.values()), f"{where}: no worker group requests nvidia.com/gpu"
    elif kind == "RayService":
        check_known(spec, RAYSERVICE_SPEC_FIELDS, where)
        gpus = _check_raycluster_spec(spec.get("rayClusterConfig"), f"{where} rayClusterConfig")
        _check_serve_config(spec.get("serveConfigV2"), gpus, where)
    else:
        raise AssertionError(f"{kind!r}: no check for this kind (known: RayJob, RayService, PersistentVolumeClaim)")


def _claims(doc: Any) -> set[str]:
    """persistentVolumeClaim.claimName references anywhere in a document."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            claim = node.get("persistentVolumeClaim")
            if isinstance(claim, dict) and "claimName" in claim:
                found.add(claim["claimName"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return found


# ------------------------------------------------------------------------------------------
# DeepSpeed (cluster/deepspeed/*.json)
# ------------------------------------------------------------------------------------------

def validate_deepspeed(cfg: Any, path: Path) -> None:
    """What jobs/train.py checks at start-up (check_deepspeed), then this repository's rules for its presets."""
    ds = check_deepspeed(cfg, rel(path))

    # Project rules for the presets (cluster/README.md).
    params = cfg["optimizer"].get("params") or {}
    assert cfg["optimizer"]["type"] == "AdamW", "optimizer type AdamW"
    assert params.get("lr") == 1e-4 and params.get("weight_decay") == 0.0, "AdamW lr 1e-4, weight_decay 0"
    assert list(params.get("betas", [])) == [0.9, 0.999], "AdamW betas (0.9, 0.999)"
    assert cfg.get("gradient_clipping") == 1.0, "gradient_clipping 1.0"
    m = re.fullmatch(r"zero(\d)(-cpu)?", path.stem)
    assert m, f"{path.name}: name presets zero<stage>[-cpu].json"
    assert ds.zero_optimization_stage == int(m.group(1)), f"{path.name}: zero_optimization.stage"
    if m.group(2):  # CPU / gloo tests: fp32 and torch's AdamW (no CUDA ops to build)
        assert not ds.bfloat16_config.enabled and not ds.float16_config.enabled, "CPU preset: no bf16/fp16"
        assert params.get("torch_adam") is True, "CPU preset: optimizer.params.torch_adam true"
    else:
        assert ds.bfloat16_config.enabled, "GPU presets train in bf16"
    if ds.zero_optimization_stage == 3:
        assert ds.zero_config.gather_16bit_weights_on_model_save, (
            "ZeRO-3: stage3_gather_16bit_weights_on_model_save so saved weights are whole")


# ------------------------------------------------------------------------------------------
# Preprocess job configs (cluster/preprocess/*.yaml)
# ------------------------------------------------------------------------------------------

def validate_preprocess(cfg: Any, path: Path) -> None:
    from letstalk_platform.preprocess import PreprocessConfig

    parse_config(PreprocessConfig, cfg)


def validate_serve(cfg: Any, path: Path) -> None:
    """cluster/serve/*.yaml: `serve run` configs; local ones bind 127.0.0.1."""
    from letstalk_platform.serve_config import check_serve_config

    check_serve_config(cfg, None, rel(path))
    host = (cfg.get("http_options") or {}).get("host")
    assert host == "127.0.0.1", f"{rel(path)}: a local Serve config binds 127.0.0.1, not {host!r}"


def validate_train(cfg: Any, path: Path) -> None:
    """What jobs/train.py checks before Ray starts: TrainConfig, its DeepSpeed JSON and the run's DeepSpeed config."""
    from letstalk_platform.train import TrainConfig, check_train

    check_train(parse_config(TrainConfig, cfg), root=REPO)


# ------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------

# (folder under cluster/, suffix) -> (validator, several YAML documents allowed).
# Add an entry with every new kind of config (the model or parser of the job or tool that reads it).
VALIDATORS: dict[tuple[str, str], tuple[Callable[[Any, Path], None], bool]] = {
    ("ray", ".yaml"): (validate_ray_launcher, False),
    ("kuberay", ".yaml"): (validate_kuberay_manifest, True),
    ("deepspeed", ".json"): (validate_deepspeed, False),
    ("preprocess", ".yaml"): (validate_preprocess, False),
    ("train", ".yaml"): (validate_train, False),
    ("serve", ".yaml"): (validate_serve, False),
}


def validator_for(path: Path) -> tuple[Callable[[Any, Path], None], bool] | None:
    folder = path.parent.relative_to(CLUSTER).as_posix()
    return VALIDATORS.get((folder, path.suffix))


def cluster_configs() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in CONFIG_SUFFIXES)


def check_file(path: Path) -> None:
    entry = validator_for(path)
    assert entry is not None, f"{rel(path)}: no validator registered"
    validate, multi_doc = entry
    docs = load_documents(path)
    assert docs, f"{rel(path)} is empty"
    assert multi_doc or len(docs) == 1, f"{rel(path)}: expected one YAML document, found {len(docs)}"
    for doc in docs:
        validate(doc, path)


def test_every_cluster_config_has_a_validator():
    missing = [rel(p) for p in cluster_configs() if validator_for(p) is None]
    assert not missing, (
        f"no validator for {missing}: register one in VALIDATORS in tests/platform/test_cluster_configs.py "
        "(the model or parser of the job/tool that reads these files); configs use .yaml / .json")


def test_the_platform_configs_exist():
    expected = ["ray/a800.yaml", "ray/a100-aws.yaml", "kuberay/rayjob-train.yaml", "kuberay/rayservice-render.yaml",
                "kuberay/pvc-data.yaml", "deepspeed/zero2.json", "deepspeed/zero3.json", "deepspeed/zero2-cpu.json"]
    assert [f for f in expected if not (CLUSTER / f).is_file()] == []


@pytest.mark.parametrize("path", [p for p in cluster_configs() if validator_for(p)], ids=rel)
def test_cluster_config_is_valid(path: Path):
    check_file(path)


def test_kuberay_claims_are_defined_in_the_folder():
    docs = [d for p in sorted((CLUSTER / "kuberay").glob("*.yaml")) for d in load_documents(p)]
    defined = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    used = set().union(*(_claims(d) for d in docs if d.get("kind") != "PersistentVolumeClaim"))
    assert used and used <= defined, f"claims used {sorted(used)}, defined in cluster/kuberay: {sorted(defined)}"


def _container_images(node: Any) -> set[str]:
    """image of every container (a mapping with name + image) anywhere in a manifest."""
    if isinstance(node, list):
        return set().union(set(), *(_container_images(v) for v in node))
    if not isinstance(node, dict):
        return set()
    own = {node["image"]} if isinstance(node.get("image"), str) and "name" in node else set()
    return own.union(*(_container_images(v) for v in node.values()))


def test_one_platform_image_everywhere():
    """Launcher configs and KubeRay pods run the same image (built from cluster/docker/Dockerfile)."""
    images = {rel(p): {load_documents(p)[0]["docker"]["image"]} for p in sorted((CLUSTER / "ray").glob("*.yaml"))}
    for p in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        found = set().union(set(), *(_container_images(d) for d in load_documents(p)))
        if found:
            images[rel(p)] = found
    assert len(images) >= 4 and len(set().union(*images.values())) == 1, images


# ------------------------------------------------------------------------------------------
# Each validator rejects a broken config
# ------------------------------------------------------------------------------------------

def _load(relpath: str) -> Any:
    (doc,) = load_documents(CLUSTER / relpath)
    return doc


def _rejects(validate: Callable[[Any, Path], None], cfg: Any, path: Path, match: str | None = None) -> None:
    with pytest.raises(Exception) as info:
        validate(cfg, path)
    if match:
        assert re.search(match, str(info.value)), str(info.value)


@pytest.mark.parametrize("relpath", ["ray/a800.yaml", "ray/a100-aws.yaml"])
@pytest.mark.parametrize("breakage, match", [
    (lambda c: c.update(max_worker=c.pop("max_workers")), "max_worker"),
    (lambda c: c.update(max_workers="4"), "is not of type 'integer'"),
    (lambda c: c["docker"].update(imagee=c["docker"]["image"]), "imagee"),
    (lambda c: c.update(idle_timeout_minutes=-1), "minimum"),
    (lambda c: c.update(head_start_ray_commands=[s.replace("RAY_AUTH_MODE=token", "")
                                                 for s in c["head_start_ray_commands"]]), "RAY_AUTH_MODE"),
    (lambda c: c.pop("provider"), "provider"),
], ids=["misspelled-key", "max-workers-string", "docker-key", "negative-idle", "no-token-auth", "no-provider"])
def test_ray_validator_rejects(relpath, breakage, match):
    cfg = _load(relpath)
    validate_ray_launcher(copy.deepcopy(cfg), CLUSTER / relpath)
    breakage(cfg)
    _rejects(validate_ray_launcher, cfg, CLUSTER / relpath, match)


def test_ray_validator_rejects_node_type_mistakes():
    path = CLUSTER / "ray/a100-aws.yaml"
    cfg = _load("ray/a100-aws.yaml")
    cfg["available_node_types"]["worker.a100x8"]["resources"]["GPU"] = "8"
    _rejects(validate_ray_launcher, cfg, path, "is not of type 'integer'")
    cfg = _load("ray/a100-aws.yaml")
    cfg["head_node_type"] = "head.gpu"
    _rejects(validate_ray_launcher, cfg, path, "head_node_type")
    cfg = _load("ray/a100-aws.yaml")
    cfg["available_node_types"]["worker.a100x8"]["min_workers"] = 9  # more than max_workers
    _rejects(validate_ray_launcher, cfg, path, "max_workers")
    cfg = _load("ray/a800.yaml")
    cfg["min_workers"] = "0"
    _rejects(validate_ray_launcher, cfg, CLUSTER / "ray/a800.yaml", "min_workers")


def _rayjob() -> dict:
    return _load("kuberay/rayjob-train.yaml")


def _rayservice() -> dict:
    return _load("kuberay/rayservice-render.yaml")


def _gpu_worker(doc: dict) -> dict:
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]
    return next(g for g in spec["workerGroupSpecs"] if "gpu" in g["groupName"] or "a800" in g["groupName"])


def _set_serve(doc: dict, change: Callable[[dict], None]) -> None:
    serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
    change(serve)
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(serve)


def _renderer(serve: dict) -> dict:
    return next(d for d in serve["applications"][0]["deployments"] if d["name"] == "Renderer")


@pytest.mark.parametrize("make, breakage, match", [
    (_rayjob, lambda d: d.update(apiVersion="ray.io/v1alpha1"), "apiVersion"),
    (_rayjob, lambda d: d["spec"].pop("entrypoint"), "entrypoint"),
    (_rayjob, lambda d: d["spec"].update(entrypoint="python jobs/finetune.py"), "unknown job script"),
    (_rayjob, lambda d: d["spec"].update(entrypoint="python train.py"), "jobs/"),
    (_rayjob, lambda d: d["spec"].update(shutdownAfterJobFinish=True), "shutdownAfterJobFinish"),
    (_rayjob, lambda d: d["spec"].update(runtimeEnvYAML="working_dri: /tmp\n"), "working_dri"),
    (_rayjob, lambda d: d["spec"]["rayClusterSpec"].update(rayVersion="2.9.0"), "rayVersion"),
    (_rayjob, lambda d: d["spec"]["rayClusterSpec"].pop("authOptions"), "token"),
    (_rayjob, lambda d: [c["resources"][p].pop("nvidia.com/gpu") for c in
                         _gpu_worker(d)["template"]["spec"]["containers"] for p in ("requests", "limits")],
     "nvidia.com/gpu"),
    (_rayjob, lambda d: _gpu_worker(d)["template"]["spec"]["containers"][0].pop("image"), "image"),
    (_rayjob, lambda d: _gpu_worker(d)["template"]["spec"]["containers"][0]["volumeMounts"].pop(), "/dev/shm"),
    (_rayjob, lambda d: _gpu_worker(d)["template"]["spec"]["volumes"].pop(0), "has no volume"),
    (_rayjob, lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
     "strings"),
    (_rayjob, lambda d: _gpu_worker(d).update(minReplicas=3), "minReplicas"),
    (_rayservice, lambda d: d["spec"].pop("rayClusterConfig"), "rayClusterConfig"),
    (_rayservice, lambda d: _set_serve(d, lambda s: _renderer(s).update(num_replica=2)), "num_replica"),
    (_rayservice, lambda d: _set_serve(d, lambda s: s["applications"][0]["deployments"][0].update(num_replicas=3)),
     "exactly one replica"),
    (_rayservice, lambda d: _set_serve(d, lambda s: s["applications"][0]["args"].update(max_upload_mb=-1)),
     "max_upload_mb"),
    (_rayservice, lambda d: _set_serve(d, lambda s: _renderer(s).update(user_config={"sampler": "euler"})),
     "sampler"),
    (_rayservice, lambda d: _set_serve(d, lambda s: _renderer(s)["autoscaling_config"].update(
        min_replicas=9)), "max_replicas"),
    (_rayservice, lambda d: _set_serve(d, lambda s: _renderer(s)["autoscaling_config"].update(
        max_replica=9)), "max_replica"),
    (_rayservice, lambda d: _set_serve(d, lambda s: _renderer(s)["ray_actor_options"].update(num_gpu=1)),
     "num_gpu"),
    (_rayservice, lambda d: _set_serve(d, lambda s: s["applications"][0].update(
        import_path="letstalk_platform.serve.build_app")), "import_path"),
    (_rayservice, lambda d: _set_serve(d, lambda s: _renderer(s)["ray_actor_options"].update(num_gpus=2)),
     "GPU"),
], ids=["api-version", "no-entrypoint", "unknown-script", "script-outside-jobs", "misspelled-spec-field",
        "runtime-env-typo", "ray-version", "no-token-auth", "no-gpu-request", "no-image", "no-shm",
        "mount-without-volume", "start-param-int", "replicas-out-of-range", "no-cluster", "serve-deployment-typo", "two-ingress-replicas",
        "bad-app-args", "bad-user-config",
        "serve-min-over-max", "serve-autoscaling-typo", "serve-actor-option-typo", "serve-import-path",
        "replica-needs-more-gpus-than-a-pod"])
def test_kuberay_validator_rejects(make, breakage, match):
    doc = make()
    path = CLUSTER / "kuberay" / "x.yaml"
    validate_kuberay_manifest(copy.deepcopy(doc), path)
    breakage(doc)
    _rejects(validate_kuberay_manifest, doc, path, match)


def test_kuberay_entrypoint_may_name_configs_that_do_not_exist_yet():
    doc = _rayjob()
    doc["spec"]["entrypoint"] = "python jobs/evaluate.py --config cluster/eval/not-written-yet.yaml"
    validate_kuberay_manifest(doc, CLUSTER / "kuberay" / "x.yaml")
    doc["spec"]["entrypoint"] = "python jobs/evaluate.py --config /etc/elsewhere.yaml"
    _rejects(validate_kuberay_manifest, doc, CLUSTER / "kuberay" / "x.yaml", "--config")


@pytest.mark.parametrize("name, breakage, match", [
    ("zero2.json", lambda c: c["zero_optimization"].update(overlap_com=True), "overlap_com"),
    ("zero3.json", lambda c: c["zero_optimization"].update(stage3_gather_16bit_weights_on_model_sav=True),
     "stage3_gather_16bit_weights_on_model_sav"),
    ("zero2.json", lambda c: c["bf16"].update(enabeld=True), "enabeld"),
    ("zero2.json", lambda c: c.update(gradient_cliping=c.pop("gradient_clipping")), "gradient_cliping"),
    ("zero2.json", lambda c: c.update(train_micro_batch_size_per_gpu="auto"), "auto"),
    ("zero2.json", lambda c: c["optimizer"]["params"].update(lrr=1e-4), "lrr"),
    ("zero2.json", lambda c: c["optimizer"]["params"].update(betas=[0.9, 1.5]), "beta"),
    ("zero2.json", lambda c: c["zero_optimization"].update(stage=5), "stage"),
    ("zero2.json", lambda c: c.update(train_batch_size=7), "train_batch_size"),
    ("zero3.json", lambda c: c["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=False),
     "gather_16bit"),
    ("zero2-cpu.json", lambda c: c["bf16"].update(enabled=True), "bf16"),
    ("zero2-cpu.json", lambda c: c["optimizer"]["params"].pop("torch_adam"), "torch_adam"),
], ids=["zero-key-typo", "zero3-key-typo", "bf16-key-typo", "top-level-typo", "auto-value", "optimizer-param-typo",
        "beta-out-of-range", "no-such-stage", "batch-mismatch", "zero3-without-16bit-save", "cpu-with-bf16",
        "cpu-without-torch-adam"])
def test_deepspeed_validator_rejects(name, breakage, match):
    path = CLUSTER / "deepspeed" / name
    cfg = _load(f"deepspeed/{name}")
    breakage(cfg)
    _rejects(validate_deepspeed, cfg, path, match)


def test_deepspeed_zero_config_forbids_unknown_keys():
    """The negative cases above rely on this: DeepSpeed's pydantic zero config has extra='forbid'."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert DeepSpeedZeroConfig.model_config.get("extra") == "forbid"
    with pytest.raises(Exception, match="overlap_com"):
        DeepSpeedZeroConfig(stage=2, overlap_com=True)


def test_json_duplicate_keys_are_rejected(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"gradient_clipping": 1.0, "gradient_clipping": 0.5}')
    with pytest.raises(ValueError, match="duplicate"):
        load_documents(path)
    path = tmp_path / "dup.yaml"
    path.write_text("max_workers: 1\nmax_workers: 2\n")
    with pytest.raises(yaml.YAMLError, match="duplicate"):
        load_documents(path)


@pytest.mark.parametrize("breakage, match", [
    (lambda c: c.update(ouptut="/tmp/x"), "ouptut"),
    (lambda c: c.update(eval_fraction=2.0), "eval_fraction"),
    (lambda c: c.pop("input"), "input"),
], ids=["misspelled-key", "out-of-range", "missing-required"])
def test_preprocess_validator_rejects(breakage, match):
    cfg = _load("preprocess/hdtf.yaml")
    breakage(cfg)
    _rejects(validate_preprocess, cfg, CLUSTER / "preprocess" / "hdtf.yaml", match)


@pytest.mark.parametrize("breakage, match", [
    (lambda c: c["data"].update(batch_sise=4), "data.batch_sise"),
    (lambda c: c.update(batch_size=c["data"].pop("batch_size")), "batch_size"),  # the flat shape of before
    (lambda c: c["optim"].update(zero_stage=4), "optim.zero_stage"),
    (lambda c: c.update(augment={"flip_prob": 1.5}), "augment.flip_prob"),
    (lambda c: c["model"].update(preset="XL"), "unknown preset"),
    (lambda c: c["model"].update(portrait_fusion="cross"), "model.portrait_fusion"),
    (lambda c: c["tracking"].update(name="a/b"), "tracking.name"),
    (lambda c: c["optim"].update(kernel="deepspeed"), "needs scaling.use_gpu"),
    (lambda c: c["optim"].update(deepspeed="cluster/deepspeed/zero4.json"), "zero4.json is not a DeepSpeed"),
], ids=["section-key-typo", "flat-key", "no-such-stage", "probability-over-1", "unknown-preset", "unknown-fusion",
        "unsafe-name", "fusedadam-on-cpu", "missing-deepspeed-json"])
def test_train_validator_rejects(breakage, match):
    cfg = _load("train/tiny-cpu.yaml")
    path = CLUSTER / "train" / "tiny-cpu.yaml"
    validate_train(copy.deepcopy(cfg), path)
    breakage(cfg)
    _rejects(validate_train, cfg, path, match)


@pytest.mark.parametrize("change, match", [
    (lambda d: d["zero_optimization"].update(overlap_com=True), "overlap_com"),
    (lambda d: d.update(train_batch_size=3), "train_batch_size 3 is not data.batch_size"),
    (lambda d: d["optimizer"]["params"].update(lrr=1e-4), "lrr"),
    (lambda d: d.update(gradient_accumulation_steps=2, train_batch_size=4 * 2 * 2), None),  # consistent: accepted
], ids=["key-typo", "batch-mismatch", "optimizer-param-typo", "consistent-batch"])
def test_train_validator_checks_the_deepspeed_json_it_names(tmp_path, change, match):
    ds = _load("deepspeed/zero2-cpu.json")
    change(ds)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = _load("train/tiny-cpu.yaml")
    cfg["optim"]["deepspeed"] = str(tmp_path / "ds.json")
    path = CLUSTER / "train" / "tiny-cpu.yaml"
    if match is None:
        validate_train(cfg, path)
    else:
        _rejects(validate_train, cfg, path, match)


def test_train_sections_take_the_library_defaults():
    """augment and target carry letstalk's own dataclasses' defaults; no second copy of them."""
    import dataclasses

    from letstalk.diffusion import ClipTarget
    from letstalk.training import Augment
    from letstalk_platform.train import AugmentSection, TargetSection

    assert AugmentSection().to_augment() == Augment()
    assert set(AugmentSection.model_fields) == {f.name for f in dataclasses.fields(Augment)}
    assert TargetSection().to_clip_target() == ClipTarget()
    assert TargetSection(residual=True, residual_scale=12).to_clip_target() == ClipTarget(True, 12.0)


def _train_job():
    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_train_flags_override_single_keys_of_the_yaml():
    from letstalk_platform.runtime import load_config
    from letstalk_platform.train import TrainConfig

    job = _train_job()
    args = job.get_args(["--config", "cluster/train/demo-quick.yaml", "--batch-size", "2", "--no-use-gpu",
                         "--zero-stage", "3", "--name", "x"])
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "debug_steps")}
    assert overrides == {"data.batch_size": 2, "scaling.use_gpu": False, "optim.zero_stage": 3, "tracking.name": "x"}
    cfg = load_config(TrainConfig, CLUSTER / "train" / "demo-quick.yaml", overrides)
    yaml_cfg = load_config(TrainConfig, CLUSTER / "train" / "demo-quick.yaml", {})
    assert (cfg.data.batch_size, cfg.optim.zero_stage, cfg.tracking.name) == (2, 3, "x")
    assert cfg.data.path == yaml_cfg.data.path and cfg.optim.lr == yaml_cfg.optim.lr  # the rest: the YAML's
    # no YAML: an absent flag leaves TrainConfig's default
    bare = load_config(TrainConfig, None, vars(job.get_args(["--data", "d"])) | {"config": None, "debug_steps": None})
    assert bare == TrainConfig(data={"path": "d"})
    assert vars(job.get_args([])) == {"config": None, "debug_steps": None}


def test_train_job_refuses_a_bad_config_before_ray_starts(tmp_path):
    """Exit code 2 and one line on stderr, in the seconds DeepSpeed's parser takes to import, no Ray."""
    cfg = _load("train/tiny-cpu.yaml")
    cfg["optim"]["deepspeed"] = str(tmp_path / "ds.json")
    ds = _load("deepspeed/zero2-cpu.json")
    ds["zero_optimization"]["overlap_com"] = True
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "flat.yaml").write_text("data: shards/\nbatch_size: 4\n")
    for config, match in (("bad.yaml", "overlap_com"), ("flat.yaml", "batch_size: Extra inputs are not permitted")):
        job = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(tmp_path / config)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert job.returncode == 2, job.stderr[-2000:]
        assert job.stderr.startswith("train: error: ") and job.stderr.count("\n") == 1, job.stderr
        assert match in job.stderr, job.stderr
        assert "Ray instance" not in job.stdout + job.stderr, job.stdout + job.stderr


def test_unregistered_folder_fails_with_a_clear_message(monkeypatch, tmp_path):
    fake = tmp_path / "cluster"
    (fake / "render").mkdir(parents=True)
    (fake / "render" / "batch.yaml").write_text("model: L\n")
    monkeypatch.setattr(sys.modules[__name__], "CLUSTER", fake)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(AssertionError, match=r"no validator for \['cluster/render/batch.yaml'\]"):
        test_every_cluster_config_has_a_validator()


# ------------------------------------------------------------------------------------------
# Dockerfile
# ------------------------------------------------------------------------------------------

DOCKERFILE = CLUSTER / "docker" / "Dockerfile"
DOCKER_INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
                       "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            word, _, args = full.partition(" ")
            out.append((word.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return out


def check_dockerfile(text: str) -> None:
    instructions = parse_dockerfile(text)
    unknown = sorted({i for i, _ in instructions} - DOCKER_INSTRUCTIONS)
    assert not unknown, f"unknown instructions {unknown}"
    first = next((i for i, _ in instructions if i != "ARG"), None)
    assert first == "FROM", f"the first instruction (after global ARGs) must be FROM, not {first}"

    args: dict[str, str] = {}
    global_args: set[str] = set()  # before the first FROM: visible in the stage only if declared again
    stage_vars: set[str] = set()
    seen_from = False
    for instr, rest in instructions:
        if instr == "FROM":
            seen_from, stage_vars = True, set()
            continue
        if seen_from:
            used = {a or b for a, b in re.findall(r"\$\{(\w+)\}|\$(\w+)", rest)}
            hidden = sorted((used & global_args) - stage_vars)
            assert not hidden, f"{instr} uses {hidden}, declared before FROM only: add `ARG <name>` after FROM"
        if instr == "ARG":
            name, _, default = rest.partition("=")
            name = name.strip()
            (stage_vars if seen_from else global_args).add(name)
            if default:
                args.setdefault(name, default.strip().strip('"'))
        elif instr == "ENV":
            stage_vars.update(re.findall(r"(\w+)=", rest))

    def resolve(s: str) -> str:
        for _ in range(5):  # defaults may refer to other ARGs
            s = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), s)
        return s

    image = resolve(next(r for i, r in instructions if i == "FROM").split()[0])
    assert re.search(r"cu12\d|cuda:12\.", image), f"base image {image} is not a CUDA 12.x image"
    py = "".join(re.findall(r"\d+", pyproject()["project"]["requires-python"].split(",")[0]))  # ">=3.11" -> 311
    ray_pin, torch_pin = pin("ray"), pin("torch")
    runs = " ; ".join(resolve(r) for i, r in instructions if i == "RUN")
    assert f"py{py}" in image or f"python3.{py[1:]}" in runs, f"Python {py} matches neither base nor RUN"
    assert f":{ray_pin}-" in image or "ray[" in runs and f"=={ray_pin}" in runs, f"ray {ray_pin} is not pinned"
    assert re.search(rf"download\.pytorch\.org/whl/cu12\d.*torch=={re.escape(torch_pin)}\b", runs), (
        f"torch=={torch_pin} must be installed from the PyTorch CUDA index before the project")
    assert re.search(r"pip install (-\S+ )*-e \"?\.\[platform\]\"?", runs), 'missing pip install -e ".[platform]"'
    assert runs.index("torch==") < runs.index(".[platform]"), "torch (CUDA build) must come before the project"
    users = [r.split(":")[0] for i, r in instructions if i == "USER"]
    assert users and users[-1] not in {"root", "0"}, "the image must end as a non-root USER"
    assert any(i == "WORKDIR" for i, _ in instructions), "set a WORKDIR"
    for instr, rest in instructions:
        if instr == "COPY" and "--from" not in rest:
            sources = [w for w in shlex.split(rest) if not w.startswith("--")][:-1]
            missing = [s for s in sources if not (REPO / s).exists()]
            assert not missing, f"COPY sources missing from the build context (repo root): {missing}"


def test_dockerfile_is_consistent_with_pyproject():
    check_dockerfile(DOCKERFILE.read_text())


@pytest.mark.parametrize("old, new, match", [
    ("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0", "torch==2.13.0"),
    ("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.59.0", "ray 2.60.0"),
    ("ARG CUDA_TAG=cu128", "ARG CUDA_TAG=cu118", "CUDA 12"),
    ("# No ENTRYPOINT", "USER root\n# No ENTRYPOINT", "non-root"),
    ("ARG RAY_VERSION=2.60.0", "RUN true\nARG RAY_VERSION=2.60.0", "FROM"),
    ("ARG RAY_VERSION\nARG CUDA_TAG\n", "ARG RAY_VERSION\n", "declared before FROM only"),
    ('-e ".[platform]"', '"letstalk[platform]"', "platform"),
], ids=["torch-pin", "ray-pin", "cuda-11", "root-user", "run-before-from", "global-arg-used-in-stage",
        "no-editable-install"])
def test_dockerfile_check_rejects(old, new, match):
    text = DOCKERFILE.read_text()
    assert old in text
    with pytest.raises(AssertionError, match=re.escape(match)):
        check_dockerfile(text.replace(old, new, 1))


# ------------------------------------------------------------------------------------------
# The CPU preset end to end: one ZeRO-2 step on a gloo process group
# ------------------------------------------------------------------------------------------

ZERO2_CPU_STEP = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist, deepspeed
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = json.load(open(sys.argv[1]))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    before = [p.detach().clone() for p in model.parameters()]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   config=cfg, dist_init_required=False)
    assert engine.zero_optimization_stage() == 2, engine.zero_optimization_stage()
    assert type(optimizer.optimizer) is torch.optim.AdamW, type(optimizer.optimizer)
    mb = cfg["train_micro_batch_size_per_gpu"]
    for _ in range(2):
        loss = engine(torch.randn(mb, 8)).pow(2).mean()
        engine.backward(loss)
        engine.step()
    assert torch.isfinite(loss), loss
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, engine.module.parameters()))
    # Without this, gloo's worker threads can outlive the interpreter and abort the exit
    # ("terminate called without an active exception", pytorch/pytorch#190489): seen once in CI.
    dist.destroy_process_group()
    print("ZERO2_CPU_OK")
""")


@pytest.mark.slow  # DeepSpeed JIT-builds its shared-memory comm op on the first run on a machine
def test_zero2_cpu_preset_trains_one_step_on_gloo(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    script = tmp_path / "step.py"
    script.write_text(ZERO2_CPU_STEP)
    proc = subprocess.run([sys.executable, str(script), str(CLUSTER / "deepspeed" / "zero2-cpu.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ZERO2_CPU_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
