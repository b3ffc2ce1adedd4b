"""Real-footage preprocessing benchmark (prints figures and ratios measured in one run; not a test).

    python bench/real_media.py [--realdata ../shared/realdata] [--all] [--size 256] [--detector mediapipe]
    python bench/real_media.py --smoke          # one 5 s clip, 2 s of it: checks that the script runs

On real talking-head clips (the realdata folder; 1080x1920 phone video included):

1. A plain Python loop, one process, per clip: decode + face tracking + crop
   (letstalk.clips.decode_video, Silero VAD on), then tokenize (codec + audio encoder + clip rows +
   parquet shard). Reports frames/s, frames per CPU-second ("per core"), and the shares of the decode
   stage spent finding faces ("detector": RetinaFace with the default ``--detector retinaface``;
   with ``mediapipe`` the FaceLandmarker's own detector runs inside it and is counted with it) and
   in the FaceLandmarker ("landmarks"); the rest is decoding, cropping, cut detection and VAD.
   Run it once per ``--detector`` for before (mediapipe) / after (retinaface) figures.
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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from letstalk.audio import AudioEncoder
from letstalk.clips import ClipSpec, build_clip_rows, decode_video
from letstalk.faces import DETECTORS, FaceSettings, RetinaFaces
from letstalk.media import ffmpeg_exe, probe
from letstalk.pipeline import LetsTalkPipeline
from letstalk.vae import LatentCodec

ROOT = Path(__file__).resolve().parents[1]
# one clip per kind of source: 1080x1920 phone video, HDTF-style 512², 700² at a variable 22 fps,
# 458², a 256² tight crop at 30 fps, a 20 s 512² anchor
DEFAULT = ("latentsync_demo1", "sadtalker_hdtf_aoc", "retalking_face1", "infinitetalk_ref_man", "styletalk_obama1",
           "mimictalk_german_anchor_20s")
SMOKE = "real3dportrait_may_5s"  # --smoke: the shortest clip, 512² at 25 fps


@dataclass(frozen=True)
class TimedFaces(FaceSettings):
    """FaceSettings whose detector adds the seconds spent in detect() to `spent[0]` and, for
    retinaface, those of RetinaFace itself to `spent[1]` (the rest of detect() is the landmarker)."""

    spent: tuple = (None,)  # a two-element list set per run (a frozen dataclass holds the reference)

    def detector_for(self, fps: float):
        inner, spent = super().detector_for(fps), self.spent[0]
        if isinstance(inner, RetinaFaces):
            find = inner.retina.detect

            def timed_find(image):
                t0 = time.perf_counter()
                try:
                    return find(image)
                finally:
                    spent[1] += time.perf_counter() - t0

            inner.retina.detect = timed_find  # this detector instance only

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


def plain_loop(paths: list[Path], bundle: Path, out: Path, spec: ClipSpec, detector: str) -> tuple[int, float]:
    from letstalk_platform.preprocess import write_shard

    codec = LatentCodec.from_pretrained(bundle / "vae")
    audio = AudioEncoder.from_pretrained(bundle / "audio_encoder", window=spec.audio_window)
    total_frames, total_s = 0, 0.0
    print(f"{'clip':<32} {'source':>11} {'frames':>6} {'decode+track s':>14} {'detector':>8} {'landmarks':>9} "
          f"{'rest':>5} {'tokenize s':>10} {'frames/s':>8} {'frames/CPU-s':>12}")
    for p in paths:
        info = probe(p)
        spent = [0.0, 0.0]  # in detect(); in RetinaFace
        faces = TimedFaces(detector=detector, spent=(spent,))
        c0, t0 = cpu_seconds(), time.perf_counter()
        video = decode_video(p, spec, faces)
        t1 = time.perf_counter()
        rows = build_clip_rows(p.stem, p.stem, codec.encode(video.frames),
                               audio.hidden_states(video.audio, len(video.frames)), spec, segments=video.segments)
        write_shard(rows, out / f"{p.stem}.parquet")
        t2, c1 = time.perf_counter(), cpu_seconds()
        n = len(video.frames)
        total_frames, total_s = total_frames + n, total_s + (t2 - t0)
        decode_s = t1 - t0
        # shares finding faces and placing landmarks; mediapipe's own detector runs inside its landmarker
        found, marks = {"retinaface": (spent[1], spent[0] - spent[1]), "mediapipe": (None, spent[0]),
                        "haar": (spent[0], 0.0)}[detector]
        found = "in lm" if found is None else f"{found / decode_s:.0%}"
        print(f"{p.stem[:32]:<32} {f'{info.width}x{info.height}':>11} {n:>6} {decode_s:>14.2f} "
              f"{found:>8} {marks / decode_s:>9.0%} {(decode_s - spent[0]) / decode_s:>5.0%} "
              f"{t2 - t1:>10.2f} {n / (t2 - t0):>8.1f} {n / (c1 - c0):>12.1f}  face {video.quality.face_fraction:.3f}")
    return total_frames, total_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--realdata", default=os.environ.get("LETSTALK_REALDATA") or str(ROOT.parent / "shared" / "realdata"))
    parser.add_argument("--all", action="store_true", help="every clip in videos/ (default: six, one per kind)")
    parser.add_argument("--size", type=int, default=256, help="crop size (pixels)")
    parser.add_argument("--detector", choices=DETECTORS, default="retinaface",
                        help="faces.detector: retinaface (the default: after) or mediapipe (its own detector: before)")
    parser.add_argument("--smoke", action="store_true", help=f"only the first 2 s of {SMOKE}: checks that it runs")
    args = parser.parse_args()
    realdata = Path(args.realdata)
    if not (realdata / "videos").is_dir():
        sys.exit(f"real media not found at {realdata} (--realdata or $LETSTALK_REALDATA)")
    paths = sorted((realdata / "videos").glob("*.mp4"))
    if not args.all:
        paths = [p for p in paths if p.stem in ((SMOKE,) if args.smoke else DEFAULT)]
    torch.set_num_threads(1)  # the plain loop is one process on one core's worth of torch threads
    spec = ClipSpec(image_size=args.size, clip_frames=8, stride=8, audio_window=5)
    print(f"{len(paths)} clips, crops {args.size}², detector {args.detector}, {os.cpu_count()} cores")

    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        if args.smoke:  # its first 2 s, cut into the temporary folder
            cut = root / f"{SMOKE}_2s.mp4"
            subprocess.run([ffmpeg_exe(), "-v", "error", "-t", "2", "-i", str(paths[0]), "-c:v", "libx264", "-c:a", "aac",
                            str(cut)], check=True)
            paths = [cut]
        bundle = LetsTalkPipeline.init_demo().save_pretrained(root / "bundle")
        (root / "plain").mkdir()
        frames, plain_s = plain_loop(paths, bundle, root / "plain", spec, args.detector)
        print(f"plain loop: {frames} frames in {plain_s:.1f} s = {frames / plain_s:.1f} frames/s")

        from letstalk_platform.preprocess import PreprocessConfig, run_preprocess
        from letstalk_platform.runtime import init_ray

        init_ray(num_cpus=2)
        listing = root / "clips.txt"
        listing.write_text("".join(f"{p}\n" for p in paths))
        common = {"input": str(listing), "model": str(bundle), "image_size": args.size, "clip_frames": 8,
                  "stride": 8, "faces": {"detector": args.detector}}
        run_preprocess(PreprocessConfig(output=str(root / "warm"), limit=1, **common))  # warm-up: actors, imports
        m = run_preprocess(PreprocessConfig(output=str(root / "ray"), decoders=2, tokenizers=1, **common))
        ray_s = m.last_run["seconds"]
        print(f"Ray Data (2 decode actors, 1 tokenizer): {frames} frames in {ray_s:.1f} s = {frames / ray_s:.1f} "
              f"frames/s; ratio to the plain loop {plain_s / ray_s:.2f}")


if __name__ == "__main__":
    main()
