"""Settings of a training run: `TrainConfig` and its sections, and what is derived from them alone.

Sections: model, data, optim, augment, target, scaling, tracking (and distill for jobs/distill.py);
YAML in cluster/train/, flags override single keys (runtime.load_config). Checked before Ray
starts: `check_train` (the DeepSpeed JSON and the DeepSpeed config the workers will build from it,
`deepspeed_config`). Also here: the learning-rate schedule (`lr_factor`), the network a run on
given shards trains (`architecture`; distilling, the teacher's: `distill_setup`, which checks that
the teacher and any student to go on from fit), and the driver's paths made absolute for the
workers (`absolute_paths`). Nothing here starts Ray or DeepSpeed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from letstalk.artifacts import ShardManifest, same_model
from letstalk.config import PRESETS, AudioFusion, LetsTalkConfig, PortraitFusion
from letstalk.diffusion import ClipTarget, Prediction
from letstalk.training import Augment
from letstalk.transformer import LetsTalkTransformer
from letstalk.vae import LatentCodec

from . import tracking
from .configs import check_deepspeed, load_mapping, require


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
    unmasked_weight: float = Field(1.0, ge=0, le=1, description="a re-voicing model's loss weight on the cells "
                                   "its condition shows, against 1 on the masked lower face it regenerates: "
                                   "letstalk.training.mask_weights")

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


def architecture(model: ModelSection, manifest: ShardManifest) -> LetsTalkConfig:
    """The LetsTalkTransformer of a run on these shards: the preset's widths and depth (and fusions,
    unless the config picks others), the clip, latent and audio sizes the manifest records."""
    fusions = {k: v for k, v in (("portrait_fusion", model.portrait_fusion), ("audio_fusion", model.audio_fusion))
               if v is not None}
    fixed, preset = manifest.architecture(), LetsTalkConfig.from_name(model.preset)
    # a preset may read fewer motion frames than the shards hold (re-voicing reads none: the loop keeps the last ones)
    fixed["num_motion_frames"] = min(preset.num_motion_frames, fixed["num_motion_frames"])
    if preset.cond_channels:  # re-voicing: the frame's masked latent and the mask (letstalk.revoice)
        fixed["cond_channels"] = fixed["in_channels"] + 1
    return LetsTalkConfig.from_name(model.preset, **fusions, **fixed)


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
