"""Render benchmark (prints figures measured in one run; not a test).

    python bench/render.py [--presets tiny S] [--seconds 1.28] [--ddpm-steps-measured 10]

Seconds per rendered frame for each preset with DDPM-250 and DDIM-25, and the share of time
in audio encoding, denoising, VAE decoding and muxing (render_to_file, real ffmpeg).

`tiny` is the test bundle (64×64 frames). `S` uses full-size random-initialised components:
the S transformer (256×256 frames, 16-frame clips), an SD-1.x-shaped AutoencoderKL and a
wav2vec2-base-shaped encoder, so the costs are those of the real networks. On a CPU, DDPM-250
for S runs `--ddpm-steps-measured` steps and scales the denoising time to 250 (each step is one
forward pass of the same cost); the output says so.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from diffusers import AutoencoderKL
from PIL import Image
from transformers import Wav2Vec2Config, Wav2Vec2Model

from letstalk import LetsTalkTransformer
from letstalk.audio import AudioEncoder
from letstalk.pipeline import LetsTalkPipeline
from letstalk.vae import LatentCodec


def full_size_pipeline(preset: str) -> LetsTalkPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
    w2v = Wav2Vec2Model(Wav2Vec2Config())  # wav2vec2-base: 12 layers × 768
    return LetsTalkPipeline(LetsTalkTransformer.from_preset(preset), LatentCodec(vae), AudioEncoder(w2v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "S"])
    parser.add_argument("--seconds", type=float, default=1.28, help="audio length (1.28 s = 32 frames)")
    parser.add_argument("--ddpm-steps-measured", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, audio {args.seconds} s")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(tmp / "p.png")
        t = np.arange(int(args.seconds * 16000)) / 16000
        sf.write(tmp / "a.wav", (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > 0)), 16000)

        for preset in args.presets:
            pipe = LetsTalkPipeline.init_tiny() if preset == "tiny" else full_size_pipeline(preset)
            for sampler, steps in (("ddpm", 250), ("ddim", 25)):
                run_steps = steps
                if preset != "tiny" and sampler == "ddpm":
                    run_steps = args.ddpm_steps_measured
                r = pipe.render_to_file(tmp / "p.png", tmp / "a.wav", tmp / "out.mp4", sampler=sampler,
                                        steps=run_steps)
                s = dict(r.seconds)
                note = ""
                if run_steps != steps:
                    s["denoise"] *= steps / run_steps
                    note = f" (denoising measured over {run_steps} steps, scaled to {steps})"
                parts = {k: s.get(k, 0.0) for k in ("audio", "denoise", "decode", "mux")}
                total = sum(parts.values()) + s.get("inputs", 0.0)
                shares = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in parts.items())
                print(f"{preset:>4} {sampler}-{steps}: {total / r.num_frames:.3f} s per frame "
                      f"({r.num_frames} frames, {pipe.image_size}²){note}; {shares}")


if __name__ == "__main__":
    main()
