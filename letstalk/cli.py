"""`letstalk` command line.

    letstalk sample --preset tiny --out out/sample.png [--sampler ddim] [--steps 25] [--seed 0]
        samples a clip from a random-initialised model (no weights needed) and saves its
        frames as a PNG strip: latent channels 0-2 shown as RGB.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .config import PRESETS
from .diffusion import SAMPLERS, GaussianDiffusion
from .transformer import LetsTalkTransformer


def latents_to_strip(latents: torch.Tensor, scale: int = 8) -> Image.Image:
    """(F, C, H, W) latents -> one RGB image, frames side by side, channels 0-2 as RGB."""
    rgb = latents[:, :3].float()
    lo, hi = rgb.amin(), rgb.amax()
    rgb = ((rgb - lo) / (hi - lo + 1e-8) * 255).round().byte()  # (F, 3, H, W)
    strip = torch.cat(list(rgb.permute(0, 2, 3, 1)), dim=1).numpy()  # (H, F*W, 3)
    img = Image.fromarray(np.ascontiguousarray(strip))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def cmd_sample(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model = LetsTalkTransformer.from_preset(args.preset).eval()
    cfg = model.cfg
    g = torch.Generator().manual_seed(args.seed)
    s = cfg.input_size
    portrait = torch.randn(1, cfg.in_channels, s, s, generator=g)
    audio = torch.randn(1, cfg.num_frames, cfg.audio_window, cfg.audio_layers, cfg.audio_feature_dim, generator=g)
    noise = torch.randn(1, cfg.num_frames, cfg.in_channels, s, s, generator=g)
    diffusion = GaussianDiffusion()
    bar = tqdm(total=args.steps, desc=f"{args.sampler} sampling", unit="step")

    def progress(i: int, n: int) -> None:
        bar.update(1)

    with torch.no_grad():
        clip = diffusion.sample(lambda x, t: model(x, t, portrait, audio), noise, sampler=args.sampler,
                                steps=args.steps, generator=g, progress=progress)
    bar.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    latents_to_strip(clip[0]).save(tmp, format="PNG")
    tmp.replace(out)
    print(f"wrote {out} ({cfg.num_frames} frames, preset {args.preset}, {args.sampler} x {args.steps})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="letstalk", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", help="sample a random-initialised model, save frames as a PNG strip")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/sample.png")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"letstalk: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
