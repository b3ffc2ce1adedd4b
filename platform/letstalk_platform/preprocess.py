"""Ray Data preprocessing: talking videos -> face-cropped 16-frame clips -> latents + audio features -> parquet shards.

    inputs (folder | glob | list file) -> [plan on the driver: ids, identities, split, what is done]
      -> ds.map(DecodeVideo)                       CPU tasks: probe, decode 25 fps / 16 kHz, one face crop per video
      -> ds.map_batches(Tokenizer, ActorPool)      VAE latents + wav2vec2 states, clip rows, one shard per video
      -> manifest.json                             letstalk.artifacts.ShardManifest: clip spec, feature
                                                   shapes, codecs + fingerprints, every input's status

Shards live at OUTPUT/{train,eval}/{video_id}.parquet, one per video, written to a temporary
name and renamed when complete, so a crash never leaves a half-written shard visible and a
re-run does only what is new or failed. The layout of a clip row is in letstalk.clips.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from pydantic import BaseModel, ConfigDict, Field

from letstalk.artifacts import (TENSOR_COLUMNS, ArtifactError, FeatureShapes, InputRecord, ShardManifest, dir_fingerprint,
                                write_json_atomic)
from letstalk.audio import AudioEncoder
from letstalk.clips import ClipSpec, build_clip_rows, decode_video, load_mouth_track
from letstalk.faces import FaceSettings
from letstalk.quality import QualityFilters
from letstalk.vae import LatentCodec, codec_downsample

from .tracking import MODEL_URI, resolve_bundle

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")


_FACES = FaceSettings()  # the library's defaults: the only ones
FORBID = ConfigDict(extra="forbid")


class FacesSection(BaseModel):
    """How faces are found and cropped (letstalk.faces.FaceSettings; its defaults are the defaults)."""

    model_config = FORBID

    detector: Literal["retinaface", "mediapipe", "haar"] = Field(
        _FACES.detector, description="retinaface: RetinaFace finds faces, the FaceLandmarker runs on each one's crop; "
                                     "mediapipe: the FaceLandmarker alone (misses small or off-centre faces); "
                                     "haar: OpenCV's built-in cascade, boxes only")
    model: str | None = Field(None, description="MediaPipe face_landmarker .task file (default: the one shipped "
                                                "with letstalk)")
    margin: float = Field(_FACES.margin, gt=0, description="crop side = margin x the shot's median face size")
    crop: Literal["track", "fixed"] = Field(_FACES.crop, description="track: the crop follows the smoothed face; "
                                                                    "fixed: one box per shot")
    smooth_seconds: float = Field(_FACES.smooth_seconds, ge=0, description="crop centre moving-average window")
    analysis_side: int = Field(_FACES.analysis_side, ge=64, description="detection runs on frames this large at most")
    cut_threshold: float = Field(_FACES.cut_threshold, gt=0, le=1,
                                 description="histogram distance between frames that marks a shot cut")
    max_faces: int = Field(_FACES.max_faces, ge=1)

    def settings(self) -> FaceSettings:
        return FaceSettings(**self.model_dump())


# the per-video measures printed by the job and written into every clip row as q_<name>
QUALITY_COLUMNS = ("face_fraction", "crop_jitter", "speech_fraction", "mouth_audio_r", "blur", "brightness",
                   "face_px", "shots")


def manifest_faces(manifest: ShardManifest) -> FaceSettings:
    """The face settings the shards were cut with (readers decode the same crops)."""
    return FacesSection(**manifest.config["faces"]).settings()


class FiltersSection(BaseModel):
    """letstalk.quality.QualityFilters: thresholds on the per-video measures; unset = only recorded."""

    model_config = FORBID

    min_face_fraction: float | None = Field(None, ge=0, le=1)
    max_crop_jitter: float | None = Field(None, ge=0, description="% of the crop side per frame")
    min_speech_fraction: float | None = Field(None, ge=0, le=1)
    min_mouth_audio_r: float | None = Field(None, ge=-1, le=1)
    min_blur: float | None = Field(None, ge=0, description="variance of the Laplacian of the grey crop")
    min_brightness: float | None = Field(None, ge=0, le=255)
    max_brightness: float | None = Field(None, ge=0, le=255)
    min_face_px: float | None = Field(None, ge=0, description="face side in source pixels")
    min_source_fps: float | None = Field(None, gt=0)
    min_decoded_fraction: float | None = Field(None, ge=0, le=1, description="frames decoded / promised (truncation)")

    def filters(self) -> QualityFilters:
        return QualityFilters(**self.model_dump())


class PreprocessConfig(BaseModel):
    """Settings of jobs/preprocess.py (YAML keys; flags override them). None = taken from the bundle."""

    model_config = FORBID

    input: str = Field(description="folder of videos, a glob, or a .txt list of paths")
    output: str
    model: str = Field(description="bundle dir or models:/<name>@<alias>: its vae/ and audio_encoder/ tokenize, its "
                                   "transformer sets sizes")
    mlflow_uri: str | None = Field(None, description="registry for models:/ URIs (None: $MLFLOW_TRACKING_URI)")
    fps: int = 25
    sample_rate: int = 16000
    image_size: int | None = None
    clip_frames: int | None = None
    stride: int | None = None
    motion_frames: int | None = Field(None, ge=1, description="motion frames stored per clip (default: the model's, "
                                      "at least 1: Ray Data cannot hold an empty tensor column)")
    ref_frames: int = 4
    max_seconds: float = 600.0
    first_seconds: float | None = Field(None, gt=0, description="use only the first N seconds of each video "
                                                                 "(smoke runs, previews)")
    eval_fraction: float = Field(0.1, ge=0.0, le=1.0)
    split_salt: str = "letstalk"
    decoders: int = Field(2, ge=1, description="concurrent decode tasks")
    tokenizers: int = Field(1, ge=1, description="tokenizer actors (one GPU each when use_gpu)")
    use_gpu: bool = False
    limit: int | None = Field(None, ge=1, description="process at most this many pending videos (smoke runs)")
    faces: FacesSection = Field(default_factory=FacesSection)
    vad: bool = Field(True, description="measure the speech fraction with Silero VAD")
    vad_model: str | None = Field(None, description="Silero VAD TorchScript file (default: the silero-vad wheel's)")
    filters: FiltersSection = Field(default_factory=FiltersSection)


def clip_spec(cfg: PreprocessConfig) -> ClipSpec:
    """Fill the sizes the config leaves open from the bundle's transformer and codec configs."""
    bundle = Path(cfg.model)
    tcfg = json.loads((bundle / "transformer" / "config.json").read_text())
    down = codec_downsample(bundle / "vae")  # AutoencoderKL or space-to-depth codec
    clip_frames = cfg.clip_frames or tcfg["num_frames"]
    return ClipSpec(
        fps=cfg.fps, sample_rate=cfg.sample_rate, image_size=cfg.image_size or tcfg["input_size"] * down,
        clip_frames=clip_frames, stride=cfg.stride or clip_frames,
        # a model that reads no motion frames (re-voicing) still gets one stored: the column cannot be empty
        motion_frames=max(1, tcfg["num_motion_frames"]) if cfg.motion_frames is None else cfg.motion_frames,
        ref_frames=cfg.ref_frames, audio_window=tcfg["audio_window"], max_seconds=cfg.max_seconds,
        first_seconds=cfg.first_seconds,
    )


# ------------------------------------------------------------------------------------------
# Planning (driver)
# ------------------------------------------------------------------------------------------

def list_inputs(spec: str) -> list[Path]:
    """A folder (recursive), a glob, or a text file with one path per line (relative to the file)."""
    path = Path(spec)
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES]
    elif path.is_file() and path.suffix.lower() in (".txt", ".lst"):
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        found = [(path.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines]
    else:
        found = [Path(p) for p in glob.glob(spec, recursive=True)]
    if not found:
        raise ValueError(f"no input videos found at {spec!r}")
    return sorted({p.resolve() for p in found})


def video_id(path: Path) -> str:
    """A file-name-safe id: the stem plus a hash of the full path (two folders may share names)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)[:60] or "video"
    return f"{stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def identity_of(path: Path) -> str:
    """The speaker: a sidecar JSON's "identity" (procedural data), else the file stem."""
    sidecar = path.with_suffix(".json")
    if sidecar.is_file():
        try:
            ident = json.loads(sidecar.read_text()).get("identity")
            if ident:
                return str(ident)
        except (OSError, ValueError):
            pass
    return path.stem


def split_of(identity: str, eval_fraction: float, salt: str) -> str:
    """Deterministic identity-level split, stable when videos are added: a hash, not a shuffle."""
    h = int(hashlib.sha1(f"{salt}:{identity}".encode()).hexdigest()[:12], 16) / 16**12
    return "eval" if h < eval_fraction else "train"


def fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


# ------------------------------------------------------------------------------------------
# Ray Data stages
# ------------------------------------------------------------------------------------------

class DecodeVideo:
    """Row {path, video_id, ...} -> the same row plus the face crops (N, S, S, 3) uint8, the audio,
    the shots to cut clips from, the quality measures and the crop track; or a reason."""

    def __init__(self, spec: ClipSpec, faces: FaceSettings, filters: QualityFilters, vad: bool | str):
        self.spec, self.faces, self.filters, self.vad = spec, faces, filters, vad

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        s = self.spec.image_size
        empty = {"face_found": False, "frames": np.zeros((0, s, s, 3), np.uint8), "audio": np.zeros(0, np.float32),
                 "segments": np.zeros((0, 2), np.int64), "quality": "", "track": ""}
        try:
            video = decode_video(row["path"], self.spec, self.faces, vad=self.vad)
        except (ValueError, OSError) as e:
            return {**row, **empty, "status": "failed", "reason": _one_line(e)}
        quality = video.quality.to_dict()
        track = json.dumps({"size": video.track.size, "fps": self.spec.fps, "detector": video.track.detector,
                            "shots": video.track.shots, "segments": video.segments,
                            "boxes": video.track.boxes.tolist(), "found": [f is not None for f in video.track.faces]})
        reason = self.filters.check(video.quality)
        if reason:
            return {**row, **empty, "status": "filtered", "reason": reason, "face_found": video.face_found,
                    "quality": json.dumps(quality), "track": track}
        return {**row, "status": "decoded", "reason": "", "face_found": video.face_found, "frames": video.frames,
                "audio": video.audio, "segments": np.asarray(video.segments, np.int64),
                "quality": json.dumps(quality), "track": track}


class Tokenizer:
    """Loads the codec and the audio encoder once per actor; per video: encode, cut clips, write the shard."""

    def __init__(self, model: str, spec: ClipSpec, output: str, mlflow_uri: str | None = None):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = local_bundle(model, mlflow_uri)  # a registry model: downloaded once to this node's cache
        self.codec = LatentCodec.from_pretrained(Path(model) / "vae", device=self.device)
        self.audio = AudioEncoder.from_pretrained(Path(model) / "audio_encoder", window=spec.audio_window,
                                                  device=self.device)
        self.spec, self.output = spec, Path(output)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = ("video_id", "status", "reason", "clips", "shard", "face_found", "features", "quality", "track")
        out: dict[str, list] = {k: [] for k in keys}
        for i in range(len(batch["video_id"])):
            status, reason, clips, shard, features = str(batch["status"][i]), str(batch["reason"][i]), 0, "", ""
            track = ""
            if batch["track"][i]:
                track = write_track(self.output, str(batch["video_id"][i]), str(batch["track"][i]))
            if status == "decoded":
                try:
                    clips, shard, features = self._tokenize(batch, i)
                    status = "done"
                except (ValueError, RuntimeError, OSError) as e:
                    status, reason = "failed", _one_line(e)
            for key, value in zip(keys, (batch["video_id"][i], status, reason, clips, shard,
                                         bool(batch["face_found"][i]), features, str(batch["quality"][i]), track)):
                out[key].append(value)
        return {k: np.asarray(v) for k, v in out.items()}

    def _tokenize(self, batch, i) -> tuple[int, str, str]:
        vid, split = str(batch["video_id"][i]), str(batch["split"][i])
        frames, audio = batch["frames"][i], batch["audio"][i]
        latents = self.codec.encode(frames)  # (N, C, h, w)
        states = self.audio.hidden_states(audio, len(frames))  # (N, layers, D)
        segments = [(int(a), int(b)) for a, b in np.asarray(batch["segments"][i]).reshape(-1, 2)]
        track = json.loads(str(batch["track"][i]))
        quality = {k: v for k, v in json.loads(str(batch["quality"][i])).items() if k in QUALITY_COLUMNS}
        rows = build_clip_rows(vid, str(batch["identity"][i]), latents, states, self.spec,
                               load_mouth_track(str(batch["path"][i])), segments=segments,
                               found=np.asarray(track["found"], bool), quality=quality)
        if not rows:
            raise ValueError(f"{vid}: no complete clip")
        shard = self.output / split / f"{vid}.parquet"
        write_shard(rows, shard)
        # the shapes as written (JSON: Ray Data carries it as a string)
        features = FeatureShapes(latent_channels=int(latents.shape[1]), latent_size=int(latents.shape[-1]),
                                 audio_layers=int(states.shape[1]), audio_feature_dim=int(states.shape[2]))
        return len(rows), str(shard.relative_to(self.output)), json.dumps(features.__dict__)


def write_track(output: Path, vid: str, track_json: str) -> str:
    """OUTPUT/tracks/{video_id}.json: shots and the crop box of every frame; returns its relative path."""
    path = output / "tracks" / f"{vid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, json.loads(track_json))
    return str(path.relative_to(output))


def write_shard(rows: list[dict], path: Path) -> None:
    """Clip rows -> one parquet file; tensors as fixed-shape tensor columns. Atomic (temp + rename)."""
    columns: dict[str, pa.Array] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key in TENSOR_COLUMNS:
            columns[key] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(np.stack(values)))
        else:
            columns[key] = pa.array(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        # one clip per row group: training reads clips by index in a shuffled order (letstalk_platform.data)
        pq.write_table(pa.table(columns), tmp, row_group_size=1)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:500] or type(e).__name__


# ------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------

def local_bundle(model: str, mlflow_uri: str | None = None) -> Path:
    """`model` as a folder on this node: a registry model is downloaded to the node's cache."""
    return resolve_bundle(model, mlflow_uri) if MODEL_URI.match(model) else Path(model)


def run_preprocess(cfg: PreprocessConfig) -> ShardManifest:
    """Plan, run the Ray Data pipeline over what is not done yet, write the manifest. Returns it."""
    # absolute paths: actors need not share the driver's working directory, and the manifest is read later
    paths = ("input", "output") if MODEL_URI.match(cfg.model) else ("input", "output", "model")
    cfg = cfg.model_copy(update={k: str(Path(getattr(cfg, k)).resolve()) for k in paths}
                         | {"mlflow_uri": cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")})
    if cfg.faces.model:  # checked here, on the driver (a cluster YAML names paths of the cluster's nodes)
        if not Path(cfg.faces.model).is_file():
            raise ValueError(f"faces.model {cfg.faces.model}: file not found (a MediaPipe face_landmarker .task file)")
        cfg = cfg.model_copy(update={"faces": cfg.faces.model_copy(update={"model": str(Path(cfg.faces.model).resolve())})})
    bundle = local_bundle(cfg.model, cfg.mlflow_uri)
    spec = clip_spec(cfg.model_copy(update={"model": str(bundle)}))
    output = Path(cfg.output)
    output.mkdir(parents=True, exist_ok=True)
    models = {name: dir_fingerprint(bundle / name) for name in ("vae", "audio_encoder")}
    try:  # a manifest of an older version (or none) only lends its finished inputs
        previous_manifest = ShardManifest.load(output)
    except ArtifactError:
        previous_manifest = None
    # shards cut with other codecs, clip sizes or face settings are redone
    same_codecs = previous_manifest is None or (previous_manifest.models == models
                                                and previous_manifest.clip_spec == spec
                                                and previous_manifest.config.get("faces") == cfg.faces.model_dump())
    previous = {e.path: e for e in ShardManifest.previous_inputs(output)} if same_codecs else {}

    entries: list[InputRecord] = []
    pending: list[InputRecord] = []
    for path in list_inputs(cfg.input):
        ident = identity_of(path)
        entry = InputRecord(path=str(path), video_id=video_id(path), identity=ident,
                            split=split_of(ident, cfg.eval_fraction, cfg.split_salt), fingerprint=fingerprint(path))
        old = previous.get(str(path))
        if (old and old.fingerprint == entry.fingerprint and old.split == entry.split
                and (output / old.shard).is_file()):
            entries.append(old)
        else:
            pending.append(entry)
    if cfg.limit is not None:
        pending = pending[: cfg.limit]

    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    if pending:
        ds = ray.data.from_items([{**e.__dict__} for e in pending], override_num_blocks=len(pending))
        # SPREAD: on a cluster the pools' actors go to different nodes (one node is not a bottleneck)
        vad = (cfg.vad_model or True) if cfg.vad else False
        decode_args = {"spec": spec, "faces": cfg.faces.settings(), "filters": cfg.filters.filters(), "vad": vad}
        ds = ds.map(DecodeVideo, fn_constructor_kwargs=decode_args, scheduling_strategy="SPREAD",
                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.decoders))
        ds = ds.map_batches(
            Tokenizer, fn_constructor_kwargs={"model": cfg.model, "spec": spec, "output": str(output),
                                              "mlflow_uri": cfg.mlflow_uri},
            batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.tokenizers),
            num_gpus=1 if cfg.use_gpu else 0, scheduling_strategy="SPREAD")
        for row in ds.iter_rows():
            results[str(row["video_id"])] = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    seconds = time.perf_counter() - t0

    shapes = {r["features"] for r in results.values() if r["status"] == "done"}
    if len(shapes) > 1:
        raise RuntimeError(f"the tokenizer wrote shards of different shapes: {sorted(shapes)}")
    reused = [e for e in entries if e.status == "done"]
    features = (FeatureShapes(**json.loads(shapes.pop())) if shapes
                else shard_features(output / reused[0].shard) if reused else None)
    for entry in pending:
        r = results.get(entry.video_id, {"status": "failed", "reason": "not processed (worker lost)",
                                         "clips": 0, "shard": "", "face_found": False, "quality": "", "track": ""})
        entries.append(InputRecord.from_dict({
            **entry.__dict__, **{k: r[k] for k in ("status", "reason", "clips", "shard", "face_found", "track")},
            "quality": json.loads(r["quality"]) if r["quality"] else {}}))
    entries.sort(key=lambda e: e.path)

    manifest = ShardManifest(clip_spec=spec, features=features, bundle=str(bundle), models=models, inputs=entries,
                             config=cfg.model_dump(),
                             last_run={"processed": len(pending), "seconds": round(seconds, 2)})
    manifest.save(output)
    return manifest


def shard_features(path: Path) -> FeatureShapes:
    """The feature shapes a shard was written with, from its parquet schema alone."""
    schema = pq.read_schema(path)
    _, channels, _, size = schema.field("latents").type.shape  # (F, C, h, w)
    _, layers, dim = schema.field("audio").type.shape  # (F + window - 1, layers, D)
    return FeatureShapes(latent_channels=channels, latent_size=size, audio_layers=layers, audio_feature_dim=dim)




def quality_table(manifest: ShardManifest) -> str:
    """The per-video quality measures as a fixed-width table (status, then each measure; "-": not measured)."""
    head = f"{'video':<40} {'status':<8} " + " ".join(f"{c[:13]:>13}" for c in QUALITY_COLUMNS)
    lines = [head]
    for e in manifest.inputs:
        cells = []
        for c in QUALITY_COLUMNS:
            v = e.quality.get(c)
            cells.append(f"{'-' if v is None else (f'{v:.3f}' if isinstance(v, float) else v):>13}")
        lines.append(f"{Path(e.path).name[:40]:<40} {e.status:<8} " + " ".join(cells))
    return "\n".join(lines)
