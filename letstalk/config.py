"""Architecture configuration: one dataclass, named presets.

The defaults here are the only defaults: the transformer takes every field as a required
keyword argument, so a config saved beside a checkpoint fully describes the network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

PortraitFusion = Literal["symbiotic", "direct", "siamese"]
AudioFusion = Literal["direct", "siamese", "symbiotic"]


@dataclass(frozen=True)
class LetsTalkConfig:
    """LetsTalk diffusion transformer.

    Latent video (F, C, H, W) = (num_frames, in_channels, input_size, input_size); patches of
    patch_size² give P = (input_size / patch_size)² tokens per frame of width hidden_size.

    Audio features per video frame are (audio_window, audio_layers, audio_feature_dim), i.e.
    wav2vec2 hidden states of every transformer layer over a window of frames i-2..i+2; the
    audio projection maps them to audio_tokens tokens of width audio_token_dim (the authors'
    code keeps that width at 768 for every model size; the cross-attention projects it to D).
    """

    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    num_frames: int = 16
    num_motion_frames: int = 2
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    audio_feature_dim: int = 768
    audio_layers: int = 12
    audio_window: int = 5
    audio_tokens: int = 32
    audio_token_dim: int = 768
    audio_proj_dim: int = 512
    portrait_fusion: PortraitFusion = "symbiotic"
    audio_fusion: AudioFusion = "direct"
    learn_sigma: bool = True
    # extra input channels per frame, concatenated to the noisy latent before the patch embedding
    # (SD-inpainting's layout): re-voicing feeds the frame's masked latent and the mask
    # (letstalk.revoice: in_channels + 1); 0 for the portrait model
    cond_channels: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("the head dimension must be even")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % 4:
            raise ValueError("hidden_size must be divisible by 4 (2-D sin-cos position embedding)")
        for name in ("input_size", "in_channels", "patch_size", "num_frames", "hidden_size", "depth",
                     "num_heads", "audio_feature_dim", "audio_layers", "audio_window", "audio_tokens",
                     "audio_token_dim", "audio_proj_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_motion_frames < 0:
            raise ValueError("num_motion_frames must be >= 0")
        if self.cond_channels < 0:
            raise ValueError(f"cond_channels must be >= 0, got {self.cond_channels}")
        if self.portrait_fusion not in get_args(PortraitFusion):
            raise ValueError(f"portrait_fusion must be one of {get_args(PortraitFusion)}, got {self.portrait_fusion!r}")
        if self.audio_fusion not in get_args(AudioFusion):
            raise ValueError(f"audio_fusion must be one of {get_args(AudioFusion)}, got {self.audio_fusion!r}")

    @property
    def tokens_per_frame(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "LetsTalkConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {list(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LetsTalkConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# Paper Table 5 (B, L) and DiT's S; `tiny` is for tests: small latents, a small audio encoder
# (4 layers × 32 features), few frames; `demo` is the learned CPU demo model.
PRESETS: dict[str, LetsTalkConfig] = {
    "tiny": LetsTalkConfig(
        input_size=8, num_frames=8, hidden_size=64, depth=2, num_heads=4,
        audio_feature_dim=32, audio_layers=4, audio_tokens=4, audio_token_dim=64, audio_proj_dim=64,
    ),
    # The CPU demo model (docs/demo-model.md): 48×48 frames through the lossless space-to-depth
    # codec (factor 4 -> 48 channels at 12×12), 8-frame clips, D 192, 4 blocks, the tiny audio encoder.
    # D must be at least a patch's 2·2·48 = 192 values: at D 128 the residual stream cannot carry the
    # (full-rank) noise, and ε-MSE stalls near 1 - 128/192 (measured: 0.35 at every t).
    "demo": LetsTalkConfig(
        input_size=12, in_channels=48, num_frames=8, hidden_size=192, depth=4, num_heads=4,
        audio_feature_dim=32, audio_layers=4, audio_tokens=4, audio_token_dim=128, audio_proj_dim=128,
    ),
    # One real person from ~30 s of footage (docs/avatar.md): 64×64 face crops through the
    # space-to-depth codec with the person's 16-component PCA basis (16 channels at 16×16, 64 tokens
    # per frame of 64 values: room beside them in D 192 for the noise), log-mel audio (80 bins,
    # 1 "layer") over a ±4-frame window: the mouth moves ahead of and behind the sound it makes.
    "avatar": LetsTalkConfig(
        input_size=16, in_channels=16, num_frames=8, hidden_size=192, depth=4, num_heads=4,
        audio_feature_dim=80, audio_layers=1, audio_window=9, audio_tokens=4, audio_token_dim=128,
        audio_proj_dim=128,
    ),
    # Re-voicing one real person (docs/avatar.md): the avatar's codec and size; each frame also sees
    # its own latent with the lower face masked, plus the mask (16 + 1 channels), and the reference
    # frame; no motion frames: the mouth must come from the audio, not from the frames before it.
    "avatar-revoice": LetsTalkConfig(
        input_size=16, in_channels=16, num_frames=8, num_motion_frames=0, hidden_size=192, depth=4, num_heads=4,
        audio_feature_dim=80, audio_layers=1, audio_window=9, audio_tokens=4, audio_token_dim=128,
        audio_proj_dim=128, cond_channels=17,
    ),
    "S": LetsTalkConfig(hidden_size=384, depth=12, num_heads=6),
    "B": LetsTalkConfig(hidden_size=768, depth=12, num_heads=12),
    "L": LetsTalkConfig(hidden_size=1024, depth=24, num_heads=16),
}

__all__ = ["LetsTalkConfig", "PRESETS", "PortraitFusion", "AudioFusion"]
