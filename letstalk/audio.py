"""Speech features per video frame: wav2vec2 (the paper's), pretrained Whisper, or log-mel.

Every encoder gives (frames, layers, hidden) states, one row block per video frame, and
``AudioEncoder.__call__`` turns them into (frames, window, layers, hidden) windows of ±window//2
frames. Whisper's layout and its per-frame context: ``WhisperAudioEncoder``.

wav2vec2:
Following Hallo, the CNN features (50 Hz for 16 kHz audio) are linearly interpolated to the
number of video frames *before* the transformer, so every transformer layer runs at the video
frame rate; then frame i gets the window of frames i-2..i+2 (clamped at the edges).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2Model, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from .whisper import is_whisper_folder, load_whisper_encoder, tiny_whisper

DEFAULT_AUDIO_ENCODER = "facebook/wav2vec2-base-960h"


def window_indices(num_frames: int, window: int) -> torch.Tensor:
    """(num_frames, window) indices i - window//2 .. i + window//2, clamped to [0, num_frames)."""
    offsets = torch.arange(window) - window // 2
    return (torch.arange(num_frames)[:, None] + offsets[None]).clamp(0, num_frames - 1)


class AudioEncoder:
    """wav2vec2 -> (frames, window, layers, hidden) features aligned to the video frame rate.

    Args:
        model: a transformers Wav2Vec2Model (frozen; used in eval mode).
        sample_rate: the rate the model expects (16 kHz).
        window: audio frames per video frame (5: i-2..i+2).
    """

    def __init__(self, model: Wav2Vec2Model, sample_rate: int = 16000, window: int = 5):
        self.model = model.eval().requires_grad_(False)
        self.sample_rate, self.window = sample_rate, window
        # the CNN needs at least its receptive field of samples
        self.min_samples = self._receptive_field(model.config)
        self._hook_lock = threading.Lock()

    @staticmethod
    def _receptive_field(config: Wav2Vec2Config) -> int:
        field = 1
        for kernel, stride in zip(reversed(config.conv_kernel), reversed(config.conv_stride)):
            field = (field - 1) * stride + kernel
        return field

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike = DEFAULT_AUDIO_ENCODER, *, window: int = 5,
                        dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> "AudioEncoder":
        """A Wav2Vec2Model (a folder or a hub id), or a bundle's log-mel settings (a config.json that
        names `letstalk_audio_features`: LogMelEncoder, no weights)."""
        if is_whisper_folder(path_or_id):
            return WhisperAudioEncoder.from_pretrained(path_or_id, window=window, dtype=dtype, device=device)
        config = Path(path_or_id) / "config.json"
        if config.is_file():
            data = json.loads(config.read_text())
            if data.get("letstalk_audio_features") == LOG_MEL:
                del data["letstalk_audio_features"]
                encoder = LogMelEncoder(window=window, **data)
                if device is not None:
                    encoder.model.to(device)
                return encoder
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = Wav2Vec2Model.from_pretrained(path_or_id, **kwargs)
        if device is not None:
            model = model.to(device)
        return cls(model, window=window)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.model.save_pretrained(path)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def hidden_states(self, audio: np.ndarray | torch.Tensor, num_frames: int) -> torch.Tensor:
        """(samples,) mono float audio at `sample_rate` -> (num_frames, layers, hidden), one row per video frame."""
        x = torch.as_tensor(np.asarray(audio, dtype=np.float32) if isinstance(audio, np.ndarray) else audio)
        if x.ndim != 1:
            raise ValueError(f"audio must be mono with shape (samples,), got {tuple(x.shape)}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if x.numel() < self.min_samples:
            x = F.pad(x, (0, self.min_samples - x.numel()))
        # zero mean, unit variance: what Wav2Vec2FeatureExtractor(do_normalize=True) does
        x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        param = next(self.model.parameters())
        x = x.to(device=param.device, dtype=param.dtype)[None]  # (1, samples)

        feats = self.model.feature_extractor(x)  # (1, C, T50)
        feats = F.interpolate(feats.float(), size=num_frames, mode="linear", align_corners=True)
        hidden, _ = self.model.feature_projection(feats.transpose(1, 2).to(param.dtype))  # (1, frames, D)

        layers: list[torch.Tensor] = []
        with self._hook_lock:  # the hooks sit on the shared model: one caller at a time (Serve runs several)
            hooks = [layer.register_forward_hook(lambda m, a, out: layers.append(out[0] if isinstance(out, tuple)
                                                                                 else out))
                     for layer in self.model.encoder.layers]
            try:
                self.model.encoder(hidden)
            finally:
                for h in hooks:
                    h.remove()
        return torch.stack(layers, dim=2)[0].float()  # (1, frames, layers, D) -> (frames, layers, D)

    def __call__(self, audio: np.ndarray | torch.Tensor, num_frames: int) -> torch.Tensor:
        """(samples,) mono float audio -> (num_frames, window, layers, hidden)."""
        return self.hidden_states(audio, num_frames)[window_indices(num_frames, self.window)]


def windows_from_context(context: torch.Tensor, window: int) -> torch.Tensor:
    """(..., F + window - 1, layers, D) per-frame states incl. window//2 frames of context each side
    -> (..., F, window, layers, D). The stored layout of training shards (see letstalk.clips)."""
    f = context.shape[-3] - window + 1
    idx = torch.arange(f)[:, None] + torch.arange(window)[None]  # (F, window)
    return context[..., idx, :, :]


def tiny_audio_encoder(hidden_size: int = 32, num_layers: int = 4, seed: int = 0) -> AudioEncoder:
    """A random-initialised small wav2vec2 (standard 7-layer CNN front end, 50 Hz) for tests and demos."""
    torch.manual_seed(seed)
    config = Wav2Vec2Config(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=2,
        intermediate_size=2 * hidden_size, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, vocab_size=32,
    )
    return AudioEncoder(Wav2Vec2Model(config))


LOG_MEL = "log_mel"


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale, each summing to 1."""
    def mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    bank = np.maximum(0.0, np.minimum((freqs - lower) / (centre - lower), (upper - freqs) / (upper - centre)))
    bank /= np.maximum(bank.sum(axis=1, keepdims=True), 1e-12)
    return torch.from_numpy(bank.astype(np.float32))


class _MelBank(torch.nn.Module):
    """The filterbank and STFT window as buffers, so `.to(device)` moves them like a model."""

    def __init__(self, bank: torch.Tensor, win_length: int):
        super().__init__()
        self.register_buffer("bank", bank)
        self.register_buffer("window", torch.hann_window(win_length))


class LogMelEncoder(AudioEncoder):
    """Log-mel spectrogram features with the AudioEncoder interface: (frames, 1 layer, n_mels) per
    video frame, then windows of `window` frames. No weights; `save_pretrained` writes its settings.

    Each video frame gets the mel power averaged over the STFT frames (25 ms Hann windows every
    10 ms) centred inside it, then log; each mel bin is normalised to zero mean and unit variance
    over the utterance (cepstral mean-variance normalisation), which removes the recording's level
    and microphone colour. On the real clips (MEASUREMENTS.md) such features predict the mouth
    better than loudness or random-initialised wav2vec2 states.
    """

    def __init__(self, n_mels: int = 80, sample_rate: int = 16000, fps: int = 25, n_fft: int = 512,
                 win_length: int = 400, hop_length: int = 160, fmin: float = 55.0, fmax: float = 7600.0,
                 window: int = 5):
        if hop_length > sample_rate / fps:
            raise ValueError(f"hop_length {hop_length} is longer than a video frame ({sample_rate / fps:.0f} samples)")
        self.settings = {"n_mels": n_mels, "sample_rate": sample_rate, "fps": fps, "n_fft": n_fft,
                         "win_length": win_length, "hop_length": hop_length, "fmin": fmin, "fmax": fmax}
        self.model = _MelBank(mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax), win_length)
        self.sample_rate, self.window, self.fps = sample_rate, window, fps
        self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
        self.min_samples = n_fft

    @property
    def num_layers(self) -> int:
        return 1

    @property
    def hidden_size(self) -> int:
        return self.settings["n_mels"]

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"letstalk_audio_features": LOG_MEL, **self.settings}, indent=2))

    @torch.no_grad()
    def hidden_states(self, audio: np.ndarray | torch.Tensor, num_frames: int) -> torch.Tensor:
        """(samples,) mono float audio -> (num_frames, 1, n_mels) normalised log-mel, one row per video frame."""
        x = torch.as_tensor(np.asarray(audio, dtype=np.float32) if isinstance(audio, np.ndarray) else audio).float()
        if x.ndim != 1:
            raise ValueError(f"audio must be mono with shape (samples,), got {tuple(x.shape)}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        bank = self.model.bank
        x = x.to(bank.device)
        if x.numel() < self.min_samples:
            x = F.pad(x, (0, self.min_samples - x.numel()))
        spec = torch.stft(x, self.n_fft, self.hop_length, self.win_length, window=self.model.window, center=True,
                          return_complex=True).abs().pow(2)  # (freq, T): STFT frame j centred on sample j·hop
        power = bank @ spec  # (n_mels, T)
        # video frame i averages the STFT frames centred in [i, i+1) / fps (clamped at the audio's end)
        per_frame = self.sample_rate / self.fps / self.hop_length
        bounds = torch.ceil(torch.arange(num_frames + 1, dtype=torch.float64) * per_frame).long()
        bounds = bounds.clamp(max=power.shape[1] - 1)
        ends = torch.maximum(bounds[1:], bounds[:-1] + 1)
        cum = F.pad(power.double().cumsum(dim=1), (1, 0))
        frames = (cum[:, ends] - cum[:, bounds[:-1]]) / (ends - bounds[:-1]).double()  # (n_mels, num_frames)
        logmel = torch.log(frames.float() + 1e-8)
        logmel = (logmel - logmel.mean(dim=1, keepdim=True)) / (logmel.std(dim=1, keepdim=True, unbiased=False) + 1e-5)
        return logmel.T[:, None, :].contiguous()  # (num_frames, 1, n_mels)


WHISPER = "whisper"
WHISPER_SETTINGS = "letstalk_audio.json"
HOP = 160  # samples per log-mel frame at 16 kHz (10 ms); Whisper's second conv halves the rate to 50 Hz
N_FFT = 400


class WhisperAudioEncoder(AudioEncoder):
    """A pretrained Whisper encoder -> (frames, window, 2 · (layers + 1), hidden) per video frame.

    Whisper was trained to transcribe speech, so its states separate the sounds that shape a mouth:
    on the real clips a linear probe reads the mouth aperture from them at r 0.62-0.80 where log-mel
    reaches 0.45-0.56 (docs/avatar.md). As lip-sync models read it (MuseTalk, LatentSync): every
    hidden state (the embeddings and each layer's output, the last one layer-normed), 2 encoder steps
    (50 Hz) per video frame, and a window of ±2 frames: encoder steps 2i - 4 .. 2i + 5 for frame i.

    **Each frame has its own fixed context.** Whisper's positions are absolute, so the same second
    encoded at another place of a window gives other states (cosine 0.48 for a window that starts
    12 s earlier). Here video frame i (time i / fps) is encoded in a window of ±`context_steps`
    encoder steps centred on it (1 s each side by default; silence beyond the audio), and the
    log-mel's dynamic-range floor (max − 8, as Whisper's feature extractor) is taken per window too.
    So a frame's states depend on the audio within its context alone, never on where a file, a clip
    or a stream chunk starts. The cost: 2 · context_steps encoder steps per frame.

    Rows of a frame (`hidden_states`): its 2 encoder steps (at i / fps and 20 ms later), step-major,
    each with layers + 1 hidden states.

    Args:
        model: a transformers WhisperEncoder (frozen, eval mode).
        window: video frames per frame's window (5: i-2..i+2).
        context_steps: encoder steps (20 ms each) of audio each side of a frame that its states see.
        fps: the video frame rate (the sample rate is Whisper's 16 kHz).
        batch_frames: frames encoded per forward pass (memory vs speed; results do not depend on it).
    """

    def __init__(self, model: WhisperEncoder, window: int = 5, context_steps: int = 50, fps: int = 25,
                 batch_frames: int = 32):
        self.model = model.eval().requires_grad_(False)
        self.sample_rate, self.window, self.fps = 16000, window, fps
        if self.sample_rate % fps or (self.sample_rate // fps) % (2 * HOP):
            raise ValueError(f"fps {fps}: a video frame must be a whole number of encoder steps (20 ms)")
        max_steps = model.config.max_source_positions
        if not 1 <= context_steps <= (max_steps - 2) // 2:
            raise ValueError(f"context_steps must be in 1..{(max_steps - 2) // 2}, got {context_steps}")
        self.context_steps, self.batch_frames = context_steps, batch_frames
        self.min_samples = 1
        self.settings = {"context_steps": context_steps, "fps": fps}
        extractor = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
        self._mel_filters = torch.from_numpy(np.asarray(extractor.mel_filters, dtype=np.float32)).T  # (mels, 201)
        self._hann = torch.hann_window(N_FFT)

    # ----------------------------------------------------------------------------- loading, saving

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, window: int = 5, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **settings) -> "WhisperAudioEncoder":
        """Any Whisper folder `letstalk.whisper.load_whisper_encoder` reads; a folder this class saved
        keeps its context and frame rate."""
        saved = Path(path) / WHISPER_SETTINGS
        if saved.is_file():
            data = json.loads(saved.read_text())
            settings = {"context_steps": data["context_steps"], "fps": data["fps"], **settings}
        model = load_whisper_encoder(path)
        if dtype is not None:
            model = model.to(dtype)
        if device is not None:
            model = model.to(device)
        return cls(model, window=window, **settings)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.model.save_pretrained(path)
        (path / WHISPER_SETTINGS).write_text(json.dumps(
            {"letstalk_audio_features": WHISPER, **self.settings},
            indent=2))

    # ----------------------------------------------------------------------------------- features

    @property
    def num_layers(self) -> int:
        """Rows per video frame: 2 encoder steps × (layers + 1) hidden states."""
        return 2 * (self.model.config.encoder_layers + 1)

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    def log_mel(self, audio: torch.Tensor) -> torch.Tensor:
        """(samples,) -> (mels, samples // HOP) log10 mel power, frame j centred on sample j·HOP
        (Whisper's STFT and filters, without its per-utterance floor)."""
        spec = torch.stft(audio, N_FFT, HOP, window=self._hann.to(audio.device), center=True,
                          return_complex=True)[:, :-1].abs() ** 2  # (201, T)
        return torch.log10((self._mel_filters.to(audio.device) @ spec).clamp(min=1e-10))

    def _encode(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, mels, 4·context) log-mel windows -> (B, layers + 1, 2·context, D) every hidden state."""
        enc = self.model
        param = next(enc.parameters())
        x = mel.to(device=param.device, dtype=param.dtype)
        x = F.gelu(enc.conv1(x))
        x = F.gelu(enc.conv2(x)).transpose(1, 2)  # (B, T, D), T = 2·context
        x = x + enc.embed_positions.weight[: x.shape[1]]
        states = [x]
        for layer in enc.layers:
            out = layer(x, attention_mask=None)
            x = out[0] if isinstance(out, tuple) else out
            states.append(x)
        states[-1] = enc.layer_norm(x)  # as WhisperEncoder's last hidden state
        return torch.stack(states, dim=1)

    @torch.no_grad()
    def hidden_states(self, audio: np.ndarray | torch.Tensor, num_frames: int) -> torch.Tensor:
        """(samples,) mono float audio at 16 kHz -> (num_frames, 2 · (layers + 1), hidden).

        Frame i's rows are encoder steps at i/fps and i/fps + 20 ms, from a window of ±context_steps
        steps centred on i/fps (silence beyond the audio)."""
        x = torch.as_tensor(np.asarray(audio, dtype=np.float32) if isinstance(audio, np.ndarray) else audio).float()
        if x.ndim != 1:
            raise ValueError(f"audio must be mono with shape (samples,), got {tuple(x.shape)}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        frame_hop = self.sample_rate // self.fps // HOP  # log-mel frames per video frame (4)
        half = 2 * self.context_steps  # log-mel frames each side of a video frame (100 = 1 s)
        pad = half * HOP
        needed = num_frames * frame_hop * HOP
        x = x[:needed + pad]  # audio past the last frame's context is never seen
        x = F.pad(x, (pad, needed + 2 * pad - x.numel() - pad))
        mel = self.log_mel(x)  # (mels, T): frame j at original sample (j - half)·HOP
        # frame i's window: log-mel frames [frame_hop·i, frame_hop·i + 2·half), centred on frame i
        windows = mel.unfold(1, 2 * half, frame_hop)[:, :num_frames].permute(1, 0, 2)  # (N, mels, 2·half)
        out = []
        for start in range(0, num_frames, self.batch_frames):
            w = windows[start:start + self.batch_frames]
            floor = w.amax(dim=(1, 2), keepdim=True) - 8.0  # Whisper's dynamic range, per window
            w = (torch.maximum(w, floor) + 4.0) / 4.0
            states = self._encode(w)  # (B, L+1, 2·context, D)
            centre = states[:, :, self.context_steps:self.context_steps + 2]  # (B, L+1, 2, D)
            out.append(centre.transpose(1, 2).reshape(w.shape[0], -1, states.shape[-1]).float())
        return torch.cat(out)  # (N, 2·(L+1), D): step-major


def tiny_whisper_encoder(hidden_size: int = 32, num_layers: int = 2, seed: int = 0,
                         context_steps: int = 10) -> WhisperAudioEncoder:
    """A random-initialised small Whisper encoder for tests (the real ones: letstalk.whisper)."""
    return WhisperAudioEncoder(tiny_whisper(hidden_size, num_layers, seed=seed), context_steps=context_steps)
