"""GPU speed of the denoiser (issue 21): frames/s and MFU of LetsTalk-B/L, and the shipped models' renders.

    python bench/gpu.py [--presets B L] [--size 256] [--batches 1 8] [--repeats 20] [--peak-tflops 989]
    python bench/gpu.py --smoke          # tiny sizes, any device: checks the script, prints no figures worth keeping

Runs where CUDA is (it says so and stops elsewhere, unless --smoke). Random weights: the cost of a
forward pass does not depend on them. One process, one device, nothing else on it.

1. The device's attained bf16 matrix rate (an 8192³ product, median of 10) beside the peak used for MFU
   (`--peak-tflops`, default 989: the H100/H200 SXM datasheet's dense bf16 rate).
2. Per preset, one denoiser forward pass on a 16-frame clip (latents 4 × size/8 × size/8, the portrait
   latent, 2 motion-frame latents, wav2vec2 features 5 × 12 × 768 per frame), batch 1 and larger:
   fp32 eager against bf16 autocast + SDPA flash + regional torch.compile (`letstalk.accel`, the
   pipeline's own switches; compile time printed apart). CUDA events, median of `--repeats` after
   warm-up. FLOPs per pass: FlopCounterMode, SDPA counted through its math backend. MFU = FLOPs /
   time / peak.
3. Whole samplers at batch 1 on the fast variant, scheduler included (`GaussianDiffusion.sample`):
   DDPM-250 (the paper's), DDIM-25 (the default) and DDIM-2 (a 2-step student's cost): seconds per
   clip and denoised frames/s. One pass per step (guidance 1, as the shipped models; audio CFG
   doubles the batch: the batch-2 forward row gives its cost).
4. The shipped demo model (DDIM-25) and its 2-step student rendering 8 s of speech end to end
   (LetsTalkPipeline.render: audio features, denoiser, codec decode, paste), fp32 and the fast variant:
   seconds and real-time factor.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from letstalk import LetsTalkTransformer
from letstalk.accel import InferenceOptions, compile_transformer, inference_scope, sdpa_backend
from letstalk.cli import SHIPPED_MODELS
from letstalk.diffusion import GaussianDiffusion


def sync_time(fn, repeats: int, warmup: int = 3) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup` (CUDA events on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(device: str, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / sync_time(lambda: a @ b, 10) / 1e12


def inputs(model: LetsTalkTransformer, batch: int, latent: int, device: str):
    cfg = model.cfg
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    return (r(batch, cfg.num_frames, cfg.in_channels, latent, latent),
            torch.full((batch,), 500, device=device, dtype=torch.long),
            r(batch, cfg.in_channels, latent, latent),
            r(batch, cfg.num_frames, cfg.audio_window, cfg.audio_layers, cfg.audio_feature_dim),
            r(batch, cfg.num_motion_frames, cfg.in_channels, latent, latent))


def flops_per_pass(model: LetsTalkTransformer, args: tuple) -> int:
    with torch.inference_mode(), sdpa_backend("math"), FlopCounterMode(display=False) as counter:
        model(*args)
    return counter.get_total_flops()


def fast(device: str) -> InferenceOptions:
    """The fast variant: the pipeline's own switches (flash attention where CUDA has it)."""
    return InferenceOptions(dtype="bf16", sdpa_backend="flash" if device == "cuda" else "auto", compile="regional")


def bench_preset(preset: str, size: int, batches: list[int], repeats: int, peak: float, device: str,
                 smoke: bool) -> None:
    latent = size // 8
    model = LetsTalkTransformer.from_preset(preset, input_size=latent).to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    frames = model.cfg.num_frames
    flops = flops_per_pass(model, inputs(model, 1, latent, device))
    print(f"\nLetsTalk-{preset}: {params / 1e6:.1f} M parameters, {size}² frames (latents 4×{latent}×{latent}), "
          f"{frames}-frame clips, {flops / 1e12:.3f} TFLOP per forward pass (batch 1)")
    rows = {}
    for name, options in (("fp32 eager", InferenceOptions()), ("bf16 + flash + regional compile", fast(device))):
        compile_transformer(model, options.compile)
        if options.compile != "none":
            t0 = time.perf_counter()
            with torch.inference_mode(), inference_scope(options, device):
                model(*inputs(model, 1, latent, device))
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"  regional compile: first pass {time.perf_counter() - t0:.1f} s (inductor compiles one block)")
        for b in batches:
            args = inputs(model, b, latent, device)

            def run():
                with torch.inference_mode(), inference_scope(options, device):
                    model(*args)

            sec = sync_time(run, 2 if smoke else repeats)
            rows[(name, b)] = sec
            mfu = flops * b / sec / (peak * 1e12)
            print(f"  {name:<33} batch {b:>2}: {sec * 1000:8.2f} ms/pass  {frames * b / sec:9.0f} frames/pass-s  "
                  f"{flops * b / sec / 1e12:7.1f} TFLOP/s  MFU {mfu * 100:5.1f}%")
    for b in batches:
        base, quick = rows[("fp32 eager", b)], rows[("bf16 + flash + regional compile", b)]
        print(f"  speed-up of the fast variant at batch {b}: ×{base / quick:.2f}")

    # whole samplers, batch 1, fast variant (the model is still compiled)
    x, _, portrait, audio, motion = inputs(model, 1, latent, device)
    diffusion = GaussianDiffusion(learn_sigma=model.cfg.learn_sigma)

    fast_options = fast(device)

    def model_fn(xt, t):
        with inference_scope(fast_options, device):
            return model(xt, t, portrait, audio, motion)

    plans = [("ddpm", 250), ("ddim", 25), ("ddim", 2)]
    if smoke:
        plans = [("ddpm", 5), ("ddim", 5), ("ddim", 2)]
    for sampler, steps in plans:
        def run():
            with torch.inference_mode():
                diffusion.sample(model_fn, torch.randn_like(x), sampler=sampler, steps=steps)

        sec = sync_time(run, 1 if smoke else 3, warmup=1)
        print(f"  {sampler.upper()}-{steps:<4} {sec:8.3f} s per clip  {frames / sec:8.1f} frames/s  "
              f"({sec / steps * 1000:.2f} ms per step, scheduler included)")
    compile_transformer(model, "none")
    if device == "cuda":
        torch.cuda.empty_cache()


def bench_shipped(device: str, seconds: float, smoke: bool) -> None:
    from letstalk.pipeline import LetsTalkPipeline
    from letstalk.synthetic import draw_portrait, speech_like_audio

    face = draw_portrait(128, seed=0)
    wave = speech_like_audio(seconds, seed=0)
    print(f"\nshipped models, {seconds:g} s of speech ({round(seconds * 25)} frames), whole render, median of "
          f"{1 if smoke else 3} after a warm-up:")
    for name, folder in SHIPPED_MODELS.items():
        if not (folder / "pipeline.json").is_file():
            print(f"  {name}: not in this checkout")
            continue
        pipe = LetsTalkPipeline.from_pretrained(folder).to(device)
        sampler, steps = pipe.sampling()
        for label, options in (("fp32", InferenceOptions()), ("bf16 + flash + regional compile", fast(device))):
            pipe.set_inference(options)
            pipe.render(face, wave)  # warm-up (and compile)
            times = []
            for _ in range(1 if smoke else 3):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                pipe.render(face, wave)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            sec = statistics.median(times)
            print(f"  {name:<11} {sampler.upper()}-{steps:<3} {label:<33} {sec:7.2f} s  RTF {sec / seconds:6.3f}  "
                  f"{seconds * 25 / sec:7.1f} frames/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="*", default=["B", "L"], help="transformer presets (none: only the shipped models)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 8])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--seconds", type=float, default=8.0, help="speech length for the shipped models' renders")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device: checks the script only")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not args.smoke:
        raise SystemExit("bench/gpu.py: no CUDA device here (use --smoke to check the script on CPU)")
    if args.smoke:
        args.presets, args.size, args.batches, args.seconds = ["tiny"], 64, [1], 1.28
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        print(f"bf16 matmul 8192³: {matmul_tflops(device, 8192):.0f} TFLOP/s attained; MFU below is against "
              f"{args.peak_tflops:g} TFLOP/s (dense bf16 peak)")
    for preset in args.presets:
        bench_preset(preset, args.size, args.batches, args.repeats, args.peak_tflops, device, args.smoke)
    bench_shipped(device, args.seconds, args.smoke)


if __name__ == "__main__":
    main()
