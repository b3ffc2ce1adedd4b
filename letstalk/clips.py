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
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .media import MediaError, iter_video_frames, load_audio, probe
from .portrait import crop_portrait, detect_face

FACE_SEARCH_FRAMES = 25  # look for a face in the first second; one crop box for the whole video


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
    max_seconds: float = 600.0

    def __post_init__(self) -> None:
        for name in ("fps", "sample_rate", "image_size", "clip_frames", "stride", "audio_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.motion_frames < 0 or self.ref_frames < 1:
            raise ValueError("motion_frames must be >= 0 and ref_frames >= 1")
        if self.audio_window % 2 == 0:
            raise ValueError(f"audio_window must be odd, got {self.audio_window}")


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (N, S, S, 3) uint8, face-centred crop
    audio: np.ndarray  # (samples,) float32 mono at spec.sample_rate
    face_found: bool
    box: tuple[int, int, int, int]


def decode_video(path: str | os.PathLike, spec: ClipSpec) -> DecodedVideo:
    """Decode at spec.fps / spec.sample_rate, crop every frame with one face box, align lengths.

    Raises ValueError (MediaError) with a one-line reason for anything unusable.
    """
    info = probe(path)
    if not info.has_video:
        raise MediaError(f"{path}: has no video stream")
    if not info.has_audio:
        raise MediaError(f"{path}: has no audio stream")
    audio = load_audio(path, spec.sample_rate, max_seconds=spec.max_seconds)
    frames: list[np.ndarray] = []
    box = None
    face_found = False
    for frame in iter_video_frames(path, fps=spec.fps):
        frames.append(frame)
        if box is None:
            face = detect_face(frame)
            if face is not None or len(frames) >= FACE_SEARCH_FRAMES:
                crop = crop_portrait(frame, size=spec.image_size)
                box, face_found = crop.box, crop.face_found
    if not frames:
        raise MediaError(f"{path}: no video frames decoded")
    if box is None:  # fewer frames than the search window and no face: centre crop
        crop = crop_portrait(frames[0], size=spec.image_size)
        box, face_found = crop.box, crop.face_found
    n = min(len(frames), round(audio.size / spec.sample_rate * spec.fps))
    if n < spec.clip_frames:
        raise ValueError(f"{path}: {n} frames at {spec.fps} fps is shorter than one clip ({spec.clip_frames} frames)")
    cropped = np.stack([_crop(f, box, spec.image_size) for f in frames[:n]])
    audio = audio[: int(round(n / spec.fps * spec.sample_rate))]
    return DecodedVideo(cropped, audio, face_found, box)


def _crop(frame: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    from PIL import Image

    x0, y0, x1, y1 = box
    return np.asarray(Image.fromarray(frame[y0:y1, x0:x1]).resize((size, size), Image.Resampling.LANCZOS))


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
                    mouth: np.ndarray | None = None) -> list[dict]:
    """Video latents (N, C, h, w) + per-frame audio states (N, layers, D) -> clip rows (module docstring)."""
    n = latents.shape[0]
    if states.shape[0] != n:
        raise ValueError(f"{video_id}: {n} latent frames but {states.shape[0]} audio frames")
    half = spec.audio_window // 2
    lat = latents.to(torch.float16).cpu().numpy()
    aud = states.to(torch.float16).cpu().numpy()
    rows = []
    for k, start in enumerate(clip_starts(n, spec.clip_frames, spec.stride)):
        end = start + spec.clip_frames
        audio_idx = np.clip(np.arange(start - half, end + half), 0, n - 1)
        motion_idx = np.clip(np.arange(start - spec.motion_frames, start), 0, n - 1)
        track = np.full(spec.clip_frames, np.nan, np.float32)
        if mouth is not None:
            part = mouth[start:end]
            track[: len(part)] = part
        rows.append({
            "video_id": video_id, "identity": identity, "clip": k, "start": start,
            "latents": lat[start:end], "audio": aud[audio_idx], "motion": lat[motion_idx],
            "refs": lat[ref_indices(n, start, spec.clip_frames, spec.ref_frames)], "mouth": track,
        })
    return rows
