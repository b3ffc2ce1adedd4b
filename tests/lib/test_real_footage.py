"""Real footage through the library's decode path (letstalk.clips.decode_video with letstalk.faces):
cuts between people, a second face in the frame, and broken or unusual files. No Ray.

Every input is made from the real clips in the realdata folder with the real ffmpeg; nothing of it
is kept in the repository (see tests/conftest.py `realdata`).
"""

import subprocess

import numpy as np
import pytest

from conftest import FACE_MODEL
from letstalk.clips import ClipSpec, build_clip_rows, decode_video
from letstalk.faces import FaceSettings
from letstalk.media import MediaError, ffmpeg_exe, probe
from letstalk.quality import QualityFilters

SPEC = ClipSpec(image_size=64, clip_frames=16, stride=16)


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def faces(realdata):
    return FaceSettings(model=str(FACE_MODEL))


def _centres(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, :2] + boxes[:, 2:]) / 2


def test_two_people_back_to_back_are_split_at_the_cut(realdata, faces, tmp_path):
    v = realdata / "videos"
    both = tmp_path / "two_people.mp4"
    ffmpeg("-t", "3", "-i", str(v / "styletalk_obama1.mp4"), "-t", "3", "-i", str(v / "sadtalker_hdtf_katiehill.mp4"),
           "-filter_complex",
           "[0:v]scale=512:512,fps=25,setsar=1[a];[1:v]scale=512:512,fps=25,setsar=1[b];"
           "[0:a]aresample=16000,aformat=channel_layouts=mono[x];[1:a]aresample=16000,aformat=channel_layouts=mono[y];"
           "[a][x][b][y]concat=n=2:v=1:a=1[v][au]", "-map", "[v]", "-map", "[au]", "-c:v", "libx264", "-c:a", "aac",
           str(both))
    video = decode_video(both, SPEC, faces, vad=False)
    assert len(video.track.shots) == 2, video.track.shots
    (s0, e0), (s1, e1) = video.track.shots
    assert s0 == 0 and abs(e0 - 75) <= 1 and s1 == e0 and e1 == len(video.frames)
    assert video.segments == video.track.shots and video.quality.shots == 2
    # no clip crosses the cut: each clip lies inside one shot
    latents = np.zeros((len(video.frames), 4, 2, 2), np.float32)
    import torch

    rows = build_clip_rows("v", "v", torch.from_numpy(latents), torch.zeros(len(video.frames), 1, 4), SPEC,
                           segments=video.segments)
    for row in rows:
        assert any(s <= row["start"] and row["start"] + SPEC.clip_frames <= e for s, e in video.segments)
    assert {row["start"] for row in rows} >= {0, e0}


def test_a_second_smaller_face_does_not_take_the_crop(realdata, faces, tmp_path):
    v = realdata / "videos"
    alone, crowded = tmp_path / "alone.mp4", tmp_path / "crowded.mp4"
    ffmpeg("-t", "3", "-i", str(v / "sadtalker_hdtf_katiehill.mp4"), "-c:v", "libx264", "-c:a", "aac", str(alone))
    ffmpeg("-t", "3", "-i", str(alone), "-t", "3", "-i", str(v / "styletalk_obama1.mp4"), "-filter_complex",
           "[1:v]scale=150:150[s];[0:v][s]overlay=8:8", "-map", "0:a", "-c:v", "libx264", "-c:a", "aac", str(crowded))
    ref = decode_video(alone, SPEC, faces, vad=False)
    got = decode_video(crowded, SPEC, faces, vad=False)
    assert got.quality.other_faces > 0.5  # the small face was seen ...
    side = ref.track.boxes[0, 2] - ref.track.boxes[0, 0]
    shift = np.linalg.norm(_centres(got.track.boxes) - _centres(ref.track.boxes), axis=1).max()
    assert shift < 0.05 * side  # ... and the crop stayed on the speaker
    assert got.track.shots == ref.track.shots == [(0, len(ref.frames))]  # an overlay is not a cut


def test_portrait_video_with_rotation_metadata_is_upright(realdata, faces, tmp_path):
    landscape, rotated = tmp_path / "landscape.mp4", tmp_path / "rotated.mp4"
    ffmpeg("-t", "3", "-i", str(realdata / "videos" / "latentsync_demo1.mp4"), "-vf", "transpose=2,scale=640:360",
           "-c:v", "libx264", "-c:a", "aac", str(landscape))
    ffmpeg("-display_rotation:v:0", "-90", "-i", str(landscape), "-c", "copy", str(rotated))
    info = probe(rotated)
    assert (info.width, info.height) == (360, 640)  # stored 640x360, shown (and decoded) portrait
    video = decode_video(rotated, SPEC, faces, vad=False)
    assert video.quality.face_fraction >= 0.95
    x0, y0, x1, y1 = video.box
    assert y1 <= 640 * 0.6  # the face sits in the upper part of the upright frame, not the body's centre


def test_broken_and_unusual_files_are_reported_not_crashed(realdata, faces, tmp_path):
    src = realdata / "videos" / "retalking_face2.mp4"
    silent = tmp_path / "silent.mp4"
    ffmpeg("-i", str(src), "-an", "-c:v", "copy", str(silent))
    with pytest.raises(MediaError, match="has no audio stream"):
        decode_video(silent, SPEC, faces, vad=False)

    # truncated mid-stream: with the index at the end nothing is readable; with it in front
    # (faststart) the first part decodes, and the quality record says how much
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(MediaError, match="truncated.mp4: not a readable media file"):
        decode_video(truncated, SPEC, faces, vad=False)
    faststart, cut = tmp_path / "faststart.mp4", tmp_path / "faststart_cut.mp4"
    ffmpeg("-i", str(src), "-c", "copy", "-movflags", "+faststart", str(faststart))
    cut.write_bytes(faststart.read_bytes()[: faststart.stat().st_size // 2])
    video = decode_video(cut, SPEC, faces, vad=False)
    assert 0.2 < video.quality.decoded_fraction < 0.7 and len(video.frames) < 0.7 * 125
    assert QualityFilters(min_decoded_fraction=0.9).check(video.quality).startswith("filtered: decoded_fraction")
    assert decode_video(faststart, SPEC, faces, vad=False).quality.decoded_fraction > 0.97

    one_fps = tmp_path / "one_fps.mp4"
    ffmpeg("-i", str(src), "-vf", "fps=1", "-c:v", "libx264", "-c:a", "aac", str(one_fps))
    video = decode_video(one_fps, SPEC, faces, vad=True)
    q = video.quality
    assert q.source_fps == pytest.approx(1.0) and q.face_fraction >= 0.95
    assert QualityFilters(min_source_fps=10).check(q).startswith("filtered: source_fps 1.000 < 10")
    assert QualityFilters().check(q) == ""  # filters default to recording
    assert 0.3 < q.speech_fraction <= 1.0


def test_haar_fallback_is_named_and_has_no_mouth_measure(realdata, tmp_path):
    short = tmp_path / "short.mp4"
    ffmpeg("-t", "2", "-i", str(realdata / "videos" / "sadtalker_hdtf_aoc.mp4"), "-c:v", "libx264", "-c:a", "aac",
           str(short))
    video = decode_video(short, SPEC, FaceSettings(detector="haar"), vad=False)
    assert video.quality.detector == "haar" and video.quality.face_fraction > 0.9
    assert np.isnan(video.quality.mouth_audio_r)  # boxes only: no landmarks, no aperture
    with pytest.raises(ValueError, match="needs its model"):
        FaceSettings(detector="mediapipe")
