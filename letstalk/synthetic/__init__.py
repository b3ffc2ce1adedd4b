"""Procedural stand-ins for real inputs (no downloads): drawn talking faces with speech-like audio.

A small "talking faces" data set that takes the place of HDTF / CelebV-HQ in tests and smoke runs:

* `faces` — `Identity` (the look of one speaker: skin, hair, face shape, eyes, mouth, voice
  pitch, ...; `Identity.sample(rng)` draws a clearly distinct one), its `layout`, `render_face`
  (one frame: mouth opening, eye opening and a small head sway are inputs), `draw_portrait`, and
  `mouth_box` / `measure_mouth_open` (a pixel measure of mouth opening in rendered or decoded
  frames, so that lip sync of generated videos can be scored against the audio).
* `speech` — `speech_like_audio` (syllable bursts in phrases with pauses, a voiced tone with
  varying pitch), `audio_envelope` (per-video-frame loudness in [0, 1]) and `smooth`.
* `dataset` — `make_talking_video` (frames + audio + per-frame ground truth) and `make_dataset`
  (`talk_0000.mp4` (H.264 + AAC) + `talk_0000.json` (the ground truth) per video).

Everything is deterministic from integer seeds and needs only numpy and OpenCV (+ ffmpeg to write).
"""

from .dataset import (MAX_SECONDS, MAX_VIDEOS, check_dataset_args, dataset_files, dataset_item, dataset_todo,
                      make_dataset, make_talking_video)
from .faces import (HAIR_STYLES, Identity, Layout, draw_portrait, layout, measure_mouth_open, mouth_box,
                    render_face)
from .speech import audio_envelope, smooth, speech_like_audio

__all__ = [
    "Identity", "speech_like_audio", "audio_envelope", "render_face", "make_talking_video",
    "make_dataset", "dataset_todo", "dataset_files", "dataset_item", "check_dataset_args",
    "mouth_box", "measure_mouth_open", "draw_portrait", "HAIR_STYLES",
    "Layout", "layout", "smooth", "MAX_SECONDS", "MAX_VIDEOS",
]
