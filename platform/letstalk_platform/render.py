"""The renderer shared by the HTTP service and the batch job: portrait + speech -> mp4 bytes.

`RenderWorker` is plain Python (no Ray): the Serve `Renderer` deployment and the Ray Data actors
of `jobs/render_batch.py --standalone` both wrap it, so online and batch renders run the same code.
Inputs arrive as file bytes (a batch row, an upload) or as already-decoded arrays (the HTTP
ingress decodes uploads to validate them); outputs come back as the bytes of a finished mp4.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from letstalk.accel import InferenceOptions
from letstalk.media import load_audio
from letstalk.pipeline import LetsTalkPipeline
from letstalk.portrait import load_image

Sampler = Literal["ddpm", "ddim", "dpm"]
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class RenderDefaults(BaseModel):
    """Settings a request may leave out; the Serve deployment's user_config (changeable live)."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(25, ge=1, le=1000)
    sampler: Sampler = "ddim"
    guidance: float = Field(1.0, ge=0.0, le=20.0)


class RenderOptions(BaseModel):
    """Per-request options; None means the renderer's default."""

    model_config = ConfigDict(extra="forbid")
    steps: int | None = Field(None, ge=1, le=1000)
    sampler: Sampler | None = None
    guidance: float | None = Field(None, ge=0.0, le=20.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    def resolve(self, defaults: RenderDefaults) -> dict:
        return {"steps": self.steps or defaults.steps, "sampler": self.sampler or defaults.sampler,
                "guidance": defaults.guidance if self.guidance is None else self.guidance, "seed": self.seed}


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    """The speed-switch flags of jobs/serve.py and jobs/render_batch.py (letstalk.accel.InferenceOptions)."""
    speed = parser.add_argument_group("speed switches (letstalk.accel.InferenceOptions; all off by default)")
    speed.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                       help="autocast of the denoiser (fp16: CUDA only)")
    speed.add_argument("--sdpa-backend", choices=["auto", "flash", "efficient", "math"], default="auto")
    speed.add_argument("--compile", choices=["none", "regional", "full"], default="none",
                       help="torch.compile each transformer block (regional) or the whole transformer")
    speed.add_argument("--overlap-decode", action="store_true", help="decode clip k while clip k+1 denoises")
    speed.add_argument("--batch-clips", action="store_true",
                       help="merge the denoising steps of a renderer's concurrent renders into one batch")
    speed.add_argument("--max-batch", type=int, default=4, help="most clips in one merged forward pass")
    speed.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a step waits for others to join")


def speed_options(args: argparse.Namespace) -> dict:
    """The parsed speed flags as an InferenceOptions dict (validated: a one-line ValueError)."""
    return InferenceOptions(dtype=args.dtype, sdpa_backend=args.sdpa_backend, compile=args.compile,
                            overlap_decode=args.overlap_decode, batch_clips=args.batch_clips,
                            max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms).to_dict()


def check_renderer_device(inference: dict, use_gpu: bool) -> None:
    """A one-line ValueError when renderers without a GPU are asked for fp16 (CUDA-only autocast),
    before any renderer starts."""
    if inference["dtype"] == "fp16" and not use_gpu:
        raise ValueError("inference dtype fp16 needs use_gpu (CPU renderers: fp32 or bf16)")


class RenderCancelled(Exception):
    """Raised inside a render when its caller gave up on it."""


@dataclass
class RenderOutput:
    video: bytes
    num_frames: int
    clips: int
    duration_s: float
    face_found: bool
    options: dict
    seconds: dict[str, float] = field(default_factory=dict)

    def result(self) -> dict:
        """The plain dict a Serve call or a Ray Data row carries back (status "done")."""
        return {"status": "done", "video": self.video, "frames": self.num_frames, "clips": self.clips,
                "duration_s": self.duration_s, "face_found": self.face_found, "options": self.options,
                "seconds": self.seconds}


def one_line(e: BaseException, limit: int = 500) -> str:
    """An exception as one line of at most `limit` characters (for JSON errors and result tables)."""
    return " ".join(str(e).split())[:limit] or type(e).__name__


def decode_file(data: bytes, what: str, load: Callable[[str], np.ndarray]) -> np.ndarray:
    """Uploaded bytes -> `load(path)` of a temporary file with our own name (the client's file name
    never becomes a path); a loader's ValueError comes back as one line naming `what`, not the path."""
    if not data:
        raise ValueError(f"{what}: the file is empty")
    with tempfile.TemporaryDirectory(prefix="letstalk-in-") as tmp:
        path = Path(tmp) / what
        path.write_bytes(data)
        try:
            return load(str(path))
        except ValueError as e:  # ImageError / MediaError
            raise ValueError(f"{what}: {one_line(e).replace(str(path), 'upload').replace(tmp, '')}") from None


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
        limit = self.pipe.settings.max_audio_seconds
        self.max_audio_seconds = min(limit, max_audio_seconds) if max_audio_seconds else limit
        self.max_image_pixels = max_image_pixels

    # ------------------------------------------------------------------ inputs

    def decode_portrait(self, portrait: bytes | np.ndarray) -> np.ndarray:
        """Image bytes (any format Pillow reads) or an array -> (H, W, 3) uint8; ImageError if not."""
        if isinstance(portrait, np.ndarray):
            return load_image(portrait, max_pixels=self.max_image_pixels)
        return decode_file(portrait, "portrait", lambda p: load_image(p, max_pixels=self.max_image_pixels))

    def decode_audio(self, audio: bytes | np.ndarray) -> np.ndarray:
        """Audio bytes (any format ffmpeg reads) or a float array -> mono float32; MediaError if not."""
        if isinstance(audio, np.ndarray):
            return self.pipe.prepare_audio(np.array(audio, dtype=np.float32))  # a writable copy
        rate = self.pipe.settings.sample_rate
        return decode_file(audio, "audio", lambda p: load_audio(p, rate, max_seconds=self.max_audio_seconds))

    # ------------------------------------------------------------------ render

    def clip_count(self, num_samples: int) -> tuple[int, int]:
        s, clip = self.pipe.settings, self.pipe.transformer.cfg.num_frames
        frames = round(num_samples / s.sample_rate * s.fps)
        return frames, -(-frames // clip)

    def render(self, portrait: bytes | np.ndarray, audio: bytes | np.ndarray, options: RenderOptions | dict | None = None,
               *, progress: Callable[[int, int, float], None] | None = None,
               cancelled: Callable[[], bool] | None = None) -> RenderOutput:
        """Render one video. `progress(clips_done, clips_total, fraction)` is called as denoising
        advances; when `cancelled()` turns true the render stops with RenderCancelled."""
        t0 = time.perf_counter()
        opts = options if isinstance(options, RenderOptions) else RenderOptions.model_validate(options or {})
        kwargs = opts.resolve(self.defaults)
        image, wave = self.decode_portrait(portrait), self.decode_audio(audio)
        frames, clips = self.clip_count(wave.size)
        steps = kwargs["steps"]

        def on_step(done: int, total: int) -> None:
            if cancelled is not None and cancelled():
                raise RenderCancelled("cancelled")
            if progress is not None:
                progress(done // steps, clips, done / total)

        with tempfile.TemporaryDirectory(prefix="letstalk-out-") as tmp:
            out = Path(tmp) / "video.mp4"
            result = self.pipe.render_to_file(image, wave, out, progress=on_step, **kwargs)
            video = out.read_bytes()
        seconds = dict(result.seconds, worker_total=time.perf_counter() - t0)
        return RenderOutput(video, result.num_frames, clips, wave.size / self.pipe.settings.sample_rate,
                            result.face_found, dict(kwargs, dtype=self.pipe.inference.dtype), seconds)

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
            "defaults": self.defaults.model_dump(),
            "inference": self.pipe.inference.to_dict(),
            "max_audio_seconds": self.max_audio_seconds,
            "max_image_pixels": self.max_image_pixels,
        }


class Cancel:
    """A thread-safe flag a caller sets to stop a render (see RenderWorker.render(cancelled=...))."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def __call__(self) -> bool:
        return self._event.is_set()
