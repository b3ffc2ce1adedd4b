"""Portrait + speech -> long talking video, clip by clip.

A bundle directory holds everything a render needs:

    bundle/
      pipeline.json      fps, sample rate, audio limit, diffusion settings
      transformer/       LetsTalkTransformer (config.json + safetensors)
      vae/               AutoencoderKL (diffusers), or a SpaceToDepthCodec (config.json [+ basis.safetensors])
      audio_encoder/     Wav2Vec2Model (transformers)

Long audio is rendered in clips of the model's frame count: clip k continues clip k-1 through
its last `num_motion_frames` clean latents (the first clip uses the reference latent), and the
last clip is rendered at its true, shorter length, so the video has exactly
round(duration × fps) frames and no padded frames.

Per request, the inputs are decoded, cropped and counted once (`prepare`, letstalk/inputs.py),
the reference latent is encoded once and the audio features are computed once for the whole
audio (iter_clips); every clip and step reuses them. Speed switches
(autocast, SDPA kernels, torch.compile, decode overlap, batching of concurrent renders) are
`InferenceOptions` (letstalk/accel.py), set with `set_inference`; all are off by default.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .accel import InferenceOptions, autocast, check_sdpa_backend, compile_transformer, inference_scope, overlapped
from .audio import AudioEncoder, LogMelEncoder, tiny_audio_encoder
from .batching import ClipBatcher
from .config import LetsTalkConfig
from .diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, ClipTarget, GaussianDiffusion
from .inputs import InputSpec, PreparedInputs, prepare, prepare_audio
from .media import write_video
from .paste import DEFAULT_MAX_SIDE, PasteBack
from .portrait import PortraitCrop, crop_portrait
from .revoice import condition, latent_mask
from .transformer import LetsTalkTransformer
from .vae import Codec, LatentCodec, SpaceToDepthCodec, tiny_codec

Progress = Callable[[int, int], None]


@dataclass
class PipelineSettings:
    """Stored as pipeline.json in a bundle."""

    fps: int = 25
    sample_rate: int = 16000
    max_audio_seconds: float = 600.0
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    # default sampling start: 1 = from pure noise; s < 1 = from the last motion frame (the reference
    # for the first clip) noised to t = s·T (GaussianDiffusion.sample's x_init/strength)
    strength: float = 1.0
    # the model denoises the clip minus the reference latent (trained with TrainConfig.residual):
    # the sample plus the reference is the clip
    residual: bool = False
    # x0 = (clip - base) · residual_scale (ClipTarget): the sample divided by it, plus the base, is the clip
    residual_scale: float = 1.0
    residual_base: str = "portrait"  # the residual's base: the portrait or the clip's last motion frame (ClipTarget)
    prediction: str = "epsilon"  # what the network predicts: "epsilon", "v_prediction" or "sample" (x0; GaussianDiffusion)
    # how this model renders when a request does not say (`sampling`): a distilled student records the
    # sampler and step count it was distilled for (jobs/distill.py: ddim, 2); None: DDIM-25
    sampler: str | None = None
    steps: int | None = None


@dataclass
class RenderResult:
    num_frames: int
    fps: int
    face_found: bool
    seconds: dict[str, float] = field(default_factory=dict)  # inputs, audio, denoise, decode, mux, total
    frames: np.ndarray | None = None  # (N, H, W, 3) uint8 when rendered to memory
    audio: np.ndarray | None = None  # (samples,) float32 at the pipeline's sample rate


class LetsTalkPipeline:
    def __init__(self, transformer: LetsTalkTransformer, codec: Codec, audio_encoder: AudioEncoder,
                 settings: PipelineSettings | None = None):
        self.transformer = transformer.eval()
        self.inference = InferenceOptions()  # speed switches, all off (set_inference)
        self._batcher: ClipBatcher | None = None
        self.codec, self.audio_encoder = codec, audio_encoder
        self.settings = settings or PipelineSettings()
        s = self.settings
        self.diffusion = GaussianDiffusion(s.num_timesteps, s.beta_start, s.beta_end, transformer.cfg.learn_sigma,
                                           prediction=s.prediction)
        self.target = ClipTarget(s.residual, s.residual_scale, s.residual_base)
        self._check_components()

    def _check_components(self) -> None:
        cfg = self.transformer.cfg
        enc = self.audio_encoder
        if (cfg.audio_layers, cfg.audio_feature_dim, cfg.audio_window) != (enc.num_layers, enc.hidden_size, enc.window):
            raise ValueError(f"audio encoder gives {enc.num_layers} layers × {enc.hidden_size} features, window "
                             f"{enc.window}; the transformer expects {cfg.audio_layers} × {cfg.audio_feature_dim}, "
                             f"window {cfg.audio_window}")
        if self.codec.latent_channels != cfg.in_channels:
            raise ValueError(f"codec has {self.codec.latent_channels} latent channels, transformer {cfg.in_channels}")

    def sampling(self, sampler: str | None = None, steps: int | None = None) -> tuple[str, int]:
        """(sampler, steps) for a render: what is given, else this bundle's pipeline.json (a distilled
        student's few steps), else DDIM-25. The bundle's step count goes only with its own sampler
        (ddpm asked of a 2-step student renders 25 steps, not 2)."""
        own = self.settings.sampler or DEFAULT_SAMPLER
        sampler = sampler or own
        if steps is None:
            steps = self.settings.steps if sampler == own and self.settings.steps else DEFAULT_STEPS
        return sampler, steps

    @property
    def image_size(self) -> int:
        return self.transformer.cfg.input_size * self.codec.downsample

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # ------------------------------------------------------------------ bundle I/O

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the bundle to `path` (via a temporary directory renamed when complete)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.transformer.save_pretrained(tmp / "transformer")
        self.codec.save_pretrained(tmp / "vae")
        self.audio_encoder.save_pretrained(tmp / "audio_encoder")
        (tmp / "pipeline.json").write_text(json.dumps(asdict(self.settings), indent=2))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None,
                        inference: InferenceOptions | dict | None = None) -> "LetsTalkPipeline":
        path = Path(path)
        if not (path / "pipeline.json").is_file():
            raise ValueError(f"{path} is not a LetsTalk bundle (no pipeline.json)")
        settings = PipelineSettings(**json.loads((path / "pipeline.json").read_text()))
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        transformer = LetsTalkTransformer.from_pretrained(path / "transformer", **kwargs)
        codec = LatentCodec.from_pretrained(path / "vae", dtype=dtype)  # either codec kind
        audio_encoder = AudioEncoder.from_pretrained(path / "audio_encoder", window=transformer.cfg.audio_window)
        pipe = cls(transformer, codec, audio_encoder, settings)
        pipe = pipe.to(device) if device is not None else pipe
        if inference is not None:
            pipe.set_inference(inference)
        return pipe

    def to(self, device: str | torch.device) -> "LetsTalkPipeline":
        self.transformer.to(device)
        self.codec.to(device)
        self.audio_encoder.model.to(device)
        return self

    @classmethod
    def init_tiny(cls, seed: int = 0) -> "LetsTalkPipeline":
        """Random-initialised tiny bundle (64×64 frames, 8-frame clips) for tests and demos."""
        torch.manual_seed(seed)
        transformer = LetsTalkTransformer.from_preset("tiny")
        return cls(transformer, tiny_codec(seed), tiny_audio_encoder(transformer.cfg.audio_feature_dim,
                                                                     transformer.cfg.audio_layers, seed))

    @classmethod
    def init_demo(cls, seed: int = 0) -> "LetsTalkPipeline":
        """Random-initialised `demo` bundle: 48×48 frames through the lossless space-to-depth codec
        (factor 4), the tiny audio encoder, 8-frame clips. Preprocessing with it gives the demo's data;
        training fills in the transformer (docs/demo-model.md)."""
        torch.manual_seed(seed)
        transformer = LetsTalkTransformer.from_preset("demo")
        codec = SpaceToDepthCodec(factor=4)  # 48 channels = the preset's in_channels (checked below)
        return cls(transformer, codec, tiny_audio_encoder(transformer.cfg.audio_feature_dim,
                                                          transformer.cfg.audio_layers, seed))

    @classmethod
    def init_avatar(cls, frames: np.ndarray, seed: int = 0, preset: str = "avatar",
                    audio_encoder: AudioEncoder | None = None) -> "LetsTalkPipeline":
        """Random-initialised person-specific bundle (docs/avatar.md): the space-to-depth codec with a
        PCA basis fitted to `frames` (N, S, S, 3) uint8 face crops of the person — factor S / the
        preset's latent size, as many components as the preset has latent channels — and the audio
        features of `audio_encoder` (default: the preset's log-mel; a pretrained Whisper sizes the
        transformer's audio input to its states and window); preprocessing the person's footage with
        it gives the data, training fills in the transformer."""
        torch.manual_seed(seed)
        cfg = LetsTalkConfig.from_name(preset)
        if audio_encoder is None:
            audio_encoder = LogMelEncoder(n_mels=cfg.audio_feature_dim, window=cfg.audio_window)
        transformer = LetsTalkTransformer.from_preset(preset, audio_layers=audio_encoder.num_layers,
                                                      audio_feature_dim=audio_encoder.hidden_size,
                                                      audio_window=audio_encoder.window)
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[1] != frames.shape[2] or frames.shape[1] % cfg.input_size:
            raise ValueError(f"frames must be square crops (N, S, S, 3) with S a multiple of {cfg.input_size}, "
                             f"got {frames.shape}")
        codec = SpaceToDepthCodec.fit(frames, factor=frames.shape[1] // cfg.input_size, channels=cfg.in_channels)
        return cls(transformer, codec, audio_encoder)

    # ------------------------------------------------------------------ speed switches

    def set_inference(self, options: InferenceOptions | dict | None = None, **changes) -> InferenceOptions:
        """Apply speed switches (letstalk/accel.py) to this pipeline, on its current device.

        `options` replaces the current ones (a dict is checked for unknown keys); keyword `changes`
        edit single fields, e.g. `pipe.set_inference(dtype="bf16")`. Checks that the device can run
        them (fp16 needs CUDA; the SDPA backend is tried once) and raises a one-line ValueError if
        not. Call it before rendering, not while renders run.
        """
        if isinstance(options, dict):
            options = InferenceOptions.from_dict(options)
        elif options is not None and not isinstance(options, InferenceOptions):
            raise ValueError(f"options must be InferenceOptions or a dict, got {type(options).__name__}")
        options = options or self.inference
        if changes:
            options = InferenceOptions.from_dict(options.to_dict() | changes)
        device, cfg = self.device, self.transformer.cfg
        autocast(options.dtype, device)  # ValueError for fp16 off CUDA
        check_sdpa_backend(options.sdpa_backend, device, options.dtype, cfg.hidden_size // cfg.num_heads)
        if (options.compile, options.compile_backend) != (self.inference.compile, self.inference.compile_backend):
            compile_transformer(self.transformer, options.compile, options.compile_backend)
        self._batcher = (ClipBatcher(self.transformer.forward_with_guidance, options.max_batch, options.batch_wait_ms)
                         if options.batch_clips else None)
        self.inference = options
        return options

    @property
    def batcher(self) -> ClipBatcher | None:
        """The batcher that merges concurrent renders' forward passes (InferenceOptions.batch_clips)."""
        return self._batcher

    # ------------------------------------------------------------------ inputs

    def input_spec(self, max_audio_seconds: float | None = None, max_image_pixels: int = 40_000_000) -> InputSpec:
        """What this bundle needs from its inputs; a deployment may lower the audio limit."""
        s = self.settings
        limit = min(s.max_audio_seconds, max_audio_seconds) if max_audio_seconds else s.max_audio_seconds
        return InputSpec(self.image_size, s.sample_rate, s.fps, self.transformer.cfg.num_frames, limit,
                         max_image_pixels)

    def prepare(self, portrait, audio=None, spec: InputSpec | None = None) -> PreparedInputs:
        """Inputs decoded, cropped and counted once (letstalk.inputs.prepare), plus the reference
        latent. `portrait` may be PreparedInputs already (then `audio` is None): only the latent is added."""
        if isinstance(portrait, PreparedInputs):
            if audio is not None:
                raise ValueError("give PreparedInputs alone, or a portrait and an audio")
            inputs = portrait
        else:
            inputs = prepare(portrait, audio, spec or self.input_spec())
        if inputs.reference is None:
            inputs.reference = self.codec.encode(inputs.crop.image[None]).to(self.device)
        return inputs

    def prepare_portrait(self, portrait) -> tuple[torch.Tensor, PortraitCrop]:
        """Image path / array / PIL image -> reference latent (1, C, h, w) and the crop."""
        crop = crop_portrait(portrait, size=self.image_size)
        return self.codec.encode(crop.image[None]).to(self.device), crop

    # ------------------------------------------------------------------ rendering

    def iter_clips(self, portrait, audio=None, *, steps: int | None = None, sampler: str | None = None,
                   guidance: float = 1.0,
                   seed: int = 0, strength: float | None = None, progress: Progress | None = None,
                   seconds: dict[str, float] | None = None) -> Iterator[np.ndarray]:
        """Yield the video clip by clip as uint8 frames (f, H, W, 3).

        portrait: PreparedInputs (audio None), image path / array / PIL image, or a reference latent
        (1, C, h, w). audio: audio path or (samples,) float array at the pipeline's sample rate.
        `steps`, `sampler`: None takes the bundle's (`sampling`).
        `progress(done, total)` counts denoising steps over the whole video; `seconds` (if given)
        accumulates time spent in audio encoding, denoising and VAE decoding. `strength` (default:
        the bundle's pipeline.json) < 1 starts each clip from its last motion frame noised to
        t = strength·T instead of from pure noise.
        """
        sampler, steps = self.checked_sampling(sampler, steps)
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        seconds = {} if seconds is None else seconds
        if isinstance(portrait, torch.Tensor):  # a reference latent: only the audio is prepared here
            spec = self.input_spec()
            ref, wave = portrait, prepare_audio(audio, spec)
            num_frames = spec.frames_for(wave.size)
            if num_frames < 1:
                raise ValueError(f"audio: {wave.size / self.settings.sample_rate * 1000:.0f} ms is too short to give "
                                 "a single video frame")
        else:
            inputs = self.prepare(portrait, audio)
            ref, wave, num_frames = inputs.reference, inputs.audio, inputs.num_frames
        t0 = time.perf_counter()
        feats = self.audio_encoder(wave, num_frames).to(self.device)  # (N, window, layers, A)
        seconds["audio"] = seconds.get("audio", 0.0) + time.perf_counter() - t0
        clips = self.denoise_clips(ref, feats, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                                   strength=strength, progress=progress, seconds=seconds)

        def decode(latents: torch.Tensor) -> np.ndarray:  # (1, f, C, h, w) -> (f, H, W, 3)
            t0 = time.perf_counter()
            frames = self.codec.decode(latents[0])
            seconds["decode"] = seconds.get("decode", 0.0) + time.perf_counter() - t0
            return frames

        if self.inference.overlap_decode:
            # clip k decodes in a background thread while clip k+1 denoises; the "decode" and "denoise"
            # seconds then overlap in time
            yield from overlapped(clips, decode)
        else:
            for latents in clips:
                yield decode(latents)

    def checked_sampling(self, sampler: str | None, steps: int | None) -> tuple[str, int]:
        """`sampling`, with the sampler and step count checked (a one-line ValueError) before any work."""
        sampler, steps = self.sampling(sampler, steps)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.diffusion.make_scheduler(sampler, steps, self.codec.sample_range)  # validates steps
        return sampler, steps

    @property
    def revoices(self) -> bool:
        """Whether this bundle re-voices footage (its transformer has condition channels: letstalk.revoice)."""
        return bool(self.transformer.cfg.cond_channels)

    def iter_revoice(self, crops: np.ndarray, audio, reference: np.ndarray | torch.Tensor, *, steps: int | None = None,
                     sampler: str | None = None, guidance: float = 1.0, seed: int = 0,
                     progress: Progress | None = None, seconds: dict[str, float] | None = None) -> Iterator[np.ndarray]:
        """Re-voice footage: yield the generated crops clip by clip, (f, S, S, 3) uint8.

        crops: (N, S, S, 3) uint8 face crops of the footage at the bundle's size, one per output frame
        (loop shorter footage with letstalk.revoice.pingpong); audio: path or (samples,) float array of
        the new speech, giving at least N frames (the first N are used); reference: a crop (S, S, 3) or
        its latent (1, C, h, w), a typical frame of the person. Keep only the lower face of each generated
        crop (letstalk.revoice.Composite): the rest is the model's copy of the frame it was shown.
        """
        if not self.revoices:
            raise ValueError("this bundle does not re-voice footage (its transformer has no condition channels)")
        sampler, steps = self.checked_sampling(sampler, steps)
        crops = np.asarray(crops)
        s = self.image_size
        if crops.ndim != 4 or crops.shape[1:] != (s, s, 3) or crops.dtype != np.uint8 or not len(crops):
            raise ValueError(f"crops must be (N, {s}, {s}, 3) uint8 frames, got {crops.shape} {crops.dtype}")
        seconds = {} if seconds is None else seconds
        spec = self.input_spec()
        wave = prepare_audio(audio, spec)
        if spec.frames_for(wave.size) < len(crops):
            raise ValueError(f"audio: {wave.size / spec.sample_rate:.2f} s gives {spec.frames_for(wave.size)} frames, "
                             f"fewer than the {len(crops)} footage frames to re-voice")
        if isinstance(reference, torch.Tensor):
            ref = reference.to(self.device)
        else:
            ref = self.codec.encode(np.asarray(reference, np.uint8)[None]).to(self.device)
        t0 = time.perf_counter()
        feats = self.audio_encoder(wave, len(crops)).to(self.device)
        t1 = time.perf_counter()
        footage = self.codec.encode(crops).to(self.device)
        seconds["audio"] = seconds.get("audio", 0.0) + t1 - t0
        seconds["encode"] = seconds.get("encode", 0.0) + time.perf_counter() - t1
        for latents in self.denoise_clips(ref, feats, steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                                          strength=1.0, progress=progress, seconds=seconds, footage=footage):
            t0 = time.perf_counter()
            frames = self.codec.decode(latents[0])
            seconds["decode"] = seconds.get("decode", 0.0) + time.perf_counter() - t0
            yield frames

    def denoise_clips(self, ref: torch.Tensor, feats: torch.Tensor, *, steps: int, sampler: str, guidance: float,
                      seed: int, strength: float | None = None, progress: Progress | None = None,
                      seconds: dict[str, float] | None = None, footage: torch.Tensor | None = None
                      ) -> Iterator[torch.Tensor]:
        """Reference latent (1, C, h, w) + audio features (N, window, layers, A) -> latent clips (1, f, C, h, w).

        Clip k's motion frames are the last clean latents of clip k-1 (the reference latent for
        the first clip); the last clip has N mod num_frames frames when that is not zero.
        footage: (N, C, h, w) latents of the frames to re-voice, one per output frame, for a model with
        condition channels (letstalk.revoice): each frame is generated seeing its own with the lower face
        masked.
        """
        cfg = self.transformer.cfg
        if bool(cfg.cond_channels) != (footage is not None):
            raise ValueError("a re-voicing model (cond_channels > 0) renders over footage: give footage latents"
                             if cfg.cond_channels else "footage given, but this model does not re-voice")
        if footage is not None and (footage.shape[0] != feats.shape[0] or tuple(footage.shape[1:]) != tuple(ref.shape[1:])):
            raise ValueError(f"footage must have one latent per audio frame, ({feats.shape[0]}, "
                             f"{', '.join(map(str, ref.shape[1:]))}), got {tuple(footage.shape)}")
        mask = latent_mask(cfg.input_size).to(self.device) if footage is not None else None
        seconds = {} if seconds is None else seconds
        num_frames, clip_len, m = feats.shape[0], cfg.num_frames, cfg.num_motion_frames
        starts = list(range(0, num_frames, clip_len))
        total_steps = steps * len(starts)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        motion = ref[:, None].expand(1, m, *ref.shape[1:]) if m else None  # (1, M, C, h, w)
        strength = self.settings.strength if strength is None else strength
        target = self.target
        forward, session = self._forward()
        for k, start in enumerate(starts):
            f = min(clip_len, num_frames - start)
            audio_clip = feats[None, start:start + f]  # (1, f, window, layers, A)
            noise = torch.randn((1, f, *ref.shape[1:]), generator=generator, device=self.device)

            extra = {} if mask is None else {"cond": condition(footage[None, start:start + f].to(self.device), mask)}

            def model_fn(x, t, audio_clip=audio_clip, motion=motion, extra=extra):
                return forward(x, t, ref, audio_clip, motion, guidance=guidance, **extra)

            done = k * steps
            t0 = time.perf_counter()
            last = ref if motion is None else motion[:, -1]  # (1, C, h, w): the frame the clip continues
            base = target.base_latent(ref, motion)
            with session():  # this render is in flight for the batcher while its clip denoises
                latents = self.diffusion.sample(
                    model_fn, noise, sampler=sampler, steps=steps, generator=generator,
                    clip_range=target.sample_range(self.codec.sample_range),
                    x_init=target.encode(last[:, None], base).expand_as(noise) if strength < 1 else None,
                    strength=strength,
                    progress=None if progress is None else (lambda i, n, done=done: progress(
                        done + round(i * steps / n), total_steps)))
            latents = target.decode(latents, base)
            seconds["denoise"] = seconds.get("denoise", 0.0) + time.perf_counter() - t0
            if m:
                motion = torch.cat([motion, latents], dim=1)[:, -m:]
            yield latents

    def _forward(self) -> tuple[Callable[..., torch.Tensor], Callable[[], contextlib.AbstractContextManager]]:
        """The denoiser call for this pipeline's InferenceOptions — forward(x, t, portrait, audio,
        motion, guidance=) -> (B, F, C', H, W) — and the batcher-session context for one clip."""
        opts, device = self.inference, self.device
        batcher = self._batcher
        inner = self.transformer.forward_with_guidance if batcher is None else batcher
        session = contextlib.nullcontext if batcher is None else batcher.session
        if opts.dtype == "fp32" and opts.sdpa_backend == "auto":
            return inner, session

        def forward(*args, **kwargs):
            with inference_scope(opts, device):
                return inner(*args, **kwargs)

        return forward, session

    def render(self, portrait, audio=None, **kwargs) -> RenderResult:
        """Render to memory: RenderResult.frames (N, H, W, 3) uint8 and .audio. `portrait` and
        `audio` as for `prepare` (PreparedInputs alone, or the two inputs)."""
        t0 = time.perf_counter()
        inputs = self.prepare(portrait, audio)
        seconds: dict[str, float] = {"inputs": time.perf_counter() - t0}
        frames = np.concatenate(list(self.iter_clips(inputs, seconds=seconds, **kwargs)))
        seconds["total"] = time.perf_counter() - t0
        return RenderResult(len(frames), self.settings.fps, inputs.face_found, seconds, frames, inputs.audio)

    def render_to_file(self, portrait, audio, out: str | os.PathLike, *, paste_back: bool | None = False,
                       max_side: int = DEFAULT_MAX_SIDE, stream: bool = False, **kwargs) -> RenderResult:
        """Render straight into an mp4 (H.264 + AAC), streaming clips to ffmpeg as they finish.
        `portrait` and `audio` as for `prepare` (PreparedInputs and None, or the two inputs).
        `paste_back`: the video has the portrait's size (longer side at most `max_side`), the generated
        face composited into it (letstalk.paste.PasteBack); None: so when the portrait is larger than the
        model's crop (PreparedInputs.pastes_back). PreparedInputs must carry the photo for it.

        The file appears at `out` only when complete; with `stream`, `out` is a fragmented mp4 that
        grows as the clips are rendered (a player can start on it; removed if the render fails).
        """
        t0 = time.perf_counter()
        inputs = self.prepare(portrait, audio)  # keeps the decoded photo: it is not decoded again below
        paste = None
        if inputs.pastes_back(paste_back):
            if inputs.photo is None:
                raise ValueError("paste-back needs the portrait image; these PreparedInputs carry no photo")
            paste = PasteBack(inputs.photo, inputs.crop.box, max_side=max_side)
        seconds: dict[str, float] = {"inputs": time.perf_counter() - t0}
        count = 0

        def frames():
            nonlocal count
            for clip in self.iter_clips(inputs, seconds=seconds, **kwargs):
                count += len(clip)
                yield from (map(paste, clip) if paste else clip)

        write_video(out, frames(), fps=self.settings.fps, audio=inputs.audio, sample_rate=self.settings.sample_rate,
                    stream=stream)
        seconds["total"] = time.perf_counter() - t0
        seconds["mux"] = max(0.0, seconds["total"] - sum(seconds.get(k, 0.0) for k in ("inputs", "audio", "denoise", "decode")))
        return RenderResult(count, self.settings.fps, inputs.face_found, seconds)
