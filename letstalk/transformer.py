"""The LetsTalk diffusion transformer, top to bottom in one file.

Shapes used throughout:
    B batch, F video frames, M motion frames, C latent channels, H = W latent size,
    P tokens per frame, D hidden size, A audio tokens per frame, Ca audio token width.

The network knows nothing about diffusion: it maps a noisy latent clip, a timestep and the
conditions to 2C output channels (ε and the learned-range variance interpolation value).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange, repeat
from torch import nn

from .config import LetsTalkConfig


# --------------------------------------------------------------------------------------------
# Position and timestep embeddings
# --------------------------------------------------------------------------------------------

def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(L,) positions -> (L, dim): first half sin, second half cos (MAE/DiT convention)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.double()[:, None] * omega[None]  # (L, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid², dim): half the channels encode the row, half the column (row-major tokens)."""
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    # DiT puts the w-coordinate first in its meshgrid; the embedding halves are [h-part, w-part].
    return torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)


class TimestepEmbedder(nn.Module):
    """(B,) timesteps -> (B, D): 256-d sinusoid followed by an MLP (DiT)."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and SDPA.

    Args:
        x: (N, L, D). extra: optional (N, L2, D) tokens that only serve as extra keys/values
           (ReferenceNet-style siamese fusion); they are projected with the same weights.
    Returns (N, L, D).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "n l (three h e) -> three n h l e", three=3, h=self.num_heads)
        if extra is not None:
            _, k2, v2 = rearrange(self.qkv(extra), "n l (three h e) -> three n h l e", three=3, h=self.num_heads)
            k, v = torch.cat([k, k2], dim=2), torch.cat([v, v2], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, h, L, e)
        return self.proj(rearrange(out, "n h l e -> n l (h e)"))


class CrossAttention(nn.Module):
    """Queries from x (N, L, D); keys/values from context (N, S, Dc). Returns (N, L, D)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(context_dim, dim, bias=False)
        self.v = nn.Linear(context_dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q(x), "n l (h e) -> n h l e", h=self.num_heads)
        k = rearrange(self.k(context), "n s (h e) -> n h s e", h=self.num_heads)
        v = rearrange(self.v(context), "n s (h e) -> n h s e", h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "n h l e -> n l (h e)"))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (N, L, D); shift/scale (N, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


# --------------------------------------------------------------------------------------------
# Audio projection (Hallo's shape): per frame a window of wav2vec2 features -> A tokens
# --------------------------------------------------------------------------------------------

class AudioProjection(nn.Module):
    """(B, F, window, layers, feat) wav2vec2 features -> (B, F, A, Ca) audio tokens.

    Flatten the window × layers × features of each frame, an MLP (ReLU) to A·Ca, LayerNorm.
    It is part of the trained model: its parameters live in the transformer's state dict.
    """

    def __init__(self, cfg: LetsTalkConfig):
        super().__init__()
        self.num_tokens, self.token_dim = cfg.audio_tokens, cfg.audio_token_dim
        in_dim = cfg.audio_window * cfg.audio_layers * cfg.audio_feature_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, cfg.audio_proj_dim), nn.ReLU(),
            nn.Linear(cfg.audio_proj_dim, cfg.audio_proj_dim), nn.ReLU(),
            nn.Linear(cfg.audio_proj_dim, cfg.audio_tokens * cfg.audio_token_dim),
        )
        self.norm = nn.LayerNorm(cfg.audio_token_dim)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        tokens = self.mlp(rearrange(audio, "b f w l a -> b f (w l a)"))
        return self.norm(rearrange(tokens, "b f (n c) -> b f n c", n=self.num_tokens))


# --------------------------------------------------------------------------------------------
# Siamese branches (ablation, paper Tables 3-4)
# --------------------------------------------------------------------------------------------

class SiamesePortraitBlock(nn.Module):
    """A backbone-like spatial block on the clean portrait tokens (N, P, D).

    Returns (new tokens, the normalised tokens that the backbone block attends to).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm1(x)
        x = x + self.attn(h)
        return x + self.mlp(self.norm2(x)), h


class SiameseAudioBlock(nn.Module):
    """Two-layer MLP block on audio tokens (..., A, Ca) (paper §6.3)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a + self.mlp(self.norm(a))


# --------------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------------

class LetsTalkBlock(nn.Module):
    """Temporal attention -> audio cross-attention -> spatial attention + MLP (adaLN-Zero).

    Forward args:
        x:        (B, F, P, D) video tokens.
        c:        (B, D) timestep embedding (drives adaLN).
        motion:   (B, M, P, D) motion-frame tokens or None; they join temporal attention only.
        side:     (B, F, S, D) tokens concatenated along the token axis for spatial attention and
                  the MLP (symbiotic portrait and/or audio tokens), or None.
        audio:    (B, F, A, Ca) audio context for cross-attention (direct/siamese audio) or None.
        portrait: (B, P, D) portrait context: cross-attention keys (direct) or extra spatial keys
                  (siamese), or None.
    Returns (x, motion, side) with the same shapes.
    """

    def __init__(self, cfg: LetsTalkConfig):
        super().__init__()
        d, heads = cfg.hidden_size, cfg.num_heads
        self.portrait_fusion, self.audio_fusion = cfg.portrait_fusion, cfg.audio_fusion
        # temporal: pre-LayerNorm self-attention over frames per spatial token, then temporal_fc
        self.temporal_norm = nn.LayerNorm(d)
        self.temporal_attn = SelfAttention(d, heads)
        self.temporal_fc = nn.Linear(d, d)
        # audio cross-attention per frame
        if cfg.audio_fusion in ("direct", "siamese"):
            self.cross_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
            self.cross_attn = CrossAttention(d, cfg.audio_token_dim, heads)
        # portrait cross-attention (direct portrait fusion, ablation only)
        if cfg.portrait_fusion == "direct":
            self.portrait_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
            self.portrait_attn = CrossAttention(d, d, heads)
        # spatial attention + MLP with adaLN-Zero
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d, heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c, motion=None, side=None, audio=None, portrait=None):
        b, f, p, _ = x.shape
        m = 0 if motion is None else motion.shape[1]

        # 1. temporal attention over [motion, video] frames, per spatial token
        xm = x if motion is None else torch.cat([motion, x], dim=1)  # (B, M+F, P, D)
        h = rearrange(xm, "b t p d -> (b p) t d")
        h = self.temporal_attn(self.temporal_norm(h))
        xm = xm + self.temporal_fc(rearrange(h, "(b p) t d -> b t p d", b=b))
        motion, x = (None, xm) if m == 0 else (xm[:, :m], xm[:, m:])

        # 2. per-frame cross-attention: frame i's video tokens attend to frame i's audio tokens
        x = rearrange(x, "b f p d -> (b f) p d")
        if audio is not None:
            x = x + self.cross_attn(self.cross_norm(x), rearrange(audio, "b f a c -> (b f) a c"))
        if self.portrait_fusion == "direct":
            ctx = repeat(portrait, "b p d -> (b f) p d", f=f)
            x = x + self.portrait_attn(self.portrait_norm(x), ctx)

        # 3. spatial attention and MLP over [video, side tokens] with adaLN-Zero
        tokens = x if side is None else torch.cat([x, rearrange(side, "b f s d -> (b f) s d")], dim=1)
        shift1, scale1, gate1, shift2, scale2, gate2 = (
            repeat(v, "b d -> (b f) d", f=f) for v in self.adaLN_modulation(c).chunk(6, dim=1)
        )
        extra = None
        if self.portrait_fusion == "siamese":
            extra = repeat(portrait, "b p d -> (b f) p d", f=f)
        tokens = tokens + gate1[:, None] * self.attn(modulate(self.norm1(tokens), shift1, scale1), extra)
        tokens = tokens + gate2[:, None] * self.mlp(modulate(self.norm2(tokens), shift2, scale2))

        x = rearrange(tokens[:, :p], "(b f) p d -> b f p d", b=b)
        if side is not None:
            side = rearrange(tokens[:, p:], "(b f) s d -> b f s d", b=b)
        return x, motion, side


class FinalLayer(nn.Module):
    """(N, P, D) -> (N, P, patch² · out_channels) with adaLN (shift, scale)."""

    def __init__(self, d: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

class LetsTalkTransformer(ModelMixin, ConfigMixin):
    """LetsTalk: latent diffusion transformer for talking video.

    Build from a preset with `LetsTalkTransformer.from_preset("B")`; every constructor
    argument is a field of `LetsTalkConfig` (the defaults live there). save_pretrained /
    from_pretrained write config.json + safetensors weights.

    forward(x, t, portrait, audio=None, motion=None, cond=None):
        x:        (B, F, C, H, W) noisy latent clip, 1 <= F <= num_frames.
        t:        (B,) diffusion timesteps.
        portrait: (B, C, H, W) reference latent.
        audio:    (B, F, audio_window, audio_layers, audio_feature_dim) wav2vec2 features, or
                  None for the unconditional model (all-zero features, as in audio dropout).
        motion:   (B, M, C, H, W) clean latents of the frames before the clip, 0 <= M <=
                  num_motion_frames, or None. They join temporal attention only.
        cond:     (B, F, cond_channels, H, W) per-frame condition channels, concatenated to x before
                  the patch embedding (re-voicing: the frame's masked latent and the mask); required
                  when cond_channels > 0, else None.
    Returns (B, F, out_channels, H, W): ε in the first C channels, then the variance values.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, *, input_size: int, in_channels: int, patch_size: int, num_frames: int,
                 num_motion_frames: int, hidden_size: int, depth: int, num_heads: int, mlp_ratio: float,
                 audio_feature_dim: int, audio_layers: int, audio_window: int, audio_tokens: int,
                 audio_token_dim: int, audio_proj_dim: int, portrait_fusion: str, audio_fusion: str,
                 learn_sigma: bool, cond_channels: int = 0):
        super().__init__()
        cfg = LetsTalkConfig(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.gradient_checkpointing = False

        self.x_embedder = nn.Conv2d(cfg.in_channels + cfg.cond_channels, d, kernel_size=p, stride=p)
        if cfg.cond_channels:  # the reference frame has no condition channels: it gets its own embedding
            self.ref_embedder = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(d)
        self.audio_proj = AudioProjection(cfg)
        self.register_buffer("pos_embed", sincos_2d(d, cfg.input_size // p)[None], persistent=False)
        temporal = sincos_1d(d, torch.arange(cfg.num_motion_frames + cfg.num_frames))
        self.register_buffer("temp_embed", temporal, persistent=False)  # (M+F, D)

        if cfg.audio_fusion == "symbiotic":
            self.audio_in = nn.Linear(cfg.audio_token_dim, d)
        if cfg.audio_fusion == "siamese":
            self.audio_siamese = nn.ModuleList(SiameseAudioBlock(cfg.audio_token_dim) for _ in range(cfg.depth))
        if cfg.portrait_fusion == "siamese":
            self.portrait_siamese = nn.ModuleList(
                SiamesePortraitBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))

        self.blocks = nn.ModuleList(LetsTalkBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, p, cfg.out_channels)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LetsTalkTransformer":
        return cls(**LetsTalkConfig.from_name(name, **overrides).to_dict())

    def initialize_weights(self) -> None:
        """DiT init; every residual branch of a block starts at zero, so a block is the identity."""
        def basic(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(basic)
        for embedder in {self.x_embedder, self.clean_embedder}:
            w = embedder.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for block in self.blocks:
            zero += [block.adaLN_modulation[-1], block.temporal_fc]
            if hasattr(block, "cross_attn"):
                zero.append(block.cross_attn.proj)
            if hasattr(block, "portrait_attn"):
                zero.append(block.portrait_attn.proj)
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ---------------------------------------------------------------- input checks

    def _check_inputs(self, x, t, portrait, audio, motion, cond=None) -> None:
        cfg = self.cfg
        c, s = cfg.in_channels, cfg.input_size
        clip = f"(batch, 1..{cfg.num_frames}, {c}, {s}, {s})"
        for name, tensor in (("x", x), ("portrait", portrait), ("audio", audio), ("motion", motion), ("cond", cond)):
            if tensor is not None and not torch.is_floating_point(tensor):
                raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
        if x.ndim != 5 or tuple(x.shape[2:]) != (c, s, s) or not 1 <= x.shape[1] <= cfg.num_frames:
            raise ValueError(f"x must have shape {clip} (B, F, C, H, W), got {tuple(x.shape)}")
        b, f = x.shape[:2]
        if t.shape != (b,):
            raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
        if tuple(portrait.shape) != (b, c, s, s):
            raise ValueError(f"portrait must have shape ({b}, {c}, {s}, {s}) (B, C, H, W), got {tuple(portrait.shape)}")
        want = (b, f, cfg.audio_window, cfg.audio_layers, cfg.audio_feature_dim)
        if audio is not None and tuple(audio.shape) != want:
            raise ValueError(f"audio must have shape {want} (B, F, window, layers, features), got {tuple(audio.shape)}")
        if motion is not None and (motion.ndim != 5 or motion.shape[0] != b or tuple(motion.shape[2:]) != (c, s, s)
                                   or motion.shape[1] > cfg.num_motion_frames):
            raise ValueError(f"motion must have shape ({b}, 0..{cfg.num_motion_frames}, {c}, {s}, {s}) "
                             f"(B, M, C, H, W), got {tuple(motion.shape)}")
        if cfg.cond_channels and (cond is None or tuple(cond.shape) != (b, f, cfg.cond_channels, s, s)):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"cond must have shape ({b}, {f}, {cfg.cond_channels}, {s}, {s}) (B, F, C', H, W) for "
                             f"this model (cond_channels {cfg.cond_channels}), got {got}")
        if not cfg.cond_channels and cond is not None:
            raise ValueError("cond given, but this model has no condition channels (cond_channels 0)")

    # ---------------------------------------------------------------- forward

    def embed(self, latents: torch.Tensor, embedder: nn.Conv2d | None = None) -> torch.Tensor:
        """(N, C, H, W) -> (N, P, D) patch tokens with the 2-D position embedding."""
        tokens = rearrange((embedder or self.x_embedder)(latents), "n d h w -> n (h w) d")
        return tokens + self.pos_embed.to(tokens.dtype)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, P, patch² · C_out) -> (N, C_out, H, W)."""
        p, g = self.cfg.patch_size, self.cfg.input_size // self.cfg.patch_size
        return rearrange(tokens, "n (gh gw) (ph pw c) -> n c (gh ph) (gw pw)", gh=g, gw=g, ph=p, pw=p)

    def forward(self, x, t, portrait, audio=None, motion=None, cond=None):
        self._check_inputs(x, t, portrait, audio, motion, cond)
        cfg = self.cfg
        b, f = x.shape[:2]
        m_max = cfg.num_motion_frames
        dtype = self.x_embedder.weight.dtype
        x, portrait = x.to(dtype), portrait.to(dtype)
        if audio is None:
            audio = x.new_zeros(b, f, cfg.audio_window, cfg.audio_layers, cfg.audio_feature_dim)

        if cond is not None:
            x = torch.cat([x, cond.to(dtype)], dim=2)  # (B, F, C + C', H, W)
        # video frames sit at temporal positions M_max..M_max+F-1; motion frames just before them
        tokens = rearrange(self.embed(rearrange(x, "b f c h w -> (b f) c h w")), "(b f) p d -> b f p d", b=b)
        tokens = tokens + self.temp_embed[m_max:m_max + f, None].to(dtype)
        motion_tokens = None
        if motion is not None and motion.shape[1] > 0:
            m = motion.shape[1]
            motion_tokens = rearrange(self.embed(rearrange(motion.to(dtype), "b m c h w -> (b m) c h w"),
                                                 self.clean_embedder), "(b m) p d -> b m p d", b=b)
            motion_tokens = motion_tokens + self.temp_embed[m_max - m:m_max, None].to(dtype)

        c = self.t_embedder(t)  # (B, D)
        audio_tokens = self.audio_proj(audio.to(dtype))  # (B, F, A, Ca)
        portrait_tokens = self.embed(portrait, self.clean_embedder)  # (B, P, D)

        side = []  # tokens concatenated along the token axis (symbiotic fusion)
        if cfg.portrait_fusion == "symbiotic":
            side.append(repeat(portrait_tokens, "b p d -> b f p d", f=f))
        if cfg.audio_fusion == "symbiotic":
            side.append(self.audio_in(audio_tokens))
        side = torch.cat(side, dim=2) if side else None

        cross_audio = audio_tokens if cfg.audio_fusion in ("direct", "siamese") else None
        ref = portrait_tokens if cfg.portrait_fusion in ("direct", "siamese") else None
        for i, block in enumerate(self.blocks):
            if cfg.audio_fusion == "siamese":
                cross_audio = self.audio_siamese[i](cross_audio)
            ref_in = ref
            if cfg.portrait_fusion == "siamese":
                ref, ref_in = self.portrait_siamese[i](ref)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens, motion_tokens, side = self._gradient_checkpointing_func(
                    block, tokens, c, motion_tokens, side, cross_audio, ref_in)
            else:
                tokens, motion_tokens, side = block(tokens, c, motion_tokens, side, cross_audio, ref_in)

        out = self.final_layer(rearrange(tokens, "b f p d -> (b f) p d"), repeat(c, "b d -> (b f) d", f=f))
        return rearrange(self.unpatchify(out), "(b f) c h w -> b f c h w", b=b)

    @property
    def clean_embedder(self) -> nn.Conv2d:
        """The patch embedding of clean latents without condition channels (portrait, motion frames)."""
        return self.ref_embedder if self.cfg.cond_channels else self.x_embedder

    def forward_with_guidance(self, x, t, portrait, audio, motion=None, guidance: float = 1.0, cond=None):
        """Classifier-free guidance on audio: ε = ε_uncond + g · (ε_audio - ε_uncond).

        The audio-free branch gets all-zero audio features (what audio dropout trains); both
        branches run as one batch. The variance channels come from the audio branch.
        """
        if guidance == 1.0 or audio is None:
            return self(x, t, portrait, audio, motion, cond)
        both = lambda v: None if v is None else torch.cat([v, v])  # noqa: E731
        out = self(both(x), both(t), both(portrait), torch.cat([audio, torch.zeros_like(audio)]), both(motion),
                   both(cond))
        cond, uncond = out.chunk(2)
        c = self.cfg.in_channels
        eps = uncond[:, :, :c] + guidance * (cond[:, :, :c] - uncond[:, :, :c])
        return torch.cat([eps, cond[:, :, c:]], dim=2)


def count_parameters(model: LetsTalkTransformer) -> dict[str, int]:
    """Backbone (everything but the audio projection) and audio projection parameter counts."""
    audio = sum(p.numel() for p in model.audio_proj.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"backbone": total - audio, "audio_projection": audio, "total": total}
