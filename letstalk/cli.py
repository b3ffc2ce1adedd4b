"""`letstalk` command line.

    letstalk render PORTRAIT AUDIO -o OUT.mp4 [--model DIR] [--steps N] [--sampler ddpm|ddim|dpm]
                    [--guidance G] [--seed S]
    letstalk init-tiny DIR        save a random-initialised tiny bundle (no model hub needed)
    letstalk demo [--out out/demo] render a drawn portrait + speech-like audio with a tiny bundle
    letstalk make-dataset OUT --videos N --seconds S --seed K   procedural talking faces (mp4 + JSON)
    letstalk sample --out X.png   sample a random-initialised model, frames as a PNG strip
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


def latents_to_strip(latents: torch.Tensor, scale: int = 8) -> Image.Image:
    """(F, C, H, W) latents -> one RGB image, frames side by side, channels 0-2 as RGB."""
    rgb = latents[:, :3].float()
    lo, hi = rgb.amin(), rgb.amax()
    rgb = ((rgb - lo) / (hi - lo + 1e-8) * 255).round().byte()  # (F, 3, H, W)
    strip = torch.cat(list(rgb.permute(0, 2, 3, 1)), dim=1).numpy()  # (H, F*W, 3)
    img = Image.fromarray(np.ascontiguousarray(strip))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


class StepBar:
    """progress(done, total) callback drawing a tqdm bar."""

    def __init__(self, desc: str):
        self.bar: tqdm | None = None
        self.desc = desc

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="step")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_sample(args: argparse.Namespace) -> int:
    from .transformer import LetsTalkTransformer

    torch.manual_seed(args.seed)
    model = LetsTalkTransformer.from_preset(args.preset).eval()
    cfg = model.cfg
    g = torch.Generator().manual_seed(args.seed)
    s = cfg.input_size
    portrait = torch.randn(1, cfg.in_channels, s, s, generator=g)
    audio = torch.randn(1, cfg.num_frames, cfg.audio_window, cfg.audio_layers, cfg.audio_feature_dim, generator=g)
    noise = torch.randn(1, cfg.num_frames, cfg.in_channels, s, s, generator=g)
    bar = StepBar(f"{args.sampler} sampling")
    with torch.no_grad():
        clip = GaussianDiffusion().sample(lambda x, t: model(x, t, portrait, audio), noise, sampler=args.sampler,
                                          steps=args.steps, generator=g, progress=bar)
    bar.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    latents_to_strip(clip[0]).save(tmp, format="PNG")
    tmp.replace(out)
    print(f"wrote {out} ({cfg.num_frames} frames, preset {args.preset}, {args.sampler} x {args.steps})")
    return 0


def cmd_init_tiny(args: argparse.Namespace) -> int:
    from .pipeline import LetsTalkPipeline

    path = LetsTalkPipeline.init_tiny(seed=args.seed).save_pretrained(args.dir)
    print(f"wrote a random-initialised tiny bundle to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Everything from nothing: a tiny bundle, a drawn portrait, speech-like audio -> mp4 + contact sheet."""
    import soundfile as sf

    from .media import load_video_frames
    from .pipeline import LetsTalkPipeline
    from .synthetic import draw_portrait, speech_like_audio
    from .viz import contact_sheet

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shipped = Path(__file__).resolve().parents[1] / "models" / "demo"  # the learned demo model (a checkout)
    bundle = Path(args.model) if args.model else shipped if (shipped / "pipeline.json").is_file() \
        else out / "tiny-bundle"
    if not (bundle / "pipeline.json").exists():
        LetsTalkPipeline.init_tiny(seed=0).save_pretrained(bundle)
        print(f"wrote a random-initialised tiny bundle to {bundle}")
    Image.fromarray(draw_portrait(256, seed=args.seed)).save(out / "portrait.png")
    sf.write(out / "speech.wav", speech_like_audio(args.seconds, seed=args.seed), 16000)
    args = argparse.Namespace(**{**vars(args), "portrait": out / "portrait.png", "audio": out / "speech.wav",
                                 "model": bundle, "out": out / "talk.mp4"})
    cmd_render(args)
    sheet = out / "contact_sheet.png"
    contact_sheet(load_video_frames(args.out), fps=25).save(sheet)
    print(f"wrote {sheet}")
    return 0


def cmd_make_dataset(args: argparse.Namespace) -> int:
    """Procedural talking-face videos with ground-truth sidecars (a stand-in for HDTF / CelebV-HQ)."""
    import time

    from .synthetic import dataset_todo, make_dataset

    out = Path(args.out)
    kept = args.videos - len(dataset_todo(out, args.videos, args.seconds, args.seed, args.size))
    start = time.perf_counter()
    paths = make_dataset(out, videos=args.videos, seconds=args.seconds, seed=args.seed, size=args.size)
    note = f"; kept {kept} already there" if kept else ""
    new = len(paths) - kept
    print(f"wrote {new} video{'s' if new != 1 else ''} to {out} in {time.perf_counter() - start:.1f} s "
          f"({args.seconds:g} s each, {args.size}x{args.size}, 25 fps, H.264 + AAC, ground truth in "
          f"talk_NNNN.json){note}")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from .pipeline import LetsTalkPipeline

    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"output must be an .mp4 file, got {out.name!r}")
    if not out.parent.is_dir():
        raise ValueError(f"output folder {str(out.parent)!r} does not exist")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = LetsTalkPipeline.from_pretrained(args.model, device=device)
    bar = StepBar(f"rendering ({args.sampler} × {args.steps})")
    try:
        result = pipe.render_to_file(args.portrait, args.audio, out, steps=args.steps, sampler=args.sampler,
                                     guidance=args.guidance, seed=args.seed, progress=bar)
    finally:
        bar.close()
    if not result.face_found:
        print("letstalk: warning: no face found in the portrait; used a centre crop", file=sys.stderr)
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    print(f"wrote {out}: {result.num_frames} frames at {result.fps} fps ({parts})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="letstalk", description="LetsTalk talking-video diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("render", help="portrait image + speech audio -> talking video (mp4)")
    p.add_argument("portrait", help="portrait image (png, jpg, ...)")
    p.add_argument("audio", help="speech audio (wav, mp3, ogg, m4a, or a video with sound)")
    p.add_argument("-o", "--out", required=True, help="output .mp4")
    p.add_argument("--model", default="models/tiny", help="bundle directory (see `letstalk init-tiny`)")
    p.add_argument("--steps", type=int, default=250, help="denoising steps per clip (paper: 250 DDPM)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddpm")
    p.add_argument("--guidance", type=float, default=1.0, help="audio classifier-free guidance (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("init-tiny", help="save a random-initialised tiny bundle")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_tiny)

    p = sub.add_parser("demo", help="render a drawn portrait and speech-like audio with the shipped demo model")
    p.add_argument("--out", default="out/quick-demo")
    p.add_argument("--model", default=None,
                   help="bundle directory (default: models/demo of this checkout, else a new random tiny bundle)")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("make-dataset", help="write procedural talking-face videos (mp4 + JSON ground truth)")
    p.add_argument("out", help="output folder (talk_0000.mp4 + talk_0000.json, ...)")
    p.add_argument("--videos", type=int, default=8, help="number of videos, one identity each")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each video")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="frame side in pixels (multiple of 8, >= 64)")
    p.set_defaults(func=cmd_make_dataset)

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
    except (ValueError, OSError) as e:  # user errors: one line, no traceback
        print(f"letstalk: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
