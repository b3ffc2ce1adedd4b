"""jobs/avatar.py on real footage: a reduced run of the user's command (a few training steps on a
few seconds of a real clip, local Ray, DeepSpeed, MLflow), the report's fields and files, the
registered model and `letstalk render` with it; the held-out measure's alignment; bad input.

The full run (obama2, 40 minutes of training) stays a command: docs/avatar.md.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import FACE_MODEL, ROOT
from letstalk.media import cut_video, load_video_frames, probe
from letstalk.vae import SpaceToDepthCodec

SR, FPS = 16000, 25
REPORT_FIELDS = ("mouth_r", "mouth_r_control", "lmd", "face_psnr", "face_ssim", "seam", "resolution", "steps",
                 "train_seconds")


def avatar(*args, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "avatar.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.heavy
def test_reduced_avatar_run_reports_registers_and_renders(realdata, tmp_path):
    clip = cut_video(realdata / "videos" / "styletalk_obama2.mp4", tmp_path / "obama-12s.mp4", seconds=12.0)
    out = tmp_path / "avatar"
    # 60 steps asked, a budget of 0.6 s: the run stops at the first logged step past it (25), with a bundle
    run = avatar("--video", clip, "--holdout-seconds", 2, "--out", out, "--face-model", FACE_MODEL, "--steps", 60,
                 "--minutes", 0.01, "--sample-steps", 2)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for key in REPORT_FIELDS:
        assert report[key] is not None, key
    assert report["steps"] == 25 and report["resolution"] == 64 and report["frames"] == 50
    assert -1 <= report["mouth_r"] <= 1 and -1 <= report["mouth_r_control"] <= 1
    assert report["seconds_of_footage"] == {"source": pytest.approx(12.0, abs=0.1), "train": pytest.approx(10.0, abs=0.1),
                                           "holdout": 2.0}
    assert report["train_clips"] == len(range(0, 250 - 8 + 1, 2))  # 10 s at 25 fps, 8-frame clips every 2 frames
    for name in ("holdout.mp4", "side_by_side.mp4", "mouth.png", "sheet.png", "portrait.png"):
        assert (out / name).stat().st_size > 1000, name
    held = load_video_frames(out / "holdout.mp4")
    assert held.shape == (50, 64, 64, 3)
    sbs = probe(out / "side_by_side.mp4")
    assert (sbs.width, sbs.height, sbs.has_audio) == (516, 256, True)
    assert abs(probe(out / "footage" / "train" / "obama-12s.mp4").duration - 10.0) < 0.1  # the held-out 2 s never trained on
    assert "time limit" in run.stderr + run.stdout

    # the registered model is the bundle: resolve it from the registry and render new speech with the CLI
    from letstalk_platform.tracking import resolve_bundle

    bundle = resolve_bundle(report["model"], report["mlflow_uri"], cache=tmp_path / "cache")
    assert json.loads((bundle / "transformer" / "config.json").read_text())["audio_feature_dim"] == 80
    speech = realdata / "speech" / "dreamtalk_french1.wav"
    render = subprocess.run([sys.executable, "-m", "letstalk.cli", "render", str(out / "portrait.png"), str(speech),
                             "-o", str(tmp_path / "new.mp4"), "--model", str(bundle), "--steps", "2", "--sampler",
                             "ddim"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert render.returncode == 0, render.stderr[-2000:]
    info = probe(tmp_path / "new.mp4")
    # the portrait (256 px) is larger than the model's 64 px crop: the face is pasted back into it
    assert abs(info.duration - probe(speech).duration) < 0.1 and info.width == Image.open(out / "portrait.png").width


def test_avatar_rejects_bad_input_in_one_line(realdata, tmp_path):
    short = cut_video(realdata / "videos" / "styletalk_obama2.mp4", tmp_path / "short.mp4", seconds=9.0)
    run = avatar("--video", short, "--holdout-seconds", 6, "--out", tmp_path / "a", "--face-model", FACE_MODEL)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "at least 8 s are needed" in run.stderr
    run = avatar("--video", short, "--holdout-seconds", 1, "--out", tmp_path / "a", "--face-model", FACE_MODEL)
    assert run.returncode == 2 and "lip-sync measure needs at least 2 s" in run.stderr
    run = avatar("--video", short, "--out", tmp_path / "a", "--face-model", tmp_path / "none.task")
    assert run.returncode == 2 and "face_model" in run.stderr and "file not found" in run.stderr
    run = avatar("--video", tmp_path / "missing.mp4", "--out", tmp_path / "a", "--face-model", FACE_MODEL)
    assert run.returncode == 2 and "file not found" in run.stderr
    run = avatar("--video", short, "--out", tmp_path / "a", "--face-model", FACE_MODEL, "--name", "../etc")
    assert run.returncode == 2 and "name may hold only" in run.stderr
    assert not (tmp_path / "a" / "shards").exists()  # nothing started


@pytest.mark.slow
def test_held_out_measure_is_aligned_on_the_real_clip(realdata):
    """The real held-out frames rendered by an 'identity model' (their own latents decoded by the
    codec) score mouth r ≈ 1 at lag 0 against themselves; delayed by two frames they score lag 2.
    A misaligned frame, audio or lag convention in the report would fail this."""
    from letstalk.clips import ClipSpec
    from letstalk.faces import FaceSettings
    from letstalk_platform.avatar import held_out, score_holdout

    spec = ClipSpec(image_size=64, clip_frames=8, stride=8, audio_window=9)
    video = realdata / "videos" / "styletalk_obama2.mp4"
    hold = held_out(str(video), 26.0, spec, FaceSettings(model=str(FACE_MODEL)))
    n = len(hold.frames)  # the last 4 s of the clip's 749 frames at 25 fps
    assert n == 749 - 650 and hold.frames.shape[1:] == (64, 64, 3) and len(hold.frames_full) == n
    assert hold.audio.size == n * SR // FPS  # the audio of exactly those frames
    codec = SpaceToDepthCodec.fit(hold.frames, channels=16)  # the avatar's codec, fitted to these frames
    identity = codec.decode(codec.encode(hold.frames))
    report, tracks = score_holdout(identity, hold.frames, hold.frames_full, hold.audio, spec, str(FACE_MODEL), 8)
    assert report["mouth_r"] > 0.9 and report["mouth_lag"] == 0
    assert report["mouth_r_control"] < 0.5 and report["face_psnr"] > 33
    assert 0.5 < report["seam"] < 2.5  # real footage has no clip seams; its frame changes still vary (1.56 here)
    assert len(tracks["envelope"]) == len(tracks["real"]) == n
    delayed = np.concatenate([identity[:1], identity[:1], identity[:-2]])
    assert score_holdout(delayed, hold.frames, hold.frames_full, hold.audio, spec, str(FACE_MODEL), 8)[0][
        "mouth_lag"] == 2


def test_the_audio_encoder_flag_sizes_the_avatar_to_whisper(tmp_path):
    """--audio-encoder: log-mel is the preset's own; a Whisper folder gives ±2-frame windows of its
    states and the fresh avatar transformer takes them; anything else is one line before any work."""
    from letstalk.audio import WhisperAudioEncoder, tiny_whisper_encoder
    from letstalk.pipeline import LetsTalkPipeline
    from letstalk.synthetic import draw_portrait
    from letstalk_platform.avatar import avatar_audio_encoder

    assert avatar_audio_encoder("log-mel") is None
    tiny_whisper_encoder(hidden_size=32, num_layers=2).save_pretrained(tmp_path / "whisper")
    encoder = avatar_audio_encoder(str(tmp_path / "whisper"))
    assert isinstance(encoder, WhisperAudioEncoder) and encoder.window == 5
    crops = np.stack([draw_portrait(64, seed=s) for s in range(20)])
    pipe = LetsTalkPipeline.init_avatar(crops, audio_encoder=encoder)
    cfg = pipe.transformer.cfg
    assert (cfg.audio_window, cfg.audio_layers, cfg.audio_feature_dim) == (5, 6, 32)
    assert LetsTalkPipeline.init_avatar(crops).transformer.cfg.audio_feature_dim == 80  # log-mel by default
    with pytest.raises(ValueError, match="neither log-mel nor a Whisper"):
        avatar_audio_encoder(str(tmp_path))
    run = avatar("--video", tmp_path / "none.mp4", "--out", tmp_path / "o", "--face-model", FACE_MODEL,
                 "--audio-encoder", "whisper-huge")
    assert run.returncode != 0 and "whisper-huge" in run.stderr and "Traceback" not in run.stderr
