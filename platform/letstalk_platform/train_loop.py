"""The training worker: what each Ray Train worker runs (`train_loop`, a module-level function Ray
pickles by reference) and the plan the driver gives it (`TrainPlan`, `SampleClip`).

Each worker: a DeepSpeed engine over LetsTalkTransformer (`build_engine`), batches read by index in
a replayable shuffled order (letstalk_platform.data), an fp32 EMA of the optimizer's master weights
(ema_export), checkpoints through `ray.train.report` every `checkpoint_every` steps (checkpoint),
resumed exactly from the newest; rank 0 logs to MLflow and renders the sample clips with the EMA
weights (`_log_samples`). A `Watchdog` says when a worker finishes no step for `stall_warning_s`.
"""

from __future__ import annotations

import os
import random
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from letstalk.artifacts import CheckpointState, RankState, ema_file
from letstalk.config import LetsTalkConfig
from letstalk.diffusion import GaussianDiffusion
from letstalk.revoice import latent_mask
from letstalk.training import EMA, distill_loss_terms, init_from_checkpoint, loss_terms, prepare_batch
from letstalk.transformer import LetsTalkTransformer
from letstalk.vae import LatentCodec

from . import tracking
from .checkpoint import check_resume, latest_checkpoint, resume_settings, rng_state, save_and_report, set_rng_state
from .ema_export import master_weights
from .train_config import TrainConfig, deepspeed_config, lr_factor

TRAIN_COLUMNS = ["latents", "audio", "motion", "refs"]


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
    cond_mask = latent_mask(arch.input_size).to(device) if arch.cond_channels else None  # a re-voicing model
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
            inputs = prepare_batch(batch, augment, arch.audio_window, generator, target=target, cond_mask=cond_mask,
                                   motion_frames=arch.num_motion_frames)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                if teacher is None:
                    terms = loss_terms(engine, diffusion, inputs, generator, motion_weight=cfg.target.motion_weight,
                                       unmasked_weight=cfg.target.unmasked_weight)
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
                                        shuffle=data.shuffle, target=target, prediction=cfg.target.prediction,
                                        settings=resume_settings(cfg))
                rank_state = RankState(rng=rng_state(generator), node_id=node)
                # whatever the checkpoint and the samples draw (model construction, sampling) must not
                # move the run's own streams, or a resumed run would draw differently from this one
                with torch.random.fork_rng(devices=[device] if use_gpu else []):
                    full = save_and_report(engine, ema, rank, arch, metrics, state, rank_state, plan.run_dir)
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
