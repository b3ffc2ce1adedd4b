"""Per-video quality measures of real footage, and the filters preprocessing applies to them.

What is measured (`measure`), per video, on what preprocessing keeps:

    face_fraction    frames in which the main face was found
    crop_jitter      RMS frame-to-frame move of the crop centre, % of the crop side
    speech_fraction  share of the audio Silero VAD calls speech (NaN when VAD is off)
    mouth_audio_r    Pearson r of the landmark mouth aperture with the loudness envelope, best lag
                     0..3 frames (NaN without landmarks, i.e. the haar detector)
    blur             median variance of the Laplacian of the grey face crop (higher = sharper)
    brightness       median mean luma of the face crop, 0..255
    face_px          median face side in source pixels (its resolution before resizing)
    shots            shots found; dropped_shots: shots shorter than one clip (not used)
    other_faces      fraction of frames with more than one face
    source_fps       the file's own frame rate (a 1 fps re-encode repeats frames at 25 fps)
    decoded_fraction frames decoded / frames the container's duration promises (a truncated
                     file decodes only its first part)

`QualityFilters` holds optional thresholds; unset ones only record. `QualityFilters.check` names
the first measure that fails, as a one-line reason.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import cv2
import numpy as np

from .faces import FaceTrack, fill_gaps
from .metrics.motion import _best_lag_r, sync_envelope


@functools.cache
def _vad_model(path: str | None):
    import torch

    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"{path}: Silero VAD model not found")
        return torch.jit.load(path, map_location="cpu").eval()
    try:
        from silero_vad import load_silero_vad
    except ImportError as e:
        raise ValueError(f"speech measures need the silero-vad package ({e}) or a vad model path") from e
    return load_silero_vad()


def speech_fraction(audio: np.ndarray, sample_rate: int = 16000, model: str | os.PathLike | None = None) -> float:
    """Share of the audio in speech segments found by Silero VAD (model: a TorchScript file, or the
    one in the silero-vad wheel). Silero works at 16 kHz: other rates are resampled linearly."""
    import torch

    from silero_vad import get_speech_timestamps

    audio = np.asarray(audio, np.float32)
    if audio.size == 0:
        return 0.0
    if sample_rate != 16000:
        n = round(audio.size * 16000 / sample_rate)
        audio = np.interp(np.linspace(0, audio.size - 1, n), np.arange(audio.size), audio).astype(np.float32)
    vad = _vad_model(None if model is None else str(model))
    with torch.inference_mode():
        segments = get_speech_timestamps(torch.from_numpy(audio), vad, sampling_rate=16000)
    vad.reset_states()
    return float(sum(s["end"] - s["start"] for s in segments) / audio.size)


def mouth_audio_r(aperture: np.ndarray, audio: np.ndarray, sample_rate: int, fps: float,
                  max_lag: int = 3) -> float:
    """Pearson r of the mouth aperture with the loudness envelope at the best lag (NaN if unknown)."""
    aperture = np.asarray(aperture, np.float64)
    if aperture.size < max_lag + 3 or not np.isfinite(aperture).any():
        return math.nan
    best = _best_lag_r(fill_gaps(aperture), sync_envelope(audio, aperture.size, sample_rate, fps), max_lag)
    return math.nan if best is None else best[0]


def blur_and_brightness(crops: np.ndarray, samples: int = 25) -> tuple[float, float]:
    """Median Laplacian variance and median mean luma over up to ``samples`` evenly spaced crops."""
    if len(crops) == 0:
        return math.nan, math.nan
    idx = np.linspace(0, len(crops) - 1, min(samples, len(crops))).round().astype(int)
    sharp, light = [], []
    for i in idx:
        gray = cv2.cvtColor(crops[i], cv2.COLOR_RGB2GRAY)
        sharp.append(cv2.Laplacian(gray, cv2.CV_64F).var())
        light.append(gray.mean())
    return float(np.median(sharp)), float(np.median(light))


@dataclass(frozen=True)
class Quality:
    face_fraction: float
    crop_jitter: float
    speech_fraction: float
    mouth_audio_r: float
    blur: float
    brightness: float
    face_px: float
    shots: int
    dropped_shots: int
    other_faces: float
    source_fps: float
    decoded_fraction: float
    detector: str

    def to_dict(self) -> dict:
        """JSON-safe: NaN becomes None, floats are rounded."""
        out = {}
        for k, v in asdict(self).items():
            if isinstance(v, float):
                v = None if not math.isfinite(v) else round(v, 4)
            out[k] = v
        return out


def measure(track: FaceTrack, crops: np.ndarray, audio: np.ndarray, sample_rate: int, fps: float,
            kept_shots: int, vad: bool | str = True, source_fps: float | None = None,
            duration: float | None = None) -> Quality:
    """The measures of the module docstring. ``vad``: True (the wheel's model), a model path, or False."""
    n = len(track.faces)
    blur, brightness = blur_and_brightness(crops)
    speech = math.nan
    if vad:
        speech = speech_fraction(audio, sample_rate, None if vad is True else vad)
    return Quality(
        face_fraction=track.face_fraction, crop_jitter=track.crop_jitter(), speech_fraction=speech,
        mouth_audio_r=mouth_audio_r(track.aperture[:n], audio, sample_rate, fps), blur=blur,
        brightness=brightness, face_px=track.face_pixels(), shots=len(track.shots),
        dropped_shots=len(track.shots) - kept_shots, other_faces=track.other_faces / max(n, 1),
        source_fps=math.nan if source_fps is None else float(source_fps),
        decoded_fraction=math.nan if not duration else min(1.0, n / (duration * fps)), detector=track.detector)


@dataclass(frozen=True)
class QualityFilters:
    """Thresholds; None (the default) records the measure without dropping anything."""

    min_face_fraction: float | None = None
    max_crop_jitter: float | None = None
    min_speech_fraction: float | None = None
    min_mouth_audio_r: float | None = None
    min_blur: float | None = None
    min_brightness: float | None = None
    max_brightness: float | None = None
    min_face_px: float | None = None
    min_source_fps: float | None = None  # a clip re-encoded at a few fps has a frozen mouth
    min_decoded_fraction: float | None = None  # a truncated file

    def check(self, q: Quality) -> str:
        """"" when every set threshold holds, else the first failure as one line."""
        for f in fields(self):
            limit = getattr(self, f.name)
            if limit is None:
                continue
            kind, measure_name = f.name.split("_", 1)
            value = getattr(q, measure_name)
            if not math.isfinite(value):
                return f"filtered: {measure_name} not measured (threshold {limit})"
            if (kind == "min" and value < limit) or (kind == "max" and value > limit):
                sign = "<" if kind == "min" else ">"
                return f"filtered: {measure_name} {value:.3f} {sign} {limit}"
        return ""
