"""Streaming output: how soon a player has the first frame of `letstalk render --stream`.

    python bench/stream.py [--seconds 8] [--repeats 3]

Renders `--seconds` of speech-like audio onto a drawn 256 px portrait with the shipped demo model
at the CLI's defaults (DDIM-25, paste-back, the default thread count) into a fragmented mp4, while a
second thread asks ffmpeg every 20 ms how many frames the growing file decodes to. Prints, medians
of `--repeats`: the time to the first decodable frame, the time the first clip took to render (its
denoising and decoding: the least any clip-by-clip renderer must wait), their ratio, the whole
render's time and its real-time factor (render seconds per second of video), against the same
render written the usual way (the file appears at the end).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from letstalk.accel import set_threads
from letstalk.cli import SHIPPED
from letstalk.diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS
from letstalk.media import ffmpeg_exe
from letstalk.pipeline import LetsTalkPipeline
from letstalk.synthetic import draw_portrait, speech_like_audio


def decodable(path: Path) -> int:
    run = subprocess.run([ffmpeg_exe(), "-v", "error", "-stats", "-i", str(path), "-map", "0:v", "-f", "null", "-"],
                         capture_output=True, text=True)
    counts = re.findall(r"frame=\s*(\d+)", run.stderr)
    return int(counts[-1]) if run.returncode == 0 and counts else 0


class FirstFrame:
    """A thread that asks ffmpeg every 20 ms whether the file at `out` decodes to a frame yet;
    `stop(end)` gives the seconds from `t0` to the first time it did (`end` if it never did)."""

    def __init__(self, out: Path, t0: float):
        self.out, self.t0, self.first = out, t0, []
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._watch)
        self.thread.start()

    def _watch(self) -> None:
        while not self.finished.is_set() and not self.first:
            if self.out.exists() and decodable(self.out) > 0:
                self.first.append(time.perf_counter() - self.t0)
            time.sleep(0.02)

    def stop(self, end: float) -> float:
        self.finished.set()
        self.thread.join()
        return self.first[0] if self.first else end


def one(pipe: LetsTalkPipeline, portrait, audio, out: Path, stream: bool) -> dict[str, float]:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    clip_done: list[float] = []

    def progress(done: int, total: int) -> None:
        if done == DEFAULT_STEPS and not clip_done:  # the first clip's last denoising step
            clip_done.append(time.perf_counter() - t0)

    watcher = FirstFrame(out, t0)
    result = pipe.render_to_file(portrait, audio, out, steps=DEFAULT_STEPS, sampler=DEFAULT_SAMPLER,
                                 progress=progress, stream=stream)
    total = time.perf_counter() - t0
    return {"first_frame": watcher.stop(total), "first_clip": clip_done[0] if clip_done else total,
            "total": total, "video_s": result.num_frames / result.fps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    threads = set_threads()
    pipe = LetsTalkPipeline.from_pretrained(SHIPPED)
    portrait, audio = draw_portrait(256, seed=0), speech_like_audio(args.seconds, seed=0)
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as d:
        one(pipe, portrait, audio[: 16000], Path(d) / "warm.mp4", True)  # warm-up
        for _ in range(args.repeats):
            for stream in (True, False):  # interleaved
                runs[stream].append(one(pipe, portrait, audio, Path(d) / f"s{stream}.mp4", stream))
    print(f"demo model, {args.seconds:g} s audio, 256 px portrait (paste-back), {DEFAULT_SAMPLER}-{DEFAULT_STEPS}, "
          f"{threads} threads, medians of {args.repeats}")
    for stream, rows in runs.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"{'--stream' if stream else 'default ':9} first frame {med['first_frame']:6.2f} s | first clip rendered "
              f"{med['first_clip']:5.2f} s | ratio {med['first_frame'] / med['first_clip']:5.2f} | whole render "
              f"{med['total']:6.2f} s | real-time factor {med['total'] / med['video_s']:.2f}")


if __name__ == "__main__":
    main()
