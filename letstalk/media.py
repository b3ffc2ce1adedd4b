"""Video and audio I/O through a real ffmpeg binary, driven by ffmpeg-python.

* `probe` reads stream facts from `ffmpeg -i` (there is no ffprobe alongside the bundled binary).
* `load_audio` decodes any audio ffmpeg reads to float32 mono at a chosen sample rate.
* `iter_video_frames` / `load_video_frames` stream uint8 RGB frames at a chosen frame rate.
* `write_video` encodes RGB frames (+ optional audio) to H.264/AAC mp4, atomically.

Command lines are built with ffmpeg-python and run with `subprocess`, so that stderr can go to
a temporary file (a full stderr pipe would otherwise stall ffmpeg while we stream frames).
Every user-facing failure is a `MediaError` with a one-line message naming the file.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import ffmpeg
import numpy as np

__all__ = [
    "LimitExceeded", "MediaError", "MediaInfo", "MediaTooLong", "ffmpeg_exe", "probe", "load_audio",
    "iter_video_frames", "load_video_frames", "write_video",
]

_QUIET = ["-hide_banner", "-nostdin", "-loglevel", "error"]
# ffmpeg lines that only repeat that something failed, without saying what.
_GENERIC = ("Error opening input file", "Error opening output file", "Conversion failed",
            "At least one output file must be specified", "Exiting normally")
_LAYOUTS = {"mono": 1, "stereo": 2, "2.1": 3, "3.0": 3, "quad": 4, "4.0": 4, "5.0": 5, "5.1": 6,
            "6.1": 7, "7.1": 8}


class MediaError(ValueError):
    """A media file that cannot be read or written; the message is one line naming the file."""


class LimitExceeded(ValueError):
    """An input over a configured limit (upload size, audio length, image pixels): HTTP 413."""


class MediaTooLong(MediaError, LimitExceeded):
    """Audio longer than the limit it was loaded with."""


@dataclass(frozen=True)
class MediaInfo:
    """What `probe` found. width/height are as decoded (after ffmpeg's autorotation)."""

    duration: float
    has_video: bool
    has_audio: bool
    fps: float | None
    width: int | None
    height: int | None
    sample_rate: int | None
    channels: int | None


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """The `ffmpeg` on PATH, else the binary bundled with imageio-ffmpeg."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _error_line(stderr: str | bytes) -> str:
    """The last informative line of an ffmpeg stderr, without its `[xxx @ 0x...]` prefix."""
    if isinstance(stderr, bytes):
        stderr = stderr.decode("utf-8", "replace")
    for line in reversed(stderr.splitlines()):
        line = re.sub(r"^\[[^\]]*\]\s*", "", line.strip()).strip()
        if line and not line.startswith(_GENERIC):
            return line[:200]
    return ""


def _fail(path: str | os.PathLike, what: str, stderr: str | bytes = "", kind: type[MediaError] = MediaError) -> MediaError:
    detail = _error_line(stderr)
    message = f"{os.fspath(path)}: {what}" + (f" (ffmpeg: {detail})" if detail else "")
    return kind(" ".join(message.split()))


def _check_input(path: str | os.PathLike) -> str:
    """`file:`-prefixed path for ffmpeg (so names with ':' are not read as protocols)."""
    p = Path(path)
    if not p.exists():
        raise _fail(path, "file not found")
    if p.is_dir():
        raise _fail(path, "is a directory, not a media file")
    return f"file:{p}"


def _command(stream) -> list[str]:
    """argv for an ffmpeg-python output stream: quiet (errors only), no stdin prompts, -y."""
    return ffmpeg.compile(stream, cmd=[ffmpeg_exe(), *_QUIET], overwrite_output=True)


def _read_log(log: IO[bytes]) -> bytes:
    log.seek(0)
    return log.read()


# ----------------------------------------------------------------------------------- probing


def _number(text: str) -> float:
    return float(text[:-1]) * 1000 if text.endswith("k") else float(text)


def probe(path: str | os.PathLike) -> MediaInfo:
    """Duration and first video/audio stream facts, parsed from `ffmpeg -hide_banner -i path`."""
    url = _check_input(path)
    try:
        run = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", url],
                             capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise _fail(path, "ffmpeg timed out while probing") from None
    text = run.stderr.decode("utf-8", "replace")
    if "Input #0" not in text:  # ffmpeg always exits 1 here (no output), so look at the text
        raise _fail(path, "not a readable media file", text)

    # Group each "Stream #0:N ..." line with its indented Metadata / Side data lines.
    blocks: list[str] = []
    for line in text.splitlines():
        if re.match(r"\s*Stream #\d+:\d+", line):
            blocks.append(line)
        elif blocks and line.startswith("      "):
            blocks[-1] += "\n" + line
    video = next((b for b in blocks if ": Video: " in b.splitlines()[0]
                  and "(attached pic)" not in b.splitlines()[0]), None)  # skip mp3 cover art
    audio = next((b for b in blocks if ": Audio: " in b.splitlines()[0]), None)
    if video is None and audio is None:
        raise _fail(path, "has neither a video nor an audio stream")

    m = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", text)
    duration = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]) if m else 0.0

    fps = width = height = sample_rate = channels = None
    if video is not None:
        head = video.splitlines()[0]
        m = re.search(r"(?<![\w.])([1-9]\d*)x([1-9]\d*)(?![\w])", head)  # not hex like 0x3163
        if m:
            width, height = int(m[1]), int(m[2])
            rot = re.search(r"rotation of (-?[\d.]+) degrees", video)
            if rot and round(abs(float(rot[1]))) % 180 == 90:  # ffmpeg autorotates on decode
                width, height = height, width
        m = re.search(r"([\d.]+k?) fps", head) or re.search(r"([\d.]+k?) tbr", head)
        fps = _number(m[1]) if m else None
    if audio is not None:
        parts = [p.strip() for p in audio.splitlines()[0].split(",")]
        for i, part in enumerate(parts):
            if part.endswith(" Hz"):
                sample_rate = int(part.split()[0])
                layout = parts[i + 1] if i + 1 < len(parts) else ""
                m = re.match(r"(\d+) channels", layout)
                channels = int(m[1]) if m else _LAYOUTS.get(layout.split("(")[0])
                break
    return MediaInfo(duration, video is not None, audio is not None, fps, width, height,
                     sample_rate, channels)


# ------------------------------------------------------------------------------------ audio


def load_audio(path: str | os.PathLike, sample_rate: int = 16000,
               max_seconds: float | None = None) -> np.ndarray:
    """Decode the first audio stream to a (samples,) float32 mono array in [-1, 1].

    Any container/codec ffmpeg reads works (wav, mp3, ogg, m4a, the audio track of an mp4).
    Raises MediaError for files without audio, with zero samples, or longer than `max_seconds`
    (checked from the probed duration before decoding). Silence is valid and returns zeros.
    """
    info = probe(path)
    if not info.has_audio:
        raise _fail(path, "has no audio stream")
    if max_seconds is not None and info.duration > max_seconds:
        raise _fail(path, f"audio is {info.duration:.2f} s long, over the limit of {max_seconds:g} s", kind=MediaTooLong)
    stream = ffmpeg.input(_check_input(path)).output(
        "pipe:", format="f32le", acodec="pcm_f32le", ac=1, ar=int(sample_rate), map="0:a:0")
    run = subprocess.run(_command(stream), capture_output=True, stdin=subprocess.DEVNULL)
    if run.returncode != 0:
        raise _fail(path, "could not decode audio", run.stderr)
    wave = np.frombuffer(run.stdout, dtype="<f4").astype(np.float32)
    if wave.size == 0:
        raise _fail(path, "audio stream is empty (0 samples)")
    if max_seconds is not None and info.duration == 0 and wave.size > max_seconds * sample_rate:
        raise _fail(path, f"audio is {wave.size / sample_rate:.2f} s long, over the limit of {max_seconds:g} s",
                    kind=MediaTooLong)
    return np.clip(wave, -1.0, 1.0)


# ------------------------------------------------------------------------------------ video


def _stop(proc: subprocess.Popen) -> None:
    """Kill `proc` if still running and reap it (no zombie), closing its pipes."""
    if proc.poll() is None:
        proc.kill()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:  # e.g. BrokenPipe while flushing stdin of a dead ffmpeg
                pass
    proc.wait()


def iter_video_frames(path: str | os.PathLike, fps: float = 25,
                      size: tuple[int, int] | None = None) -> Iterator[np.ndarray]:
    """Stream (H, W, 3) uint8 RGB frames resampled to `fps`, optionally scaled to size=(W, H).

    The file is probed when called (errors surface here, not at the first frame); frames are
    then read one at a time from ffmpeg's stdout. Closing the generator early kills ffmpeg.
    """
    info = probe(path)
    if not info.has_video or info.width is None or info.height is None:
        raise _fail(path, "has no video stream")
    if fps <= 0:
        raise MediaError(f"{os.fspath(path)}: fps must be positive, got {fps}")
    stream = ffmpeg.input(_check_input(path)).video.filter("fps", fps=fps)
    if size is not None:
        width, height = (int(s) for s in size)
        if width <= 0 or height <= 0:
            raise MediaError(f"{os.fspath(path)}: size must be positive (width, height), "
                             f"got {size}")
        stream = stream.filter("scale", width, height)
    else:
        width, height = info.width, info.height
    cmd = _command(stream.output("pipe:", format="rawvideo", pix_fmt="rgb24"))
    return _read_frames(path, cmd, width, height)


def _read_frames(path: str | os.PathLike, cmd: list[str], width: int,
                 height: int) -> Iterator[np.ndarray]:
    frame_bytes = width * height * 3
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        count = 0
        try:
            while True:
                buf = proc.stdout.read(frame_bytes)
                if len(buf) < frame_bytes:
                    break
                count += 1
                yield np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3)
            proc.stdout.close()
            if proc.wait() != 0:
                raise _fail(path, "could not decode video", _read_log(log))
            if count == 0:
                raise _fail(path, "video stream has no decodable frames", _read_log(log))
        finally:
            _stop(proc)


def load_video_frames(path: str | os.PathLike, fps: float = 25,
                      size: tuple[int, int] | None = None) -> np.ndarray:
    """All frames as one (N, H, W, 3) uint8 array; see `iter_video_frames`."""
    return np.stack(list(iter_video_frames(path, fps=fps, size=size)))


def _check_frame(frame: np.ndarray, shape: tuple[int, ...] | None, index: int, path: Path) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 \
            or frame.shape[2] != 3:
        is_array = isinstance(frame, np.ndarray)
        got = f"{frame.dtype} {frame.shape}" if is_array else type(frame).__name__
        raise MediaError(f"{path}: frame {index} must be a uint8 (H, W, 3) array, got {got}")
    if shape is not None and frame.shape != shape:
        raise MediaError(f"{path}: frame {index} has shape {frame.shape}, "
                         f"but the first frame had {shape}")


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float,
                audio: np.ndarray | None = None, sample_rate: int = 16000, crf: int = 18,
                stream: bool = False) -> Path:
    """Encode (H, W, 3) uint8 RGB frames (+ optional audio) to an H.264/AAC mp4 at `path`.

    Frames are streamed to ffmpeg's stdin; all must have the first frame's shape. An odd width
    or height is padded (black, right/bottom) by one pixel to even, as yuv420p requires.
    `audio` is (samples,) or (samples, channels) float at `sample_rate`; it is kept at its own
    length (not trimmed to the video). The file is written to a temporary `.name.*.part` in the
    same directory (a name that does not end in .mp4: a process killed mid-encode leaves nothing
    that `*.mp4` finds) and renamed to `path` only on success; on failure nothing is left.
    Returns `path` as a Path.

    `stream`: a fragmented mp4 written at `path` itself as the frames arrive, one fragment per frame
    (x264 without lookahead or B-frames), so a player can start while the rest is still coming; on
    failure it is removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise MediaError(f"{path}: output directory does not exist")
    if fps <= 0:
        raise MediaError(f"{path}: fps must be positive, got {fps}")
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise MediaError(f"{path}: no frames to write")
    _check_frame(first, None, 0, path)
    height, width = first.shape[:2]

    video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}",
                         framerate=fps).video
    if width % 2 or height % 2:
        video = video.filter("pad", width + width % 2, height + height % 2)
    streams = [video]
    opts = dict(format="mp4", vcodec="libx264", pix_fmt="yuv420p", crf=int(crf),
                movflags="+faststart")
    if stream:
        opts.update(movflags="+frag_keyframe+empty_moov+default_base_moof+delay_moov", frag_duration=int(1e6 / fps),
                    tune="zerolatency", flush_packets=1)
        # flush_packets: else ffmpeg holds the fragments back until the end; delay_moov: the header is
        # written with the first fragment, when the AAC priming is known (without it the first video
        # frame lasts 0.104 s instead of 0.04 and the video runs 2 frames long)
        tmp = path
    else:
        # the format is given (opts' format="mp4"): ffmpeg does not guess it from the name
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
    done = False
    wav: Path | None = None
    proc: subprocess.Popen | None = None
    try:
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim not in (1, 2) or audio.shape[0] == 0:
                raise MediaError(f"{path}: audio must be a non-empty (samples,) or "
                                 f"(samples, channels) array, got shape {audio.shape}")
            import soundfile

            fd, wav_name = tempfile.mkstemp(suffix=".wav")
            os.close(fd)
            wav = Path(wav_name)
            soundfile.write(wav, audio, int(sample_rate), subtype="FLOAT")
            streams.append(ffmpeg.input(f"file:{wav}").audio)
            opts.update(acodec="aac", audio_bitrate="128k")
        cmd = _command(ffmpeg.output(*streams, f"file:{tmp}", **opts))
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=log)
            try:
                proc.stdin.write(memoryview(np.ascontiguousarray(first)).cast("B"))
                for index, frame in enumerate(it, start=1):
                    _check_frame(frame, first.shape, index, path)
                    proc.stdin.write(memoryview(np.ascontiguousarray(frame)).cast("B"))
                proc.stdin.close()
            except BrokenPipeError:  # ffmpeg died; its exit code and stderr say why
                pass
            if proc.wait() != 0:
                raise _fail(path, "ffmpeg failed to encode the video", _read_log(log))
        tmp.chmod(0o644)  # mkstemp makes 0600; a finished video is an ordinary file
        os.replace(tmp, path)
        done = True
        return path
    finally:
        if proc is not None:
            _stop(proc)
        for leftover in (None if done else tmp, wav):
            if leftover is not None:
                leftover.unlink(missing_ok=True)


def cut_video(path: str | os.PathLike, out: str | os.PathLike, start: float = 0.0, seconds: float | None = None,
              fps: float = 25, crf: int = 12) -> Path:
    """The [start, start + seconds) part of a video (to its end when `seconds` is None), re-encoded at
    `fps` (H.264 at near-lossless `crf`, AAC 192k) so that it begins on a frame of its own; written
    to a temporary `.name.part` (an mp4, the format given: not a name that `*.mp4` finds) and renamed
    when complete."""
    src, out = _check_input(path), Path(out)
    if start < 0 or (seconds is not None and seconds <= 0):
        raise MediaError(f"{path}: cannot cut {seconds} s from {start} s")
    tmp = out.with_name(f".{out.name}.part")
    cmd = [ffmpeg_exe(), "-v", "error", "-y", "-ss", f"{start:.3f}", "-i", src]
    if seconds is not None:
        cmd += ["-t", f"{seconds:.3f}"]
    cmd += ["-map", "0:v:0", "-map", "0:a:0", "-r", f"{fps:g}", "-c:v", "libx264", "-crf", str(crf), "-preset",
            "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "192k", "-f", "mp4", f"file:{tmp}"]
    run = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL)
    if run.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise _fail(path, f"could not cut {start:g}-{'end' if seconds is None else f'{start + seconds:g}'} s",
                    run.stderr)
    os.replace(tmp, out)
    return out
