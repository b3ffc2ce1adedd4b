"""Distributed training: Ray Train TorchTrainer + DeepSpeed ZeRO, MLflow tracking, registry.

Settings: `TrainConfig`, in sections (model, data, optim, augment, target, scaling, tracking); YAML in
cluster/train/, checked before Ray starts by `check_train`.

Driver (`run_training`): check the config, open the MLflow run, build the `TrainPlan` every worker
gets, run TorchTrainer, then export the EMA weights as a LetsTalkPipeline bundle and register it.
Workers (`train_loop`): DeepSpeed engine over LetsTalkTransformer, batches read by index in a
replayable shuffled order (letstalk_platform.data), an fp32 EMA of the optimizer's master weights,
checkpoints through `ray.train.report` every `checkpoint_every` steps.

A checkpoint folder holds DeepSpeed's own files (`ds/`: weights, optimizer, LR schedule; per
rank), `ema-rank{r}.safetensors` (each rank's EMA of its fp32 master partitions), `rank{r}.json`
(each rank's RNG states and the node it ran on), `state.json` (step, data position, world size),
`resume.json` (the settings an exact resume must share: RESUME_KEYS) and `transformer/` (the full EMA
model, fp32 config.json + safetensors, loadable without Ray or DeepSpeed). Resuming from it
continues the run exactly (docs/training.md); a resume with other RESUME_KEYS is refused before Ray
starts unless `allow_config_change`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors.torch import load_file, save_file

from letstalk.artifacts import (CheckpointState, RankState, ShardManifest, ema_file, export_bundle, same_model,
                                write_json_atomic)
from letstalk.config import PRESETS, AudioFusion, LetsTalkConfig, PortraitFusion
from letstalk.diffusion import ClipTarget, GaussianDiffusion, Prediction
from letstalk.training import EMA, Augment, distill_loss_terms, init_from_checkpoint, loss_terms, prepare_batch
from letstalk.transformer import LetsTalkTransformer
from letstalk.vae import LatentCodec

from . import tracking
from .configs import check_deepspeed, load_mapping, require

TRAIN_COLUMNS = ["latents", "audio", "motion", "refs"]


FORBID = ConfigDict(extra="forbid")
_AUGMENT, _TARGET = Augment(), ClipTarget()  # the library's defaults: the only ones


class ModelSection(BaseModel):
    """The network: a preset of letstalk.config with the sizes the shards fix (`architecture`)."""

    model_config = FORBID

    preset: str = "B"
    portrait_fusion: PortraitFusion | None = Field(None, description="None: the preset's")
    audio_fusion: AudioFusion | None = Field(None, description="None: the preset's")
    init_from: str | None = Field(None, description="Latte/DiT checkpoint: keys matching by name and shape; with "
                                   "distill, an earlier student (.safetensors) to go on from instead of the teacher")
    gradient_checkpointing: bool = Field(False, description="recompute each block in the backward: far less "
                                         "activation memory for about a third more compute (bench/train.py)")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose from {list(PRESETS)}")
        return v


class DataSection(BaseModel):
    """What each worker reads: the shards of jobs/preprocess.py, by index (letstalk_platform.data)."""

    model_config = FORBID

    path: str = Field(description="shard folder written by jobs/preprocess.py")
    batch_size: int = Field(4, ge=1, description="clips per worker per step")
    shuffle: bool = Field(True, description="a new permutation of all clips every epoch, seeded by (seed, epoch), "
                          "so each batch mixes videos; false: shard order (a video's clips in a row)")
    prefetch_batches: int = Field(1, ge=0, description="batches each worker's loader thread reads ahead "
                                  "(the metric data_wait_frac says whether the loader keeps up)")


class OptimSection(BaseModel):
    """AdamW and its schedule, DeepSpeed (ZeRO stage, precision, base JSON) and the EMA of the weights."""

    model_config = FORBID

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warmup from 0")
    schedule: Literal["constant", "cosine"] = Field("constant", description="after warmup: constant, or cosine "
                                                    "decay to min_lr_ratio·lr at `steps`")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    kernel: Literal["auto", "fused", "foreach", "loop", "deepspeed"] = Field(
        "auto", description="AdamW kernel: torch's fused one ('fused', CUDA and CPU), its multi-tensor "
        "('foreach') or per-tensor ('loop') path, or DeepSpeed's FusedAdam ('deepspeed': CUDA, built at first "
        "use); auto = fused, the fastest here (bench/train.py)")
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    deepspeed: str | None = Field(None, description="base DeepSpeed JSON (cluster/deepspeed/); batch size, lr, "
                                  "weight decay, clipping, ZeRO stage, precision and kernel come from this config")
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    ema_warmup: bool = Field(False, description="decay min(ema_decay, (1+n)/(10+n)) at step n: for short runs")

    @property
    def kernel_impl(self) -> str:
        """The AdamW implementation this run uses ('auto' resolved)."""
        return "fused" if self.kernel == "auto" else self.kernel


class AugmentSection(BaseModel):
    """letstalk.training.Augment's fields (see its docstring); its defaults are the defaults."""

    model_config = FORBID

    flip_prob: float = Field(_AUGMENT.flip_prob, ge=0, le=1)
    audio_dropout: float = Field(_AUGMENT.audio_dropout, ge=0, le=1)
    motion_noise: float = Field(_AUGMENT.motion_noise, ge=0)
    motion_ref_prob: float = Field(_AUGMENT.motion_ref_prob, ge=0, le=1)

    def to_augment(self) -> Augment:
        return Augment(**self.model_dump())


class TargetSection(BaseModel):
    """What the network learns: x0 (letstalk.diffusion.ClipTarget, its defaults), the prediction, the loss weights."""

    model_config = FORBID

    residual: bool = Field(_TARGET.residual, description="diffuse the clip minus its portrait latent (written to "
                           "the bundle's pipeline.json)")
    residual_scale: float = Field(_TARGET.scale, gt=0, description="x0 = (clip - portrait) · residual_scale (or "
                                  "clip · residual_scale): about 1 / the RMS of the target (written to pipeline.json)")
    prediction: Prediction = Field("epsilon", description="the network's target (written to the bundle's "
                                   "pipeline.json)")
    motion_weight: float = Field(0.0, ge=0, description="weight the loss towards what moves in the clip "
                                 "(mouth, eyes): letstalk.training.motion_weights")

    residual_base: Literal["portrait", "motion"] = Field(_TARGET.base, description="the residual's base: the "
                                                         "portrait latent, or the clip's last motion frame (written "
                                                         "to pipeline.json)")

    def to_clip_target(self) -> ClipTarget:
        return ClipTarget(self.residual, self.residual_scale, self.residual_base)


class DistillSection(BaseModel):
    """Few-step distillation (jobs/distill.py): a student initialised from the teacher learns, in
    `student_steps` DDIM steps, the samples the teacher makes in `teacher_steps`
    (letstalk.training.distill_loss_terms). The teacher fixes the architecture and the target; the
    student's bundle renders with ddim and `student_steps` unless told otherwise (pipeline.json)."""

    model_config = FORBID

    teacher: str = Field(description="the teacher: a bundle folder or models:/NAME@ALIAS (tracking.mlflow_uri's "
                         "registry); its codecs must be the ones that made the shards")
    student_steps: int = Field(2, ge=1, le=50, description="the student's DDIM steps")
    teacher_steps: int = Field(8, ge=2, le=1000, description="the teacher's DDIM steps the student reproduces: a "
                               "multiple of student_steps (each student step learns teacher_steps / student_steps "
                               "teacher steps)")
    guidance: float = Field(1.0, ge=0, le=20, description="audio guidance the teacher samples with, baked into the "
                            "student (render the student at guidance 1)")

    @model_validator(mode="after")
    def _multiple(self) -> "DistillSection":
        if self.teacher_steps % self.student_steps or self.teacher_steps <= self.student_steps:
            raise ValueError(f"distill.teacher_steps ({self.teacher_steps}) must be a multiple of student_steps "
                             f"({self.student_steps}) and larger")
        return self

    @property
    def substeps(self) -> int:
        return self.teacher_steps // self.student_steps


class ScalingSection(BaseModel):
    """Ray Train's ScalingConfig and FailureConfig."""

    model_config = FORBID

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves for each worker (e.g. 0.5 on a laptop)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="how Ray places the workers: PACK fills a node first, SPREAD prefers one per node, "
        "STRICT_SPREAD demands it")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint (-1: no limit)")


class TrackingSection(BaseModel):
    """Where the run lives (STORAGE/NAME) and what it reports to: MLflow and its model registry."""

    model_config = FORBID

    name: str = Field("letstalk", description="run name: storage sub-folder and MLflow run name")
    storage: str = Field("runs", description="folder for Ray Train run state and checkpoints")
    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment: str = "letstalk"
    register_name: str | None = Field("letstalk", description="registered model name; null: do not register")
    register_alias: str = "candidate"

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v) or v.startswith("."):
            raise ValueError("name may hold only letters, digits, '-', '_' and '.'")
        return v


class TrainConfig(BaseModel):
    """Settings of jobs/train.py: YAML sections (cluster/train/*.yaml); flags override single keys
    (`--batch-size` = data.batch_size). Only `data.path` is required."""

    model_config = FORBID

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection
    optim: OptimSection = Field(default_factory=OptimSection)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    target: TargetSection = Field(default_factory=TargetSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    distill: DistillSection | None = Field(None, description="distil a teacher into a few-step student "
                                           "(jobs/distill.py) instead of training from the data alone")
    steps: int = Field(300_000, ge=1)
    time_limit_minutes: float | None = Field(None, gt=0, description="wall-clock budget of this training attempt: "
                                             "the run stops (checkpoint, bundle) at the first log_every step past "
                                             "it, every worker at the same step; the schedule still runs to `steps`")
    checkpoint_every: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    sample_clips: int = Field(1, ge=0, description="eval clips rendered to MLflow at every checkpoint")
    sample_steps: int = Field(25, ge=1, description="DDIM steps for those samples")
    seed: int = 0
    stall_warning_s: float = Field(600.0, gt=0, description="a worker that finishes no step for this long says "
                                   "so in the log (waiting for data, or for a peer in a collective)")
    fail_at_step: int | None = Field(None, description="chaos test: rank 1 dies once at this step")
    allow_config_change: bool = Field(False, description="resume the run's checkpoint even though seed, data.shuffle, "
                                      "data.batch_size or model.preset differ from what it was trained with (the "
                                      "run then goes on, but not as the uninterrupted run would have)")

    @model_validator(mode="after")
    def _kernel_on_device(self) -> "TrainConfig":
        if self.optim.kernel == "deepspeed" and not self.scaling.use_gpu:
            raise ValueError("optim.kernel 'deepspeed' (DeepSpeed's FusedAdam) needs scaling.use_gpu; on CPU use "
                             "fused, foreach or loop")
        return self

    @property
    def bf16(self) -> bool:
        """Whether the workers train in bf16 (precision 'auto': on GPU)."""
        return self.optim.precision == "bf16" or (self.optim.precision == "auto" and self.scaling.use_gpu)


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config: cfg.optim.deepspeed's JSON (if any) with this run's settings on top."""
    opt = cfg.optim
    base: dict[str, Any] = json.loads(Path(opt.deepspeed).read_text()) if opt.deepspeed else {}
    zero = dict(base.get("zero_optimization", {})) | {"stage": opt.zero_stage}
    optimizer = base.get("optimizer", {"type": "AdamW", "params": {"betas": [0.9, 0.999], "eps": 1e-8}})
    params = dict(optimizer.get("params", {})) | {"lr": opt.lr, "weight_decay": opt.weight_decay}
    for key in ("torch_adam", "fused", "foreach"):
        params.pop(key, None)
    if opt.kernel_impl != "deepspeed":
        # torch.optim.AdamW built by DeepSpeed (no op to compile); DeepSpeed passes `foreach` and
        # hands the remaining params (`fused`) to the constructor
        params |= {"torch_adam": True} | {"fused": {"fused": True}, "foreach": {"foreach": True},
                                          "loop": {"foreach": False}}[opt.kernel_impl]
    return base | {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": base.get("gradient_accumulation_steps", 1),
        "gradient_clipping": opt.grad_clip,
        "optimizer": {"type": optimizer.get("type", "AdamW"), "params": params},
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 10**9,
    }


def check_train(cfg: TrainConfig, root: str | os.PathLike | None = None) -> None:
    """What the TrainConfig model cannot see: optim.deepspeed names a DeepSpeed JSON that DeepSpeed
    accepts, and the config the workers will hand DeepSpeed (that JSON with this run's batch size,
    lr, clipping, ZeRO stage, precision and AdamW kernel on top: `deepspeed_config`) is valid too.
    Raises ConfigError.

    root: the folder relative paths are under (default: the working directory)."""
    if cfg.optim.deepspeed is not None:
        path = Path(root or ".") / cfg.optim.deepspeed
        require(path.is_file() and path.suffix == ".json",
                f"optim.deepspeed: {cfg.optim.deepspeed} is not a DeepSpeed .json file")
        base = load_mapping(path)
        base.pop("train_batch_size", None)  # checked below against this run's world size, not 1
        check_deepspeed(base, f"optim.deepspeed {cfg.optim.deepspeed}")
        cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"deepspeed": str(path)})})
    run = deepspeed_config(cfg)
    # DeepSpeed checks train_batch_size = micro batch × accumulation × world size; the world here is 1
    total = run.pop("train_batch_size", None)
    per_step = run["train_micro_batch_size_per_gpu"] * run["gradient_accumulation_steps"] * cfg.scaling.num_workers
    require(total is None or total == per_step,
            f"optim.deepspeed: train_batch_size {total} is not data.batch_size × gradient_accumulation_steps × "
            f"scaling.num_workers = {per_step} (leave it out: jobs/train.py sets the batch)")
    check_deepspeed(run, "the run's DeepSpeed config (optim.deepspeed + this config)")


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Learning rate at optimizer step `step` (0-based) as a fraction of cfg.optim.lr."""
    opt = cfg.optim
    if step < opt.warmup_steps:
        return (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - opt.warmup_steps) / max(1, cfg.steps - opt.warmup_steps))
    return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------

def say(line: str) -> None:
    """One line from a training worker to the driver's console. Not print(): Ray Train patches it
    to log and also tee to a wrapped stdout, which shows every line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def optimizer_kernel(engine) -> str:
    """Which AdamW kernel the engine steps with, e.g. "AdamW fused" or "FusedAdam" (an MLflow tag)."""
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the base optimizer
    defaults = getattr(opt, "defaults", {})
    kind = "fused" if defaults.get("fused") else {True: "foreach", False: "loop"}.get(defaults.get("foreach"), "")
    return f"{type(opt).__name__} {kind}".strip()


def master_weights(engine) -> dict[str, torch.Tensor]:
    """This rank's fp32 master weights, the tensors the optimizer steps: the flat fp32 partitions of
    ZeRO-3 / ZeRO-1-2 / DeepSpeed's bf16 optimizer, or (no ZeRO, fp32) the parameters themselves.
    The EMA averages these, so it is fp32, sharded like the optimizer state, and never sees the
    rounding of a bf16 working copy."""
    opt = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(opt, attr, None)
        if flats:
            return {f"{attr}.{i}": t for i, t in enumerate(flats)}
    params = dict(engine.module.named_parameters())
    if any(p.dtype != torch.float32 for p in params.values()):
        raise RuntimeError("no fp32 master weights found: the EMA needs a ZeRO/bf16 optimizer or fp32 parameters")
    return params


def full_ema_state(engine, ema: EMA, rank: int) -> dict[str, torch.Tensor] | None:
    """The whole EMA model, every tensor in fp32, on rank 0 (None elsewhere); a collective under ZeRO.

    The EMA shadow is swapped into the master weights, DeepSpeed assembles each full fp32 parameter
    from them (`safe_get_full_fp32_param`: all-gather under ZeRO-3, all-reduce of the fragments under
    ZeRO-1/2, for persistent parameters too), and the live masters are put back."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = master_weights(engine)
    live = {k: v.detach().clone() for k, v in masters.items()}
    state: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for k, v in masters.items():
                v.copy_(ema.shadow[k])
            for name, p in engine.module.named_parameters():
                full = safe_get_full_fp32_param(p)
                full = p.detach() if full is None else full  # no ZeRO: the parameter is the master
                if rank == 0:
                    state[name] = full.detach().float().cpu().clone().reshape(p.ds_shape if hasattr(p, "ds_shape")
                                                                              else p.shape)
    finally:
        with torch.no_grad():
            for k, v in masters.items():
                v.copy_(live[k])
    return state if rank == 0 else None


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream a worker draws from (JSON-able)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(), "generator": generator.get_state().tolist(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def seed_everything(seed: int, rank: int) -> torch.Generator:
    """Per-rank streams for augmentation, timesteps and noise; returns the training generator."""
    torch.manual_seed(seed * 1000 + rank + 1)
    np.random.seed((seed * 1000 + rank + 1) % 2**32)
    random.seed(seed * 1000 + rank + 1)
    return torch.Generator().manual_seed(seed * 1000 + rank)


class Watchdog:
    """Says so in the log when a worker finishes no step for `limit_s` (blocked on data, or on a peer
    in a collective that will never come), instead of hanging in silence."""

    def __init__(self, limit_s: float, rank: int):
        self.limit_s, self.rank = limit_s, rank
        self.step, self.doing, self.last = 0, "starting", time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="letstalk-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int, doing: str) -> None:
        self.step, self.doing, self.last = step, doing, time.monotonic()

    def _watch(self) -> None:
        warned_at = None
        while not self._stop.wait(min(self.limit_s / 4, 30.0)):
            idle = time.monotonic() - self.last
            if idle >= self.limit_s and warned_at != self.last:
                warned_at = self.last
                say(f"train: rank {self.rank}: no step finished for {idle:.0f} s after step {self.step} "
                    f"({self.doing}; stall_warning_s={self.limit_s:g})")

    def close(self) -> None:
        self._stop.set()


def build_engine(cfg: TrainConfig, arch: LetsTalkConfig, device: torch.device, rank: int,
                 init_from: str | None = None):
    """LetsTalkTransformer (the same initial weights on every rank) in a DeepSpeed engine; every
    parameter, the audio projection included, in the optimizer. `init_from` (default: model.init_from):
    the weights rank 0 starts from (DeepSpeed gives them to every rank)."""
    import deepspeed

    from .runtime import check_extension_locks

    torch.manual_seed(cfg.seed)
    model = LetsTalkTransformer(**arch.to_dict())
    init_from = init_from or cfg.model.init_from
    if init_from and rank == 0:
        report = init_from_checkpoint(model, init_from)
        say(f"init from {init_from}: {len(report['loaded'])} tensors loaded, "
            f"{len(report['shape_mismatch'])} shape mismatches, {len(report['missing'])} missing")
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    check_extension_locks()  # DeepSpeed's CPU comm op is built at first use: never wait on a dead build
    deepspeed.init_distributed(dist_backend="nccl" if cfg.scaling.use_gpu else "gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(cfg),
                                           lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                                               opt, lambda s: lr_factor(cfg, s)))
    return engine


@dataclass(frozen=True)
class SampleClip:
    """An eval clip rendered to MLflow at every checkpoint: its shard columns and where its audio is."""

    video_id: str
    path: str  # the source video (its audio track goes under the rendered clip)
    start: int  # first frame of the clip in that video
    latents: np.ndarray  # (F, C, h, w)
    audio: np.ndarray  # (F + window - 1, layers, D)
    motion: np.ndarray  # (M, C, h, w)
    refs: np.ndarray  # (K, C, h, w)


@dataclass(frozen=True)
class TrainPlan:
    """Everything a training worker needs, built once by `run_training` (Ray pickles it to each
    worker inside train_loop_config = {"plan": plan}: Ray Train takes a dict there)."""

    cfg: TrainConfig  # absolute paths (the workers do not share the driver's working directory)
    arch: LetsTalkConfig  # the preset with the sizes the shards fix
    run_id: str  # the MLflow run the workers log into
    run_dir: Path  # STORAGE/NAME: checkpoints and the LATEST pointer
    data_bundle: Path  # the bundle the shards were tokenized with (its codec decodes the samples)
    fps: float
    sample_rate: int
    samples: tuple[SampleClip, ...] = field(default=(), repr=False)
    clip_range: float | None = None  # the sampler's x0 bound (distillation runs the teacher's sampler)

    @property
    def chaos_marker(self) -> Path:
        """Written by the rank that `fail_at_step` kills, so that it dies only once."""
        return self.run_dir / ".chaos-done"


def train_loop(config: dict[str, Any]) -> None:
    import ray
    import ray.train

    from .data import BatchLoader, ClipTable

    plan: TrainPlan = config["plan"]
    cfg, arch = plan.cfg, plan.arch
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.scaling.use_gpu
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if use_gpu else "cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    node = ray.get_runtime_context().get_node_id()

    teacher, init_from = None, None
    if cfg.distill is not None:  # every rank holds the frozen teacher; the student starts as its copy,
        # or as model.init_from: an earlier student of this teacher to go on distilling (distill_setup checked it)
        teacher_dir = tracking.resolve_bundle(cfg.distill.teacher, cfg.tracking.mlflow_uri)
        teacher = LetsTalkTransformer.from_pretrained(teacher_dir / "transformer").to(device).eval()
        teacher.requires_grad_(False)
        init_from = cfg.model.init_from or str(teacher_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    engine = build_engine(cfg, arch, device, rank, init_from)
    generator = seed_everything(cfg.seed, rank)
    ema = EMA(master_weights(engine), cfg.optim.ema_decay, warmup=cfg.optim.ema_warmup)
    diffusion = GaussianDiffusion(learn_sigma=arch.learn_sigma, prediction=cfg.target.prediction)
    augment, target = cfg.augment.to_augment(), cfg.target.to_clip_target()
    log = tracking.RankZeroLogger(cfg.tracking.mlflow_uri, plan.run_id, rank)
    log.tag("optimizer_kernel", optimizer_kernel(engine))

    step, epoch, batch_in_epoch = 0, 0, 0
    resume = latest_checkpoint(ray.train.get_checkpoint(), plan.run_dir)
    if resume is not None:
        state = CheckpointState.load(resume)
        check_resume(cfg, resume)  # the driver checked the run's newest; Ray Train may hand back another
        if state.world_size != world:
            raise ValueError(f"checkpoint written by {state.world_size} workers, this run has {world}: "
                             "resume with the same scaling.num_workers (the EMA and data order are per rank)")
        engine.load_checkpoint(str(resume), tag="ds")
        ema.load_state_dict(load_file(str(ema_file(resume, rank)), device=str(device)))
        set_rng_state(RankState.load(resume, rank).rng, generator)
        step, (epoch, batch_in_epoch) = state.step, state.data_position
        ema.updates = step
        say(f"train: rank {rank}: resumed at step {step} (epoch {epoch}, batch {batch_in_epoch}) from {resume.name} "
            f"on node {node[:12]}")

    data = cfg.data
    table = ClipTable(data.path, "train", TRAIN_COLUMNS)
    loader = BatchLoader(table, data.batch_size, cfg.seed, rank, world, data.shuffle, start=(epoch, batch_in_epoch),
                         prefetch=data.prefetch_batches)
    if rank == 0 and step == 0:
        say(f"train: {len(table)} clips, {loader.batches_per_epoch} steps per epoch of {world} × {data.batch_size}")
    watchdog = Watchdog(cfg.stall_warning_s, rank)
    t_last, samples_since = time.perf_counter(), 0
    # data_wait_frac: the share of wall time a worker spends blocked on its next batch (0 = the
    # loader never holds the accelerator up)
    t_ready, data_wait = time.perf_counter(), 0.0
    batches = iter(loader)
    t_begin, out_of_time = time.perf_counter(), False
    try:
        while step < cfg.steps and not out_of_time:
            watchdog.beat(step, "waiting for data")
            epoch, b, arrays = next(batches)
            data_wait += time.perf_counter() - t_ready
            watchdog.beat(step, "in a step: forward, backward or a collective with the other workers")
            batch = {k: torch.from_numpy(arrays[k]).to(device) for k in TRAIN_COLUMNS}
            inputs = prepare_batch(batch, augment, arch.audio_window, generator, target=target)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                if teacher is None:
                    terms = loss_terms(engine, diffusion, inputs, generator, motion_weight=cfg.target.motion_weight)
                else:
                    d = cfg.distill
                    terms = distill_loss_terms(engine, teacher, diffusion, inputs, d.student_steps, d.substeps,
                                               d.guidance, plan.clip_range, generator, cfg.target.motion_weight)
            engine.backward(terms["loss"])
            engine.step()
            ema.update(master_weights(engine))
            step, samples_since = step + 1, samples_since + data.batch_size * world
            position = (epoch, b + 1) if b + 1 < loader.batches_per_epoch else (epoch + 1, 0)

            if cfg.fail_at_step == step and rank == min(1, world - 1):
                if not plan.chaos_marker.exists():
                    plan.chaos_marker.write_text(f"killed rank {rank} at step {step}\n")
                    os._exit(1)  # a worker dies without warning; Ray Train restarts from the last checkpoint

            metrics = {"step": step, **{k: float(terms[k].detach()) for k in ("loss", "mse", "vb") if k in terms}}
            if cfg.time_limit_minutes is not None and step % cfg.log_every == 0:
                out_of_time = _all_past(time.perf_counter() - t_begin > cfg.time_limit_minutes * 60, device)
                if out_of_time and rank == 0:
                    say(f"train: time limit of {cfg.time_limit_minutes:g} min reached at step {step}/{cfg.steps}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                metrics |= {"grad_norm": float(engine.get_global_grad_norm() or 0.0),
                            "samples_per_s": samples_since / max(now - t_last, 1e-9),
                            "lr": float(engine.get_lr()[0]),
                            "data_wait_frac": data_wait / max(now - t_last, 1e-9),
                            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
                t_last, samples_since, data_wait = now, 0, 0.0
                log.metrics({k: v for k, v in metrics.items() if k != "step"}, step)
                if rank == 0:
                    say(f"train: step {step}/{cfg.steps} ({step / cfg.steps:.0%}) loss {metrics['loss']:.4f} "
                        f"{metrics['samples_per_s']:.1f} samples/s, waiting for data {metrics['data_wait_frac']:.0%}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
                watchdog.beat(step, "writing a checkpoint")
                state = CheckpointState(step=step, data_position=position, world_size=world, seed=cfg.seed,
                                        shuffle=data.shuffle, target=target, prediction=cfg.target.prediction)
                rank_state = RankState(rng=rng_state(generator), node_id=node)
                # whatever the checkpoint and the samples draw (model construction, sampling) must not
                # move the run's own streams, or a resumed run would draw differently from this one
                with torch.random.fork_rng(devices=[device] if use_gpu else []):
                    full = _save_and_report(engine, ema, rank, arch, metrics, state, rank_state, plan.run_dir,
                                            resume_settings(cfg))
                    if full is not None and plan.samples:
                        _log_samples(full, plan, log, step, device)
            t_ready = time.perf_counter()
    finally:
        watchdog.close()


def _all_past(mine: bool, device: torch.device) -> bool:
    """Whether any worker is past its time limit (a MAX all-reduce): all stop at the same step."""
    import torch.distributed as dist

    flag = torch.tensor([1.0 if mine else 0.0], device=device)  # NCCL reduces CUDA tensors only
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


LATEST = "latest_checkpoint.json"


def latest_checkpoint(reported, run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of this run: the one Ray Train hands back, or the one
    `LATEST` names, whichever holds the later step.

    Ray Train registers a reported checkpoint asynchronously: a worker that dies a moment after a
    report can take the registration with it, and the restarted workers would then begin again from
    step 0. `LATEST` is written by rank 0 after every rank has finished writing, so it is never lost."""
    found: list[Path] = []
    if reported is not None and Path(reported.path).is_dir():  # shared storage: read it in place
        found.append(Path(reported.path))
    pointer = run_dir / LATEST
    if pointer.is_file():
        found.append(run_dir / json.loads(pointer.read_text())["dir"])
    found = [d for d in found if (d / CheckpointState.FILE).is_file()]
    return max(found, key=lambda d: CheckpointState.load(d, resumable=False).step, default=None)


RESUME_FILE = "resume.json"
# what a resumed run must share with its checkpoint to go on exactly as the uninterrupted run: the data
# order (seed, shuffle, batch size), the random streams (seed) and the network (preset)
RESUME_KEYS = ("seed", "data.shuffle", "data.batch_size", "model.preset")


def resume_settings(cfg: TrainConfig) -> dict[str, Any]:
    """RESUME_KEYS with their values in `cfg`: what each checkpoint records in resume.json."""
    return {"seed": cfg.seed, "data.shuffle": cfg.data.shuffle, "data.batch_size": cfg.data.batch_size,
            "model.preset": cfg.model.preset}


def check_resume(cfg: TrainConfig, checkpoint: Path) -> list[str]:
    """Refuse to resume `checkpoint` with RESUME_KEYS other than those it was trained with: a one-line
    ValueError naming them. With cfg.allow_config_change the changes are returned instead (for the
    log). A checkpoint from before resume.json is compared on what its state.json holds (seed, shuffle)."""
    if (checkpoint / RESUME_FILE).is_file():
        recorded = json.loads((checkpoint / RESUME_FILE).read_text())
    else:
        state = CheckpointState.load(checkpoint, resumable=False)
        recorded = {"seed": state.seed, "data.shuffle": state.shuffle}
    now = resume_settings(cfg)
    changed = [f"{key} {recorded[key]!r} (checkpoint) vs {now[key]!r} (this run)"
               for key in RESUME_KEYS if key in recorded and recorded[key] != now[key]]
    if changed and not cfg.allow_config_change:
        raise ValueError(f"cannot resume {checkpoint.parent.name}/{checkpoint.name} exactly: {', '.join(changed)}; "
                         "give the checkpoint's settings, or a new tracking.name, or --allow-config-change "
                         "(allow_config_change: true) to go on from it anyway")
    return changed


def _save_and_report(engine, ema: EMA, rank: int, arch: LetsTalkConfig, metrics: dict, state: CheckpointState,
                     rank_state: RankState, run_dir: Path, settings: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    full = full_ema_state(engine, ema, rank)
    name = f"checkpoint_{state.step:09d}"
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag="ds")
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, str(ema_file(d, rank)))
        rank_state.save(d, rank)
        if rank == 0:
            model = LetsTalkTransformer(**arch.to_dict())
            model.load_state_dict(full)
            model.save_pretrained(Path(d) / "transformer")
            state.save(d)
            (Path(d) / RESUME_FILE).write_text(json.dumps(settings))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d), checkpoint_dir_name=name)
    dist.barrier()  # every rank's files are in storage
    if rank == 0 and (run_dir / name / CheckpointState.FILE).is_file():
        write_json_atomic(run_dir / LATEST, {"dir": name, "step": state.step})
    return full


def _log_samples(ema_state: dict, plan: TrainPlan, log: tracking.RankZeroLogger, step: int,
                 device: torch.device) -> None:
    """Rank 0: render the eval sample clips with the EMA weights (DDIM) -> mp4 with the source audio -> MLflow."""
    from letstalk.audio import windows_from_context
    from letstalk.media import load_audio, write_video

    cfg, arch = plan.cfg, plan.arch
    target = cfg.target.to_clip_target()
    model = LetsTalkTransformer(**arch.to_dict()).to(device).eval()
    model.load_state_dict(ema_state)
    codec = LatentCodec.from_pretrained(plan.data_bundle / "vae", device=device)
    diffusion = GaussianDiffusion(learn_sigma=arch.learn_sigma, prediction=cfg.target.prediction)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    for k, clip in enumerate(plan.samples):
        ref = torch.as_tensor(clip.refs[0], device=device).float()[None]
        audio = windows_from_context(torch.as_tensor(clip.audio, device=device).float(), arch.audio_window)[None]
        motion = torch.as_tensor(clip.motion, device=device).float()[None]
        noise = torch.randn((1, *clip.latents.shape), generator=g, device=device)
        latents = diffusion.sample(lambda x, t: model(x, t, ref, audio, motion), noise, sampler="ddim",
                                   steps=cfg.distill.student_steps if cfg.distill else cfg.sample_steps, generator=g,
                                   clip_range=target.sample_range(codec.sample_range))
        latents = target.decode(latents, target.base_latent(ref, motion))
        frames = codec.decode(latents[0])
        fps, sr = plan.fps, plan.sample_rate
        wave = load_audio(clip.path, sr)[int(clip.start / fps * sr):][: int(len(frames) / fps * sr)]
        with tempfile.TemporaryDirectory() as d:
            out = write_video(Path(d) / f"step{step:07d}-clip{k}.mp4", frames, fps, wave, sr)
            log.artifact(out, "samples")


# ------------------------------------------------------------------------------------------
# Driver side
# ------------------------------------------------------------------------------------------

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


def architecture(model: ModelSection, manifest: ShardManifest) -> LetsTalkConfig:
    """The LetsTalkTransformer of a run on these shards: the preset's widths and depth (and fusions,
    unless the config picks others), the clip, latent and audio sizes the manifest records."""
    fusions = {k: v for k, v in (("portrait_fusion", model.portrait_fusion), ("audio_fusion", model.audio_fusion))
               if v is not None}
    return LetsTalkConfig.from_name(model.preset, **fusions, **manifest.architecture())


def distill_setup(cfg: TrainConfig, manifest: ShardManifest) -> tuple[TrainConfig, LetsTalkConfig, float | None]:
    """The teacher's architecture and target for a distillation run (the config's model and target
    sections give way, but for motion_weight), after checking that the teacher fits these shards;
    and the x0 bound its sampler clips to. One-line ValueErrors."""
    teacher = tracking.resolve_bundle(cfg.distill.teacher, cfg.tracking.mlflow_uri)
    settings = json.loads((teacher / "pipeline.json").read_text())
    config = json.loads((teacher / "transformer" / "config.json").read_text())
    arch = LetsTalkConfig.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    wanted = manifest.architecture()
    differ = {k: (getattr(arch, k), v) for k, v in wanted.items() if getattr(arch, k) != v}
    if differ:
        raise ValueError(f"distill.teacher {cfg.distill.teacher} does not fit these shards: "
                         + ", ".join(f"{k} {a} (teacher) vs {b} (shards)" for k, (a, b) in differ.items()))
    manifest.check_models()  # the shards' own bundle is still the one that made them
    for name in ("vae", "audio_encoder"):
        if not same_model(teacher / name, Path(manifest.bundle) / name):
            raise ValueError(f"distill.teacher {cfg.distill.teacher}: its {name} is not the one that tokenized "
                             f"{cfg.data.path} (preprocess the videos with the teacher's bundle)")
    target = TargetSection(residual=settings.get("residual", False), residual_scale=settings.get("residual_scale", 1.0),
                           residual_base=settings.get("residual_base", "portrait"),
                           prediction=settings.get("prediction", "epsilon"), motion_weight=cfg.target.motion_weight)
    if cfg.model.init_from:
        check_same_tensors(cfg.model.init_from, arch)
    clip_range = target.to_clip_target().sample_range(LatentCodec.from_pretrained(teacher / "vae").sample_range)
    return cfg.model_copy(update={"target": target}), arch, clip_range


def check_same_tensors(path: str, arch: LetsTalkConfig) -> None:
    """A student to go on from (distill with model.init_from) must hold every tensor of the teacher's
    architecture, shape for shape: a partial match, which init_from allows for training, would start
    the student as half a teacher. One-line ValueError."""
    from safetensors import SafetensorError, safe_open

    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in LetsTalkTransformer(**arch.to_dict()).state_dict().items()}
    try:
        with safe_open(path, "pt") as f:
            theirs = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise ValueError(f"model.init_from {path}: not a readable safetensors file ({e})") from None
    differ = sorted(k for k in own.keys() | theirs.keys() if own.get(k) != theirs.get(k))
    if differ:
        raise ValueError(f"model.init_from {path}: not a student of this teacher's architecture ({len(differ)} "
                         f"tensors missing, extra or of another shape against the teacher's {len(own)}, e.g. {differ[0]})")


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Relative paths (and a relative sqlite URI) resolved against the driver's working directory."""
    def resolve(value: str | None) -> str | None:
        return str(Path(value).resolve()) if value and "://" not in value else value

    uri = cfg.tracking.mlflow_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"path": resolve(cfg.data.path)}),
        "model": cfg.model.model_copy(update={"init_from": resolve(cfg.model.init_from)}),
        "optim": cfg.optim.model_copy(update={"deepspeed": resolve(cfg.optim.deepspeed)}),
        "tracking": cfg.tracking.model_copy(update={"storage": resolve(cfg.tracking.storage), "mlflow_uri": uri}),
        "distill": cfg.distill and cfg.distill.model_copy(update={"teacher": cfg.distill.teacher if tracking.MODEL_URI.match(
            cfg.distill.teacher) else resolve(cfg.distill.teacher)}),
    })


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
