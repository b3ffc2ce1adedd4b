"""The renderer shared by the HTTP service and the batch job: portrait + speech -> mp4.

`RenderWorker` is plain Python (no Ray): the Serve `Renderer` deployment and the Ray Data actors
of `jobs/render_batch.py --standalone` both wrap it, so online and batch renders run the same code.
Inputs arrive prepared (letstalk.inputs.PreparedInputs: the HTTP ingress prepares uploads once, at
the edge) or as file bytes (a batch row), prepared here once. The mp4 is written once, where it will
be served from; only a caller on another machine gets its bytes back.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import get_type_hints

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from letstalk.accel import InferenceOptions
from letstalk.diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS, Sampler
from letstalk.inputs import PreparedInputs, PreparedSpeech, prepare, prepare_speech
from letstalk.paste import DEFAULT_MAX_SIDE
from letstalk.pipeline import LetsTalkPipeline

from .runtime import flag_kwargs

APP_NAME = "letstalk"  # the Serve application's default name (jobs/serve.py, jobs/render_batch.py)
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MIN_SIDE, MAX_SIDE = 16, 4096  # the bounds of a request's max_side: PasteBack's least, and 4K
PASTE_BACK_HELP = ("paste the generated face back into the portrait: the video has the portrait's size; "
                   "false: the square face crop at the model's size (default: auto, on when the portrait is "
                   "larger than the model's crop)")
MAX_SIDE_HELP = (f"with paste-back, the video's longer side at most, {MIN_SIDE}..{MAX_SIDE} "
                 f"(default {DEFAULT_MAX_SIDE}); a larger portrait is scaled down")
STREAM_HELP = ("write the mp4 as it renders (fragmented: one fragment per frame) and serve it at "
               "GET /v1/renders/{id}/stream meanwhile, so a player starts before the render ends; the "
               "finished video is that fragmented mp4")


class RenderDefaults(BaseModel):
    """Settings a request may leave out; the Serve deployment's user_config (changeable live)."""

    model_config = ConfigDict(extra="forbid")
    steps: int | None = Field(None, ge=1, le=1000, description="denoising steps (None: the model's pipeline.json, "
                              f"e.g. a distilled student's 2; else {DEFAULT_STEPS})")
    sampler: Sampler | None = Field(None, description=f"None: the model's pipeline.json, else {DEFAULT_SAMPLER}")
    guidance: float = Field(1.0, ge=0.0, le=20.0, description="audio classifier-free guidance scale")


class RenderOptions(BaseModel):
    """Per-request options; None means the renderer's default."""

    model_config = ConfigDict(extra="forbid")
    steps: int | None = Field(None, ge=1, le=1000)
    sampler: Sampler | None = None
    guidance: float | None = Field(None, ge=0.0, le=20.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    paste_back: bool | None = Field(None, description=PASTE_BACK_HELP)
    max_side: int | None = Field(None, ge=MIN_SIDE, le=MAX_SIDE, description=MAX_SIDE_HELP)
    stream: bool = Field(False, description=STREAM_HELP)

    def resolve(self, defaults: RenderDefaults) -> dict:
        """The pipeline's keyword arguments; paste_back stays None (auto) until the inputs are known."""
        return {"steps": self.steps or defaults.steps, "sampler": self.sampler or defaults.sampler,
                "guidance": defaults.guidance if self.guidance is None else self.guidance, "seed": self.seed,
                "paste_back": self.paste_back, "max_side": self.max_side or DEFAULT_MAX_SIDE, "stream": self.stream}


SPEED_FLAGS = {  # flag -> letstalk.accel.InferenceOptions field, with what the flag is for
    "--dtype": ("dtype", "autocast of the denoiser (fp16: CUDA only)"),
    "--sdpa-backend": ("sdpa_backend", "attention kernel"),
    "--compile": ("compile", "torch.compile each transformer block (regional) or the whole transformer"),
    "--overlap-decode": ("overlap_decode", "decode clip k while clip k+1 denoises"),
    "--batch-clips": ("batch_clips", "merge the denoising steps of a renderer's concurrent renders into one batch"),
    "--max-batch": ("max_batch", "most clips in one merged forward pass"),
    "--batch-wait-ms": ("batch_wait_ms", "how long a step waits for others to join"),
}


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    """The speed-switch flags of jobs/serve.py and jobs/render_batch.py. Types, choices and
    defaults come from letstalk.accel.InferenceOptions (the only place they are written); an
    absent flag is absent from the parsed namespace."""
    fields = {f.name: f for f in dataclasses.fields(InferenceOptions)}
    hints = get_type_hints(InferenceOptions)
    speed = parser.add_argument_group("speed switches (letstalk.accel.InferenceOptions; all off by default)")
    for flag, (name, what) in SPEED_FLAGS.items():
        kwargs = flag_kwargs(hints[name]) | {"dest": f"inference.{name}", "default": argparse.SUPPRESS,
                                             "help": f"{what} (default {fields[name].default})"}
        if "type" in kwargs and "choices" not in kwargs:
            kwargs["metavar"] = name.upper()
        speed.add_argument(flag, **kwargs)


def speed_options(args: argparse.Namespace) -> dict:
    """The parsed speed flags as an InferenceOptions dict (validated: a one-line ValueError)."""
    given = {k.removeprefix("inference."): v for k, v in vars(args).items() if k.startswith("inference.")}
    return InferenceOptions.from_dict(given).to_dict()


def check_renderer_device(inference: dict, use_gpu: bool) -> None:
    """A one-line ValueError when renderers without a GPU are asked for fp16 (CUDA-only autocast),
    before any renderer starts."""
    if inference["dtype"] == "fp16" and not use_gpu:
        raise ValueError("inference dtype fp16 needs use_gpu (CPU renderers: fp32 or bf16)")


class RenderCancelled(Exception):
    """Raised inside a render when its caller gave up on it."""


def one_line(e: BaseException, limit: int = 500) -> str:
    """An exception as one line of at most `limit` characters (for JSON errors and result tables)."""
    return " ".join(str(e).split())[:limit] or type(e).__name__


def check_name(name: str, what: str = "name") -> str:
    """A user-supplied name that will become part of a file name: a plain name or a ValueError."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} {name!r} must be a plain name: 1-100 of A-Z a-z 0-9 . _ - "
                         f"(no path parts, not starting with '.' or '-')")
    return name


class RenderWorker:
    """One loaded pipeline; `render` is safe to call from several threads at once.

    `inference` (letstalk.accel.InferenceOptions or its dict) switches on autocast, SDPA kernels,
    torch.compile, decode overlap and batching of the concurrent renders' clips (batch_clips).
    """

    def __init__(self, bundle_dir: str | os.PathLike, *, device: str | None = None,
                 defaults: RenderDefaults | None = None, max_audio_seconds: float | None = None,
                 max_image_pixels: int = 40_000_000, inference: InferenceOptions | dict | None = None):
        self.bundle_dir = Path(bundle_dir)
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = LetsTalkPipeline.from_pretrained(self.bundle_dir, device=device, inference=inference)
        self.device = device
        self.defaults = defaults or RenderDefaults()
        self.spec = self.pipe.input_spec(max_audio_seconds, max_image_pixels)
        self.footage = None
        if self.pipe.revoices:  # a re-voicing avatar: its footage, decoded and tracked once
            from letstalk.faces import FaceSettings
            from letstalk.footage import bundle_footage, load_footage

            video, faces = bundle_footage(self.bundle_dir)
            self.footage = load_footage(video, FaceSettings(**faces), fps=self.pipe.settings.fps)

    def render(self, portrait: PreparedInputs | PreparedSpeech | bytes | np.ndarray | str | None,
               audio: bytes | np.ndarray | str | None = None,
               options: RenderOptions | dict | None = None, *, out: str | os.PathLike | None = None,
               progress: Callable[[int, int, float], None] | None = None,
               cancelled: Callable[[], bool] | None = None) -> dict:
        """Render one video. Inputs: PreparedInputs (audio None), or a portrait and an audio as
        file bytes, arrays or paths (prepared here, once). With paste-back (options' paste_back, auto
        by default) the video has the portrait's size: PreparedInputs must then carry the photo. A
        re-voicing avatar (a bundle with footage) takes PreparedSpeech or the speech alone (portrait
        None): the video is its footage, at the footage's size, speaking it.

        The mp4 is written to `out` when its folder is on this machine (the caller serves it from
        there); otherwise (no `out`, or a caller on another node) its bytes come back in the result.
        With options' `stream`, the mp4 is fragmented and grows at its path as the clips are rendered
        (a caller that wants its bytes early reads them from there: Renderer.render_stream).
        `progress(clips_done, clips_total, fraction)` is called as denoising advances; when
        `cancelled()` turns true the render stops with RenderCancelled. Returns the result dict
        (status "done") that Serve calls and Ray Data rows carry back.
        """
        t0 = time.perf_counter()
        opts = options if isinstance(options, RenderOptions) else RenderOptions.model_validate(options or {})
        kwargs = opts.resolve(self.defaults)
        kwargs["sampler"], kwargs["steps"] = self.pipe.sampling(kwargs["sampler"], kwargs["steps"])  # the bundle's
        if self.footage is not None:  # a re-voicing avatar: the speech over its footage, at the footage's size
            from letstalk.footage import revoice_video

            inputs = self._speech(portrait, audio)
            kwargs.update(paste_back=False, max_side=None)

            def write(path: Path, on_step) -> tuple[int, dict]:
                seconds: dict[str, float] = {}
                revoice_video(self.pipe, self.footage, inputs.audio, path, steps=kwargs["steps"],
                              sampler=kwargs["sampler"], guidance=kwargs["guidance"], seed=kwargs["seed"],
                              stream=kwargs["stream"], progress=on_step, seconds=seconds)
                return inputs.num_frames, seconds
        else:
            if portrait is None or isinstance(portrait, PreparedSpeech):
                raise ValueError("portrait: this model animates a portrait: give a portrait image with the speech")
            inputs = portrait if isinstance(portrait, PreparedInputs) else prepare(portrait, audio, self.spec)
            kwargs["paste_back"] = inputs.pastes_back(kwargs["paste_back"])  # auto decided: the result says which

            def write(path: Path, on_step) -> tuple[int, dict]:
                result = self.pipe.render_to_file(inputs, None, path, progress=on_step, **kwargs)
                return result.num_frames, result.seconds
        steps = kwargs["steps"]

        def on_step(done: int, total: int) -> None:
            if cancelled is not None and cancelled():
                raise RenderCancelled("cancelled")
            if progress is not None:
                progress(done // steps, inputs.num_clips, done / total)

        local = out is not None and Path(out).parent.is_dir()
        with tempfile.TemporaryDirectory(prefix="letstalk-out-") as tmp:
            path = Path(out) if local else Path(tmp) / "video.mp4"
            frames, seconds = write(path, on_step)
            video = None if local else path.read_bytes()
        return {"status": "done", "video_path": str(path) if local else None, "video": video,
                "frames": frames, "clips": inputs.num_clips, "duration_s": inputs.duration_s,
                "face_found": inputs.face_found, "options": dict(kwargs, dtype=self.pipe.inference.dtype),
                "seconds": dict(seconds, worker_total=time.perf_counter() - t0)}

    def _speech(self, speech, audio) -> PreparedSpeech:
        """A re-voicing avatar's request: PreparedSpeech, or the speech alone as bytes, an array or a path."""
        if isinstance(speech, PreparedSpeech):
            return speech
        if speech is not None and audio is not None or isinstance(speech, PreparedInputs):
            raise ValueError("portrait: this model is a re-voicing avatar that speaks over its own footage: give the "
                             "speech alone")
        return prepare_speech(audio if audio is not None else speech, self.spec)

    def info(self) -> dict:
        cfg = self.pipe.transformer.cfg
        return {
            "bundle": str(self.bundle_dir),
            "device": str(self.device),
            "torch_threads": __import__("torch").get_num_threads(),
            "image_size": self.pipe.image_size,
            "fps": self.pipe.settings.fps,
            "sample_rate": self.pipe.settings.sample_rate,
            "clip_frames": cfg.num_frames,
            "motion_frames": cfg.num_motion_frames,
            "transformer": {"hidden_size": cfg.hidden_size, "depth": cfg.depth, "num_heads": cfg.num_heads,
                            "portrait_fusion": str(cfg.portrait_fusion), "audio_fusion": str(cfg.audio_fusion),
                            "parameters": sum(p.numel() for p in self.pipe.transformer.parameters())},
            "defaults": self.defaults.model_dump() | dict(zip(("sampler", "steps"), self.pipe.sampling(
                self.defaults.sampler, self.defaults.steps))),
            "inference": self.pipe.inference.to_dict(),
            "max_audio_seconds": self.spec.max_audio_seconds,
            "max_image_pixels": self.spec.max_image_pixels,
            # revoice: requests give the speech alone, spoken over the avatar's footage (`footage`)
            "mode": "portrait" if self.footage is None else "revoice",
            "footage": None if self.footage is None else {
                "frames": len(self.footage), "fps": self.footage.fps, "width": int(self.footage.frames.shape[2]),
                "height": int(self.footage.frames.shape[1])},
        }


class Cancel:
    """A thread-safe flag a caller sets to stop a render (see RenderWorker.render(cancelled=...))."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()
