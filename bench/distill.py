"""A distilled student against its teacher: denoising time and whole-render time, same input, one run.

    python bench/distill.py --student out/demo-distill/runs/demo-distill/bundle [--teacher letstalk/models/demo]
                            [--seconds 8] [--repeats 3]

Renders `--seconds` of speech-like audio onto a drawn portrait with the teacher at DDIM-25 (the
CLI's default) and the student at its own sampler and steps (its pipeline.json), interleaved,
`--repeats` times each after a warm-up, on the default thread count. Prints medians of the
denoising seconds (the transformer's share: what distillation shortens), of the whole render
(audio features, decoding and muxing included) and the real-time factor (render seconds per
second of video), and the teacher ÷ student ratios. Quality is the evaluate job's (docs/distill.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from letstalk.accel import set_threads
from letstalk.cli import SHIPPED
from letstalk.pipeline import LetsTalkPipeline
from letstalk.synthetic import draw_portrait, speech_like_audio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="the student's bundle folder")
    ap.add_argument("--teacher", default=str(SHIPPED), help="the teacher's bundle folder (rendered at DDIM-25)")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    threads = set_threads()
    pipes = {"teacher": LetsTalkPipeline.from_pretrained(args.teacher),
             "student": LetsTalkPipeline.from_pretrained(args.student)}
    sampling = {name: pipe.sampling() for name, pipe in pipes.items()}
    portrait, audio = draw_portrait(256, seed=0), speech_like_audio(args.seconds, seed=0)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in pipes}
    with tempfile.TemporaryDirectory() as d:
        for name, pipe in pipes.items():  # warm-up
            pipe.render_to_file(portrait, audio[:16000], Path(d) / "warm.mp4")
        for _ in range(args.repeats):
            for name, pipe in pipes.items():  # interleaved
                t0 = time.perf_counter()
                result = pipe.render_to_file(portrait, audio, Path(d) / f"{name}.mp4")  # no sampler, no steps
                total = time.perf_counter() - t0
                runs[name].append({"denoise": result.seconds["denoise"], "total": total,
                                   "video_s": result.num_frames / result.fps})
    med = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in runs.items()}
    print(f"{args.seconds:g} s audio, 256 px portrait (paste-back), {threads} threads, medians of {args.repeats}")
    for name, m in med.items():
        sampler, steps = sampling[name]
        print(f"{name:8} {sampler}-{steps:<3} denoise {m['denoise']:7.2f} s | whole render {m['total']:7.2f} s | "
              f"real-time factor {m['total'] / m['video_s']:.3f}")
    t, s = med["teacher"], med["student"]
    print(f"teacher / student: denoise {t['denoise'] / s['denoise']:.1f}x, whole render {t['total'] / s['total']:.1f}x")


if __name__ == "__main__":
    main()
