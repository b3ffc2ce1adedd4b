"""Evaluation: models × the eval split -> the paper's metrics table (Tables 1-4), on stdout, on disk and in MLflow.

Protocol (the paper's): the first clip (`frames`, default 16 frames) of every eval video; the
video's first frame is the reference portrait and its audio drives the model; generated and
ground-truth frames are resized to one resolution (`size`, default the shards' crop size) before
any metric. Ground truth is decoded from the source videos the manifest lists, with the same
decode + face crop as preprocessing (`letstalk.clips.decode_video`), i.e. real pixels, not
VAE reconstructions.

Metrics (letstalk.metrics): FID (Inception pool features over all frames), FVD (I3D over
16-frame clips), SSIM and PSNR (whole frame and the face region), E-FID (Fréchet distance over
Deep3DFaceRecon expression coefficients, or a labelled mouth-opening proxy on procedural data),
lip sync vs a mismatched-audio control and blinks per minute (procedural data). A metric that
cannot be computed (no weights file, too few clips, not procedural data) is reported as
"not computed (reason)", never as NaN.

Several models give one row each, labelled with their fusion config: the layout of the
paper's ablation Tables 3-4.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from letstalk import metrics
from letstalk.artifacts import ShardManifest
from letstalk.diffusion import Sampler
from letstalk.clips import decode_video
from letstalk.pipeline import LetsTalkPipeline

from .preprocess import manifest_faces
from . import tracking


def default_mlflow_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


class EvalConfig(BaseModel):
    """Settings of jobs/evaluate.py (YAML keys; flags override them)."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1, description="bundle dirs or models:/<name>@<alias>, one row each")
    data: str = Field(description="shard folder written by jobs/preprocess.py (its manifest lists the videos)")
    out: str | None = Field(None, description="folder for table.md + table.json")
    mlflow_uri: str = Field(default_factory=default_mlflow_uri)
    experiment: str = "letstalk-eval"
    steps: int = Field(25, ge=1, le=1000)
    sampler: Sampler = "ddim"
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


@dataclass
class EvalVideo:
    video_id: str
    path: str
    frames: np.ndarray  # (F, S, S, 3) uint8 ground truth at the evaluation size
    audio: np.ndarray  # (samples,) float32, the clip's audio
    face: metrics.ProceduralFace | None  # procedural data: where mouth and eyes are


@dataclass
class EvalReport:
    rows: list[dict[str, Any]]  # one per model, then the ground-truth reference row
    markdown: str
    protocol: dict[str, Any]
    run_ids: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ data


def load_eval_videos(cfg: EvalConfig) -> tuple[list[EvalVideo], dict[str, Any], list[str]]:
    """The eval split's ground truth: (videos, clip spec, skipped reasons)."""
    root = Path(cfg.data)
    manifest = ShardManifest.load(root)
    entries = manifest.done("eval")
    if not entries:
        raise ValueError(f"{root}: the eval split is empty (see manifest.json counts)")
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
        raise ValueError(f"{root}: no eval video has {cfg.frames} usable frames ({'; '.join(skipped)[:300]})")
    return videos, {"fps": spec.fps, "sample_rate": spec.sample_rate, "size": size}, skipped


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
                                seed=cfg.seed)
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


def motion_metrics(frames: list[np.ndarray], videos: list[EvalVideo], spec: dict[str, Any], max_lag: int,
                   notes: dict[str, str]) -> dict[str, float | None]:
    """Weights-free lip sync and blinks (procedural videos only)."""
    row: dict[str, float | None] = {"sync": None, "sync_control": None, "sync_lag": None, "blinks_per_min": None}
    faces = [v.face for v in videos]
    if any(f is None for f in faces):
        reason = "not computed (needs procedural videos with a sidecar JSON)"
        notes.update({k: reason for k in ("sync", "blinks_per_min")})
        return row
    mouths = [metrics.mouth_opening(f, v.face) for f, v in zip(frames, videos)]
    envs = [metrics.sync_envelope(v.audio, len(f), spec["sample_rate"], spec["fps"]) for f, v in zip(frames, videos)]
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
    row |= motion_metrics(gen, videos, spec, max_lag, notes)
    return row, notes


# ------------------------------------------------------------------------------------------ table

COLUMNS = [("fid", "FID ↓", 2), ("fvd", "FVD ↓", 2), ("ssim", "SSIM ↑", 4), ("psnr", "PSNR ↑", 2),
           ("efid", "E-FID ↓", 4), ("face_ssim", "face SSIM ↑", 4), ("face_psnr", "face PSNR ↑", 2),
           ("sync", "sync ↑", 3), ("sync_control", "sync control", 3), ("seam", "seam ↓", 2),
           ("blinks_per_min", "blinks/min", 1)]


def markdown_table(rows: list[dict[str, Any]], protocol: dict[str, Any]) -> str:
    """Rows -> a markdown table in the paper's layout, with the reasons for every missing value."""
    head = ["model", "portrait fusion", "audio fusion"] + [title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: list[str] = []
    for row in rows:
        cells = [row["model"], row.get("portrait_fusion") or "–", row.get("audio_fusion") or "–"]
        for key, _, digits in COLUMNS:
            value = row.get(key)
            cells.append("–" if value is None else f"{value:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
        for key, note in row.get("notes", {}).items():
            line = f"- {key}: {note}"
            if line not in notes:
                notes.append(line)
    p = protocol
    intro = (f"Protocol: first {p['frames']} frames of {p['videos']} eval videos, {p['size']}×{p['size']} px, "
             f"{p['sampler']} {p['steps']} steps, guidance {p['guidance']:g}, seed {p['seed']}. "
             f"Sync: mean Pearson r of pixel mouth opening vs audio loudness (best lag 0..{p['max_lag']}); "
             "control: the same with another video's audio. Seam: mean frame change across clip boundaries / "
             "median change within clips (1 = seamless).")
    return "\n".join([intro, "", *lines, "", "Notes (– = not computed):", *notes]) + "\n"


def reference_row(videos: list[EvalVideo], spec: dict[str, Any], max_lag: int) -> dict[str, Any]:
    """The ground-truth videos scored by the weights-free measures: what a perfect model would get."""
    notes: dict[str, str] = {}
    row = {"model": "ground truth", "portrait_fusion": None, "audio_fusion": None}
    row |= {k: None for k, _, _ in COLUMNS}
    row |= motion_metrics([v.frames for v in videos], videos, spec, max_lag, notes)
    row["notes"] = notes
    return row


def evaluate_models(cfg: EvalConfig, cache: str | os.PathLike | None = None) -> EvalReport:
    """Render and score every model in `cfg.models` on the eval split; log to MLflow; write cfg.out.

    Returns the rows (one per model + the ground-truth reference), the markdown table, the protocol,
    the MLflow run ids and the files written.
    """
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.mlflow_uri.startswith("sqlite:///") and not cfg.mlflow_uri.startswith("sqlite:////"):
        cfg = cfg.model_copy(update={"mlflow_uri": "sqlite:///" + str(Path(cfg.mlflow_uri[10:]).resolve())})
    bundles = [tracking.resolve_bundle(m, cfg.mlflow_uri, cache) for m in cfg.models]  # fail fast on a bad name
    extractors = Extractors.load(cfg, device)
    videos, spec, skipped = load_eval_videos(cfg)
    protocol = {"videos": len(videos), "frames": cfg.frames, "size": spec["size"], "fps": spec["fps"],
                "sampler": cfg.sampler, "steps": cfg.steps, "guidance": cfg.guidance, "seed": cfg.seed,
                "max_lag": cfg.max_lag, "skipped": skipped, "data": str(Path(cfg.data).resolve())}
    rows = []
    for model, bundle in zip(cfg.models, bundles):
        pipe = LetsTalkPipeline.from_pretrained(bundle, device=device)
        label = model_label(model)
        gen = render_videos(pipe, videos, cfg, spec, desc=f"render {label}")
        values, notes = score_model(gen, videos, extractors, spec, cfg.max_lag)
        tcfg = pipe.transformer.cfg
        values["seam"] = _try(notes, "seam", lambda: metrics.seam_ratio(gen, tcfg.num_frames))
        rows.append({"model": label, "source": model, "portrait_fusion": tcfg.portrait_fusion,
                     "audio_fusion": tcfg.audio_fusion, **values, "notes": notes})
    rows.append(reference_row(videos, spec, cfg.max_lag))
    table = markdown_table(rows, protocol)
    payload = json.dumps({"protocol": protocol, "rows": rows}, indent=1)
    report = EvalReport(rows, table, protocol)
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (("table.md", table), ("table.json", payload)):
            (out / name).write_text(text)
            report.files.append(str(out / name))
    for row in rows[:-1]:
        params = {"model": row["source"], "portrait_fusion": row["portrait_fusion"],
                  "audio_fusion": row["audio_fusion"]} | {k: v for k, v in protocol.items() if k != "skipped"}
        run_id = tracking.start_run(cfg.mlflow_uri, cfg.experiment, f"eval-{row['model']}", params)
        log = tracking.RankZeroLogger(cfg.mlflow_uri, run_id, 0)
        logged = {c for c, _, _ in COLUMNS} | {"sync_lag"}
        log.metrics({k: v for k, v in row.items() if k in logged and v is not None}, 0)
        log.text(table, "eval/table.md")
        log.text(payload, "eval/table.json")
        report.run_ids.append(run_id)
    return report
