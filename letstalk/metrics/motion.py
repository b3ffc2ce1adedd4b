"""Weights-free motion metrics for procedural talking faces (letstalk.synthetic): lip sync, blinks,
and an expression proxy.

The procedural generator draws each face from known `Identity` parameters, so the mouth and eye
regions are known exactly. Every measure here reads pixels only (rendered or decoded frames),
never the ground-truth tracks, so generated videos are scored the same way as real ones.

* Lip sync (`sync_score`): the mouth opening measured from pixels (the fraction of dark pixels
  in the mouth box, as `synthetic.measure_mouth_open`) against the audio loudness per video frame
  (`synthetic.audio_envelope`, Gaussian-smoothed with sigma 0.8 frames like the generator's
  mouth): per video, the Pearson correlation at its best lag of 0..`max_lag` frames (the mouth
  follows the sound), averaged over videos. The control pairs each video's mouth with
  another video's audio (one video: its own audio circularly shifted by half its length), with
  the same lag search: a model that ignores the audio scores about the same on both (the lag
  search lifts both a little above 0, more so on short clips: compare score with control).
* Blinks (`count_blinks`): the luma spread inside the eye boxes drops while the lid covers the
  eye; a blink is a run of frames below (1 - 0.15) × the video's median. Reliable from 128 px
  frames on (at 64 px the eye is a few pixels and the count is noise).
* Expression proxy (`expression_proxy`): per frame (mouth opening, its change since the previous
  frame), a 2-D stand-in for Deep3DFaceRecon's 64 expression coefficients when those weights are
  not given. It is labelled "proxy" wherever it is reported: it covers the mouth only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .. import synthetic

__all__ = ["ProceduralFace", "dark_fraction", "mouth_opening", "eye_spread", "count_blinks", "SyncScore",
           "sync_score", "sync_envelope", "expression_proxy", "BLINK_MIN_SIZE"]

MOUTH_THRESHOLD = 55.0  # luma below this is the open mouth (as synthetic.measure_mouth_open)
ENVELOPE_SMOOTHING = 0.8  # frames (sigma), the generator's mouth smoothing
BLINK_DROP = 0.15
BLINK_MIN_SIZE = 128
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

Box = tuple[int, int, int, int]


def _luma(frames: np.ndarray, box: Box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return frames[:, y0:y1, x0:x1].astype(np.float32) @ _LUMA  # (N, h, w)


@dataclass(frozen=True)
class ProceduralFace:
    """Where a procedural identity's mouth and eyes are in a square crop of its video.

    identity: the sidecar's "identity_params"; source_size: the video's side in pixels;
    crop: (x0, y0, x1, y1) of the crop in the source frame (the whole frame by default);
    size: the side of the crop after resizing.
    """

    identity: synthetic.Identity
    source_size: int
    size: int
    crop: Box | None = None

    @classmethod
    def from_sidecar(cls, meta: dict, size: int, crop: Box | None = None) -> "ProceduralFace":
        if "identity_params" not in meta or "size" not in meta:
            raise ValueError("the sidecar has no identity_params/size: not a procedural video")
        return cls(synthetic.Identity.from_dict(meta["identity_params"]), int(meta["size"]), int(size),
                   None if crop is None else tuple(int(v) for v in crop))

    def _map(self, box: tuple[float, float, float, float]) -> Box:
        """A source-pixel box -> crop pixels (rounded outwards, clipped)."""
        x0, y0, x1, y1 = self.crop or (0, 0, self.source_size, self.source_size)
        sx, sy = self.size / (x1 - x0), self.size / (y1 - y0)
        out = (int(np.floor((box[0] - x0) * sx)), int(np.floor((box[1] - y0) * sy)),
               int(np.ceil((box[2] - x0) * sx)), int(np.ceil((box[3] - y0) * sy)))
        clipped = (max(0, out[0]), max(0, out[1]), min(self.size, out[2]), min(self.size, out[3]))
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            raise ValueError(f"the face region {box} lies outside the crop {self.crop}")
        return clipped

    def mouth_box(self) -> Box:
        return self._map(synthetic.mouth_box(self.identity, self.source_size))

    def eye_boxes(self) -> list[Box]:
        # the generator's layout is the one source of truth for where the eyes are drawn
        L = synthetic.layout(self.identity)
        s, m = self.source_size, 0.025 * self.source_size + 1  # room for head sway, as mouth_box
        boxes = []
        for side in (-1, 1):
            ex = L.cx + side * L.eye_dx
            boxes.append(self._map(((ex - 1.2 * L.eye_rx) * s - m, (L.eye_y - 1.2 * L.eye_ry) * s - m,
                                    (ex + 1.2 * L.eye_rx) * s + m, (L.eye_y + 1.2 * L.eye_ry) * s + m)))
        return boxes


def _frames(frames, size: int | None = None) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
    if len(frames) == 0:
        raise ValueError("no frames")
    if size is not None and frames.shape[1:3] != (size, size):
        raise ValueError(f"frames are {frames.shape[2]}×{frames.shape[1]} but the face layout is for {size}×{size}")
    return frames


def dark_fraction(frames, box: Box, threshold: float = MOUTH_THRESHOLD) -> np.ndarray:
    """(N,) fraction of pixels with luma < `threshold` inside `box`."""
    return (_luma(_frames(frames), box) < threshold).mean(axis=(1, 2))


def mouth_opening(frames, face: ProceduralFace) -> np.ndarray:
    """(N,) pixel measure of mouth opening of a procedural face (grows about linearly with the opening)."""
    return dark_fraction(_frames(frames, face.size), face.mouth_box())


def eye_spread(frames, face: ProceduralFace) -> np.ndarray:
    """(N,) luma standard deviation inside both eye boxes (iris and eye white vs lid: drops in a blink)."""
    frames = _frames(frames, face.size)
    return np.concatenate([_luma(frames, b).reshape(len(frames), -1) for b in face.eye_boxes()], axis=1).std(axis=1)


def count_blinks(spread: np.ndarray, drop: float = BLINK_DROP) -> int:
    """Blinks in an `eye_spread` track: runs of frames below (1 - drop) × the track's median."""
    spread = np.asarray(spread, np.float64)
    if spread.ndim != 1 or spread.size == 0:
        raise ValueError(f"expected a non-empty (N,) track, got shape {spread.shape}")
    closed = spread < (1.0 - drop) * np.median(spread)
    return int(np.count_nonzero(np.diff(np.concatenate([[False], closed]).astype(np.int8)) == 1))


def sync_envelope(audio: np.ndarray, frames: int, sample_rate: int = 16000, fps: float = 25) -> np.ndarray:
    """(frames,) smoothed loudness per video frame (`synthetic.audio_envelope`, sigma 0.8 frames),
    cut or zero-padded to `frames`."""
    env = synthetic.audio_envelope(audio, sample_rate, fps).astype(np.float64)
    env = np.pad(env, (0, max(0, frames - len(env))))[:frames]
    return synthetic.smooth(env, ENVELOPE_SMOOTHING) if frames else env


@dataclass(frozen=True)
class SyncScore:
    score: float  # mean over videos of Pearson r at each video's best lag
    lag: int  # median over videos of the frames the mouth trails the audio
    control: float  # the same with mismatched audio
    control_lag: int
    videos: int  # videos whose tracks vary (a still mouth or silent audio says nothing about sync)


def _best_lag_r(mouth: np.ndarray, env: np.ndarray, max_lag: int) -> tuple[float, int] | None:
    """Pearson r of mouth[t] with env[t - lag] at the best lag in 0..max_lag; None if a track is constant."""
    n = min(len(mouth), len(env))
    best: tuple[float, int] | None = None
    for lag in range(max_lag + 1):
        x, y = mouth[lag:n], env[: n - lag]
        if x.std() <= 1e-9 or y.std() <= 1e-9:
            continue
        r = float(np.corrcoef(x, y)[0, 1])
        if best is None or r > best[0]:
            best = (r, lag)
    return best


def _mean_r(mouths: Sequence[np.ndarray], envs: Sequence[np.ndarray], max_lag: int) -> tuple[float, int, int]:
    found = [b for b in (_best_lag_r(m, e, max_lag) for m, e in zip(mouths, envs)) if b is not None]
    if not found:
        return 0.0, 0, 0
    return float(np.mean([r for r, _ in found])), int(np.median([lag for _, lag in found])), len(found)


def sync_score(mouths: Sequence[np.ndarray], envelopes: Sequence[np.ndarray], max_lag: int = 3) -> SyncScore:
    """Lip sync of per-video mouth tracks against per-video audio envelopes (see the module docstring).

    mouths[i] and envelopes[i] are (N_i,) tracks of video i at the same frame rate and length.
    A video whose mouth or audio never changes adds nothing; if no video varies, the scores are 0.
    """
    if len(mouths) == 0:
        raise ValueError("no videos to score lip sync on")
    if len(mouths) != len(envelopes):
        raise ValueError(f"{len(mouths)} mouth tracks but {len(envelopes)} audio envelopes")
    if max_lag < 0:
        raise ValueError(f"max_lag must be >= 0, got {max_lag}")
    ms, es = [], []
    for i, (m, e) in enumerate(zip(mouths, envelopes)):
        m, e = np.asarray(m, np.float64), np.asarray(e, np.float64)
        if m.ndim != 1 or e.ndim != 1:
            raise ValueError(f"video {i}: tracks must be 1-D, got {m.shape} and {e.shape}")
        if len(m) != len(e):
            raise ValueError(f"video {i}: {len(m)} mouth frames but {len(e)} audio frames")
        if len(m) < max_lag + 3:
            raise ValueError(f"video {i}: {len(m)} frames is too short for a lag search up to {max_lag}")
        if not (np.isfinite(m).all() and np.isfinite(e).all()):
            raise ValueError(f"video {i}: tracks contain NaN or infinite values")
        ms.append(m)
        es.append(e)
    score, lag, videos = _mean_r(ms, es, max_lag)
    if len(es) > 1:
        control_envs = es[1:] + es[:1]  # every mouth with the next video's audio
    else:
        control_envs = [np.roll(es[0], len(es[0]) // 2)]
    control, control_lag, _ = _mean_r(ms, control_envs, max_lag)
    return SyncScore(round(score, 6), lag, round(control, 6), control_lag, videos)


def expression_proxy(mouth: np.ndarray) -> np.ndarray:
    """(N,) mouth-opening track -> (N - 1, 2) features (opening, change since the previous frame)."""
    mouth = np.asarray(mouth, np.float64)
    if mouth.ndim != 1 or len(mouth) < 2:
        raise ValueError(f"expected a mouth track of at least 2 frames, got shape {mouth.shape}")
    return np.stack([mouth[1:], np.diff(mouth)], axis=1)
