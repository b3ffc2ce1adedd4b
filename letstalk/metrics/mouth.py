"""Mouth measures of real (and generated) faces from MediaPipe face landmarks: lip sync against a
real video's own mouth, lip landmark distance (LMD), and the mouth against the audio loudness.

The procedural measures of `motion` read pixels at known places of a drawn face; a real face has
no known layout, so these read MediaPipe FaceLandmarker landmarks instead (`letstalk.faces`):

* `mouth_track`: per frame of one video, the largest face's mouth aperture (inner-lip gap 13-14
  / face height 10-152), its ``jawOpen`` blendshape and the 40 lip landmarks centred on their
  mean and divided by the face height. Frames below ``min_side`` pixels (generated crops are
  48-128 px) are upscaled first: the landmarker finds few faces in small frames.
* `landmark_sync`: Pearson r of a generated aperture track with the real video's at the best lag
  of 0..max_lag frames (the generated mouth may trail), beside a control: the same measure with
  the real track circularly shifted by half its length. A model that ignores the audio scores
  about the control; one that moves the mouth as the speaker did approaches 1.
* `audio_sync`: the same measure of an aperture track against the audio loudness envelope
  (`motion.sync_envelope`); on real faces loudness explains little of the mouth (r about 0.2-0.26
  on the real clips measured), so it is a secondary figure.
* `lmd`: mean Euclidean distance of the normalised lip landmarks of the two videos, frame by
  frame, in % of the face height (0 = the same lip shapes).

Sync figures need length: below `MIN_SYNC_FRAMES` frames (2 s at 25 fps) the lag search makes
even unrelated tracks correlate noticeably, so the evaluate job reports them as not computed.

No face-embedding model is available here (no ArcFace-style weights), so identity similarity is
not measured.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from ..faces import LIP_POINTS, MediaPipeFaces, fill_gaps
from .motion import _best_lag_r, sync_envelope

__all__ = ["MouthTrack", "mouth_track", "LandmarkSync", "landmark_sync", "audio_sync", "lmd", "MIN_SYNC_FRAMES",
           "IDENTITY_NOT_MEASURED"]

MIN_SYNC_FRAMES = 50  # below this many frames a sync figure is not meaningful (see the module docstring)
IDENTITY_NOT_MEASURED = "no face-embedding model"


@dataclass
class MouthTrack:
    """The mouth of the largest face per frame of one video (NaN where no face was found)."""

    aperture: np.ndarray  # (N,) inner-lip gap / face height
    jaw_open: np.ndarray  # (N,) the jawOpen blendshape in [0, 1]
    lips: np.ndarray  # (N, len(LIP_POINTS), 2) lip landmarks, centred, / face height
    found: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.found)

    @property
    def face_fraction(self) -> float:
        return float(self.found.mean()) if len(self.found) else 0.0


def mouth_track(frames: Iterable[np.ndarray], model_path: str | os.PathLike, fps: float = 25,
                min_side: int = 256) -> MouthTrack:
    """Run a fresh MediaPipe FaceLandmarker over the (H, W, 3) uint8 RGB frames of one video, in
    order; frames whose shorter side is below ``min_side`` are upscaled (bicubic) first."""
    aperture, jaw, lips, found = [], [], [], []
    nan_lips = np.full((len(LIP_POINTS), 2), np.nan)
    with MediaPipeFaces(model_path, fps=fps) as detector:
        for frame in frames:
            frame = np.asarray(frame)
            if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
                raise ValueError(f"frames must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
            h, w = frame.shape[:2]
            if min(h, w) < min_side:
                scale = min_side / min(h, w)
                frame = cv2.resize(frame, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_CUBIC)
            faces = detector.detect(frame)
            face = max(faces, key=lambda f: f.size) if faces else None
            found.append(face is not None)
            aperture.append(face.aperture if face is not None else math.nan)
            jaw.append(face.jaw_open if face is not None else math.nan)
            lips.append(face.lips() if face is not None else nan_lips)
    if not found:
        raise ValueError("no frames to track a mouth in")
    return MouthTrack(np.array(aperture, np.float64), np.array(jaw, np.float64), np.array(lips, np.float64),
                      np.array(found, bool))


@dataclass(frozen=True)
class LandmarkSync:
    r: float  # Pearson r at the best lag
    lag: int  # frames the first track trails the second
    control: float  # the same with the second track circularly shifted by half its length
    frames: int  # the length of the tracks compared


def _filled(track, name: str, min_valid: int) -> np.ndarray:
    """A 1-D float track with its NaN gaps linearly interpolated (held flat at the ends)."""
    x = np.asarray(track, np.float64)
    if x.ndim != 1:
        raise ValueError(f"the {name} track must be 1-D, got shape {x.shape}")
    ok = np.isfinite(x)
    if ok.sum() < min_valid:
        raise ValueError(f"the {name} track has {int(ok.sum())} frames with a face, fewer than {min_valid}")
    return fill_gaps(x)


def _sync(x: np.ndarray, y: np.ndarray, max_lag: int, names: tuple[str, str]) -> LandmarkSync:
    """Best-lag Pearson r of x with y, and with y rolled by half its length (the control)."""
    best = _best_lag_r(x, y, max_lag)
    if best is None:
        still = names[0] if x.std() <= 1e-9 else names[1]
        raise ValueError(f"the {still} track never changes: no correlation to measure")
    control = _best_lag_r(x, np.roll(y, len(y) // 2), max_lag)
    return LandmarkSync(round(best[0], 6), best[1], round(control[0], 6) if control else 0.0, len(x))


def landmark_sync(generated_aperture, real_aperture, max_lag: int = 3) -> LandmarkSync:
    """Lip sync of a generated video against the real one: Pearson r of their aperture tracks at
    the best lag 0..max_lag (the generated mouth may trail), NaN gaps interpolated, and the same
    with the real track circularly shifted by half its length as the control."""
    if max_lag < 0:
        raise ValueError(f"max_lag must be >= 0, got {max_lag}")
    gen, real = np.asarray(generated_aperture), np.asarray(real_aperture)
    if gen.shape != real.shape:
        raise ValueError(f"aperture tracks differ in length: generated {gen.shape}, real {real.shape}")
    need = max_lag + 3
    return _sync(_filled(gen, "generated", need), _filled(real, "real", need), max_lag, ("generated", "real"))


def audio_sync(aperture, audio: np.ndarray, sample_rate: int = 16000, fps: float = 25,
               max_lag: int = 3) -> LandmarkSync:
    """The aperture track against the audio's loudness envelope per video frame
    (`motion.sync_envelope`): best-lag r, and the envelope shifted by half its length as the control."""
    if max_lag < 0:
        raise ValueError(f"max_lag must be >= 0, got {max_lag}")
    x = _filled(aperture, "aperture", max_lag + 3)
    return _sync(x, sync_envelope(np.asarray(audio, np.float32), len(x), sample_rate, fps), max_lag,
                 ("aperture", "audio loudness"))


def lmd(generated_lips, real_lips) -> float:
    """Lip landmark distance: mean over the frames with a face in both videos, and over the lip
    points, of the Euclidean distance between the centred, face-height-normalised landmarks
    (`MouthTrack.lips`), in % of the face height."""
    gen, real = np.asarray(generated_lips, np.float64), np.asarray(real_lips, np.float64)
    if gen.shape != real.shape or gen.ndim != 3 or gen.shape[-1] != 2:
        raise ValueError(f"lip tracks must both be (N, points, 2), got {gen.shape} and {real.shape}")
    both = np.isfinite(gen).all(axis=(1, 2)) & np.isfinite(real).all(axis=(1, 2))
    if not both.any():
        raise ValueError("no frame has a face in both videos")
    return float(np.linalg.norm(gen[both] - real[both], axis=-1).mean() * 100)
