"""Where finished videos are kept: the render API's store (letstalk_platform.storage.VideoStore), a
folder, and S3 as spoken by a real local S3 server (moto's, on 127.0.0.1; the s3_server fixture)
through pyarrow; and the batch job's output folder. A process killed (SIGKILL) while it encodes into
either leaves nothing that `*.mp4` finds, and what it left is cleaned up."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from letstalk.media import load_video_frames
from letstalk.synthetic import draw_portrait, speech_like_audio
from letstalk_platform.storage import VideoStore

JOB = "0123456789abcdef" * 2
OTHER = "fedcba9876543210" * 2
ROOT = Path(__file__).resolve().parents[2]


def exercise(store: VideoStore, tmp_path) -> None:
    data = bytes(range(256)) * 5000  # 1.28 MB: more than one chunk
    assert store.size(JOB) is None
    store.put_bytes(JOB, data)
    assert store.size(JOB) == len(data) and b"".join(store.chunks(JOB)) == data
    src = tmp_path / "v.mp4"
    src.write_bytes(data[::-1])
    store.put_file(JOB, src)  # replaces
    assert b"".join(store.chunks(JOB)) == data[::-1]
    store.delete(JOB)
    store.delete(JOB)  # twice: no error
    assert store.size(JOB) is None
    for bad in ("../../etc/passwd", "A" * 32, JOB + ".mp4", ""):
        with pytest.raises(ValueError, match="not a job id"):
            store.put_bytes(bad, b"x")


def test_a_folder_store(tmp_path):
    store = VideoStore(tmp_path / "videos")
    assert store.local_path(JOB) == (tmp_path / "videos" / f"{JOB}.mp4").resolve()
    exercise(store, tmp_path)
    store.put_bytes(JOB, b"whole")
    assert [p.name for p in (tmp_path / "videos").iterdir()] == [f"{JOB}.mp4"]  # no .part left behind


def test_an_s3_store(s3_server, tmp_path):
    store = VideoStore(s3_server("renders/videos"))
    assert store.local_path(JOB) is None
    exercise(store, tmp_path)
    store.put_bytes(JOB, b"kept")
    again = VideoStore(s3_server("renders/videos"))  # another process's view: the same object
    assert b"".join(again.chunks(JOB)) == b"kept"
    assert VideoStore(s3_server("other")).size(JOB) is None  # prefixes keep stores apart


def test_a_bad_storage_uri_is_one_line_without_the_secret():
    with pytest.raises(ValueError) as e:
        VideoStore("nosuchscheme://key:hunter2@bucket/videos")
    assert "hunter2" not in str(e.value) and "\n" not in str(e.value) and "video storage" in str(e.value)


# encodes frames into argv[1] until it is killed (write_video, as a renderer would)
ENCODE = """
import itertools, sys, time
import numpy as np
from letstalk.media import write_video

def frames():
    for k in itertools.count():
        time.sleep(0.01)
        yield np.full((64, 64, 3), k % 256, np.uint8)

write_video(sys.argv[1], frames(), 25)
"""

# the batch job's loop (run_batch) with its renderer (RenderWorker) in one process, without Ray:
# argv = manifest, out, bundle
BATCH = """
import sys
from pathlib import Path
from letstalk_platform.batch import plan_items, read_manifest, run_batch
from letstalk_platform.render import RenderWorker

manifest, out, bundle = map(Path, sys.argv[1:4])
worker = RenderWorker(bundle)
run_batch(plan_items(read_manifest(manifest), manifest.parent), out,
          lambda item, target: worker.render(item.portrait, item.audio, item.options, out=target),
          concurrency=1, progress=False)
"""


def kill_while_encoding(script: str, args: list, folder: Path, name: str, timeout: float = 120) -> Path:
    """Run `script`; SIGKILL it (and its ffmpeg) once the hidden temporary of `name` in `folder` holds
    encoded bytes. Returns that temporary."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                parts = [p for p in folder.glob(f".{name}.*") if p.stat().st_size > 0] if folder.is_dir() else []
                if parts:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole session: the encoder dies too
                    proc.wait()
                    return parts[0]
                time.sleep(0.02)
            log.seek(0)
            raise AssertionError(f"no temporary of {name} with bytes in it (exit code {proc.poll()}): "
                                 f"{log.read().decode(errors='replace')[-1500:]}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_a_killed_encode_into_the_store_leaves_no_mp4_and_goes_with_its_job(tmp_path):
    """A Renderer on the store's machine encodes into the folder (store.local_path); killed mid-encode,
    it leaves a temporary that no `*.mp4` glob finds, and `delete` (the API's expiry sweep) removes it."""
    folder = tmp_path / "videos"
    store = VideoStore(folder)
    store.put_bytes(OTHER, b"whole")  # a finished job beside it
    part = kill_while_encoding(ENCODE, [store.local_path(JOB)], folder, f"{JOB}.mp4")
    assert part.is_file() and part.stat().st_size > 0  # truncated, never renamed
    assert [p.name for p in folder.rglob("*.mp4")] == [f"{OTHER}.mp4"]
    assert store.size(JOB) is None
    store.delete(JOB)
    assert [p.name for p in folder.iterdir()] == [f"{OTHER}.mp4"]  # the temporary went with its job
    assert store.size(OTHER) == 5


@pytest.mark.slow
def test_a_batch_killed_mid_encode_and_run_again_has_only_the_good_videos(bundle, tmp_path):
    """The batch process dies (SIGKILL) while it encodes its second video; the re-run renders that row
    again, the bad row fails again, and `*.mp4` finds exactly the good rows, whole; no temporaries."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(draw_portrait(64, seed=1)).save(inputs / "face.png")
    sf.write(inputs / "short.wav", speech_like_audio(0.4, seed=1), 16000)
    sf.write(inputs / "long.wav", speech_like_audio(4.0, seed=2), 16000)
    manifest = inputs / "rows.csv"
    manifest.write_text("id,portrait,audio,steps\n"
                        "short,face.png,short.wav,2\n"
                        "bad,face.png,missing.wav,2\n"
                        "long,face.png,long.wav,2\n")
    out = tmp_path / "out"
    kill_while_encoding(BATCH, [manifest, out, bundle], out, "long.mp4")
    assert (out / "short.mp4").is_file() and not (out / "long.mp4").exists()

    again = subprocess.run([sys.executable, "-c", BATCH, str(manifest), str(out), str(bundle)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(p.name for p in out.rglob("*.mp4")) == ["long.mp4", "short.mp4"]
    assert sorted(p.name for p in out.iterdir()) == ["long.mp4", "results.parquet", "short.mp4"]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert [(r["id"], r["status"], r["reused"]) for r in rows] == \
        [("short", "done", True), ("bad", "failed", False), ("long", "done", False)]
    assert len(load_video_frames(out / "long.mp4")) == 100  # whole: 4 s at 25 fps
