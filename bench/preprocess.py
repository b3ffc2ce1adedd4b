"""Preprocessing benchmark (prints ratios measured in one run; not a test).

    python bench/preprocess.py [--videos 8] [--seconds 4] [--size 256]

1. clips/s of the Ray Data pipeline (jobs/preprocess.py's run_preprocess: decode tasks + a
   tokenizer actor pool, local Ray) vs the same per-video functions in a plain Python loop, same
   cores, same inputs, same tiny bundle (64² crops, 8-frame clips, stride 4).
2. Decode throughput: letstalk.media.iter_video_frames (ffmpeg-python, pipe, numpy frames) vs
   the raw ffmpeg binary decoding to /dev/null at the same fps and pixel format.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from letstalk.clips import ClipSpec, build_clip_rows, decode_video
from letstalk.faces import FaceSettings
from letstalk.media import ffmpeg_exe, iter_video_frames
from letstalk.pipeline import LetsTalkPipeline

FACES = FaceSettings(detector="haar", crop="fixed")  # drawn faces


def make_videos(root: Path, videos: int, seconds: float, size: int) -> list[Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import talking_video

    root.mkdir()
    for i in range(videos):
        talking_video(root / f"v{i}.mp4", int(seconds * 25), seed=i, size=size, identity=f"id{i}")
    return sorted(root.glob("*.mp4"))


def plain_loop(paths: list[Path], bundle: Path, out: Path, spec: ClipSpec) -> int:
    from letstalk.audio import AudioEncoder
    from letstalk.vae import LatentCodec
    from letstalk_platform.preprocess import write_shard

    codec = LatentCodec.from_pretrained(bundle / "vae")
    audio = AudioEncoder.from_pretrained(bundle / "audio_encoder")
    clips = 0
    for p in paths:
        video = decode_video(p, spec, FACES, vad=False)
        rows = build_clip_rows(p.stem, p.stem, codec.encode(video.frames),
                               audio.hidden_states(video.audio, len(video.frames)), spec)
        write_shard(rows, out / f"{p.stem}.parquet")
        clips += len(rows)
    return clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--size", type=int, default=256, help="source video size (pixels)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        paths = make_videos(root / "raw", args.videos, args.seconds, args.size)
        bundle = LetsTalkPipeline.init_tiny().save_pretrained(root / "bundle")
        spec = ClipSpec(image_size=64, clip_frames=8, stride=4, audio_window=5)

        t0 = time.perf_counter()
        (root / "plain").mkdir()
        plain_clips = plain_loop(paths, bundle, root / "plain", spec)
        plain_s = time.perf_counter() - t0

        from letstalk_platform.preprocess import PreprocessConfig, run_preprocess
        from letstalk_platform.runtime import init_ray

        init_ray(num_cpus=2)
        run_preprocess(PreprocessConfig(input=str(root / "raw"), output=str(root / "warm"), model=str(bundle),
                                        stride=4, limit=1, faces=FACES.__dict__, vad=False))  # warm-up: workers, imports
        m = run_preprocess(PreprocessConfig(input=str(root / "raw"), output=str(root / "ray"), model=str(bundle),
                                            stride=4, decoders=2, tokenizers=1, faces=FACES.__dict__, vad=False))
        ray_clips = m.clip_count("train") + m.clip_count("eval")
        ray_s = m.last_run["seconds"]
        print(f"{args.videos} videos × {args.seconds} s at {args.size}²: plain loop {plain_clips / plain_s:.2f} clips/s, "
              f"Ray Data {ray_clips / ray_s:.2f} clips/s, ratio {(ray_clips / ray_s) / (plain_clips / plain_s):.2f} "
              f"({ray_clips} clips each)")

        frames, t0 = 0, time.perf_counter()
        for p in paths:
            frames += sum(1 for _ in iter_video_frames(p, fps=25))
        ours = frames / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for p in paths:
            subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(p), "-vf", "fps=25", "-f", "rawvideo",
                            "-pix_fmt", "rgb24", "-y", "/dev/null"], check=True)
        raw = frames / (time.perf_counter() - t0)
        print(f"decode: iter_video_frames {ours:.0f} frames/s, raw ffmpeg to /dev/null {raw:.0f} frames/s, "
              f"ratio {ours / raw:.2f}")


if __name__ == "__main__":
    main()
