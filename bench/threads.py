"""A CLI render against torch's thread count, on an idle machine and on a busy one: ratios from one run.

    python bench/threads.py [--seconds 2] [--repeats 3] [--threads 1 2 4 8] [--busy 1]

Renders as `letstalk render` does (the shipped demo model, DDIM-25, a drawn portrait, speech-like
audio, to memory) with torch.set_num_threads(n) for each n; the repeats are interleaved (one render
per thread count per round). Then the same while `--busy` other processes each keep one core busy
(a pure-Python loop: another job on the machine). Prints median seconds per render and the ratio
to the CLI's default, letstalk.accel.usable_cpus() threads.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from letstalk.accel import usable_cpus
from letstalk.cli import SHIPPED
from letstalk.diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS
from letstalk.pipeline import LetsTalkPipeline
from letstalk.synthetic import draw_portrait, speech_like_audio


def timings(pipe: LetsTalkPipeline, threads: list[int], repeats: int, seconds: float) -> dict[int, list[float]]:
    portrait, audio = draw_portrait(256, seed=0), speech_like_audio(seconds, seed=0)
    out: dict[int, list[float]] = {n: [] for n in threads}
    for _ in range(repeats):
        for n in threads:
            torch.set_num_threads(n)
            start = time.perf_counter()
            pipe.render(portrait, audio, steps=DEFAULT_STEPS, sampler=DEFAULT_SAMPLER, seed=0)
            out[n].append(time.perf_counter() - start)
    return out


def report(title: str, times: dict[int, list[float]], default: int) -> None:
    base = statistics.median(times[default])
    print(f"\n{title}")
    print(f"{'threads':>8} {'median s':>9} {'min-max s':>13} {'/ default':>10}")
    for n, t in times.items():
        mark = "  <- CLI default" if n == default else ""
        print(f"{n:>8} {statistics.median(t):>9.2f} {min(t):>6.2f}-{max(t):<6.2f} {statistics.median(t) / base:>10.2f}"
              f"{mark}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="audio length per render")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--busy", type=int, default=1, help="other processes keeping a core busy in the second run")
    args = ap.parse_args()
    default = usable_cpus()
    threads = sorted(set(args.threads) | {default})
    pipe = LetsTalkPipeline.from_pretrained(SHIPPED)
    pipe.render(draw_portrait(256, seed=0), speech_like_audio(0.5, seed=0), steps=2)  # warm-up
    print(f"demo model, {args.seconds:g} s audio, {DEFAULT_SAMPLER}-{DEFAULT_STEPS}, {args.repeats} repeats; "
          f"usable CPUs {default}, os.cpu_count() {__import__('os').cpu_count()}, torch {torch.__version__}")
    report("idle machine", timings(pipe, threads, args.repeats, args.seconds), default)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        time.sleep(1.0)
        report(f"{args.busy} other process(es) keeping a core busy",
               timings(pipe, threads, args.repeats, args.seconds), default)
    finally:
        for hog in hogs:
            hog.kill()


if __name__ == "__main__":
    main()
