"""Real-footage preprocessing benchmark (prints figures and ratios measured in one run; not a test).

    python bench/real_media.py [--realdata ../shared/realdata] [--all] [--size 256]

On real talking-head clips (the realdata folder; 1080x1920 phone video included):

1. A plain Python loop, one process, per clip: decode + MediaPipe face tracking + crop
   (letstalk.clips.decode_video, Silero VAD on), then tokenize (codec + audio encoder + clip rows +
   parquet shard). Reports frames/s, frames per CPU-second ("per core"), and the detector's share
   of the decode stage, per source resolution.
2. The same clips through the Ray Data job (letstalk_platform.preprocess.run_preprocess: 2 decode
   actors + 1 tokenizer actor, local Ray with 2 CPUs): frames/s, and its ratio to the plain loop.

The bundle is the demo data bundle (the lossless space-to-depth codec, random-init tiny audio
encoder): tokenizing is cheap, so the figures are those of decoding and face tracking. Run it
alone on the machine: it times things.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from letstalk.audio import AudioEncoder
from letstalk.clips import ClipSpec, build_clip_rows, decode_video
from letstalk.faces import FaceSettings
from letstalk.media import probe
from letstalk.pipeline import LetsTalkPipeline
from letstalk.vae import LatentCodec

ROOT = Path(__file__).resolve().parents[1]
# one clip per kind of source: 1080x1920 phone video, HDTF-style 512², 700² at a variable 22 fps,
# 458², a 256² tight crop at 30 fps, a 20 s 512² anchor
DEFAULT = ("latentsync_demo1", "sadtalker_hdtf_aoc", "retalking_face1", "infinitetalk_ref_man", "styletalk_obama1",
           "mimictalk_german_anchor_20s")
FACE_MODEL = "weights/mediapipe_face_landmarker_v2_with_blendshapes.task"


@dataclass(frozen=True)
class TimedFaces(FaceSettings):
    """FaceSettings whose detector adds the seconds it spends in detect() to `spent[0]`."""

    spent: tuple = (None,)  # a one-element list set per run (a frozen dataclass holds the reference)

    def detector_for(self, fps: float):
        inner, spent = super().detector_for(fps), self.spent[0]

        class Timed:
            name = inner.name

            def detect(self, frame):
                t0 = time.perf_counter()
                try:
                    return inner.detect(frame)
                finally:
                    spent[0] += time.perf_counter() - t0

            def close(self):
                inner.close()

        return Timed()


def cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def plain_loop(paths: list[Path], bundle: Path, out: Path, spec: ClipSpec, face_model: Path) -> tuple[int, float]:
    from letstalk_platform.preprocess import write_shard

    codec = LatentCodec.from_pretrained(bundle / "vae")
    audio = AudioEncoder.from_pretrained(bundle / "audio_encoder", window=spec.audio_window)
    total_frames, total_s = 0, 0.0
    print(f"{'clip':<32} {'source':>11} {'frames':>6} {'decode+track s':>14} {'detector':>8} {'tokenize s':>10} "
          f"{'frames/s':>8} {'frames/CPU-s':>12}")
    for p in paths:
        info = probe(p)
        spent = [0.0]
        faces = TimedFaces(model=str(face_model), spent=(spent,))
        c0, t0 = cpu_seconds(), time.perf_counter()
        video = decode_video(p, spec, faces)
        t1 = time.perf_counter()
        rows = build_clip_rows(p.stem, p.stem, codec.encode(video.frames),
                               audio.hidden_states(video.audio, len(video.frames)), spec, segments=video.segments)
        write_shard(rows, out / f"{p.stem}.parquet")
        t2, c1 = time.perf_counter(), cpu_seconds()
        n = len(video.frames)
        total_frames, total_s = total_frames + n, total_s + (t2 - t0)
        print(f"{p.stem[:32]:<32} {f'{info.width}x{info.height}':>11} {n:>6} {t1 - t0:>14.2f} "
              f"{spent[0] / (t1 - t0):>8.0%} {t2 - t1:>10.2f} {n / (t2 - t0):>8.1f} {n / (c1 - c0):>12.1f}")
    return total_frames, total_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--realdata", default=os.environ.get("LETSTALK_REALDATA") or str(ROOT.parent / "shared" / "realdata"))
    parser.add_argument("--all", action="store_true", help="every clip in videos/ (default: six, one per kind)")
    parser.add_argument("--size", type=int, default=256, help="crop size (pixels)")
    args = parser.parse_args()
    realdata = Path(args.realdata)
    face_model = realdata / FACE_MODEL
    if not face_model.is_file():
        sys.exit(f"real media not found at {realdata} (--realdata or $LETSTALK_REALDATA)")
    paths = sorted((realdata / "videos").glob("*.mp4"))
    if not args.all:
        paths = [p for p in paths if p.stem in DEFAULT]
    torch.set_num_threads(1)  # the plain loop is one process on one core's worth of torch threads
    spec = ClipSpec(image_size=args.size, clip_frames=8, stride=8, audio_window=5)
    print(f"{len(paths)} clips, crops {args.size}², {os.cpu_count()} cores")

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        bundle = LetsTalkPipeline.init_demo().save_pretrained(root / "bundle")
        (root / "plain").mkdir()
        frames, plain_s = plain_loop(paths, bundle, root / "plain", spec, face_model)
        print(f"plain loop: {frames} frames in {plain_s:.1f} s = {frames / plain_s:.1f} frames/s")

        from letstalk_platform.preprocess import PreprocessConfig, run_preprocess
        from letstalk_platform.runtime import init_ray

        init_ray(num_cpus=2)
        listing = root / "clips.txt"
        listing.write_text("".join(f"{p}\n" for p in paths))
        common = {"input": str(listing), "model": str(bundle), "image_size": args.size, "clip_frames": 8,
                  "stride": 8, "faces": {"model": str(face_model)}}
        run_preprocess(PreprocessConfig(output=str(root / "warm"), limit=1, **common))  # warm-up: actors, imports
        m = run_preprocess(PreprocessConfig(output=str(root / "ray"), decoders=2, tokenizers=1, **common))
        ray_s = m.last_run["seconds"]
        print(f"Ray Data (2 decode actors, 1 tokenizer): {frames} frames in {ray_s:.1f} s = {frames / ray_s:.1f} "
              f"frames/s; ratio to the plain loop {plain_s / ray_s:.2f}")


if __name__ == "__main__":
    main()
