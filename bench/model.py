"""Model benchmark (prints ratios measured in one run; not a test).

    python bench/model.py [--preset S] [--frames 16] [--repeats 3]

1. MFU ratio: forward FLOP/s of the preset ÷ FLOP/s of a plain matrix product of similar size
   (tokens × D @ D × 4D), both measured here, now.
2. Interleaved temporal/spatial attention (LetsTalk) vs full spatio-temporal attention (every
   token of every frame attends to every other) at the same frame count: FLOPs and time of the
   whole forward pass.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from einops import rearrange
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from letstalk import LetsTalkTransformer


class FullSpatioTemporal(nn.Module):
    """Wraps a block's spatial attention so it attends over all frames' tokens jointly."""

    def __init__(self, attn: nn.Module, frames: int):
        super().__init__()
        self.attn, self.frames = attn, frames

    def forward(self, x, extra=None):  # x: (B*F, T, D)
        joint = rearrange(x, "(b f) t d -> b (f t) d", f=self.frames)
        return rearrange(self.attn(joint), "b (f t) d -> (b f) t d", f=self.frames)


class NoTemporal(nn.Module):
    def forward(self, x, extra=None):
        return torch.zeros_like(x)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def flops_of(fn) -> int:
    # the CPU flash-attention kernel is invisible to FlopCounterMode: count with the math
    # backend, whose matmuls it does see
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="S")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = LetsTalkTransformer.from_preset(args.preset, num_frames=args.frames).eval()
    cfg = model.cfg
    s, c = cfg.input_size, cfg.in_channels
    x = torch.randn(1, args.frames, c, s, s)
    t = torch.tensor([500])
    portrait = torch.randn(1, c, s, s)
    audio = torch.randn(1, args.frames, cfg.audio_window, cfg.audio_layers, cfg.audio_feature_dim)
    motion = torch.randn(1, cfg.num_motion_frames, c, s, s)

    @torch.no_grad()
    def forward():
        return model(x, t, portrait, audio, motion)

    flops = flops_of(forward)
    seconds = timed(forward, args.repeats)

    tokens = args.frames * 2 * cfg.tokens_per_frame  # video + portrait tokens per clip
    a = torch.randn(tokens, cfg.hidden_size)
    w = torch.randn(cfg.hidden_size, 4 * cfg.hidden_size)
    gemm_flops = 2 * tokens * cfg.hidden_size * 4 * cfg.hidden_size
    gemm_seconds = timed(lambda: a @ w, 20)

    model_rate, gemm_rate = flops / seconds, gemm_flops / gemm_seconds
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"preset {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{args.frames} frames × {cfg.tokens_per_frame} tokens, D={cfg.hidden_size}")
    print(f"forward: {flops / 1e9:.1f} GFLOP in {seconds:.2f} s = {model_rate / 1e9:.1f} GFLOP/s")
    print(f"GEMM {tokens}×{cfg.hidden_size} @ {cfg.hidden_size}×{4 * cfg.hidden_size}: {gemm_rate / 1e9:.1f} GFLOP/s")
    print(f"MFU ratio (forward ÷ GEMM FLOP/s): {model_rate / gemm_rate:.2f}")

    for block in model.blocks:
        block.attn = FullSpatioTemporal(block.attn, args.frames)
        block.temporal_attn = NoTemporal()
    full_flops = flops_of(forward)
    full_seconds = timed(forward, args.repeats)
    print(f"full spatio-temporal attention forward: {full_flops / 1e9:.1f} GFLOP in {full_seconds:.2f} s")
    print(f"interleaved vs full: {full_flops / flops:.2f}x fewer FLOPs, {full_seconds / seconds:.2f}x faster")


if __name__ == "__main__":
    main()
