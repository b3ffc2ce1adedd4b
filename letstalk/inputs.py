"""Render inputs, prepared once: portrait + speech -> PreparedInputs (face crop, 16 kHz wave, counts).

Every entry point prepares a request's inputs exactly once, at its edge, and hands the result on:

    letstalk render (CLI)      LetsTalkPipeline.render_to_file(path, path) -> pipe.prepare -> prepare
    HTTP ingress               prepare(upload bytes, ...) -> PreparedInputs -> the Renderer replica
    batch job                  the Renderer / RenderWorker: prepare(file bytes, ...)

`prepare` decodes the image (Pillow) and the audio (ffmpeg) once each, crops the face once and
counts frames and clips once; the pipeline adds the reference latent (one codec encode) the first
time it renders them. Problems are one-line ValueErrors naming "portrait" or "audio"; a request
over a configured limit raises LimitExceeded (a ValueError), which the HTTP API answers with 413.

The decoded photo stays with the inputs (`PreparedInputs.photo`) for paste-back; `for_renderer`
decides paste-back and keeps only what a renderer elsewhere needs of the photo (none, or the photo
scaled to the video's size), so it is neither decoded again nor shipped larger than the video.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .media import LimitExceeded, load_audio
from .paste import fit_photo
from .portrait import PortraitCrop, crop_portrait, load_image

__all__ = ["InputSpec", "LimitExceeded", "PreparedInputs", "PreparedSpeech", "clip_count", "decode_bytes", "prepare",
           "prepare_audio", "prepare_speech"]


@dataclass(frozen=True)
class InputSpec:
    """What a bundle needs from its inputs, and the limits a deployment puts on them."""

    image_size: int
    sample_rate: int = 16000
    fps: int = 25
    clip_frames: int = 16
    max_audio_seconds: float = 600.0
    max_image_pixels: int = 40_000_000

    def frames_for(self, samples: int) -> int:
        return round(samples / self.sample_rate * self.fps)


def clip_count(frames: int, clip_frames: int) -> int:
    """Clips a video of `frames` frames is rendered in (the last one may be shorter)."""
    return -(-frames // clip_frames)


@dataclass(eq=False)
class PreparedInputs:
    """One request's inputs, decoded and checked: what every renderer takes."""

    crop: PortraitCrop  # the face-centred square at the bundle's image size
    audio: np.ndarray  # (samples,) float32 mono at sample_rate
    sample_rate: int
    num_frames: int
    num_clips: int
    reference: Any = None  # the crop's codec latent (1, C, h, w); filled by LetsTalkPipeline.prepare
    # the decoded portrait (H, W, 3) uint8 the crop was cut from (crop.box is in its pixels), for
    # paste-back; None: not carried (for_renderer drops it when the render will not paste back)
    photo: np.ndarray | None = None

    @property
    def duration_s(self) -> float:
        return self.audio.size / self.sample_rate

    @property
    def face_found(self) -> bool:
        return self.crop.face_found

    def pastes_back(self, paste_back: bool | None) -> bool:
        """Whether a render of these inputs pastes the face back into the photo: `paste_back`, or for
        None (auto) whether there is a photo larger than the model's crop."""
        if paste_back is not None:
            return paste_back
        return self.photo is not None and max(self.photo.shape[:2]) > self.crop.image.shape[0]

    def for_renderer(self, paste_back: bool | None, max_side: int) -> "PreparedInputs":
        """A copy to hand to a renderer in another process, with the paste-back decided: no photo
        when the render will not paste back (auto: the photo is no larger than the crop), else the
        photo at the video's size (letstalk.paste.fit_photo, longer side at most `max_side`) and
        crop.box scaled with it. `photo is not None` on the copy says which."""
        if not self.pastes_back(paste_back):
            return dataclasses.replace(self, photo=None)
        if self.photo is None:
            raise ValueError("paste-back needs the portrait image; these inputs were prepared without it")
        photo, box = fit_photo(self.photo, self.crop.box, max_side)
        return dataclasses.replace(self, photo=photo, crop=dataclasses.replace(self.crop, box=box))


@dataclass(eq=False)
class PreparedSpeech:
    """A re-voicing avatar's request (letstalk.footage): the speech alone, decoded and counted; the face and
    the frames are the avatar's own footage. Takes PreparedInputs' place on the way to a renderer."""

    audio: np.ndarray  # (samples,) float32 mono at sample_rate
    sample_rate: int
    num_frames: int
    num_clips: int
    photo: None = None  # nothing to paste back into: the footage is the renderer's
    face_found: bool = True

    @property
    def duration_s(self) -> float:
        return self.audio.size / self.sample_rate

    def pastes_back(self, paste_back: bool | None) -> bool:
        return False

    def for_renderer(self, paste_back: bool | None, max_side: int) -> "PreparedSpeech":
        return self


def decode_bytes(data: bytes, what: str, load: Callable[[str], Any]) -> Any:
    """Uploaded bytes -> `load(path)` of a temporary file with our own name (a client's file name
    never becomes a path); errors come back as one line naming `what`, with the same type."""
    if not data:
        raise ValueError(f"{what}: the file is empty")
    with tempfile.TemporaryDirectory(prefix="letstalk-in-") as tmp:
        path = Path(tmp) / what
        path.write_bytes(data)
        try:
            return load(str(path))
        except ValueError as e:  # ImageError / MediaError / LimitExceeded: keep the type, lose the path
            message = " ".join(str(e).split()).replace(str(path), "upload").replace(tmp, "")
            raise type(e)(f"{what}: {message}") from None


def _image(portrait: Any, spec: InputSpec) -> np.ndarray:
    def load(source: Any) -> np.ndarray:
        return load_image(source, max_pixels=spec.max_image_pixels)

    return decode_bytes(portrait, "portrait", load) if isinstance(portrait, bytes) else load(portrait)


def prepare_audio(audio: Any, spec: InputSpec) -> np.ndarray:
    """Audio path, encoded bytes or a (samples,) float array -> mono float32 at spec.sample_rate."""

    def load(path: str | os.PathLike) -> np.ndarray:
        return load_audio(path, spec.sample_rate, max_seconds=spec.max_audio_seconds)

    if isinstance(audio, bytes):
        return decode_bytes(audio, "audio", load)
    if isinstance(audio, (str, os.PathLike)):
        return load(audio)
    wave = np.array(audio, dtype=np.float32)  # a writable copy
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"audio must be a non-empty mono array (samples,), got shape {wave.shape}")
    if wave.size / spec.sample_rate > spec.max_audio_seconds:
        raise LimitExceeded(f"audio: {wave.size / spec.sample_rate:.1f} s long, over the limit of "
                            f"{spec.max_audio_seconds:g} s")
    return wave


def prepare_portrait(portrait: Any, spec: InputSpec) -> PortraitCrop:
    """Decode and check a portrait (path, encoded bytes, array or PIL image) -> its face crop at
    spec.image_size: what a render would use."""
    return crop_portrait(_image(portrait, spec), size=spec.image_size)


def _frames(wave: np.ndarray, spec: InputSpec) -> int:
    frames = spec.frames_for(wave.size)
    if frames < 1:
        raise ValueError(f"audio: {wave.size / spec.sample_rate * 1000:.0f} ms is too short to give a single "
                         "video frame")
    return frames


def prepare_speech(audio: Any, spec: InputSpec) -> PreparedSpeech:
    """Decode and check the speech of a re-voicing avatar's request (as `prepare` does the audio)."""
    wave = prepare_audio(audio, spec)
    frames = _frames(wave, spec)
    return PreparedSpeech(wave, spec.sample_rate, frames, clip_count(frames, spec.clip_frames))


def prepare(portrait: Any, audio: Any, spec: InputSpec) -> PreparedInputs:
    """Decode, check and crop one request's inputs.

    portrait: image path, encoded bytes, (H, W[, C]) array or PIL image; audio: path (any format
    ffmpeg reads), encoded bytes or a (samples,) float array at spec.sample_rate.
    """
    wave = prepare_audio(audio, spec)
    frames = _frames(wave, spec)
    photo = _image(portrait, spec)
    crop = crop_portrait(photo, size=spec.image_size)
    return PreparedInputs(crop, wave, spec.sample_rate, frames, clip_count(frames, spec.clip_frames), photo=photo)
