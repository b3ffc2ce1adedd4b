"""Talking video -> training clips: the per-video work of preprocessing, as pure functions.

The Ray Data job (letstalk_platform.preprocess) runs these on the cluster; they are testable
without Ray. One clip row (all tensors float16 unless noted):

    video_id  str, identity str, clip int, start int (first frame index in the video)
    latents   (F, C, h, w)                   codec latents of the clip's frames (× 0.18215 for the SD VAE)
    audio     (F + window - 1, layers, D)    wav2vec2 states of the clip's frames plus window//2
                                             frames of context each side (clamped at the video's
                                             ends); letstalk.audio.windows_from_context turns it
                                             into the (F, window, layers, D) model input
    motion    (M, C, h, w)                   latents of the M frames before the clip (frame 0
                                             repeated where the video has none)
    refs      (K, C, h, w)                   reference latents drawn from outside the clip
    mouth     (F,) float32                   ground-truth mouth opening (procedural data), NaN if unknown
    face_fraction float                      real footage: the clip's frames in which the face was found
    q_<name>  float                          real footage: the video's quality measures (letstalk.quality)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .faces import FaceSettings, FaceTrack, crop_frame, scale_track, track_faces
from .media import MediaError, iter_video_frames, load_audio, probe
from .quality import Quality, measure


@dataclass(frozen=True)
class ClipSpec:
    fps: int = 25
    sample_rate: int = 16000
    image_size: int = 256
    clip_frames: int = 16
    stride: int = 16
    motion_frames: int = 2
    ref_frames: int = 4
    audio_window: int = 5
    max_seconds: float = 600.0  # a longer video is refused (a length limit, not a cut)
    first_seconds: float | None = None  # only the first this many seconds of each video are used

    def __post_init__(self) -> None:
        for name in ("fps", "sample_rate", "image_size", "clip_frames", "stride", "audio_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.motion_frames < 0 or self.ref_frames < 1:
            raise ValueError("motion_frames must be >= 0 and ref_frames >= 1")
        if self.audio_window % 2 == 0:
            raise ValueError(f"audio_window must be odd, got {self.audio_window}")
        if self.first_seconds is not None and self.first_seconds <= 0:
            raise ValueError(f"first_seconds must be positive, got {self.first_seconds}")


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (N, S, S, 3) uint8, each frame cut by its crop box and resized
    audio: np.ndarray  # (samples,) float32 mono at spec.sample_rate
    track: FaceTrack  # main face, shots and (N, 4) crop boxes in source pixels
    segments: list[tuple[int, int]]  # [start, end) shots at least one clip long: clips come from these
    quality: Quality

    @property
    def face_found(self) -> bool:
        return any(f is not None for f in self.track.faces)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The first frame's crop box (the whole first shot's with the fixed crop)."""
        return tuple(int(v) for v in self.track.boxes[0])


# a video whose decoded frames fit in this many bytes keeps them from the detection pass; larger
# (or scaled-for-detection) videos are decoded a second time at full resolution to cut the crops
_KEEP_BYTES = 1 << 30


def decode_video(path: str | os.PathLike, spec: ClipSpec, faces: FaceSettings,
                 vad: bool | str = True) -> DecodedVideo:
    """Decode at spec.fps / spec.sample_rate, track the main face, crop every frame, measure quality.

    Detection runs on frames scaled to at most ``faces.analysis_side``; crops are cut from the
    full-resolution frames. Clips never cross a shot cut: ``segments`` lists the shots at least
    one clip long. ``vad``: Silero VAD for the speech measure (True: the silero-vad wheel's model, a
    path, or False: not measured). Raises ValueError (MediaError) with a one-line reason for
    anything unusable.
    """
    info = probe(path)
    if not info.has_video:
        raise MediaError(f"{path}: has no video stream")
    if not info.has_audio:
        raise MediaError(f"{path}: has no audio stream")
    audio = load_audio(path, spec.sample_rate, max_seconds=spec.max_seconds)
    duration = info.duration
    if spec.first_seconds is not None:
        audio = audio[: int(round(spec.first_seconds * spec.sample_rate))]
        duration = min(duration, spec.first_seconds)
    width, height = int(info.width), int(info.height)
    scale = min(1.0, faces.analysis_side / max(width, height))
    size = None if scale == 1.0 else (max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2))
    keep = size is None and duration * spec.fps * width * height * 3 <= _KEEP_BYTES
    kept: list[np.ndarray] = []
    max_frames = int(spec.max_seconds * spec.fps) + 1
    if spec.first_seconds is not None:
        max_frames = min(max_frames, int(round(spec.first_seconds * spec.fps)))

    def analysis_frames():
        for i, frame in enumerate(iter_video_frames(path, fps=spec.fps, size=size)):
            if i >= max_frames:
                break
            if keep:
                kept.append(frame)
            yield frame

    detector = faces.detector_for(spec.fps)
    try:
        track = track_faces(analysis_frames(), detector, faces, spec.fps)
    finally:
        detector.close()
    if not track.faces:
        raise MediaError(f"{path}: no video frames decoded")
    track = scale_track(track, width, height)
    n = min(len(track.faces), round(audio.size / spec.sample_rate * spec.fps))
    if n < spec.clip_frames:
        raise ValueError(f"{path}: {n} frames at {spec.fps} fps is shorter than one clip ({spec.clip_frames} frames)")
    crops = []
    for i, frame in enumerate(kept if keep else iter_video_frames(path, fps=spec.fps)):
        if i >= n:
            break
        crops.append(crop_frame(frame, track.boxes[i], spec.image_size))
    track = track.truncated(len(crops))
    segments = [(s, e) for s, e in track.shots if e - s >= spec.clip_frames]
    if not segments:
        raise ValueError(f"{path}: no shot is as long as one clip ({spec.clip_frames} frames); "
                         f"shot lengths {[e - s for s, e in track.shots]}")
    frames = np.stack(crops)
    audio = audio[: int(round(len(frames) / spec.fps * spec.sample_rate))]
    quality = measure(track, frames, audio, spec.sample_rate, spec.fps, kept_shots=len(segments), vad=vad,
                      source_fps=info.fps, duration=duration)
    return DecodedVideo(frames, audio, track, segments, quality)


def clip_starts(num_frames: int, clip_frames: int, stride: int) -> list[int]:
    return list(range(0, num_frames - clip_frames + 1, stride))


def ref_indices(num_frames: int, start: int, clip_frames: int, k: int) -> np.ndarray:
    """k frame indices spread evenly over the frames outside [start, start + clip_frames).

    A video exactly one clip long has no such frame: its first frame is used.
    """
    outside = np.concatenate([np.arange(0, start), np.arange(start + clip_frames, num_frames)])
    if outside.size == 0:
        return np.zeros(k, dtype=np.int64)
    return outside[np.linspace(0, outside.size - 1, k).round().astype(np.int64)]


def load_mouth_track(video_path: str | os.PathLike) -> np.ndarray | None:
    """Per-frame ground-truth mouth opening from a procedural video's sidecar JSON, if any."""
    sidecar = Path(video_path).with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        track = json.loads(sidecar.read_text()).get("mouth_open")
    except (OSError, ValueError):
        return None
    return None if track is None else np.asarray(track, dtype=np.float32)


def build_clip_rows(video_id: str, identity: str, latents: torch.Tensor, states: torch.Tensor, spec: ClipSpec,
                    mouth: np.ndarray | None = None,
                    segments: list[tuple[int, int]] | None = None, found: np.ndarray | None = None,
                    quality: dict[str, float | None] | None = None) -> list[dict]:
    """Video latents (N, C, h, w) + per-frame audio states (N, layers, D) -> clip rows (module docstring).

    ``segments``: [start, end) shots (default: the whole video). A clip, its audio context, motion
    frames and reference frames all come from the clip's own shot. ``found`` (N,) bool adds the
    clip's own ``face_fraction`` column; ``quality`` adds the video's measures as ``q_<name>``
    float columns (None -> NaN), so clips can be filtered when read.
    """
    n = latents.shape[0]
    if states.shape[0] != n:
        raise ValueError(f"{video_id}: {n} latent frames but {states.shape[0]} audio frames")
    half = spec.audio_window // 2
    lat = latents.to(torch.float16).cpu().numpy()
    aud = states.to(torch.float16).cpu().numpy()
    rows = []
    for s, e in segments or [(0, n)]:
        e = min(e, n)
        for start in clip_starts(e - s, spec.clip_frames, spec.stride):
            end = start + spec.clip_frames
            audio_idx = s + np.clip(np.arange(start - half, end + half), 0, e - s - 1)
            motion_idx = s + np.clip(np.arange(start - spec.motion_frames, start), 0, e - s - 1)
            refs = s + ref_indices(e - s, start, spec.clip_frames, spec.ref_frames)
            track = np.full(spec.clip_frames, np.nan, np.float32)
            if mouth is not None:
                part = mouth[s + start:s + end]
                track[: len(part)] = part
            row = {
                "video_id": video_id, "identity": identity, "clip": len(rows), "start": s + start,
                "latents": lat[s + start:s + end], "audio": aud[audio_idx], "motion": lat[motion_idx],
                "refs": lat[refs], "mouth": track,
            }
            if found is not None:
                row["face_fraction"] = float(np.mean(found[s + start:s + end]))
            for name, value in (quality or {}).items():
                row[f"q_{name}"] = float("nan") if value is None else float(value)
            rows.append(row)
    return rows
