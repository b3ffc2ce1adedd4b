"""Procedural talking-face videos and data sets: `make_talking_video` (frames + audio + per-frame
ground truth: the mouth follows the audio envelope with a small lag; blinks and head sway come from
random streams of their own) and `make_dataset` (`talk_0000.mp4` (H.264 + AAC) + `talk_0000.json`,
the ground truth, per video), with its helpers. Writing needs ffmpeg."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .faces import Identity, render_face
from .speech import audio_envelope, smooth, speech_like_audio

__all__ = [
    "make_talking_video", "make_dataset", "dataset_todo", "dataset_files", "dataset_item",
    "check_dataset_args", "MAX_SECONDS", "MAX_VIDEOS",
]

MAX_SECONDS = 600.0  # per video
MAX_VIDEOS = 100_000

# ------------------------------------------------------------------------------------- videos


def _blinks(frames: int, fps: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame eye opening in [0, 1] and a 0/1 blink flag: a blink every 2-6 s lasting 3-5 frames."""
    eye = np.ones(frames, np.float32)
    flag = np.zeros(frames, np.int64)
    pos = rng.uniform(0.3, 2.5)
    profiles = {3: [0.3, 0.0, 0.5], 4: [0.4, 0.0, 0.1, 0.6], 5: [0.5, 0.1, 0.0, 0.3, 0.7]}
    while True:
        start = int(round(pos * fps))
        if start >= frames:
            break
        prof = profiles[int(rng.integers(3, 6))]
        for k, v in enumerate(prof):
            if start + k < frames:
                eye[start + k] = v
                flag[start + k] = 1
        pos += rng.uniform(2.0, 6.0)
    return eye, flag


def _sway(frames: int, fps: float, rng: np.random.Generator, size: int) -> np.ndarray:
    """(frames, 3) smooth head motion: dx, dy in pixels (up to ~1.2% of the side), roll in degrees."""
    t = np.arange(frames) / fps
    out = np.zeros((frames, 3))
    for j, amp in enumerate((0.012 * size, 0.008 * size, 2.0)):
        for _ in range(3):
            out[:, j] += rng.uniform(0.2, 0.5) * amp * np.sin(2 * np.pi * rng.uniform(0.08, 0.5) * t
                                                              + rng.uniform(0, 2 * np.pi))
    return out


def _identity_id(identity: Identity) -> str:
    import hashlib

    digest = hashlib.sha1(json.dumps(identity.to_dict(), sort_keys=True).encode()).hexdigest()
    return f"id-{digest[:8]}"


def make_talking_video(identity: Identity, seconds: float, seed: int, fps: float = 25, size: int = 256,
                       sample_rate: int = 16000, identity_id: str | None = None
                       ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Render `identity` speaking for `seconds`.

    Returns (frames (N, size, size, 3) uint8, audio (samples,) float32, meta) with
    N = round(seconds * fps). The mouth opening is the audio envelope, smoothed (zero-phase) and
    delayed by `meta["lag_frames"]` (1 or 2 frames, 40-80 ms at 25 fps). Blinks and head sway come
    from random streams of their own, independent of the audio. meta holds the per-frame ground
    truth ("mouth_open", "eye_open", "blink", "head_pose" = [dx px, dy px, roll deg], "envelope")
    and "lag_frames", "identity" (`identity_id`, default a hash of the parameters),
    "identity_params" (`Identity.to_dict`), "seed", "fps", "sample_rate", "size", "seconds", "frames".
    """
    frames, audio, meta = _talking_video(identity, seconds, seed, fps, size, sample_rate, identity_id)
    out = np.empty((meta["frames"], int(size), int(size), 3), np.uint8)
    for k, frame in enumerate(frames):
        out[k] = frame
    return out, audio, meta


def _talking_video(identity: Identity, seconds: float, seed: int, fps: float, size: int, sample_rate: int,
                   identity_id: str | None) -> tuple[Iterator[np.ndarray], np.ndarray, dict]:
    """`make_talking_video` with the frames as a lazy iterator (long videos need not fit in memory)."""
    if not (0 < seconds <= MAX_SECONDS):
        raise ValueError(f"seconds must be in (0, {MAX_SECONDS:g}], got {seconds}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    frames_n = int(round(seconds * fps))
    if frames_n < 1:
        raise ValueError(f"{seconds} s at {fps:g} fps is not a single frame")
    audio_rng, motion_rng, blink_rng, lag_rng = (np.random.default_rng(s) for s in
                                                 np.random.SeedSequence([int(seed), 7]).spawn(4))
    audio = speech_like_audio(seconds, seed=int(audio_rng.integers(2**31)), sample_rate=sample_rate,
                              pitch=identity.voice_pitch)
    env = audio_envelope(audio, sample_rate, fps)
    env = np.pad(env, (0, max(0, frames_n - len(env))))[:frames_n]
    lag = int(lag_rng.integers(1, 3))
    gain = float(lag_rng.uniform(0.8, 1.0))  # how wide this take opens its mouth
    mouth = np.clip(gain * np.concatenate([np.zeros(lag), smooth(env.astype(np.float64), 0.8)]), 0, 1)
    mouth = np.round(mouth[:frames_n], 5)  # rounded as stored in the sidecar: frames match it exactly
    eye, blink = _blinks(frames_n, fps, blink_rng)
    pose = np.round(_sway(frames_n, fps, motion_rng, int(size)), 4)
    meta = {
        "identity": identity_id or _identity_id(identity),
        "seed": int(seed), "fps": fps, "sample_rate": int(sample_rate), "size": int(size),
        "seconds": float(seconds), "frames": frames_n, "lag_frames": lag,
        "mouth_open": [float(v) for v in mouth],
        "eye_open": [round(float(v), 5) for v in eye],
        "blink": [int(v) for v in blink],
        "envelope": [round(float(v), 5) for v in env],
        "head_pose": [[float(v) for v in p] for p in pose],
        "identity_params": identity.to_dict(),
    }

    def frames() -> Iterator[np.ndarray]:
        for k in range(frames_n):
            yield render_face(identity, int(size), mouth[k], eye[k], offset=(pose[k, 0], pose[k, 1]),
                              angle=pose[k, 2])

    return frames(), audio, meta


# ------------------------------------------------------------------------------------ dataset


def _write_json_atomic(path: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w") as f:  # one key per line, each value (a whole track) on its line
            f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in data.items())
                    + "\n}\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def check_dataset_args(videos: int, seconds: float, size: int, fps: float = 25,
                       seed: int | None = None) -> None:
    """Raise ValueError (one line) for settings `make_dataset` cannot honour."""
    if int(videos) != videos or not 1 <= videos <= MAX_VIDEOS:
        raise ValueError(f"videos must be an integer from 1 to {MAX_VIDEOS}, got {videos}")
    if not (0 < seconds <= MAX_SECONDS):
        raise ValueError(f"seconds must be > 0 and at most {MAX_SECONDS:g}, got {seconds}")
    if int(size) != size or size < 64 or size % 8:
        raise ValueError(f"size must be a multiple of 8 and >= 64, got {size}")
    if not (0 < fps <= 120):
        raise ValueError(f"fps must be in (0, 120], got {fps}")
    if round(seconds * fps) < 1:
        raise ValueError(f"seconds={seconds} gives no frame at {fps:g} fps")
    if seed is not None and int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def dataset_files(out_dir: str | os.PathLike, index: int) -> tuple[Path, Path]:
    """(video, sidecar) paths of video `index` in a data set directory."""
    out = Path(out_dir)
    return out / f"talk_{index:04d}.mp4", out / f"talk_{index:04d}.json"


def dataset_item(seed: int, index: int) -> tuple[Identity, int, str]:
    """The identity, video seed and identity id of video `index` of a data set made with `seed`
    (independent of how many videos are made, so growing a data set keeps the first ones)."""
    ss = np.random.SeedSequence([int(seed), int(index), 1234])
    id_ss, video_ss = ss.spawn(2)
    identity = Identity.sample(np.random.default_rng(id_ss))
    video_seed = int(np.random.default_rng(video_ss).integers(2**31))
    return identity, video_seed, f"id{index:04d}"


def dataset_todo(out_dir: str | os.PathLike, videos: int, seconds: float, seed: int, size: int = 256,
                 fps: float = 25, sample_rate: int = 16000) -> list[int]:
    """Indices of the videos `make_dataset` would (re)write in `out_dir`: those without both an mp4
    and a readable sidecar. Raises ValueError if a video there was made with other settings
    (seed, seconds, size, fps, sample rate), so that data sets are never silently mixed."""
    check_dataset_args(videos, seconds, size, fps, seed)
    if not 8000 <= sample_rate <= 96000:
        raise ValueError(f"sample_rate must be in [8000, 96000], got {sample_rate}")
    want = {"dataset_seed": int(seed), "seconds": float(seconds), "size": int(size), "fps": fps,
            "sample_rate": int(sample_rate)}
    todo = []
    for i in range(int(videos)):
        mp4, sidecar = dataset_files(out_dir, i)
        try:
            meta = json.loads(sidecar.read_text()) if mp4.is_file() else None
        except (OSError, ValueError):
            meta = None
        if not isinstance(meta, dict):
            todo.append(i)
            continue
        have = {k: meta.get(k) for k in want}
        if have != want:
            settings = ", ".join(f"{k}={v}" for k, v in have.items())
            raise ValueError(f"{sidecar} was made with other settings ({settings}); "
                             f"use another folder or the same settings")
    return todo


def make_dataset(out_dir: str | os.PathLike, videos: int = 8, seconds: float = 8.0, seed: int = 0,
                 size: int = 256, fps: float = 25, sample_rate: int = 16000,
                 progress: Callable[[int, int], None] | bool | None = None) -> list[Path]:
    """Write `videos` procedural talking-face videos to `out_dir`: `talk_{i:04d}.mp4` (H.264 + AAC)
    and its sidecar `talk_{i:04d}.json` (the `make_talking_video` meta plus "dataset_seed" and
    "index"), one identity per video ("id0000", "id0001", ...).

    Deterministic from `seed`: video i depends only on (seed, i), so a larger data set starts with
    the videos of a smaller one. A video whose mp4 and sidecar already exist is skipped (see
    `dataset_todo`; other settings there raise ValueError). Both files are written atomically
    (temporary file + rename), the sidecar last. progress: None draws a tqdm bar, False is
    silent, a callable gets (done, total). Returns the mp4 paths in order.
    """
    from ..media import write_video

    out = Path(out_dir)
    todo = set(dataset_todo(out, videos, seconds, seed, size, fps, sample_rate))
    out.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress is None:
        from tqdm import tqdm

        bar = tqdm(total=int(videos), desc="making videos", unit="video")
    paths = []
    try:
        for i in range(int(videos)):
            mp4, sidecar = dataset_files(out, i)
            if i in todo:
                identity, video_seed, ident_id = dataset_item(seed, i)
                frames, audio, meta = _talking_video(identity, seconds, video_seed, fps, size, sample_rate,
                                                     ident_id)
                meta["dataset_seed"] = int(seed)
                meta["index"] = i
                sidecar.unlink(missing_ok=True)  # never leave a sidecar next to a video it does not describe
                write_video(mp4, frames, fps, audio, sample_rate)
                _write_json_atomic(sidecar, meta)
            paths.append(mp4)
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(i + 1, int(videos))
    finally:
        if bar is not None:
            bar.close()
    return paths
