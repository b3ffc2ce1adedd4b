"""A person's footage re-voiced with new speech, at the footage's own resolution.

    footage = load_footage("me.mp4", FaceSettings(detector="mediapipe", model=TASK, crop="track"))
    revoice_video(pipe, footage, "speech.wav", "out.mp4")   # pipe: a re-voicing bundle (letstalk.revoice)

The footage is decoded once: its frames (scaled to at most `max_side`), the face track's crop boxes and
the crops. Each output frame takes the next footage frame, looping back and forth when the speech is
longer (`letstalk.revoice.pingpong`); the model regenerates the crop's lower face from the speech, and
`Composite` blends it into the frame with a feathered edge. Everything outside the lower face is the
footage's own pixels.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .clips import ClipSpec, decode_video
from .faces import FaceSettings, scale_track
from .media import MediaError, iter_video_frames, probe, write_video
from .metrics.frames import resize_frames
from .revoice import Composite, MouthDetail, pingpong

MAX_FOOTAGE_BYTES = 4 << 30  # the frames kept in memory to loop over; longer footage is refused
AVATAR_DIR = "avatar"  # in a re-voicing bundle: footage.mp4 (the person's footage) and avatar.json (how to crop it)


@dataclass
class Footage:
    """A person's footage, decoded for re-voicing."""

    frames: np.ndarray  # (N, H, W, 3) uint8, scaled to at most max_side
    boxes: np.ndarray  # (N, 4) square crop boxes in `frames`' pixels
    crops: np.ndarray  # (N, S, S, 3) uint8 crops at `crop_size` (S >= 256: the mouth measures read them)
    fps: int

    def __len__(self) -> int:
        return len(self.frames)


def load_footage(path: str | os.PathLike, faces: FaceSettings, fps: int = 25, crop_size: int = 256,
                 max_side: int = 1280, max_seconds: float = 120.0) -> Footage:
    """Decode `path` at `fps`, track the face, keep frames, boxes and crops. One-line errors (MediaError,
    ValueError) for footage without a face, too long, or too large to keep in memory."""
    info = probe(path)
    if not info.has_video:
        raise MediaError(f"{path}: has no video stream")
    if info.duration > max_seconds:
        raise MediaError(f"{path}: footage is {info.duration:.1f} s long, over the limit of {max_seconds:g} s "
                         "(cut it: a few seconds to a minute of the person talking is enough)")
    width, height = int(info.width), int(info.height)
    scale = min(1.0, max_side / max(width, height))
    size = (max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2))
    if info.duration * fps * size[0] * size[1] * 3 > MAX_FOOTAGE_BYTES:
        raise MediaError(f"{path}: {info.duration:.1f} s at {size[0]}x{size[1]} is too large to keep in memory: scale it down (--max-side) or cut it")
    decoded = decode_video(path, ClipSpec(fps=fps, image_size=crop_size, clip_frames=1, stride=1,
                                          max_seconds=max_seconds), faces, vad=False)
    if not decoded.face_found:
        raise MediaError(f"{path}: no face found in the footage")
    n = len(decoded.frames)
    frames = []
    for frame in iter_video_frames(path, fps=fps, size=None if scale == 1.0 else size):
        if len(frames) >= n:
            break
        frames.append(frame)
    n = len(frames)
    boxes = scale_track(decoded.track, *size).boxes[:n]  # the crop boxes in the kept frames' pixels
    return Footage(np.stack(frames), boxes, decoded.frames[:n], fps)


def add_footage(bundle: str | os.PathLike, video: str | os.PathLike, faces: dict) -> Path:
    """Put the person's footage into a bundle (BUNDLE/avatar/footage.mp4, a copy) with the face settings
    that crop it (avatar.json; a detector model path is not kept: the renderer uses its own or the one it is
    given). The avatar then renders new speech on its own: `letstalk render --avatar BUNDLE speech.wav`."""
    folder = Path(bundle) / AVATAR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / ".footage.mp4.part"
    shutil.copyfile(video, part)
    part.rename(folder / "footage.mp4")
    settings = {k: v for k, v in faces.items() if k != "model"}
    (folder / "avatar.json").write_text(json.dumps({"faces": settings}, indent=2))
    return folder / "footage.mp4"


def bundle_footage(bundle: str | os.PathLike) -> tuple[Path, dict]:
    """(footage.mp4, face settings) of a re-voicing bundle; a one-line ValueError when it has none."""
    folder = Path(bundle) / AVATAR_DIR
    if not (folder / "footage.mp4").is_file():
        raise ValueError(f"{bundle}: holds no footage ({AVATAR_DIR}/footage.mp4): give --footage VIDEO, the person "
                         "talking")
    meta = json.loads((folder / "avatar.json").read_text()) if (folder / "avatar.json").is_file() else {}
    return folder / "footage.mp4", meta.get("faces", {})


def typical_index(pipe, crops: np.ndarray) -> int:
    """The crop whose latent is nearest the mean of all crops' latents: the person's most typical pose
    and expression (the reference frame of a re-voiced render)."""
    latents = pipe.codec.encode(resize_frames(crops, pipe.image_size)).cpu()
    return int((latents - latents.mean(0)).flatten(1).pow(2).sum(1).argmin())


def revoice_frames(pipe, footage: Footage, audio: np.ndarray, *, steps: int | None = None,
                   sampler: str | None = None, guidance: float = 1.0, seed: int = 0, mouth_detail: bool = True,
                   progress: Callable[[int, int], None] | None = None, seconds: dict[str, float] | None = None):
    """Yield (footage index, re-voiced frame) for each video frame of `audio` ((samples,) at the bundle's
    rate): the footage frame with its lower face regenerated, at the footage's resolution; with
    `mouth_detail`, the fine detail of the footage's best-matching mouth added (letstalk.revoice.MouthDetail)."""
    n = round(len(audio) / pipe.settings.sample_rate * footage.fps)
    if n < 1:
        raise ValueError("audio: too short to give a single video frame")
    order = pingpong(len(footage), n)
    small = resize_frames(footage.crops, pipe.image_size)
    ref = small[typical_index(pipe, footage.crops)]
    paste = Composite(pipe.transformer.cfg.input_size)
    detail = MouthDetail(footage.crops, pipe.image_size) if mouth_detail else None
    k = 0
    for clip in pipe.iter_revoice(small[order], audio, ref, steps=steps, sampler=sampler, guidance=guidance,
                                  seed=seed, progress=progress, seconds=seconds):
        for generated in clip:
            i = int(order[k])
            yield i, paste(footage.frames[i], footage.boxes[i], generated, None if detail is None else detail(generated))
            k += 1


def revoice_video(pipe, footage: Footage, audio: np.ndarray, out: str | os.PathLike, *, stream: bool = False,
                  **kwargs) -> Path:
    """Write the re-voiced footage with `audio` as its sound to `out` (an mp4, written whole or not at all;
    with `stream`, a fragmented mp4 that grows at `out` as the frames come: letstalk.media.write_video)."""
    frames = (frame for _, frame in revoice_frames(pipe, footage, audio, **kwargs))
    return write_video(out, frames, fps=footage.fps, audio=audio, sample_rate=pipe.settings.sample_rate, stream=stream)


__all__ = ["AVATAR_DIR", "Footage", "load_footage", "add_footage", "bundle_footage", "typical_index", "revoice_frames",
           "revoice_video"]
