"""Sampler quality vs cost on a trained model: DDIM / DPM-Solver++ at 10-50 steps vs DDPM-250.

    python bench/samplers.py --model letstalk/models/demo --data out/demo/shards [--videos 4] [--frames 100]

Renders the held-out videos of the shard folder's eval split with each setting (the evaluate job's
protocol: first frame as the portrait, the video's own audio) and prints, per setting, lip sync
(and its shuffled-audio control), identity PSNR/SSIM of the face region, the clip-seam ratio and
the render time per frame, plus each time as a ratio of DDPM-250's, all from one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from letstalk_platform.evaluate import EvalConfig, Extractors, load_eval_videos, render_videos, score_model

from letstalk import metrics
from letstalk.pipeline import LetsTalkPipeline

SETTINGS = [("ddpm", 250), ("ddim", 50), ("ddim", 25), ("ddim", 10), ("dpm", 25), ("dpm", 10)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="letstalk/models/demo")
    p.add_argument("--data", required=True, help="shard folder whose eval split holds held-out identities")
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--settings", help="e.g. ddpm:250,ddim:25 (default: %s)" % ",".join(f"{s}:{n}" for s, n in SETTINGS))
    args = p.parse_args()
    settings = SETTINGS if not args.settings else [(s, int(n)) for s, n in
                                                    (x.split(":") for x in args.settings.split(","))]
    with tempfile.TemporaryDirectory() as tmp:
        base = EvalConfig(models=[args.model], data=args.data, frames=args.frames, max_videos=args.videos,
                          mlflow_uri=f"sqlite:///{tmp}/m.db")
        videos, spec, _ = load_eval_videos(base)
    pipe = LetsTalkPipeline.from_pretrained(args.model)
    extractors = Extractors(None, None, None)
    rows = []
    for sampler, steps in settings:
        cfg = base.model_copy(update={"sampler": sampler, "steps": steps})
        t0 = time.perf_counter()
        gen = render_videos(pipe, videos, cfg, spec, desc=f"{sampler}-{steps}")
        seconds = time.perf_counter() - t0
        values, _ = score_model(gen, videos, extractors, spec, cfg.max_lag)
        values["seam"] = metrics.seam_ratio(gen, pipe.transformer.cfg.num_frames)
        rows.append((f"{sampler}-{steps}", values, seconds / sum(len(g) for g in gen)))
    ref_name, _, ref = next((r for r in rows if r[0] == "ddpm-250"), rows[0])
    print(f"\n{args.model}: {len(videos)} held-out videos x {args.frames} frames, {spec['size']} px, CPU")
    print(f"| sampler | sync | control | face PSNR | face SSIM | seam | s/frame | time vs {ref_name} |")
    print("|---|---|---|---|---|---|---|---|")
    for name, v, spf in rows:
        print(f"| {name} | {v['sync']:.3f} | {v['sync_control']:.3f} | {v['face_psnr']:.2f} | {v['face_ssim']:.3f} | "
              f"{v['seam']:.2f} | {spf:.4f} | {spf / ref:.3f} |")


if __name__ == "__main__":
    main()
