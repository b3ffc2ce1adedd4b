"""Distributed training: Ray Train TorchTrainer + DeepSpeed ZeRO, MLflow tracking, registry.

Driver (`run_training`): check the config, open the MLflow run, build the `TrainPlan` every worker
gets, run TorchTrainer, then export the EMA weights as a LetsTalkPipeline bundle and register it.
`job_args` and `run_job` are the command line of jobs/train.py and jobs/distill.py.

The rest lives by concern, and the names other code uses are re-exported here:

    train_config   TrainConfig and its sections, check_train, deepspeed_config, lr_factor,
                   architecture, distill_setup (docs/training.md: the config)
    train_loop     the worker: train_loop, TrainPlan, SampleClip, build_engine, Watchdog
    checkpoint     a checkpoint's files, latest_checkpoint, exact resume (RESUME_KEYS, check_resume),
                   the RNG states, save_and_report
    ema_export     the EMA's master weights and the full EMA model (master_weights, full_ema_state)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from letstalk.artifacts import ShardManifest, export_bundle

from . import tracking
from .checkpoint import (LATEST, RESUME_FILE, RESUME_KEYS, check_resume, latest_checkpoint, resume_settings,
                         rng_state, set_rng_state)
from .ema_export import full_ema_state, master_weights
from .train_config import (AugmentSection, DataSection, DistillSection, ModelSection, OptimSection, ScalingSection,
                           TargetSection, TrackingSection, TrainConfig, absolute_paths, architecture,
                           check_same_tensors, check_train, deepspeed_config, distill_setup, lr_factor)
from .train_loop import SampleClip, TrainPlan, Watchdog, build_engine, seed_everything, train_loop

__all__ = [  # this module's own, then the re-exports
    "run_training", "job_args", "run_job",
    "LATEST", "RESUME_FILE", "RESUME_KEYS", "check_resume", "latest_checkpoint", "resume_settings", "rng_state",
    "set_rng_state", "full_ema_state", "master_weights", "AugmentSection", "DataSection", "DistillSection",
    "ModelSection", "OptimSection", "ScalingSection", "TargetSection", "TrackingSection", "TrainConfig",
    "absolute_paths", "architecture", "check_same_tensors", "check_train", "deepspeed_config", "distill_setup",
    "lr_factor", "SampleClip", "TrainPlan", "Watchdog", "build_engine", "seed_everything", "train_loop",
]


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Check the config (and, distilling, that the teacher fits the shards), attach to Ray or start a
    local one (runtime.init_ray, once every check has passed), train, export the EMA model as a
    bundle, register it. Returns a summary dict."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .runtime import check_extension_locks, init_ray

    cfg = absolute_paths(cfg)  # workers do not share the driver's working directory
    check_train(cfg)  # the DeepSpeed JSON and what this run makes of it
    check_extension_locks()  # before anything starts: a dead build's lock would hang every worker
    manifest = ShardManifest.load(cfg.data.path)
    manifest.check_models()  # the codecs the bundle will ship are the ones that made the shards
    spec = manifest.clip_spec
    if cfg.distill is not None:  # the teacher fixes the architecture and the target
        cfg, arch, clip_range = distill_setup(cfg, manifest)
    else:
        arch, clip_range = architecture(cfg.model, manifest), None  # fails fast, before any worker starts
    latest = latest_checkpoint(None, Path(cfg.tracking.storage) / cfg.tracking.name)
    for change in check_resume(cfg, latest) if latest is not None else []:  # a mismatch: refused here, unless allowed
        print(f"train: resuming {latest.name} with {change} (allow_config_change): not an exact continuation",
              file=sys.stderr)
    init_ray()  # a no-op where the caller (or `ray job submit`) has Ray already

    run, scaling = cfg.tracking, cfg.scaling
    storage = Path(run.storage)
    run_dir = storage / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = tracking.start_run(run.mlflow_uri, run.experiment, run.name,
                                tracking.flat_params(cfg.model_dump() | {"arch": arch.to_dict()}))
    log = tracking.RankZeroLogger(run.mlflow_uri, run_id, 0)
    log.text(json.dumps({"train": cfg.model_dump(), "arch": arch.to_dict()}, indent=2), "config.json")

    plan = TrainPlan(cfg=cfg, arch=arch, run_id=run_id, run_dir=run_dir, data_bundle=Path(manifest.bundle),
                     fps=spec.fps, sample_rate=spec.sample_rate, samples=_sample_clips(cfg, manifest),
                     clip_range=clip_range)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker},
                                     placement_strategy=scaling.placement_strategy),
        run_config=RunConfig(name=run.name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint ({result.error})")

    bundle_dir = run_dir / "bundle"
    # a student renders with the sampler and steps it was distilled for, unless a request says otherwise
    sampling = {"sampler": "ddim", "steps": cfg.distill.student_steps} if cfg.distill else {}
    with result.checkpoint.as_directory() as ckpt:
        export_bundle(ckpt, manifest, bundle_dir, **sampling)
    summary = {"run_id": run_id, "steps": result.metrics.get("step"), "loss": result.metrics.get("loss"),
               "seconds": round(seconds, 1), "checkpoint": result.checkpoint.path, "bundle": str(bundle_dir)}
    if run.register_name:
        version = tracking.register_bundle(run.mlflow_uri, run_id, bundle_dir, run.register_name, run.register_alias)
        summary["registered"] = f"models:/{run.register_name}@{run.register_alias} (version {version})"
    log.text(json.dumps(summary, indent=2), "summary.json")
    return summary


def job_args(doc: str, flags: dict[str, str], config_help: str, argv: list[str] | None = None,
             choices: dict[str, list[str]] | None = None) -> argparse.Namespace:
    """The command line of jobs/train.py and jobs/distill.py: `--config YAML`, one flag per TrainConfig
    key in `flags` (runtime.add_config_flags) and `--allow-config-change`, `--debug-steps N`."""
    from .runtime import add_config_flags

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--config", help=config_help)
    add_config_flags(p, TrainConfig, flags | {"--allow-config-change": "allow_config_change"}, choices=choices)
    p.add_argument("--debug-steps", type=int, help="smoke run: this many steps, checkpoint at the end")
    return p.parse_args(argv)


def run_job(name: str, args: Any, distill: bool = False) -> int:
    """jobs/train.py and jobs/distill.py: their parsed flags (`--config`, `--debug-steps N`: N steps,
    a checkpoint at the end, every step logged; the rest override TrainConfig keys) -> load and check
    the config (run_training checks it, and that a teacher fits the shards, before Ray starts), train,
    print the summary as JSON. A bad config, a stale torch-extension lock or a teacher that does not
    fit: `NAME: error: ...` in one line, exit code 2."""
    from .runtime import StaleLockError, load_config

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "debug_steps")}
    if args.debug_steps:
        overrides |= {"steps": args.debug_steps, "checkpoint_every": args.debug_steps, "log_every": 1}
    try:
        cfg = load_config(TrainConfig, args.config, overrides)
        if distill and cfg.distill is None:
            raise ValueError("nothing to distil: give --teacher (a bundle folder or models:/NAME@ALIAS) or a "
                             "distill section in the YAML")
        summary = run_training(cfg)
    except (ValueError, StaleLockError) as e:
        print(f"{name}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _sample_clips(cfg: TrainConfig, manifest: ShardManifest) -> tuple[SampleClip, ...]:
    """The first clip of the first `sample_clips` eval videos (train videos if there is no eval split)."""
    from .data import ClipTable

    if cfg.sample_clips == 0:
        return ()
    split = "eval" if manifest.clip_count("eval") else "train"
    paths = {e.video_id: e.path for e in manifest.done()}
    table = ClipTable(cfg.data.path, split, ["video_id", "start", "latents", "audio", "motion", "refs"])
    firsts = [int(i) for i in table.offsets[:-1][: cfg.sample_clips]]  # clip 0 of each video
    rows = table.read(firsts)
    return tuple(SampleClip(video_id=str(rows["video_id"][i]), path=paths[str(rows["video_id"][i])],
                            start=int(rows["start"][i]), latents=rows["latents"][i], audio=rows["audio"][i],
                            motion=rows["motion"][i], refs=rows["refs"][i])
                 for i in range(len(firsts)))
