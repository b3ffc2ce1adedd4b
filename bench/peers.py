"""Peer benchmark: LetsTalk vs a Hallo-shaped U-Net, same input, one process (prints ratios; not a test).

    python bench/peers.py [--sizes 256 512] [--timing-sizes 256] [--repeats 3] [--threads N]
                          [--presets B L] [--hallo-steps 40] [--letstalk-steps 25 250] [--no-full] [--smoke]
                          [--device cuda] [--bf16]      # timed on a GPU (synchronised), fp32 or bf16 autocast

The paper's efficiency claim (Fig. 1 right: LetsTalk-B near Hallo's quality with far fewer
parameters and less inference time), measured on random weights: one denoising step of each model
on the same clip, batch 1, fp32, 16 frames, latents (4, size/8, size/8), no classifier-free guidance
(both methods use it at inference and it doubles both batches).

Per size it prints parameters, FLOPs per denoising step (FlopCounterMode: matmuls and convolutions,
SDPA counted through the math backend, counted on the `meta` device, so free at any size) and, at
the `--timing-sizes`, CPU seconds per step: the median of `--repeats` rounds after one warm-up
round, every model once per round (interleaved, so drift hits all alike), fp32, eval mode,
torch.inference_mode, SDPA's default backend. Ratios are to the first `--presets` entry.

LetsTalk: `LetsTalkTransformer.from_preset(p, input_size=size // 8)` with its inputs (portrait
latent, 2 motion-frame latents, wav2vec2 features 5 × 12 × 768 per frame; its audio projection runs
inside every step).

Hallo-shaped (fudan-generative-vision/hallo, configs/inference/default.yaml), built from
diffusers 0.42 blocks with random weights:
  denoiser, every step: SD-1.5 `UNet2DConditionModel` config inflated to video by
    `UNetMotionModel.from_unet2d` with a default `MotionAdapter` (AnimateDiff mm_sd_v15_v2: 2
    temporal self-attentions + GEGLU per motion layer, mid-block motion module, 32 positions), plus
    - reference attention: every spatial self-attention (attn1) also attends to the ReferenceNet's
      tokens of the reference frame at the same layer (Hallo's ReferenceAttentionControl, "read"),
      so its keys/values are 2 × H·W tokens;
    - Hallo's audio modules, written here (diffusers has none): after each of the 16 spatial
      transformers a second transformer (GroupNorm, 1×1 proj_in, self-attention, three
      cross-attentions to the frame's 32 × 768 audio tokens for the full/face/lip regions, each
      masked and through a 1×1 conv, GEGLU feed-forward, 1×1 proj_out), at Hallo's widths (the
      block's input width: half the channels in the first layer of each widening block);
    - the face locator's features added after conv_in; cross-attention context: 4 face-embedding
      tokens × 768 (Hallo's image projection of the insightface embedding).
  once per clip (Hallo's FaceAnimatePipeline runs the ReferenceNet only at step 0; the face
    locator and both projections also run before the loop): the ReferenceNet (SD-1.5
    `UNet2DConditionModel`) on 3 latents (reference image + 2 motion frames, timestep 0), the face
    locator (convs 3→16→32→64→128→320 over each frame's pixel mask), the audio projection (the
    same module shape as LetsTalk's) and the image projection. The per-step total charges them
    over `--hallo-steps` (Hallo's default: 40 DDIM steps).
  not included, for either method: VAE encode/decode, wav2vec2, Hallo's insightface embedding and
  its audio separator. Hallo's mid-block motion module also sees the 2 motion frames' reference
  features (18 frames, not 16): left out (< 1 % of its FLOPs).

Interleaved vs full attention (the paper's Sec. 3.2 figure): LetsTalk's first preset with every
block's temporal + spatial attention replaced by one attention over all frames' tokens
(bench/model.py's FullSpatioTemporal), FLOPs at every size, time at the timing sizes (`--no-full`
skips the timing).

Runtime (measured 2026-11-30, 2-core VM, nothing else running): the defaults took 6 min 28 s and
~14 GB of RAM (3.4 G fp32 parameters). Timing at 512² too adds roughly an hour (estimated from the
FLOPs). `--smoke` (tiny models, 1 thread) takes ~15 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from einops import rearrange, repeat
from torch import nn

from letstalk.accel import autocast
from letstalk.config import PRESETS, LetsTalkConfig
from letstalk.transformer import AudioProjection, LetsTalkTransformer, count_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/model.py, however this is launched
from model import FullSpatioTemporal, NoTemporal, flops_of  # noqa: E402


# --------------------------------------------------------------------------------------------
# Sizes of everything but LetsTalk (whose sizes are its presets)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """The clip and the Hallo-shaped model's widths; `SMOKE` shrinks every one of them."""

    frames: int = 16
    motion_frames: int = 2
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # SD-1.5 block_out_channels
    token_dim: int = 768  # SD-1.5 cross_attention_dim = Hallo's audio and face token width
    face_tokens: int = 4  # Hallo's ImageProjModel(clip_extra_context_tokens=4)
    face_embedding_dim: int = 512  # insightface embedding
    locator_channels: tuple[int, ...] = (16, 32, 64, 128)  # Hallo's FaceLocator defaults
    audio: LetsTalkConfig = field(default_factory=LetsTalkConfig)  # audio fields: 5 × 12 × 768 -> 32 × 768


FULL = Setup()
SMOKE = Setup(frames=4, unet_channels=(32, 64, 64, 64), token_dim=64, face_embedding_dim=32,
              locator_channels=(8, 16, 16, 32), audio=PRESETS["tiny"])


def sd15_unet(setup: Setup) -> UNet2DConditionModel:
    """The published Stable Diffusion 1.5 U-Net configuration (random weights)."""
    return UNet2DConditionModel(
        sample_size=64, in_channels=setup.latent_channels, out_channels=setup.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=setup.unet_channels, layers_per_block=2,
        cross_attention_dim=setup.token_dim, attention_head_dim=8,
    )


# --------------------------------------------------------------------------------------------
# Hallo's additions to the U-Net
# --------------------------------------------------------------------------------------------

class Conditions:
    """Per-clip tensors the hooked U-Net layers read; set by HalloShaped.forward (a plain object,
    so the layers that hold it do not register it as a submodule)."""

    def __init__(self) -> None:
        self.reference: dict[str, torch.Tensor] = {}  # attn1 name -> (B, L, C) reference-frame tokens
        self.audio: torch.Tensor | None = None  # (B·F, A, Ca) audio tokens per frame
        self.face: torch.Tensor | None = None  # (B·F, C0, h, w) face-locator features


class ReferenceSelfAttention:
    """attn1 processor of the denoiser's spatial transformers: Hallo's reference attention.

    Queries are a frame's tokens; keys and values are [frame tokens, the reference frame's tokens
    at the same layer of the ReferenceNet]. hidden_states (B·F, L, C) -> (B·F, L, C).
    """

    def __init__(self, name: str, conditions: Conditions):
        self.name, self.conditions, self.sdpa = name, conditions, AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        ref = self.conditions.reference[self.name]  # (B, L, C)
        ref = repeat(ref, "b l c -> (b f) l c", f=hidden_states.shape[0] // ref.shape[0])
        context = torch.cat([hidden_states, ref], dim=1)  # (B·F, 2L, C)
        return self.sdpa(attn, hidden_states, encoder_hidden_states=context, attention_mask=attention_mask)


class AudioModule(nn.Module):
    """Hallo's audio layer after a spatial transformer (its `audio_modules`, hierarchical audio-driven
    synthesis): a transformer of its own at width `inner`.

    GroupNorm, proj_in C -> d, self-attention over the frame's tokens, three cross-attentions (full
    face / face / lip regions) to the frame's audio tokens, each masked and through a zero-initialised
    1×1 conv, GEGLU feed-forward, proj_out d -> C, residual. Hallo's 1×1 convs are Linear layers over
    the tokens here (same weights, same FLOPs).

    forward(x (N, C, H, W), audio (N, A, Ca)) -> (N, C, H, W), N = B·F.
    """

    def __init__(self, channels: int, inner: int, audio_dim: int, heads: int = 8):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.norm1 = nn.LayerNorm(inner)
        self.attn1 = Attention(inner, heads=heads, dim_head=inner // heads)
        self.norm2 = nn.LayerNorm(inner)
        self.region_attn = nn.ModuleList(
            Attention(inner, cross_attention_dim=audio_dim, heads=heads, dim_head=inner // heads) for _ in range(3))
        self.region_out = nn.ModuleList(nn.Linear(inner, inner) for _ in range(3))
        self.norm3 = nn.LayerNorm(inner)
        self.ff = FeedForward(inner, activation_fn="geglu")
        self.proj_out = nn.Linear(inner, channels)
        for layer in self.region_out:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        tokens = self.proj_in(rearrange(self.norm(x), "n c h w -> n (h w) c"))  # (N, HW, d)
        tokens = tokens + self.attn1(self.norm1(tokens))
        normed = self.norm2(tokens)
        mask = tokens.new_ones(tokens.shape[0], h * w, 1)  # Hallo's region masks; a real one costs the same
        for attn, out in zip(self.region_attn, self.region_out):
            tokens = tokens + out(attn(normed, encoder_hidden_states=audio) * mask)
        tokens = tokens + self.ff(self.norm3(tokens))
        return x + rearrange(self.proj_out(tokens), "n (h w) c -> n c h w", h=h, w=w)


class WithAudio(nn.Module):
    """A spatial transformer (diffusers Transformer2DModel) followed by Hallo's audio module."""

    def __init__(self, transformer: nn.Module, audio: AudioModule, conditions: Conditions):
        super().__init__()
        self.transformer, self.audio, self.conditions = transformer, audio, conditions

    def forward(self, hidden_states, **kwargs):  # called with return_dict=False by the motion blocks
        out = self.transformer(hidden_states, **kwargs)[0]  # (B·F, C, H, W)
        return (self.audio(out, self.conditions.audio),)


class AddFaceFeatures(nn.Module):
    """conv_in, then + the face locator's features (Hallo's `mask_cond_fea`)."""

    def __init__(self, conv_in: nn.Module, conditions: Conditions):
        super().__init__()
        self.conv_in, self.conditions = conv_in, conditions

    def forward(self, x):  # x (B·F, C, h, w)
        return self.conv_in(x) + self.conditions.face


def audio_module_widths(channels: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """Spatial-transformer name -> (channels, audio-module width) as Hallo's unet_3d_blocks sets them:
    down blocks: the block's input width in layer 0, its output width after; mid: its width; up blocks:
    the skip width of the block (`in_channels`) in every layer."""
    out = {}
    for i, c in enumerate(channels[:-1]):  # CrossAttnDownBlock × 3
        c_in = channels[max(i - 1, 0)]
        out[f"down_blocks.{i}.attentions.0"] = (c, c_in)
        out[f"down_blocks.{i}.attentions.1"] = (c, c)
    out["mid_block.attentions.0"] = (channels[-1], channels[-1])
    rev = list(reversed(channels))
    for i in range(1, len(channels)):  # CrossAttnUpBlock × 3 (up block 0 has no attention)
        skip = rev[min(i + 1, len(channels) - 1)]
        for layer in range(3):
            out[f"up_blocks.{i}.attentions.{layer}"] = (rev[i], skip)
    return out


class FaceLocator(nn.Module):
    """Hallo's face locator: convs over each frame's face-region mask, 8× down, to conv_in's width.
    (N, 3, H, W) -> (N, C0, H/8, W/8)."""

    def __init__(self, out_channels: int, channels: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1), nn.SiLU()]
        for a, b in zip(channels, channels[1:]):
            layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
        layers.append(nn.Conv2d(channels[-1], out_channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.net(mask)


# --------------------------------------------------------------------------------------------
# The Hallo-shaped model
# --------------------------------------------------------------------------------------------

@dataclass
class HalloClip:
    """What the once-per-clip work produces for every denoising step."""

    face_tokens: torch.Tensor  # (B, 4, Ct): cross-attention context of both U-Nets
    audio: torch.Tensor  # (B·F, 32, Ct)
    face: torch.Tensor  # (B·F, C0, h, w)
    reference: dict[str, torch.Tensor] = field(default_factory=dict)  # attn1 name -> (B, L, C)


class HalloShaped(nn.Module):
    """Hallo's networks with random weights (see the module docstring for what is and is not in).

    Once per clip: `conditions(face_embedding (B, E), face_mask (B, F, 3, H, W), audio (B, F, 5, 12, 768))`
    then `reference(clip, ref_latents (B, 1 + M, C, h, w))`. Every step: `forward(x (B, F, C, h, w),
    t (B,), clip) -> (B, F, C, h, w)`.
    """

    def __init__(self, setup: Setup):
        super().__init__()
        self.setup = setup
        self.shared = Conditions()
        self.reference_net = sd15_unet(setup)
        with torch.device("meta"):  # only their configs are read: from_unet2d(load_weights=False)
            template = sd15_unet(setup)
            adapter = MotionAdapter(block_out_channels=setup.unet_channels, motion_max_seq_length=32)
        self.denoiser = UNetMotionModel.from_unet2d(template, adapter, load_weights=False)

        # reference attention: the ReferenceNet's attn1 inputs (normed tokens) feed the denoiser's attn1
        self._bank: dict[str, torch.Tensor] = {}
        for name, module in self.reference_net.named_modules():
            if ".attentions." in name and name.endswith("attn1"):
                module.register_forward_pre_hook(self._keep(name), with_kwargs=True)
        for name, module in self.denoiser.named_modules():
            if ".attentions." in name and name.endswith("attn1"):
                module.set_processor(ReferenceSelfAttention(name, self.shared))
        # audio modules after every spatial transformer; face features after conv_in
        for name, (channels, inner) in audio_module_widths(setup.unet_channels).items():
            parent, index = self.denoiser.get_submodule(name.rsplit(".", 1)[0]), int(name.rsplit(".", 1)[1])
            parent[index] = WithAudio(parent[index], AudioModule(channels, inner, setup.token_dim), self.shared)
        self.denoiser.conv_in = AddFaceFeatures(self.denoiser.conv_in, self.shared)

        self.face_locator = FaceLocator(setup.unet_channels[0], setup.locator_channels)
        self.audio_proj = AudioProjection(setup.audio)
        self.image_proj = nn.Linear(setup.face_embedding_dim, setup.face_tokens * setup.token_dim)
        self.image_norm = nn.LayerNorm(setup.token_dim)

    def _keep(self, name: str):
        def hook(module, args, kwargs):
            self._bank[name] = args[0] if args else kwargs["hidden_states"]
        return hook

    def parameter_groups(self) -> dict[str, int]:
        count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
        named = list(self.denoiser.named_parameters())
        motion = count(p for n, p in named if ".motion_modules." in n)
        audio = count(p for n, p in named if ".audio." in n)
        once = [self.face_locator, self.audio_proj, self.image_proj, self.image_norm]
        denoiser = count(p for _, p in named)
        return {"denoiser": denoiser, "denoiser: SD-1.5 U-Net part": denoiser - motion - audio,
                "denoiser: motion modules": motion, "denoiser: audio modules": audio,
                "ReferenceNet": count(self.reference_net.parameters()),
                "face locator + projections": sum(count(m.parameters()) for m in once),
                "total": count(self.parameters())}

    def conditions(self, face_embedding, face_mask, audio) -> HalloClip:
        tokens = rearrange(self.image_proj(face_embedding), "b (n c) -> b n c", c=self.setup.token_dim)
        face_tokens = self.image_norm(tokens)  # (B, 4, Ct)
        face = self.face_locator(rearrange(face_mask, "b f c h w -> (b f) c h w"))  # (B·F, C0, h, w)
        audio_tokens = rearrange(self.audio_proj(audio), "b f a c -> (b f) a c")
        return HalloClip(face_tokens, audio_tokens, face)

    def reference(self, clip: HalloClip, ref_latents: torch.Tensor) -> HalloClip:
        b, n = ref_latents.shape[:2]
        self._bank.clear()
        self.reference_net(rearrange(ref_latents, "b n c h w -> (b n) c h w"),
                           torch.zeros(b * n, device=ref_latents.device),
                           encoder_hidden_states=repeat(clip.face_tokens, "b t c -> (b n) t c", n=n), return_dict=False)
        # keep the reference image's tokens (item 0 of each clip); the motion frames' go to Hallo's mid block only
        clip.reference = {k: rearrange(v, "(b n) l c -> b n l c", n=n)[:, 0] for k, v in self._bank.items()}
        return clip

    def forward(self, x: torch.Tensor, t: torch.Tensor, clip: HalloClip) -> torch.Tensor:
        self.shared.reference, self.shared.audio, self.shared.face = clip.reference, clip.audio, clip.face
        context = repeat(clip.face_tokens, "b n c -> (b f) n c", f=x.shape[1])  # UNetMotionModel wants it per frame
        out = self.denoiser(rearrange(x, "b f c h w -> b c f h w"), t, encoder_hidden_states=context,
                            return_dict=False)[0]
        return rearrange(out, "b c f h w -> b f c h w")


# --------------------------------------------------------------------------------------------
# Inputs, measurements
# --------------------------------------------------------------------------------------------

@dataclass
class Clip:
    """The same clip for every model. latents (B, F, C, h, w) etc.; pixel-size face mask for Hallo."""

    x: torch.Tensor
    t: torch.Tensor
    portrait: torch.Tensor
    motion: torch.Tensor
    audio: torch.Tensor
    face_embedding: torch.Tensor
    face_mask: torch.Tensor

    @classmethod
    def make(cls, setup: Setup, size: int, device: str) -> "Clip":
        g = torch.Generator().manual_seed(0)

        def r(*shape):
            return torch.empty(*shape, device="meta") if device == "meta" else torch.randn(*shape, generator=g).to(device)
        s, c, f, a = size // 8, setup.latent_channels, setup.frames, setup.audio
        return cls(x=r(1, f, c, s, s), t=torch.full((1,), 500, device=device), portrait=r(1, c, s, s),
                   motion=r(1, setup.motion_frames, c, s, s),
                   audio=r(1, f, a.audio_window, a.audio_layers, a.audio_feature_dim),
                   face_embedding=r(1, setup.face_embedding_dim), face_mask=r(1, f, 3, size, size))


class Models:
    """Every network of the comparison at one latent size, on one device ("meta": shapes only)."""

    def __init__(self, setup: Setup, presets: list[str], size: int, device: str, hallo: HalloShaped | None = None):
        self.setup, self.presets = setup, presets
        with torch.device(device):
            self.letstalk = {p: LetsTalkTransformer.from_preset(p, input_size=size // 8, num_frames=max(
                setup.frames, PRESETS[p].num_frames)).eval() for p in presets}
            self.hallo = (hallo if hallo is not None else HalloShaped(setup)).eval()
        first = self.letstalk[presets[0]]
        self.interleaved = [(b.attn, b.temporal_attn) for b in first.blocks]
        self.full = [(FullSpatioTemporal(b.attn, setup.frames), NoTemporal()) for b in first.blocks]
        self.clip = Clip.make(setup, size, device)

    def full_attention(self, on: bool) -> None:
        modules = self.full if on else self.interleaved
        for block, (attn, temporal) in zip(self.letstalk[self.presets[0]].blocks, modules):
            block.attn, block.temporal_attn = attn, temporal

    def jobs(self, full: bool) -> dict[str, Callable[[], object]]:
        """name -> a no-argument call; the Hallo denoiser's per-clip inputs are prepared once here."""
        c, h = self.clip, self.hallo
        with torch.inference_mode():
            prepared = h.reference(h.conditions(c.face_embedding, c.face_mask, c.audio),
                                   torch.cat([c.portrait[:, None], c.motion], dim=1))
        jobs: dict[str, Callable[[], object]] = {
            f"LetsTalk-{p}": (lambda m=m: m(c.x, c.t, c.portrait, c.audio, c.motion)) for p, m in self.letstalk.items()}
        jobs["Hallo denoiser"] = lambda: h(c.x, c.t, prepared)
        jobs["Hallo ReferenceNet"] = lambda: h.reference(prepared, torch.cat([c.portrait[:, None], c.motion], dim=1))
        jobs["Hallo locator+proj"] = lambda: h.conditions(c.face_embedding, c.face_mask, c.audio)
        if full:
            first = f"LetsTalk-{self.presets[0]}"

            def full_step():
                self.full_attention(True)
                try:
                    return jobs[first]()
                finally:
                    self.full_attention(False)
            jobs[f"{first} full attention"] = full_step
        return jobs


def count_flops(models: Models) -> dict[str, int]:
    with torch.inference_mode():
        return {name: flops_of(fn) for name, fn in models.jobs(full=True).items()}


def median_times(jobs: dict[str, Callable[[], object]], repeats: int, device: str = "cpu",
                 bf16: bool = False) -> dict[str, float]:
    """Median seconds per call, every job once per round (round 0 warms up); on CUDA each call is
    synchronised, and `bf16` runs it under bf16 autocast."""
    runs: dict[str, list[float]] = {name: [] for name in jobs}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast("bf16" if bf16 else "fp32", device):
        for round_ in range(repeats + 1):
            for name, fn in jobs.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                if round_:
                    runs[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in runs.items()}


def seconds_text(s: float) -> str:
    return f"{s:.2f} s" if s >= 1 else f"{s * 1000:.1f} ms"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def report(size: int, params: dict[str, int], flops: dict[str, int], seconds: dict[str, float] | None,
           presets: list[str], hallo_steps: int, letstalk_steps: list[int], frames: int,
           timing: str = "CPU time", precision: str = "fp32") -> None:
    ref = f"LetsTalk-{presets[0]}"
    once = ["Hallo ReferenceNet", "Hallo locator+proj"]
    flops = dict(flops)
    flops["Hallo per step"] = flops["Hallo denoiser"] + sum(flops[k] for k in once) / hallo_steps
    if seconds:
        seconds = dict(seconds)
        seconds["Hallo per step"] = seconds["Hallo denoiser"] + sum(seconds[k] for k in once) / hallo_steps

    print(f"\n{size}×{size} pixels = {frames} × 4 × {size // 8} × {size // 8} latents, batch 1, {precision}")
    print(f"{'model':<34} {'params M':>9} {'GFLOP':>10} {timing:>9} {'FLOPs ×':>8} {'time ×':>7}")
    rows = [(f"LetsTalk-{p}", f"LetsTalk-{p} (per step)") for p in presets] + [
        ("Hallo denoiser", "Hallo denoiser (per step)"),
        ("Hallo ReferenceNet", "Hallo ReferenceNet (once per clip)"),
        ("Hallo locator+proj", "Hallo face locator + proj. (once)"),
        ("Hallo per step", f"Hallo, all nets, step + once/{hallo_steps}")]
    for key, label in rows:
        p = params.get(key)
        s = seconds.get(key) if seconds else None
        per_step = key not in once
        ratio_f = f"{flops[key] / flops[ref]:.1f}" if per_step else "–"
        ratio_t = f"{s / seconds[ref]:.1f}" if s is not None and per_step else "–"
        s_text = seconds_text(s) if s is not None else "–"
        print(f"{label:<34} {p / 1e6:>9.1f} {flops[key] / 1e9:>10.1f} {s_text:>9} {ratio_f:>8} {ratio_t:>7}")

    hallo_clip_f = hallo_steps * flops["Hallo denoiser"] + sum(flops[k] for k in once)
    line = [f"Hallo DDIM-{hallo_steps}: {hallo_clip_f / 1e12:.1f} TFLOP"]
    if seconds:
        hallo_clip_s = hallo_steps * seconds["Hallo denoiser"] + sum(seconds[k] for k in once)
        line[0] += f", {seconds_text(hallo_clip_s)}"
    for n in letstalk_steps:
        text = (f"{ref} × {n} steps: {n * flops[ref] / 1e12:.1f} TFLOP "
                f"(Hallo ÷ this {hallo_clip_f / (n * flops[ref]):.2f})")
        if seconds:
            text += f", {seconds_text(n * seconds[ref])} (Hallo ÷ this {hallo_clip_s / (n * seconds[ref]):.2f})"
        line.append(text)
    print("per clip, no CFG: " + "; ".join(line))

    full = f"{ref} full attention"
    text = f"{ref} interleaved vs full spatio-temporal attention: {flops[full] / flops[ref]:.2f}× fewer FLOPs"
    if seconds and full in seconds:
        text += (f", {seconds[full] / seconds[ref]:.2f}× faster ({seconds_text(seconds[full])} vs "
                 f"{seconds_text(seconds[ref])})")
    print(text + f" (full: {flops[full] / 1e9:.0f} GFLOP)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="pixel sizes (latents: size / 8)")
    parser.add_argument("--timing-sizes", type=int, nargs="*", default=[256], help="sizes at which to time on CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: all; 1 with --smoke)")
    parser.add_argument("--presets", nargs="+", default=["B", "L"], choices=list(PRESETS),
                        help="LetsTalk presets; ratios are to the first")
    parser.add_argument("--hallo-steps", type=int, default=40,
                        help="Hallo's DDIM steps (its configs/inference/default.yaml)")
    parser.add_argument("--letstalk-steps", type=int, nargs="+", default=[25, 250],
                        help="LetsTalk steps for the per-clip line (25: this repo's DDIM; 250: the paper's DDPM)")
    parser.add_argument("--no-full", action="store_true", help="do not time full spatio-temporal attention")
    parser.add_argument("--smoke", action="store_true", help="tiny models and sizes, 1 repeat: a few seconds")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to time (FLOPs: always meta)")
    parser.add_argument("--bf16", action="store_true", help="time under bf16 autocast (default fp32; TF32 off)")
    args = parser.parse_args()
    setup = FULL
    if args.smoke:
        setup, args.sizes, args.timing_sizes, args.repeats, args.presets = SMOKE, [64], [64], 1, ["tiny"]
    for size in args.sizes + args.timing_sizes:
        if size % 64:
            raise SystemExit(f"size {size} must be a multiple of 64 (latent side divisible by the U-Net's 8)")
    torch.set_num_threads(args.threads or (1 if args.smoke else torch.get_num_threads()))
    torch.manual_seed(0)

    precision = "bf16 autocast" if args.bf16 else "fp32"
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
        where = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        where = f"{cpu_name()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; {precision}, batch 1, {setup.frames} frames, random weights")
    print("FLOPs: FlopCounterMode on the meta device (matmuls + convolutions; SDPA via the math backend)")
    print("Hallo-shaped, every step: SD-1.5 U-Net + AnimateDiff-v2 motion modules + reference attention + Hallo's "
          "audio modules + face-locator features; once per clip (charged / --hallo-steps): ReferenceNet on 3 latents, "
          "face locator, audio + image projections. Neither side: VAE, wav2vec2, insightface, CFG (doubles both).")

    meta_hallo = real_hallo = None
    for size in sorted(set(args.sizes) | set(args.timing_sizes)):
        meta = Models(setup, args.presets, size, "meta", meta_hallo)
        meta_hallo = meta.hallo  # the U-Net does not depend on the size
        groups = meta.hallo.parameter_groups()
        params = {f"LetsTalk-{p}": count_parameters(m)["total"] for p, m in meta.letstalk.items()}
        params |= {"Hallo denoiser": groups["denoiser"], "Hallo ReferenceNet": groups["ReferenceNet"],
                   "Hallo locator+proj": groups["face locator + projections"], "Hallo per step": groups["total"]}
        if size == min(args.sizes + args.timing_sizes):
            print("Hallo-shaped parameters (M): " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in groups.items()))
            for p, m in meta.letstalk.items():
                n = count_parameters(m)
                print(f"LetsTalk-{p} parameters (M): backbone {n['backbone'] / 1e6:.1f} + audio projection "
                      f"{n['audio_projection'] / 1e6:.1f} = {n['total'] / 1e6:.1f}")
        flops = count_flops(meta)
        seconds = None
        if size in args.timing_sizes:
            real = Models(setup, args.presets, size, args.device, real_hallo)
            real_hallo = real.hallo
            if args.smoke:  # the meta count must match a count on real tensors
                real_flops = count_flops(real)
                assert real_flops == flops, (real_flops, flops)
                print("smoke: FLOPs on meta == FLOPs on real tensors")
            seconds = median_times(real.jobs(full=not args.no_full), args.repeats, args.device, args.bf16)
            del real
        report(size, params, flops, seconds, args.presets, args.hallo_steps, args.letstalk_steps, setup.frames,
               "GPU time" if args.device == "cuda" else "CPU time", precision)


if __name__ == "__main__":
    main()
