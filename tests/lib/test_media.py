"""letstalk.media against the real ffmpeg binary: tiny generated clips, real encode/decode."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from letstalk.media import (MediaError, MediaInfo, ffmpeg_exe, iter_video_frames, load_audio,
                            load_video_frames, probe, write_video)

W, H = 64, 48


def ff(*args: str) -> None:
    """Run the real ffmpeg quietly; fail the test with its stderr if it fails."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def sine(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.fft.rfftfreq(wave.size, 1 / rate)[spectrum.argmax()])


def children() -> list[int]:
    """PIDs of this process's child processes (zombies included), from /proc."""
    me, pids = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                pids.append(int(entry))
    return pids


def assert_one_line_error(exc: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(exc.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Source files made by the real ffmpeg / soundfile, shared by the tests of this module."""
    d = tmp_path_factory.mktemp("media")
    src = {name: d / name for name in
           ["av30.mp4", "silent_video.mp4", "tone.mp3", "tone.ogg", "tone.m4a", "stereo.wav",
            "silence.wav", "empty.wav", "notes.txt"]}
    tone = ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=2"]
    # 2 s of 30 fps testsrc + stereo 44.1 kHz sine: the "phone clip" input.
    ff("-f", "lavfi", "-i", f"testsrc=size={W}x{H}:rate=30:duration=2", *tone, "-ac", "2",
       "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(src["av30.mp4"]))
    ff("-f", "lavfi", "-i", f"testsrc=size={W}x{H}:rate=25:duration=1", "-c:v", "libx264",
       "-pix_fmt", "yuv420p", str(src["silent_video.mp4"]))
    # The bundled imageio-ffmpeg binary has libmp3lame, libvorbis, libopus and the native aac.
    ff(*tone, "-c:a", "libmp3lame", str(src["tone.mp3"]))
    ff(*tone, "-c:a", "libvorbis", str(src["tone.ogg"]))
    ff(*tone, "-c:a", "aac", str(src["tone.m4a"]))
    sf.write(src["stereo.wav"], np.stack([sine(2, 44100), sine(2, 44100, 880)], axis=1), 44100)
    sf.write(src["silence.wav"], np.zeros(16000, np.float32), 16000)
    sf.write(src["empty.wav"], np.zeros(0, np.float32), 16000)
    src["notes.txt"].write_text("not a video\n" * 20)
    return src


# ------------------------------------------------------------------------------------- probe


def test_probe_reads_streams(media):
    info = probe(media["av30.mp4"])
    assert isinstance(info, MediaInfo)
    assert info.has_video and info.has_audio
    assert (info.width, info.height, info.fps) == (W, H, 30.0)
    assert (info.sample_rate, info.channels) == (44100, 2)
    assert info.duration == pytest.approx(2.0, abs=0.05)

    audio_only = probe(media["tone.mp3"])
    assert audio_only.has_audio and not audio_only.has_video
    assert (audio_only.sample_rate, audio_only.channels, audio_only.width) == (44100, 1, None)


@pytest.mark.parametrize("name", ["missing.mp4", "notes.txt"])
def test_probe_rejects_missing_and_non_media(media, name):
    path = media["notes.txt"].parent / name
    with pytest.raises(MediaError) as exc:
        probe(path)
    assert_one_line_error(exc, path)


# ------------------------------------------------------------------------------- round trip


def test_write_then_decode_round_trip(tmp_path):
    fps, n, rate = 25, 50, 16000
    ramp = np.linspace(0, 255, W, dtype=np.float32)
    rows = [((ramp + 4 * i) % 256).astype(np.uint8) for i in range(n)]  # a sliding gradient
    frames = [np.broadcast_to(row[None, :, None], (H, W, 3)).copy() for row in rows]
    audio = sine(2.0, rate)
    out = write_video(tmp_path / "out.mp4", iter(frames), fps=fps, audio=audio, sample_rate=rate)

    assert out == tmp_path / "out.mp4" and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temp files left
    info = probe(out)
    assert (info.width, info.height, info.fps) == (W, H, 25.0)
    assert info.has_audio and info.sample_rate == rate

    decoded = load_video_frames(out, fps=fps)
    assert abs(len(decoded) - n) <= 1 and decoded.shape[1:] == (H, W, 3)
    k = min(len(decoded), n)
    assert np.abs(decoded[:k].astype(np.float32) - np.stack(frames[:k])).mean() < 8  # crf 18

    wave = load_audio(out, sample_rate=rate)
    assert abs(wave.size - audio.size) <= 0.04 * rate
    assert peak_hz(wave, rate) == pytest.approx(440, abs=2)
    rms = lambda x: float(np.sqrt(np.mean(x**2)))  # noqa: E731
    assert rms(wave) == pytest.approx(rms(audio), rel=0.2)


def test_odd_size_is_padded_to_even(tmp_path):
    frames = [np.full((47, 63, 3), 200, np.uint8)] * 5
    info = probe(write_video(tmp_path / "odd.mp4", frames, fps=25))
    assert (info.width, info.height, info.has_audio) == (64, 48, False)


# ------------------------------------------------------------------------------ video reading


def test_decode_30fps_source_at_25fps_and_scale(media):
    info = probe(media["av30.mp4"])
    frames = load_video_frames(media["av30.mp4"], fps=25)
    assert abs(len(frames) - round(info.duration * 25)) <= 1
    assert frames.shape[1:] == (H, W, 3) and frames.dtype == np.uint8
    assert frames.std() > 10  # testsrc is colourful, not a blank decode

    small = load_video_frames(media["av30.mp4"], fps=10, size=(32, 24))
    assert small.shape[1:] == (24, 32, 3)
    assert abs(len(small) - round(info.duration * 10)) <= 1


def test_rotated_video_reports_and_decodes_displayed_size(media, tmp_path):
    rotated = tmp_path / "portrait.mp4"  # a phone clip: 64x48 stored, display matrix 90 degrees
    ff("-display_rotation", "90", "-i", str(media["av30.mp4"]), "-c", "copy", str(rotated))
    info = probe(rotated)
    assert (info.width, info.height) == (H, W)
    assert load_video_frames(rotated, fps=5).shape[1:] == (W, H, 3)


def test_iter_video_frames_closes_early_without_zombie(media):
    before = set(children())
    frames = iter_video_frames(media["av30.mp4"], fps=25)
    first = next(frames)
    assert first.shape == (H, W, 3)
    assert set(children()) - before, "ffmpeg should be running while frames are streamed"
    frames.close()
    assert set(children()) - before == set()  # killed and reaped: no zombie left
    with pytest.raises(StopIteration):
        next(frames)


def test_iter_video_frames_rejects_audio_only(media):
    with pytest.raises(MediaError) as exc:
        iter_video_frames(media["tone.mp3"])
    assert_one_line_error(exc, media["tone.mp3"], "no video stream")


# ------------------------------------------------------------------------------ audio reading


def test_load_audio_stereo_wav_to_mono_16k(media):
    wave = load_audio(media["stereo.wav"], sample_rate=16000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert wave.size == pytest.approx(32000, rel=0.01)
    assert np.abs(wave).max() <= 1.0
    spectrum = np.abs(np.fft.rfft(wave))
    freqs = np.fft.rfftfreq(wave.size, 1 / 16000)
    for hz in (440, 880):  # both channels made it into the mono mix
        assert spectrum[np.abs(freqs - hz) < 3].max() > 0.3 * spectrum.max()


@pytest.mark.parametrize("name", ["tone.mp3", "tone.ogg", "tone.m4a", "av30.mp4"])
def test_load_audio_compressed_formats(media, name):
    wave = load_audio(media[name], sample_rate=16000)
    assert wave.size == pytest.approx(32000, rel=0.03)  # codecs pad a few ms
    assert peak_hz(wave, 16000) == pytest.approx(440, abs=2)


def test_load_audio_silence_is_zeros(media):
    wave = load_audio(media["silence.wav"])
    assert wave.size == 16000 and np.all(wave == 0)


def test_load_audio_errors(media):
    cases = [("notes.txt", ()), ("silent_video.mp4", ("no audio stream",)),
             ("empty.wav", ("0 samples",))]
    for name, words in cases:
        with pytest.raises(MediaError) as exc:
            load_audio(media[name])
        assert_one_line_error(exc, media[name], *words)


def test_load_audio_max_seconds(media):
    with pytest.raises(MediaError) as exc:
        load_audio(media["tone.m4a"], max_seconds=1.5)
    assert_one_line_error(exc, media["tone.m4a"], "1.5 s", "2.0")
    assert load_audio(media["tone.m4a"], max_seconds=3).size > 0


# ------------------------------------------------------------------------------ write errors


def test_write_video_size_mismatch_leaves_nothing(tmp_path):
    def frames():
        for _ in range(5):
            yield np.zeros((H, W, 3), np.uint8)
        yield np.zeros((H, W + 2, 3), np.uint8)

    target = tmp_path / "bad.mp4"
    with pytest.raises(MediaError) as exc:
        write_video(target, frames(), fps=25, audio=sine(1, 16000))
    assert_one_line_error(exc, target, "frame 5")
    assert list(tmp_path.iterdir()) == []


def test_write_video_rejects_zero_frames_and_bad_dtype(tmp_path):
    with pytest.raises(MediaError, match="no frames"):
        write_video(tmp_path / "empty.mp4", [], fps=25)
    with pytest.raises(MediaError, match="uint8"):
        write_video(tmp_path / "float.mp4", [np.zeros((H, W, 3), np.float32)], fps=25)
    assert list(tmp_path.iterdir()) == []


def test_write_video_failing_ffmpeg_leaves_nothing(tmp_path):
    target = tmp_path / "x.mp4"
    with pytest.raises(MediaError) as exc:  # crf out of range: ffmpeg itself fails
        write_video(target, [np.zeros((H, W, 3), np.uint8)] * 3, fps=25, crf=-100)
    assert_one_line_error(exc, target, "ffmpeg")
    assert list(tmp_path.iterdir()) == []
