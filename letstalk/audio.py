"""Speech features: wav2vec2 hidden states of every layer, one window per video frame.

Following Hallo, the CNN features (50 Hz for 16 kHz audio) are linearly interpolated to the
number of video frames *before* the transformer, so every transformer layer runs at the video
frame rate; then frame i gets the window of frames i-2..i+2 (clamped at the edges).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2Model

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
