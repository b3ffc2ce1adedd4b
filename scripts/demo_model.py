"""The learned demo model's recipe helpers (docs/demo-model.md).

    python scripts/demo_model.py init out/demo-model/data-bundle        # random `demo` bundle: codec + audio encoder
    python scripts/demo_model.py evaluate --model models/demo --data out/demo-model/shards --steps 25

`evaluate` renders held-out identities (the eval split of the shard manifest) from their first frame
and their own audio, and prints simple figures (the official ones come from jobs/evaluate.py):

    sync     Pearson r between the mouth opening measured in the rendered frames
             (letstalk.synthetic.measure_mouth_open) and the audio envelope, max over lags 0..3 frames
    control  the same against another held-out video's envelope (shuffled audio)
    psnr     identity PSNR (dB) of the face box, rendered vs the ground-truth crops
    seam     mean |frame difference| across clip boundaries / median within clips
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from letstalk.clips import ClipSpec, decode_video
from letstalk.media import iter_video_frames
from letstalk.pipeline import LetsTalkPipeline
from letstalk.portrait import crop_portrait, detect_face
from letstalk.synthetic import Identity, audio_envelope, measure_mouth_open


def lagged_r(mouth: np.ndarray, env: np.ndarray, max_lag: int = 3) -> float:
    """max over lag in 0..max_lag of Pearson r(mouth[t], env[t - lag])."""
    best = -1.0
    for lag in range(max_lag + 1):
        n = min(len(mouth) - lag, len(env))
        a, b = mouth[lag:lag + n], env[:n]
        if n > 2 and a.std() > 1e-8 and b.std() > 1e-8:
            best = max(best, float(np.corrcoef(a, b)[0, 1]))
    return best


def uncrop(frames: np.ndarray, box: tuple[int, int, int, int], canvas: np.ndarray) -> np.ndarray:
    """(N, s, s, 3) crops -> (N, H, W, 3) full frames: each crop resized back into `box` of `canvas`."""
    x0, y0, x1, y1 = box
    out = np.repeat(canvas[None], len(frames), axis=0)
    for k, f in enumerate(frames):
        out[k, y0:y1, x0:x1] = np.asarray(Image.fromarray(f).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR))
    return out


def seam_ratio(frames: np.ndarray, clip_len: int) -> float:
    d = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))  # d[t-1] = |f_t - f_{t-1}|
    t = np.arange(1, len(frames))
    boundary = t % clip_len == 0
    return float(d[boundary].mean() / max(np.median(d[~boundary]), 1e-6))


def evaluate(model: str, data: str, videos: int = 4, steps: int = 25, sampler: str = "ddim", guidance: float = 1.0,
             seconds: float | None = None, split: str = "eval", sheet: str | None = None, seed: int = 0,
             strength: float | None = None) -> dict:
    pipe = LetsTalkPipeline.from_pretrained(model)
    manifest = json.loads((Path(data) / "manifest.json").read_text())
    entries = [e for e in manifest["inputs"] if e["status"] == "ok" and e["split"] == split][:videos]
    if len(entries) < 2:
        raise ValueError(f"need at least 2 {split} videos, found {len(entries)}")
    spec = ClipSpec(image_size=pipe.image_size, clip_frames=pipe.transformer.cfg.num_frames)
    clip_len = pipe.transformer.cfg.num_frames
    rows, envs = [], []
    for e in entries:
        meta = json.loads(Path(e["path"]).with_suffix(".json").read_text())
        ident = Identity.from_dict(meta["identity_params"])
        gt = decode_video(e["path"], spec)  # ground-truth crops (N, s, s, 3), the preprocessing's crop box
        wave = gt.audio if seconds is None else gt.audio[: int(seconds * spec.sample_rate)]
        first = next(iter(iter_video_frames(e["path"], fps=spec.fps)))  # the full first frame: the portrait
        crop = crop_portrait(first, size=pipe.image_size)
        t0 = time.perf_counter()
        ref = pipe.codec.encode(crop.image[None]).to(pipe.device)
        frames = np.concatenate(list(pipe.iter_clips(ref, wave, steps=steps, sampler=sampler, guidance=guidance,
                                                     seed=seed, strength=strength)))
        secs = time.perf_counter() - t0
        n = len(frames)
        gt_frames = gt.frames[:n]
        env = audio_envelope(wave, spec.sample_rate, spec.fps)[:n]
        mouth = measure_mouth_open(uncrop(frames, crop.box, first), ident)
        mouth_gt = measure_mouth_open(uncrop(gt_frames, crop.box, first), ident)
        face = detect_face(first) or crop.box  # face box in the full frame -> crop coordinates
        x0, y0, x1, y1 = crop.box
        sc = pipe.image_size / (x1 - x0)
        fx0, fy0 = max(0, round((face[0] - x0) * sc)), max(0, round((face[1] - y0) * sc))
        fx1, fy1 = min(pipe.image_size, round((face[2] - x0) * sc)), min(pipe.image_size, round((face[3] - y0) * sc))
        mse = ((frames[:, fy0:fy1, fx0:fx1].astype(np.float64) - gt_frames[:, fy0:fy1, fx0:fx1]) ** 2).mean()
        rows.append({"video": Path(e["path"]).name, "identity": e["identity"], "frames": n, "render_s": round(secs, 1),
                     "sync": lagged_r(mouth, env), "sync_gt": lagged_r(mouth_gt, env),
                     "psnr": float(10 * np.log10(255**2 / max(mse, 1e-10))), "seam": seam_ratio(frames, clip_len),
                     "seam_gt": seam_ratio(gt_frames, clip_len), "_mouth": mouth})
        envs.append(env)
        if sheet and len(rows) == 1:
            idx = np.linspace(0, n - 1, 12).round().astype(int)
            grid = np.concatenate([np.concatenate(list(gt_frames[idx]), axis=1),
                                   np.concatenate(list(frames[idx]), axis=1)], axis=0)
            Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.Resampling.NEAREST).save(sheet)
    for k, r in enumerate(rows):  # control: the mouth against the next held-out video's envelope
        r["control"] = lagged_r(r.pop("_mouth"), envs[(k + 1) % len(rows)])
    keys = ("sync", "control", "sync_gt", "psnr", "seam", "seam_gt")
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    return {"model": model, "videos": len(rows), "steps": steps, "sampler": sampler, "guidance": guidance,
            "strength": pipe.settings.strength if strength is None else strength,
            "mean": summary, "per_video": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("init", help="save the random-initialised `demo` data bundle (codec + audio encoder)")
    q.add_argument("dir")
    q.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("evaluate", help="quick held-out figures: sync vs control, identity PSNR, seam ratio")
    q.add_argument("--model", required=True, help="render bundle")
    q.add_argument("--data", required=True, help="shard folder (its manifest names the videos and the split)")
    q.add_argument("--split", default="eval", choices=["eval", "train"])
    q.add_argument("--videos", type=int, default=4)
    q.add_argument("--seconds", type=float, help="render only the first S seconds of each video")
    q.add_argument("--steps", type=int, default=25)
    q.add_argument("--sampler", default="ddim")
    q.add_argument("--guidance", type=float, default=1.0)
    q.add_argument("--strength", type=float, help="sampling start (default: the bundle's pipeline.json)")
    q.add_argument("--sheet", help="PNG: ground truth (top) vs rendered (bottom) frames of the first video")
    q.add_argument("--json", help="write the full result here")
    args = p.parse_args(argv)
    if args.cmd == "init":
        print(LetsTalkPipeline.init_demo(seed=args.seed).save_pretrained(args.dir))
        return 0
    res = evaluate(args.model, args.data, args.videos, args.steps, args.sampler, args.guidance, args.seconds,
                   args.split, args.sheet, strength=args.strength)
    for r in res["per_video"]:
        print(f"{r['video']:>14} {r['identity']:>8} frames {r['frames']:4d}  sync {r['sync']:+.3f} "
              f"(control {r['control']:+.3f}, gt {r['sync_gt']:+.3f})  psnr {r['psnr']:5.1f} dB  "
              f"seam {r['seam']:.2f} (gt {r['seam_gt']:.2f})  {r['render_s']} s")
    m = res["mean"]
    print(f"{'mean':>23}  sync {m['sync']:+.3f} (control {m['control']:+.3f}, gt {m['sync_gt']:+.3f})  "
          f"psnr {m['psnr']:5.1f} dB  seam {m['seam']:.2f} (gt {m['seam_gt']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
