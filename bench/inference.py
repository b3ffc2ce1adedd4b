"""Inference speed switches (letstalk.accel): each one against the default, ratios from one run.

    nice -n 10 python bench/inference.py [--presets tiny demo] [--seconds 1.28] [--steps 25]
                                         [--repeats 3] [--threads 1] [--no-compile]

For each preset (random-initialised: the cost of a forward pass does not depend on the weights),
seconds per rendered frame (LetsTalkPipeline.render to memory, DDIM) for:

    fp32 eager (the default) | bf16 autocast | SDPA math | SDPA flash | decode overlap |
    regional torch.compile (inductor; the compile itself is timed apart, on the first render)

Each variant is its own pipeline with the same weights, and the repeats are interleaved (one
render of each variant per round), so drift in machine load hits all of them; medians are printed
with their ratio to the default. Then 4 concurrent renders (threads, one pipeline) with clip
batching against the same without, and 4 renders one after another.

`tiny` = the test bundle (64² frames through a small SD-shaped VAE, 8-frame clips);
`demo` = LetsTalkPipeline.init_demo() (48² frames through the space-to-depth codec, D 192, 4 blocks).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from letstalk.accel import torch_thread_pool
from letstalk.pipeline import LetsTalkPipeline
from letstalk.synthetic import draw_portrait, speech_like_audio

VARIANTS: dict[str, dict] = {
    "fp32 eager (default)": {},
    "bf16 autocast": {"dtype": "bf16"},
    "SDPA math": {"sdpa_backend": "math"},
    "SDPA flash": {"sdpa_backend": "flash"},
    "decode overlap": {"overlap_decode": True},
    "regional compile": {"compile": "regional"},
}


def make(preset: str, options: dict) -> LetsTalkPipeline:
    pipe = LetsTalkPipeline.init_tiny(seed=0) if preset == "tiny" else LetsTalkPipeline.init_demo(seed=0)
    pipe.set_inference(options)
    return pipe


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "demo"], choices=["tiny", "demo"])
    p.add_argument("--seconds", type=float, default=1.28, help="audio length (1.28 s = 32 frames = 4 clips)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--concurrent", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes on a small CPU)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else cpu_name()} ({os.cpu_count()} CPUs), "
          f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), load {os.getloadavg()[0]:.1f}")
    face = draw_portrait(128, seed=0)
    wave = speech_like_audio(args.seconds, seed=0)
    frames = round(args.seconds * 25)
    kw = {"steps": args.steps, "sampler": "ddim"}
    print(f"input: {args.seconds:g} s audio -> {frames} frames, DDIM-{args.steps}, {args.repeats} interleaved rounds")

    for preset in args.presets:
        variants = {k: v for k, v in VARIANTS.items() if not (args.no_compile and "compile" in v)}
        pipes = {name: make(preset, opts).to(device) for name, opts in variants.items()}
        first = {}
        for name, pipe in pipes.items():  # warm-up; for compile this is where inductor compiles
            t0 = time.perf_counter()
            pipe.render(face, wave, **kw)
            first[name] = time.perf_counter() - t0
        times: dict[str, list[float]] = {name: [] for name in pipes}
        for _ in range(args.repeats):
            for name, pipe in pipes.items():
                t0 = time.perf_counter()
                pipe.render(face, wave, **kw)
                times[name].append((time.perf_counter() - t0) / frames)
        base = statistics.median(times["fp32 eager (default)"])
        print(f"\n{preset} ({next(iter(pipes.values())).image_size}² frames), load {os.getloadavg()[0]:.1f}:")
        for name, ts in times.items():
            med = statistics.median(ts)
            extra = f"  (first render incl. compile {first[name]:.1f} s)" if "compile" in variants[name] else ""
            print(f"  {name:<22} {med * 1000:8.2f} ms/frame  x{base / med:5.2f} speed  "
                  f"{[round(t * 1000, 2) for t in ts]}{extra}")

        # 4 concurrent renders in one pipeline (threads, as in a Serve replica), with and without batching
        n = args.concurrent
        waves = [speech_like_audio(args.seconds, seed=k) for k in range(n)]
        plain = make(preset, {}).to(device)
        batched = make(preset, {"batch_clips": True, "max_batch": args.max_batch,
                                "batch_wait_ms": args.batch_wait_ms}).to(device)
        for pipe in (plain, batched):
            pipe.render(face, waves[0], **kw)  # warm-up
        rows: dict[str, list[float]] = {"one after another": [], f"{n} concurrent": [],
                                        f"{n} concurrent, batched": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for k, w in enumerate(waves):
                plain.render(face, w, seed=k, **kw)
            rows["one after another"].append(time.perf_counter() - t0)
            for name, pipe in ((f"{n} concurrent", plain), (f"{n} concurrent, batched", batched)):
                t0 = time.perf_counter()
                with torch_thread_pool(n) as pool:
                    list(pool.map(lambda kw_: pipe.render(face, kw_[1], seed=kw_[0], **kw), enumerate(waves)))
                rows[name].append(time.perf_counter() - t0)
        b = batched.batcher
        serial = statistics.median(rows["one after another"])
        print(f"  {n} renders of {frames} frames, load {os.getloadavg()[0]:.1f}:")
        for name, ts in rows.items():
            med = statistics.median(ts)
            print(f"    {name:<26} {med:7.2f} s  {n * frames / med:7.1f} frames/s  x{serial / med:5.2f} vs one after "
                  f"another  {[round(t, 2) for t in ts]}")
        print(f"    batcher: {b.calls} forward calls served by {b.forwards} merged passes "
              f"({b.calls / max(b.forwards, 1):.2f} clips per pass)")


if __name__ == "__main__":
    main()
