"""Evaluation: models × held-out videos -> the paper's metrics table (Tables 1-4), on stdout, on disk and in MLflow.

Two sources of videos, either or both:

* A shard folder (`data`): the videos its manifest lists for `split` (default the hash eval split
  of held-out identities; "train" or "all" for the others). Protocol (the paper's): the first
  clip (`frames`, default 16 frames) of every video; the video's first frame is the reference
  portrait and its audio drives the model; generated and ground-truth frames are resized to one
  resolution (`size`, default the shards' crop size) before any metric. Ground truth is decoded
  from the source videos the manifest lists, with the same decode + face crop as preprocessing
  (`letstalk.clips.decode_video`), i.e. real pixels, not VAE reconstructions.
* Real footage (`reference_videos`: a folder or glob of talking-head videos with their own
  audio): the first `max_seconds` of each, decoded and face-cropped at the model's own
  resolution; the first crop is the portrait and the video's audio drives the model. Generated
  and real crops are scored by MediaPipe face landmarks (letstalk.metrics.mouth): the generated
  mouth against the real speaker's (mouth r, with a shifted control), lip landmark distance
  (LMD), the mouth against the audio loudness, and how often a face is found at all. Identity
  similarity is not measured: there is no face-embedding model here.

Metrics (letstalk.metrics): FID (Inception pool features over all frames), FVD (I3D over
16-frame clips), SSIM and PSNR (whole frame and the face region), E-FID (Fréchet distance over
Deep3DFaceRecon expression coefficients, or a labelled mouth-opening proxy on procedural data),
lip sync vs a mismatched-audio control and blinks per minute (procedural data). A metric that
cannot be computed (no weights file, too few clips, not procedural data) is reported as
"not computed (reason)", never as NaN. Sync figures need `metrics.MIN_SYNC_FRAMES` frames (2 s):
on shorter clips the lag search makes unrelated tracks correlate, so they print as
"– (16 frames < 50)".

Several models give one row each, labelled with their fusion config: the layout of the
paper's ablation Tables 3-4.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from letstalk import metrics
from letstalk.artifacts import ShardManifest
from letstalk.diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS, Sampler
from letstalk.clips import ClipSpec, decode_video
from letstalk.faces import LANDMARKER, FaceSettings, MediaPipeFaces
from letstalk.media import MediaError, ffmpeg_exe, probe
from letstalk.pipeline import LetsTalkPipeline

from .preprocess import list_inputs, manifest_faces, video_id
from . import tracking

# without --out the store is per user, never the working directory
NO_OUT_MLFLOW_DB = Path.home() / ".cache" / "letstalk" / "eval" / "mlflow.db"


def default_mlflow_uri(out: str | os.PathLike | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else a sqlite store in the output folder (OUT/mlflow.db), else (no
    output folder) ~/.cache/letstalk/eval/mlflow.db."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(out).resolve() / "mlflow.db" if out else NO_OUT_MLFLOW_DB
    return f"sqlite:///{db}"


class EvalConfig(BaseModel):
    """Settings of jobs/evaluate.py (YAML keys; flags override them)."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1, description="bundle dirs or models:/<name>@<alias>, one row each")
    data: str | None = Field(None, description="shard folder written by jobs/preprocess.py (its manifest lists the "
                                               "videos); this and/or reference_videos")
    split: Literal["eval", "train", "all"] = Field("eval", description="which videos of the shard folder")
    reference_videos: str | None = Field(None, description="real talking-head videos with their own audio (a folder "
                                                           "or a glob): scored by face landmarks against the real "
                                                           "mouth")
    face_model: str = Field(str(LANDMARKER), description="MediaPipe face_landmarker .task file, for "
                            "reference_videos (default: the one shipped with the package)")
    max_seconds: float = Field(8.0, gt=0, description="seconds of each reference video evaluated")
    out: str | None = Field(None, description="folder for table.md + table.json")
    mlflow_uri: str | None = Field(None, description="tracking store; default $MLFLOW_TRACKING_URI, else "
                                                     "sqlite:///OUT/mlflow.db, else ~/.cache/letstalk/eval/mlflow.db")
    experiment: str = "letstalk-eval"
    steps: int | None = Field(None, ge=1, le=1000, description="None: each model's own (pipeline.json: a distilled "
                              f"student's few steps), else {DEFAULT_STEPS}")
    sampler: Sampler | None = Field(None, description=f"None: each model's own, else {DEFAULT_SAMPLER}")
    guidance: float = Field(1.0, ge=0)
    seed: int = Field(0, ge=0)
    frames: int = Field(16, ge=2, description="frames per eval video (the paper: its first 16-frame clip)")
    size: int | None = Field(None, ge=16, description="evaluation resolution (default: the shards' crop size)")
    max_videos: int | None = Field(None, ge=1)
    inception: str | None = Field(None, description="TorchScript Inception (inception-2015-12-05.pt) for FID")
    i3d: str | None = Field(None, description="TorchScript I3D (i3d_torchscript.pt) for FVD")
    face_recon: str | None = Field(None, description="Deep3DFaceRecon epoch_20.pth (or TorchScript) for E-FID")
    device: str = Field("auto", description="auto | cpu | cuda[:n]")
    max_lag: int = Field(3, ge=0, le=10, description="lip-sync lag search, frames")

    @model_validator(mode="after")
    def _sources(self) -> "EvalConfig":
        if not self.data and not self.reference_videos:
            raise ValueError("nothing to evaluate on: give a shard folder (data) and/or reference_videos")
        if self.mlflow_uri is None:
            self.mlflow_uri = default_mlflow_uri(self.out)
        return self


@dataclass
class EvalVideo:
    video_id: str
    path: str
    frames: np.ndarray  # (F, S, S, 3) uint8 ground truth at the evaluation size
    audio: np.ndarray  # (samples,) float32, the clip's audio
    face: metrics.ProceduralFace | None  # procedural data: where mouth and eyes are


@dataclass
class ReferenceSet:
    """Real footage at one model's resolution: the videos, their real mouths, what was skipped."""

    spec: ClipSpec
    videos: list[EvalVideo]  # first crop = the portrait; audio = the video's own
    mouths: list[metrics.MouthTrack]  # of the real crops, measured as the generated ones are
    skipped: list[str]


@dataclass
class EvalReport:
    rows: list[dict[str, Any]]  # shard evaluation: one per model, then the ground-truth reference row
    markdown: str
    protocol: dict[str, Any]  # of the shard evaluation ({} without data)
    run_ids: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    # real footage: per video, one row per model and a ground-truth row; then the means
    reference_rows: list[dict[str, Any]] = field(default_factory=list)
    reference_protocol: dict[str, Any] = field(default_factory=dict)
    mlflow_uri: str = ""


# ------------------------------------------------------------------------------------------ data


def load_eval_videos(cfg: EvalConfig) -> tuple[list[EvalVideo], dict[str, Any], list[str]]:
    """The ground truth of the shard folder's `cfg.split` videos: (videos, clip spec, skipped reasons)."""
    root = Path(cfg.data)
    manifest = ShardManifest.load(root)
    entries = manifest.done(None if cfg.split == "all" else cfg.split)
    which = "" if cfg.split == "all" else f"{cfg.split} "
    if not entries:
        raise ValueError(f"{root}: no {which}video was preprocessed (see manifest.json counts)")
    spec, faces = manifest.clip_spec, manifest_faces(manifest)
    size = cfg.size or spec.image_size
    videos, skipped = [], []
    for e in entries[: cfg.max_videos] if cfg.max_videos else entries:
        try:
            decoded = decode_video(e.path, spec, faces, vad=False)
        except (ValueError, OSError) as err:
            skipped.append(f"{e.video_id}: {' '.join(str(err).split())[:200]}")
            continue
        if len(decoded.frames) < cfg.frames:
            skipped.append(f"{e.video_id}: {len(decoded.frames)} frames, fewer than {cfg.frames}")
            continue
        samples = int(round(cfg.frames / spec.fps * spec.sample_rate))
        videos.append(EvalVideo(e.video_id, e.path, metrics.resize_frames(decoded.frames[: cfg.frames], size),
                                decoded.audio[:samples], procedural_face(e.path, size, decoded.box)))
    if not videos:
        raise ValueError(f"{root}: no {which}video has {cfg.frames} usable frames ({'; '.join(skipped)[:300]})")
    return videos, {"fps": spec.fps, "sample_rate": spec.sample_rate, "size": size}, skipped


def first_seconds(path: Path, seconds: float, folder: Path) -> Path:
    """The video itself if it is at most `seconds` long, else its first `seconds` (streams copied,
    not re-encoded) as a file in `folder`: decoding reads no more than it needs."""
    if probe(path).duration <= seconds:
        return path
    cut = folder / f"{video_id(path)}{path.suffix}"
    run = subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(path), "-t", f"{seconds:g}", "-map", "0:v:0",
                          "-map", "0:a:0", "-c", "copy", str(cut)], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["ffmpeg failed"])[-1]
        raise MediaError(f"{path}: could not cut its first {seconds:g} s ({last})")
    return cut


def reference_spec(pipe: LetsTalkPipeline, max_seconds: float) -> ClipSpec:
    """How real footage is decoded for a model: its frame rate, sample rate, resolution and clip length."""
    tcfg = pipe.transformer.cfg
    # max_seconds is decode_video's length limit, not a cut: a stream-copied cut may run a few ms over
    return ClipSpec(fps=pipe.settings.fps, sample_rate=pipe.settings.sample_rate, image_size=pipe.image_size,
                    clip_frames=tcfg.num_frames, stride=tcfg.num_frames, motion_frames=tcfg.num_motion_frames,
                    audio_window=tcfg.audio_window, max_seconds=max_seconds + 1.0)


def load_reference_videos(cfg: EvalConfig, spec: ClipSpec) -> ReferenceSet:
    """The first `cfg.max_seconds` of each reference video at `spec`: face crops, own audio, and
    the real crops' mouth track. Only the first shot (at least one clip long) is kept: across a
    cut the real mouth belongs to another view. Unusable videos are skipped with a reason."""
    paths = list_inputs(cfg.reference_videos)
    MediaPipeFaces(cfg.face_model).close()  # a bad model file fails here, not once per video
    faces = FaceSettings(detector="mediapipe", model=cfg.face_model)
    limit = int(round(cfg.max_seconds * spec.fps))
    videos, mouths, skipped = [], [], []
    with tempfile.TemporaryDirectory(prefix="letstalk-eval-") as tmp:
        for path in paths[: cfg.max_videos] if cfg.max_videos else paths:
            vid = video_id(path)
            try:
                decoded = decode_video(first_seconds(path, cfg.max_seconds, Path(tmp)), spec, faces, vad=False)
            except (ValueError, OSError) as err:
                skipped.append(f"{vid}: {' '.join(str(err).split())[:200]}")
                continue
            shots = [(s, e) for s, e in decoded.track.truncated(limit).shots if e - s >= spec.clip_frames]
            if not shots:
                skipped.append(f"{vid}: no shot of the first {cfg.max_seconds:g} s is one clip long "
                               f"({spec.clip_frames} frames)")
                continue
            s, e = shots[0]
            frames = decoded.frames[s:e]
            audio = decoded.audio[round(s / spec.fps * spec.sample_rate):round(e / spec.fps * spec.sample_rate)]
            videos.append(EvalVideo(vid, str(path), frames, audio, None))
            mouths.append(metrics.mouth_track(frames, cfg.face_model, spec.fps))
    if not videos:
        raise ValueError(f"{cfg.reference_videos}: no usable reference video ({'; '.join(skipped)[:300]})")
    return ReferenceSet(spec, videos, mouths, skipped)


def procedural_face(path: str, size: int, box) -> metrics.ProceduralFace | None:
    sidecar = Path(path).with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text())
        return metrics.ProceduralFace.from_sidecar(meta, size, box)
    except (OSError, ValueError, TypeError):
        return None


# ------------------------------------------------------------------------------------------ render


def model_label(model: str) -> str:
    m = tracking.MODEL_URI.match(model)
    return f"{m['name']}@{m['alias']}" if m else Path(model).resolve().name


def render_videos(pipe: LetsTalkPipeline, videos: list[EvalVideo], cfg: EvalConfig, spec: dict[str, Any],
                  desc: str = "render") -> list[np.ndarray]:
    """Each video's first frame + its audio -> generated frames (F, S, S, 3) at the evaluation size."""
    if pipe.settings.fps != spec["fps"] or pipe.settings.sample_rate != spec["sample_rate"]:
        raise ValueError(f"the model renders {pipe.settings.fps} fps / {pipe.settings.sample_rate} Hz but the eval "
                         f"data is {spec['fps']} fps / {spec['sample_rate']} Hz")
    out = []
    for v in tqdm(videos, desc=desc, unit="video"):
        ref = metrics.resize_frames(v.frames[:1], pipe.image_size)
        ref_latent = pipe.codec.encode(ref).to(pipe.device)  # (1, C, h, w)
        clips = pipe.iter_clips(ref_latent, v.audio, steps=cfg.steps, sampler=cfg.sampler, guidance=cfg.guidance,
                                seed=cfg.seed)  # None: the model's own sampler and steps (LetsTalkPipeline.sampling)
        frames = np.concatenate(list(clips))
        if len(frames) != len(v.frames):
            raise ValueError(f"{v.video_id}: the model rendered {len(frames)} frames for {len(v.frames)}")
        out.append(metrics.resize_frames(frames, spec["size"]))
    return out


# ------------------------------------------------------------------------------------------ metrics


@dataclass
class Extractors:
    inception: metrics.InceptionFeatures | None
    i3d: metrics.I3DFeatures | None
    expression: metrics.ExpressionFeatures | None

    @classmethod
    def load(cls, cfg: EvalConfig, device: str) -> "Extractors":
        return cls(metrics.load_inception(cfg.inception, device) if cfg.inception else None,
                   metrics.load_i3d(cfg.i3d, device) if cfg.i3d else None,
                   metrics.load_face_recon(cfg.face_recon, device) if cfg.face_recon else None)


def _try(notes: dict[str, str], name: str, fn) -> float | None:
    try:
        value = float(fn())
    except ValueError as e:
        notes[name] = f"not computed ({' '.join(str(e).split())[:200]})"
        return None
    if not math.isfinite(value):
        notes[name] = "not computed (not finite)"
        return None
    return value


def _fvd_clips(frames: list[np.ndarray]) -> np.ndarray:
    clips = [f[i:i + metrics.FVD_CLIP_FRAMES] for f in frames
             for i in range(0, len(f) - metrics.FVD_CLIP_FRAMES + 1, metrics.FVD_CLIP_FRAMES)]
    if not clips:
        raise ValueError(f"eval clips are shorter than FVD's {metrics.FVD_CLIP_FRAMES} frames")
    return np.stack(clips)


def too_short_for_sync(frames: int) -> str | None:
    """The reason a sync figure is not given ("16 frames < 50"), or None when the video is long enough."""
    return f"{frames} frames < {metrics.MIN_SYNC_FRAMES}" if frames < metrics.MIN_SYNC_FRAMES else None


def _short_sync_note(short: str) -> str:
    return (f"not computed ({short}: too short for a lip-sync figure, the lag search makes unrelated tracks "
            f"correlate; evaluate {metrics.MIN_SYNC_FRAMES} frames or more)")


def motion_metrics(frames: list[np.ndarray], videos: list[EvalVideo], spec: dict[str, Any], max_lag: int,
                   notes: dict[str, str]) -> dict[str, Any]:
    """Weights-free lip sync and blinks (procedural videos only). Sync needs MIN_SYNC_FRAMES frames:
    below that the row gets "cells" that print "– (16 frames < 50)" in the sync columns."""
    row: dict[str, Any] = {"sync": None, "sync_control": None, "sync_lag": None, "blinks_per_min": None}
    faces = [v.face for v in videos]
    if any(f is None for f in faces):
        reason = "not computed (needs procedural videos with a sidecar JSON)"
        notes.update({k: reason for k in ("sync", "blinks_per_min")})
        return row
    short = too_short_for_sync(min(len(f) for f in frames))
    if short:
        notes["sync"] = _short_sync_note(short)
        row["cells"] = {"sync": f"– ({short})", "sync_control": f"– ({short})"}
    else:
        mouths = [metrics.mouth_opening(f, v.face) for f, v in zip(frames, videos)]
        envs = [metrics.sync_envelope(v.audio, len(f), spec["sample_rate"], spec["fps"])
                for f, v in zip(frames, videos)]
        try:
            s = metrics.sync_score(mouths, envs, max_lag)
            row.update(sync=s.score, sync_control=s.control, sync_lag=float(s.lag))
        except ValueError as e:
            notes["sync"] = f"not computed ({e})"
    if spec["size"] < metrics.BLINK_MIN_SIZE:
        notes["blinks_per_min"] = f"not computed (eyes too small below {metrics.BLINK_MIN_SIZE} px)"
    else:
        blinks = sum(metrics.count_blinks(metrics.eye_spread(f, v.face)) for f, v in zip(frames, videos))
        row["blinks_per_min"] = blinks / (sum(len(f) for f in frames) / spec["fps"] / 60.0)
    return row


def score_model(gen: list[np.ndarray], videos: list[EvalVideo], ex: Extractors, spec: dict[str, Any],
                max_lag: int) -> tuple[dict[str, float | None], dict[str, str]]:
    """Generated frames (one (F, S, S, 3) array per video) vs the ground truth -> (metrics, notes)."""
    notes: dict[str, str] = {}
    real = [v.frames for v in videos]
    if len(gen) != len(real):
        raise ValueError(f"{len(gen)} generated videos for {len(real)} ground-truth videos")
    for g, r, v in zip(gen, real, videos):
        try:
            metrics.check_frame_pair(g, r)
        except ValueError as e:
            raise ValueError(f"{v.video_id}: {e}") from None
    all_gen, all_real = np.concatenate(gen), np.concatenate(real)
    box = metrics.face_region(spec["size"])
    row: dict[str, float | None] = {}
    row["ssim"] = _try(notes, "ssim", lambda: np.mean([metrics.ssim(g, r) for g, r in zip(gen, real)]))
    row["psnr"] = _try(notes, "psnr", lambda: np.mean([metrics.psnr(g, r) for g, r in zip(gen, real)]))
    row["face_ssim"] = _try(notes, "face_ssim", lambda: np.mean(
        [metrics.ssim(metrics.crop_region(g, box), metrics.crop_region(r, box)) for g, r in zip(gen, real)]))
    row["face_psnr"] = _try(notes, "face_psnr", lambda: np.mean(
        [metrics.psnr(metrics.crop_region(g, box), metrics.crop_region(r, box)) for g, r in zip(gen, real)]))
    no_weights = "not computed (no weights: pass --{} {})"
    if ex.inception is None:
        row["fid"], notes["fid"] = None, no_weights.format("inception", "inception-2015-12-05.pt")
    else:
        row["fid"] = _try(notes, "fid", lambda: metrics.frechet_distance_from_features(ex.inception(all_real),
                                                                                        ex.inception(all_gen)))
    if ex.i3d is None:
        row["fvd"], notes["fvd"] = None, no_weights.format("i3d", "i3d_torchscript.pt")
    else:
        row["fvd"] = _try(notes, "fvd", lambda: metrics.frechet_distance_from_features(
            ex.i3d(_fvd_clips(real)), ex.i3d(_fvd_clips(gen))))
    if ex.expression is not None:
        row["efid"] = _try(notes, "efid", lambda: metrics.frechet_distance_from_features(
            ex.expression(all_real), ex.expression(all_gen)))
        notes.setdefault("efid_kind", "Deep3DFaceRecon expression coefficients")
    elif all(v.face is not None for v in videos):
        def proxy(frames):
            return np.concatenate([metrics.expression_proxy(metrics.mouth_opening(f, v.face))
                                   for f, v in zip(frames, videos)])

        row["efid"] = _try(notes, "efid", lambda: metrics.frechet_distance_from_features(proxy(real), proxy(gen)))
        notes["efid_kind"] = ("PROXY: pixel mouth opening + its change (no Deep3DFaceRecon weights: pass "
                              "--face-recon epoch_20.pth); not comparable with the paper's E-FID")
    else:
        row["efid"], notes["efid"] = None, no_weights.format("face-recon", "epoch_20.pth")
    if all(v.face is not None for v in videos):
        row["mouth_sharpness"] = _try(notes, "mouth_sharpness", lambda: mouth_sharpness(gen, videos))
    else:
        row["mouth_sharpness"], notes["mouth_sharpness"] = None, "not computed (no mouth box: not procedural videos)"
    row |= motion_metrics(gen, videos, spec, max_lag, notes)
    return row, notes


def mouth_sharpness(gen: list[np.ndarray], videos: list[EvalVideo]) -> float:
    """Generated ÷ real variance of the Laplacian in each video's mouth box, pooled over the frames of
    all videos (1 = as sharp as the ground truth; PSNR and sync reward a blurred mouth, this does not)."""
    g = np.concatenate([metrics.laplacian_variance(f, v.face.mouth_box()) for f, v in zip(gen, videos)])
    r = np.concatenate([metrics.laplacian_variance(v.frames, v.face.mouth_box()) for v in videos])
    if r.mean() <= 1e-9:
        raise ValueError("the real mouths are flat")
    return float(g.mean() / r.mean())


# ------------------------------------------------------------------------------------------ table

COLUMNS = [("fid", "FID ↓", 2), ("fvd", "FVD ↓", 2), ("ssim", "SSIM ↑", 4), ("psnr", "PSNR ↑", 2),
           ("efid", "E-FID ↓", 4), ("face_ssim", "face SSIM ↑", 4), ("face_psnr", "face PSNR ↑", 2),
           ("mouth_sharpness", "mouth sharpness (1 = real)", 2),
           ("sync", "sync ↑", 3), ("sync_control", "sync control", 3), ("seam", "seam ↓", 2),
           ("blinks_per_min", "blinks/min", 1)]


def markdown_table(rows: list[dict[str, Any]], protocol: dict[str, Any]) -> str:
    """Rows -> a markdown table in the paper's layout, with the reasons for every missing value."""
    head = ["model", "portrait fusion", "audio fusion"] + [title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: list[str] = []
    for row in rows:
        cells = [row["model"], row.get("portrait_fusion") or "–", row.get("audio_fusion") or "–"]
        cells += [_cell(row, key, digits) for key, _, digits in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
        for key, note in row.get("notes", {}).items():
            line = f"- {key}: {note}"
            if line not in notes:
                notes.append(line)
    p = protocol
    which = "" if p.get("split", "eval") == "all" else f"{p.get('split', 'eval')} "
    intro = (f"Protocol: first {p['frames']} frames of {p['videos']} {which}videos, {p['size']}×{p['size']} px, "
             f"{sampling_text(p)}, guidance {p['guidance']:g}, seed {p['seed']}. "
             f"Sync: mean Pearson r of pixel mouth opening vs audio loudness (best lag 0..{p['max_lag']}); "
             "control: the same with another video's audio. Seam: mean frame change across clip boundaries / "
             "median change within clips (1 = seamless).")
    return "\n".join([intro, "", *lines, "", "Notes (– = not computed):", *notes]) + "\n"


def sampling_text(p: dict[str, Any]) -> str:
    """The protocol's sampler and steps in words ("ddim 25 steps", or each model's own)."""
    if p.get("steps"):
        return f"{p.get('sampler') or DEFAULT_SAMPLER} {p['steps']} steps"
    return (f"each model's own sampler and steps (pipeline.json, else {DEFAULT_SAMPLER} {DEFAULT_STEPS}; "
            "in the model column)")


def _cell(row: dict[str, Any], key: str, digits: int) -> str:
    """A value, its inline reason ("– (16 frames < 50)") or "–" (the reason is under Notes)."""
    if key in row.get("cells", {}):
        return row["cells"][key]
    value = row.get(key)
    return "–" if value is None else f"{value:.{digits}f}"


def reference_row(videos: list[EvalVideo], spec: dict[str, Any], max_lag: int) -> dict[str, Any]:
    """The ground-truth videos scored by the weights-free measures: what a perfect model would get."""
    notes: dict[str, str] = {}
    row = {"model": "ground truth", "portrait_fusion": None, "audio_fusion": None}
    row |= {k: None for k, _, _ in COLUMNS}
    if all(v.face is not None for v in videos):
        row["mouth_sharpness"] = 1.0  # by definition: the scale the models' column is read on
    row |= motion_metrics([v.frames for v in videos], videos, spec, max_lag, notes)
    row["notes"] = notes
    return row


# ------------------------------------------------------------------------------------------ real footage

REFERENCE_COLUMNS = [("frames", "frames", 0), ("mouth_r", "mouth r ↑", 3), ("mouth_control", "mouth control", 3),
                     ("mouth_lag", "lag", 0), ("lmd", "LMD ↓", 2), ("audio_r", "audio r", 3),
                     ("audio_control", "audio control", 3), ("face_found", "face found ↑", 2),
                     ("identity", "identity ↑", 3)]
REFERENCE_METRICS = ("mouth_r", "mouth_control", "lmd", "audio_r", "audio_control", "face_found")  # logged
IDENTITY_CELL = f"– ({metrics.IDENTITY_NOT_MEASURED})"


SYNC_COLUMNS = ("mouth_r", "mouth_control", "mouth_lag", "audio_r", "audio_control")


def _reference_values(mouth: metrics.MouthTrack) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """A row's values (frames, face found; the rest None), notes, and inline cells: identity not
    measured, and the sync columns' reason below MIN_SYNC_FRAMES (both explained once under the table)."""
    values: dict[str, Any] = {k: None for k, _, _ in REFERENCE_COLUMNS}
    values |= {"frames": len(mouth), "face_found": mouth.face_fraction}
    cells = {"identity": IDENTITY_CELL}
    short = too_short_for_sync(len(mouth))
    if short:
        cells |= {k: f"– ({short})" for k in SYNC_COLUMNS}
    return values, {}, cells


def _audio_figures(values: dict[str, Any], notes: dict[str, str], mouth: metrics.MouthTrack, video: EvalVideo,
                   spec: ClipSpec, max_lag: int) -> None:
    try:
        a = metrics.audio_sync(mouth.aperture, video.audio, spec.sample_rate, spec.fps, max_lag)
        values |= {"audio_r": a.r, "audio_control": a.control}
    except ValueError as e:
        notes["audio_r"] = f"not computed ({e})"


def score_reference_video(gen: metrics.MouthTrack, real: metrics.MouthTrack, video: EvalVideo, spec: ClipSpec,
                          max_lag: int) -> dict[str, Any]:
    """One generated video against its real video: mouth r (+ shifted control and lag), LMD, the
    generated mouth vs the loudness envelope (+ its shifted control), the face-found fraction."""
    values, notes, cells = _reference_values(gen)
    if "mouth_r" not in cells:
        try:
            s = metrics.landmark_sync(gen.aperture, real.aperture, max_lag)
            values |= {"mouth_r": s.r, "mouth_control": s.control, "mouth_lag": s.lag}
        except ValueError as e:
            notes["mouth_r"] = f"not computed ({e})"
        _audio_figures(values, notes, gen, video, spec, max_lag)
    try:
        values["lmd"] = metrics.lmd(gen.lips, real.lips)
    except ValueError as e:
        notes["lmd"] = f"not computed ({e})"
    return {"video": video.video_id, **values, "cells": cells, "notes": notes}


def reference_truth_row(real: metrics.MouthTrack, video: EvalVideo, spec: ClipSpec, max_lag: int) -> dict[str, Any]:
    """The real crops' own track: mouth r against itself would be 1 and LMD 0, so the row gives its
    shifted control (what an unrelated stretch of the same speaker's mouth scores) and its audio r
    (how much of this speaker's mouth loudness explains) instead."""
    values, notes, cells = _reference_values(real)
    if "mouth_r" not in cells:
        try:
            values["mouth_control"] = metrics.landmark_sync(real.aperture, real.aperture, max_lag).control
        except ValueError as e:
            notes["mouth_control"] = f"not computed ({e})"
        _audio_figures(values, notes, real, video, spec, max_lag)
    cells |= {"mouth_r": "– (itself)", "mouth_lag": "–", "lmd": "– (itself)"}
    return {"video": video.video_id, "model": "ground truth", **values, "cells": cells, "notes": notes}


def _mean_row(rows: list[dict[str, Any]], model: str) -> dict[str, Any]:
    """The mean of each figure over the videos that have it (the median lag); a note says "over n of
    N videos" when some lack it, and a figure no video has keeps the videos' inline reason."""
    row: dict[str, Any] = {"video": f"mean ({len(rows)} videos)", "model": model,
                           "frames": float(np.mean([r["frames"] for r in rows])), "identity": None,
                           "cells": {}, "notes": {}}
    for key in REFERENCE_METRICS + ("mouth_lag",):
        have = [r[key] for r in rows if r.get(key) is not None]
        row[key] = None if not have else float(np.median(have) if key == "mouth_lag" else np.mean(have))
        if have and len(have) < len(rows):
            row["notes"][key] = f"mean over {len(have)} of {len(rows)} videos"
    for key, _, _ in REFERENCE_COLUMNS:
        if row.get(key) is None and key in rows[0]["cells"]:
            row["cells"][key] = rows[0]["cells"][key]
    return row


def score_references(pipe: LetsTalkPipeline, ref: ReferenceSet, cfg: EvalConfig, label: str) -> list[dict[str, Any]]:
    """Render every reference video with the model and score it against the real one: one row per
    video, then their means."""
    spec = {"fps": ref.spec.fps, "sample_rate": ref.spec.sample_rate, "size": ref.spec.image_size}
    gen = render_videos(pipe, ref.videos, cfg, spec, desc=f"render {label} (real footage)")
    rows = []
    for frames, real, video in zip(gen, ref.mouths, ref.videos):
        track = metrics.mouth_track(frames, cfg.face_model, ref.spec.fps)
        rows.append({"model": label} | score_reference_video(track, real, video, ref.spec, cfg.max_lag))
    return rows + [_mean_row(rows, label)]


def reference_table(rows: list[dict[str, Any]], protocol: dict[str, Any]) -> str:
    """Real-footage rows (per video: the models, then the ground truth; then the means) -> markdown."""
    head = ["video", "model"] + [title for _, title, _ in REFERENCE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: list[str] = []
    order = {v: i for i, v in enumerate(dict.fromkeys(r["video"] for r in rows))}
    for row in sorted(rows, key=lambda r: (r["video"].startswith("mean"), order[r["video"]])):
        cells = [row["video"], row["model"]] + [_cell(row, key, digits) for key, _, digits in REFERENCE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"- {row['video']}, {row['model']}: {key} {note}" for key, note in row["notes"].items()]
    if any(r["frames"] < metrics.MIN_SYNC_FRAMES for r in rows):
        notes.append(f"- {', '.join(SYNC_COLUMNS)}: {_short_sync_note(f'fewer than {metrics.MIN_SYNC_FRAMES} frames')}")
    notes.append(f"- identity: not computed ({metrics.IDENTITY_NOT_MEASURED})")
    p = protocol
    intro = (f"Real footage: the first {p['max_seconds']:g} s (first shot) of {p['videos']} videos from "
             f"{p['source']}, face crops at {p['size']} px and {p['fps']} fps, the first crop as the portrait and "
             f"the video's own audio; {sampling_text(p)}, guidance {p['guidance']:g}, seed {p['seed']}. "
             f"Mouths: MediaPipe FaceLandmarker on generated and real crops alike (upscaled to "
             f"{p['mouth_min_side']} px), aperture = inner-lip gap / face height. mouth r: Pearson r of the generated "
             f"aperture with the real video's at the best lag 0..{p['max_lag']} (the generated mouth may trail); "
             "mouth control: the same against the real track shifted by half its length (a model that ignores the "
             "audio scores about this). LMD: mean lip-landmark distance to the real frame, % of face height. "
             "audio r: the aperture vs the audio loudness envelope, best lag (secondary: loudness explains little "
             "of a real mouth, r ≈ 0.2-0.3), audio control: vs the envelope shifted by half. face found: share of "
             "frames with a face. Ground-truth rows: the real crops' own track; its mouth r (1) and LMD (0) against "
             "itself are not printed; mouth control and audio r there are the real mouth's own floor and audio "
             f"ceiling. Sync columns need {metrics.MIN_SYNC_FRAMES} frames.")
    return "\n".join([intro, "", *lines, "", "Notes (– = not computed):", *notes]) + "\n"


def reference_protocol(cfg: EvalConfig, sets: list[ReferenceSet]) -> dict[str, Any]:
    first = sets[0]
    return {"videos": len(first.videos), "source": cfg.reference_videos, "max_seconds": cfg.max_seconds,
            "fps": first.spec.fps, "size": ", ".join(str(r.spec.image_size) for r in sets),
            "face_model": str(Path(cfg.face_model).resolve()), "mouth_min_side": 256,
            "min_sync_frames": metrics.MIN_SYNC_FRAMES, "sampler": cfg.sampler, "steps": cfg.steps,
            "guidance": cfg.guidance, "seed": cfg.seed, "max_lag": cfg.max_lag,
            "skipped": sorted({s for r in sets for s in r.skipped})}


# ------------------------------------------------------------------------------------------ job


def _mlflow_key(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)


def evaluate_models(cfg: EvalConfig, cache: str | os.PathLike | None = None) -> EvalReport:
    """Render and score every model in `cfg.models` on the shard folder's `cfg.split` videos
    and/or the reference videos; log to MLflow (one run per model); write cfg.out.

    Returns the rows (shards: one per model + the ground-truth reference; real footage: per video
    and model + ground truth, then means), the markdown tables, the protocols, the MLflow run ids
    and the files written.
    """
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.mlflow_uri.startswith("sqlite:///") and not cfg.mlflow_uri.startswith("sqlite:////"):
        cfg = cfg.model_copy(update={"mlflow_uri": "sqlite:///" + str(Path(cfg.mlflow_uri[10:]).resolve())})
    if cfg.mlflow_uri.startswith("sqlite:///"):  # sqlite creates the file, not its folder
        Path(cfg.mlflow_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    bundles = [tracking.resolve_bundle(m, cfg.mlflow_uri, cache) for m in cfg.models]  # fail fast on a bad name
    videos, spec, protocol = None, {}, {}
    if cfg.data:
        extractors = Extractors.load(cfg, device)
        videos, spec, skipped = load_eval_videos(cfg)
        protocol = {"videos": len(videos), "split": cfg.split, "frames": cfg.frames, "size": spec["size"],
                    "fps": spec["fps"], "sampler": cfg.sampler, "steps": cfg.steps, "guidance": cfg.guidance,
                    "seed": cfg.seed, "max_lag": cfg.max_lag, "skipped": skipped,
                    "data": str(Path(cfg.data).resolve())}
    reference_sets: dict[ClipSpec, ReferenceSet] = {}  # one per model resolution
    rows, ref_rows, per_model = [], [], []
    for model, bundle in zip(cfg.models, bundles):
        pipe = LetsTalkPipeline.from_pretrained(bundle, device=device)
        label = model_label(model)
        tcfg = pipe.transformer.cfg
        sampler, steps = pipe.sampling(cfg.sampler, cfg.steps)
        if cfg.steps is None:  # each model's own step count (a student's 2, a teacher's 25): each row says which
            label = f"{label} ({sampler} {steps})"
        info = {"model": label, "source": model, "portrait_fusion": tcfg.portrait_fusion,
                "audio_fusion": tcfg.audio_fusion, "sampler": sampler, "steps": steps}
        row = None
        if videos is not None:
            gen = render_videos(pipe, videos, cfg, spec, desc=f"render {label}")
            values, notes = score_model(gen, videos, extractors, spec, cfg.max_lag)
            values["seam"] = _try(notes, "seam", lambda: metrics.seam_ratio(gen, tcfg.num_frames))
            row = {**info, **values, "notes": notes}
            rows.append(row)
        model_ref_rows = []
        if cfg.reference_videos:
            rspec = reference_spec(pipe, cfg.max_seconds)
            if rspec not in reference_sets:
                reference_sets[rspec] = load_reference_videos(cfg, rspec)
            model_ref_rows = score_references(pipe, reference_sets[rspec], cfg, label)
            ref_rows += model_ref_rows
        per_model.append((info, row, model_ref_rows))
    if videos is not None:
        rows.append(reference_row(videos, spec, cfg.max_lag))
    ref_protocol: dict[str, Any] = {}
    if reference_sets:
        sets = list(reference_sets.values())
        ref_protocol = reference_protocol(cfg, sets)
        for ref in sets:
            truth = [reference_truth_row(m, v, ref.spec, cfg.max_lag) for m, v in zip(ref.mouths, ref.videos)]
            if len(sets) > 1:
                for r in truth:
                    r["model"] = f"ground truth ({ref.spec.image_size} px)"
            ref_rows += truth + [_mean_row(truth, truth[0]["model"])]
    tables = ([markdown_table(rows, protocol)] if rows else []) + \
        ([reference_table(ref_rows, ref_protocol)] if ref_rows else [])
    table = "\n".join(tables)
    data: dict[str, Any] = {"protocol": protocol, "rows": rows}
    if ref_rows:
        data["reference"] = {"protocol": ref_protocol, "rows": ref_rows}
    payload = json.dumps(data, indent=1)
    report = EvalReport(rows, table, protocol, reference_rows=ref_rows, reference_protocol=ref_protocol,
                        mlflow_uri=cfg.mlflow_uri)
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (("table.md", table), ("table.json", payload)):
            (out / name).write_text(text)
            report.files.append(str(out / name))
    logged = {c for c, _, _ in COLUMNS} | {"sync_lag"}
    for info, row, model_ref_rows in per_model:
        params = {k: info[k] for k in ("portrait_fusion", "audio_fusion")} | {"model": info["source"]}
        params |= {k: v for k, v in protocol.items() if k != "skipped"}
        params |= {k: info[k] for k in ("sampler", "steps")}  # what this model rendered with
        params |= {f"reference_{k}": v for k, v in ref_protocol.items() if k not in ("skipped", "sampler", "steps",
                                                                                      "guidance", "seed", "max_lag")}
        if not protocol:
            params |= {k: ref_protocol[k] for k in ("sampler", "steps", "guidance", "seed", "max_lag")}
        run_id = tracking.start_run(cfg.mlflow_uri, cfg.experiment, f"eval-{info['model']}", params)
        log = tracking.RankZeroLogger(cfg.mlflow_uri, run_id, 0)
        values = {k: v for k, v in (row or {}).items() if k in logged and v is not None}
        for r in model_ref_rows:  # real footage: the means, and each video's figures
            prefix = "real_" if r["video"].startswith("mean") else f"real/{_mlflow_key(r['video'])}/"
            values |= {f"{prefix}{k}": r[k] for k in REFERENCE_METRICS + ("mouth_lag",) if r.get(k) is not None}
        log.metrics(values, 0)
        log.text(table, "eval/table.md")
        log.text(payload, "eval/table.json")
        report.run_ids.append(run_id)
    return report
