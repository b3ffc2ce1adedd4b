"""Procedural talking-face data: identities, rendering, audio-driven mouth, mp4 data sets, CLI."""

import json
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from letstalk.cli import main
from letstalk.media import load_audio, load_video_frames, probe
from letstalk.portrait import detect_face
from letstalk.synthetic import (
    HAIR_STYLES, Identity, audio_envelope, dataset_files, dataset_todo, draw_portrait, make_dataset,
    make_talking_video, measure_mouth_open, mouth_box, render_face, speech_like_audio,
)

ROOT = Path(__file__).resolve().parents[2]
FPS, SR = 25, 16000


def ident(seed: int) -> Identity:
    return Identity.sample(np.random.default_rng(seed))


def corr(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


def lagged_corr(envelope, mouth, lag: int) -> float:
    """Correlation of mouth[t] with envelope[t - lag]."""
    n = min(len(envelope), len(mouth))
    return corr(envelope[:n - lag], mouth[lag:n])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("talk")
    paths = make_dataset(out, videos=2, seconds=3.0, seed=5, size=128, progress=False)
    return out, paths


# --- identities and rendering ------------------------------------------------------------------


def test_identities_are_distinct():
    ids = [ident(s) for s in range(20)]
    assert len({i for i in ids}) == 20 and len({i.skin for i in ids}) == 20
    assert len({i.hair_style for i in ids}) >= 3 and {i.hair_style for i in ids} <= set(HAIR_STYLES)
    frames = np.stack([render_face(i, 64) for i in ids]).astype(np.float32)
    for a, b in combinations(range(20), 2):  # every pair looks clearly different
        assert np.abs(frames[a] - frames[b]).mean() > 8, (a, b)
    assert ident(3) == ident(3) and ident(3) != ident(4)
    i = ids[0]
    assert Identity.from_dict(json.loads(json.dumps(i.to_dict()))) == i


def test_render_face_mouth_eyes_and_sway():
    i = ident(1)
    base = render_face(i, 128)
    assert base.shape == (128, 128, 3) and base.dtype == np.uint8
    assert np.array_equal(base, render_face(i, 128))  # deterministic
    openness = measure_mouth_open(np.stack([render_face(i, 128, m) for m in np.linspace(0, 1, 6)]), i)
    assert openness[0] < 0.01 and np.all(np.diff(openness) > 0)  # dark opening grows with mouth_open
    # the mouth changes only inside the mouth box
    x0, y0, x1, y1 = mouth_box(i, 128)
    diff = np.abs(render_face(i, 128, 1.0).astype(int) - base).sum(axis=2)
    assert diff[y0:y1, x0:x1].sum() > 0.98 * diff.sum()
    # a blink changes only the eyes (an even lid hides white sclera and dark iris), not the mouth
    closed = render_face(i, 128, eye_open=0.0)
    changed = np.abs(closed.astype(int) - base).max(axis=2) > 10
    rows = np.flatnonzero(changed.any(axis=1))
    assert changed.sum() > 20 and 0.3 * 128 < rows.min() and rows.max() < 0.55 * 128
    assert closed[changed].std() < 0.8 * base[changed].std()
    assert np.array_equal(closed[y0:y1], base[y0:y1])
    # head sway: a translation moves the face by about that many pixels
    moved = render_face(i, 128, offset=(3, 0))
    err = [np.abs(moved[:, 20:100].astype(int) - np.roll(base, s, axis=1)[:, 20:100]).mean() for s in range(-1, 6)]
    assert int(np.argmin(err)) - 1 == 3
    assert not np.array_equal(render_face(i, 128, angle=2.0), base)
    assert draw_portrait(64, seed=2).shape == (64, 64, 3)


def test_haar_detects_procedural_faces():
    """OpenCV's Haar frontal-face cascade finds the drawn faces (measured: 98-100 %)."""
    hits, total = 0, 0
    for s in range(20):
        i = ident(100 + s)
        for mouth, eye, dx, angle in ((0.0, 1.0, 0, 0), (0.8, 1.0, 3, -2), (0.4, 0.0, -2, 2)):
            box = detect_face(render_face(i, 256, mouth, eye, offset=(dx, 1), angle=angle))
            total += 1
            if box is not None:
                x0, y0, x1, y1 = box
                hits += 80 < (x0 + x1) / 2 < 176 and 80 < (y0 + y1) / 2 < 190  # on the face
    assert hits / total >= 0.9, hits / total


# --- audio ---------------------------------------------------------------------------------------


def test_speech_like_audio_and_envelope():
    a = speech_like_audio(4.0, seed=3)
    assert a.dtype == np.float32 and a.shape == (64000,) and np.abs(a).max() <= 1
    assert np.array_equal(a, speech_like_audio(4.0, seed=3)) and not np.array_equal(a, speech_like_audio(4.0, seed=4))
    env = audio_envelope(a, SR, FPS)
    assert env.shape == (100,) and env.dtype == np.float32 and env.min() >= 0 and env.max() == 1
    assert 0.1 < (env < 0.05).mean() < 0.6  # pauses between syllables and phrases
    assert 0.2 < (env > 0.3).mean() < 0.8  # and voiced syllables
    assert audio_envelope(np.zeros(16000), SR).tolist() == [0.0] * 25  # silence: zeros, not NaN
    assert len(audio_envelope(np.zeros(16123), SR)) == round(16123 / SR * FPS)
    burst = np.zeros(16000, np.float32)
    burst[6400:7040] = np.sin(np.arange(640) / 3)  # exactly frame 10
    e = audio_envelope(burst, SR)
    assert int(np.argmax(e)) == 10 and e[10] == 1 and e[:10].max() == 0 and e[11:].max() == 0


# --- talking videos ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mouth_follows_audio_with_lag(seed):
    frames, audio, meta = make_talking_video(ident(seed), 4.0, seed=seed, size=64)
    assert frames.shape == (100, 64, 64, 3) and frames.dtype == np.uint8 and audio.shape == (64000,)
    for key in ("mouth_open", "eye_open", "blink", "head_pose", "envelope"):
        assert len(meta[key]) == 100, key
    assert meta["lag_frames"] in (1, 2) and meta["fps"] == FPS and meta["sample_rate"] == SR
    assert meta["seed"] == seed and meta["identity"].startswith("id") and meta["identity_params"]["skin"]
    env, mouth = audio_envelope(audio, SR, FPS), np.array(meta["mouth_open"])
    rs = [lagged_corr(env, mouth, lag) for lag in range(4)]
    assert int(np.argmax(rs)) == meta["lag_frames"] and max(rs) > 0.8, rs
    assert abs(corr(meta["blink"], env)) < 0.3
    assert abs(corr(np.array(meta["head_pose"])[:, 0], env)) < 0.4
    # the pixels follow the ground truth
    assert corr(measure_mouth_open(frames, ident(seed)), mouth) > 0.8


def test_blinks_and_sway_are_independent_of_audio():
    i = ident(7)
    _, audio_a, a = make_talking_video(i, 10.0, seed=7, size=64)
    _, audio_b, b = make_talking_video(i, 10.0, seed=8, size=64)
    assert not np.array_equal(audio_a, audio_b) and a["blink"] != b["blink"]
    for meta in (a, b):
        blink = np.array(meta["blink"])
        starts = np.flatnonzero(np.diff(np.r_[0, blink]) == 1)
        ends = np.flatnonzero(np.diff(np.r_[blink, 0]) == -1)
        assert 1 <= len(starts) <= 6 and all(3 <= e - s + 1 <= 5 for s, e in zip(starts, ends))
        assert min(meta["eye_open"]) == 0.0
        pose = np.array(meta["head_pose"])
        assert 0.1 < np.abs(pose[:, :2]).max() < 64 * 0.03 and np.abs(pose[:, 2]).max() < 4
        assert np.abs(np.diff(pose[:, 0])).max() < 0.5  # smooth


# --- data sets ----------------------------------------------------------------------------------


def test_dataset_writes_real_mp4s_with_sidecars(dataset):
    out, paths = dataset
    assert paths == [out / "talk_0000.mp4", out / "talk_0001.mp4"]
    assert [dataset_files(out, k) for k in (0, 1)] == [(p, p.with_suffix(".json")) for p in paths]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    metas = [json.loads(p.with_suffix(".json").read_text()) for p in paths]
    assert [m["identity"] for m in metas] == ["id0000", "id0001"]
    assert metas[0]["identity_params"] != metas[1]["identity_params"]
    for path, meta in zip(paths, metas):
        info = probe(path)
        assert info.has_video and info.has_audio and info.fps == FPS and (info.width, info.height) == (128, 128)
        assert info.sample_rate == SR and abs(info.duration - 3.0) < 0.1
        frames = load_video_frames(path)
        assert abs(len(frames) - 75) <= 1 and len(meta["mouth_open"]) == len(meta["blink"]) == 75
        mouth = np.array(meta["mouth_open"])[:len(frames)]
        identity = Identity.from_dict(meta["identity_params"])
        assert corr(measure_mouth_open(frames, identity), mouth) > 0.8  # lip motion is measurable
        # the lag survives the AAC round trip
        env = audio_envelope(load_audio(path), SR, FPS)
        rs = [lagged_corr(env, mouth, lag) for lag in range(4)]
        assert int(np.argmax(rs)) == meta["lag_frames"] and max(rs) > 0.8
        found = [detect_face(f) is not None for f in frames[::6]]
        assert np.mean(found) >= 0.8


def test_dataset_is_deterministic_and_rerun_skips(dataset, tmp_path):
    out, paths = dataset
    stamps = [(p.stat().st_mtime_ns, p.with_suffix(".json").stat().st_mtime_ns) for p in paths]
    calls = []
    assert make_dataset(out, videos=2, seconds=3.0, seed=5, size=128, progress=lambda d, t: calls.append((d, t))) \
        == paths
    assert calls == [(1, 2), (2, 2)]
    assert [(p.stat().st_mtime_ns, p.with_suffix(".json").stat().st_mtime_ns) for p in paths] == stamps

    again = make_dataset(tmp_path / "again", videos=1, seconds=3.0, seed=5, size=128, progress=False)[0]
    assert again.with_suffix(".json").read_text() == paths[0].with_suffix(".json").read_text()
    assert np.array_equal(load_video_frames(again), load_video_frames(paths[0]))

    other = make_dataset(tmp_path / "other", videos=1, seconds=3.0, seed=6, size=128, progress=False)[0]
    assert json.loads(other.with_suffix(".json").read_text())["mouth_open"] \
        != json.loads(paths[0].with_suffix(".json").read_text())["mouth_open"]
    assert not np.array_equal(load_video_frames(other), load_video_frames(paths[0]))

    # a video without a (readable) sidecar is made again
    sidecar = again.with_suffix(".json")
    for damage in (sidecar.unlink, lambda: sidecar.write_text('{"trunc')):
        damage()
        assert dataset_todo(again.parent, 1, 3.0, 5, 128) == [0]
        make_dataset(again.parent, videos=1, seconds=3.0, seed=5, size=128, progress=False)
        assert sidecar.read_text() == paths[0].with_suffix(".json").read_text()
    assert dataset_todo(again.parent, 2, 3.0, 5, 128) == [1]

    # a folder made with other settings is not silently mixed
    for kw in (dict(seed=6), dict(seconds=2.0), dict(size=64)):
        args = dict(videos=1, seconds=3.0, seed=5, size=128, progress=False) | kw
        with pytest.raises(ValueError, match="other settings"):
            make_dataset(again.parent, **args)
    assert sidecar.read_text() == paths[0].with_suffix(".json").read_text()


@pytest.mark.parametrize("kw, message", [
    (dict(videos=0), "videos"), (dict(seconds=0), "seconds"), (dict(seconds=601), "seconds"),
    (dict(size=100), "size"), (dict(size=56), "size"), (dict(seed=-1), "seed"), (dict(fps=0), "fps"),
])
def test_dataset_rejects_bad_settings(tmp_path, kw, message):
    args = dict(videos=1, seconds=1.0, seed=0, size=64, progress=False) | kw
    with pytest.raises(ValueError, match=message):
        make_dataset(tmp_path / "d", **args)
    assert not (tmp_path / "d").exists()


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_make_dataset_from_a_shell(tmp_path):
    cmd = [sys.executable, "-m", "letstalk.cli", "make-dataset", str(tmp_path / "ds"), "--videos", "2",
           "--seconds", "1", "--seed", "3", "--size", "64"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "wrote 2 videos" in run.stdout and str(tmp_path / "ds") in run.stdout
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == \
        ["talk_0000.json", "talk_0000.mp4", "talk_0001.json", "talk_0001.mp4"]
    assert probe(tmp_path / "ds" / "talk_0001.mp4").width == 64

    bad = subprocess.run(cmd[:-1] + ["100"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == ["letstalk: error: size must be a multiple of 8 and >= 64, got 100"]


@pytest.mark.parametrize("argv", [["--videos", "0"], ["--seconds", "-1"], ["--seconds", "nan"], ["--size", "32"],
                                  ["--seconds", "601"], ["--seed", "-2"]])
def test_cli_bad_arguments_are_one_line(tmp_path, capsys, argv):
    assert main(["make-dataset", str(tmp_path / "ds"), *argv]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("letstalk: error: ")
    assert not (tmp_path / "ds").exists()


def test_cli_rerun_keeps_existing(tmp_path, capsys):
    argv = ["make-dataset", str(tmp_path), "--videos", "1", "--seconds", "0.4", "--size", "64"]
    assert main(argv) == 0 and "wrote 1 video " in capsys.readouterr().out
    assert main(argv) == 0 and "wrote 0 videos" in capsys.readouterr().out
