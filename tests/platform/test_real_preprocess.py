"""Every real clip of the realdata folder through `jobs/preprocess.py` with no face flags (local Ray,
the default detector: RetinaFace + MediaPipe FaceLandmarker, both shipped with letstalk; Silero VAD)
into shards with quality columns, and what the crops hold.

The bundle is the demo's random-initialised data bundle (the lossless space-to-depth codec), so the
shards' latents decode back to exactly the face crops preprocessing cut: the test looks at those
pixels with the landmarker. 128-pixel crops of the first FIRST_SECONDS of each clip keep the run short.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import FACE_MODEL, ROOT
from letstalk.artifacts import ShardManifest
from letstalk.faces import MediaPipeFaces
from letstalk.pipeline import LetsTalkPipeline
from letstalk.vae import SpaceToDepthCodec

pytestmark = pytest.mark.slow

SIZE = 128
FIRST_SECONDS = 4  # of each clip (--first-seconds): 84 of the 279 s of footage
# HDTF-style footage: a steady camera on one speaker (SOURCES.md of the realdata folder)
HDTF_STYLE = ("sadtalker_hdtf_aoc", "sadtalker_hdtf_katiehill", "real3dportrait_may_5s", "mimictalk_german_anchor_20s",
              "infinitetalk_ref_man", "retalking_face1", "retalking_face2", "retalking_face3", "retalking_face4",
              "retalking_face5")
JITTER_BOUND = 1.0  # % of the crop side per frame; measured 0.00-0.30 on these clips
PORTRAIT_9_16 = ("latentsync_demo1", "latentsync_demo2", "latentsync_demo3")  # 1080x1920


@pytest.fixture(scope="module")
def job(realdata, tmp_path_factory):
    d = tmp_path_factory.mktemp("real")
    LetsTalkPipeline.init_demo().save_pretrained(d / "bundle")
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "preprocess.py"), "--input", str(realdata / "videos"),
                          "--output", str(d / "shards"), "--model", str(d / "bundle"), "--image-size", str(SIZE),
                          "--first-seconds", str(FIRST_SECONDS)],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    return d, run.stdout, ShardManifest.load(d / "shards")


def _by_name(manifest: ShardManifest) -> dict:
    return {Path(e.path).stem: e for e in manifest.inputs}


def test_every_real_clip_becomes_shards_with_quality_columns(realdata, job):
    d, stdout, manifest = job
    videos = sorted(p.stem for p in (realdata / "videos").glob("*.mp4"))
    entries = _by_name(manifest)
    assert sorted(entries) == videos
    for name, e in entries.items():
        assert e.status == "done" or e.reason, name  # done, or a recorded reason
        assert e.quality["detector"] == "retinaface"
        for key in ("face_fraction", "crop_jitter", "speech_fraction", "mouth_audio_r", "blur", "brightness",
                    "face_px", "shots", "source_fps"):
            assert key in e.quality, (name, key)
        assert e.quality["speech_fraction"] > 0.5, name  # all of them are speech (SOURCES.md: checked with VAD)
        assert e.quality["face_fraction"] >= 0.95, name  # measured: 1.000 on all 21 (mediapipe alone: 0.944-1)
        assert np.isfinite(e.quality["mouth_audio_r"]), name  # landmarks, with no face flag
        track = json.loads((d / "shards" / e.track).read_text())
        assert len(track["boxes"]) == FIRST_SECONDS * 25, name  # only the first seconds were used
    # the shards carry the measures as columns: per clip (face_fraction) and per video (q_*)
    aoc = entries["sadtalker_hdtf_aoc"]
    table = pq.read_table(d / "shards" / aoc.shard, columns=["face_fraction", "q_speech_fraction", "q_crop_jitter"])
    assert table.num_rows == aoc.clips and min(table.column("face_fraction").to_pylist()) == 1.0
    assert table.column("q_speech_fraction").to_pylist() == [pytest.approx(aoc.quality["speech_fraction"])] * aoc.clips
    assert manifest.counts()["done"] == len(videos)  # measured: all 21 are usable
    # the job prints the quality table, one line per video
    for name in videos:
        assert any(line.startswith(name[:40]) and " done " in line for line in stdout.splitlines()), name


def test_the_crops_hold_the_face(job):
    d, _, manifest = job
    codec = SpaceToDepthCodec.from_pretrained(d / "bundle" / "vae")
    for e in manifest.done():
        table = pq.read_table(d / "shards" / e.shard, columns=["latents"])
        latents = table.column("latents").combine_chunks().to_numpy_ndarray()  # (clips, F, C, h, w)
        frames = codec.decode(torch.from_numpy(latents.reshape(-1, *latents.shape[2:]).astype(np.float32)))
        assert frames.shape[1:] == (SIZE, SIZE, 3)
        frames = frames[::4]  # every 4th frame: enough to see a lost face
        with MediaPipeFaces(FACE_MODEL, max_faces=1) as faces:
            found = np.mean([bool(faces.detect(np.kron(f, np.ones((2, 2, 1), np.uint8)))) for f in frames])
        assert found >= 0.95, (e.path, found)


def test_crop_jitter_is_bounded_on_steady_footage(job):
    entries = _by_name(job[2])
    jitter = {name: entries[name].quality["crop_jitter"] for name in HDTF_STYLE}
    assert max(jitter.values()) < JITTER_BOUND, jitter


def test_portrait_phone_video_gets_a_face_crop_not_a_body_crop(job):
    d, _, manifest = job
    entries = _by_name(manifest)
    for name in PORTRAIT_9_16:
        track = json.loads((d / "shards" / entries[name].track).read_text())
        width, height = track["size"]
        assert (width, height) == (1080, 1920)
        boxes = np.asarray(track["boxes"])
        assert len(boxes) == len(track["found"]) and np.mean(track["found"]) >= 0.9
        side = boxes[:, 2] - boxes[:, 0]
        assert (side == boxes[:, 3] - boxes[:, 1]).all()  # square
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        # a centre crop of the shorter side would be 1080 px wide and centred at y = 960
        assert side.max() < 0.7 * width, (name, side.max())
        centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
        assert np.median(centre_y) < 0.45 * height, (name, np.median(centre_y))
