"""The training data order (letstalk_platform.data) and the guards against silent hangs: no Ray needed."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from letstalk.artifacts import FeatureShapes, InputRecord, ShardManifest
from letstalk.clips import ClipSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """5 videos × 12 clips, each clip's latents holding (video number, clip number)."""
    from letstalk_platform.preprocess import write_shard

    root = tmp_path_factory.mktemp("order")
    inputs = []
    for v in range(5):
        rows = [{"video_id": f"v{v}", "identity": f"id{v}", "clip": k, "start": 2 * k,
                 "latents": np.full((2, 1, 2, 2), 100 * v + k, np.float16), "audio": np.zeros((6, 1, 4), np.float16),
                 "motion": np.zeros((1, 1, 2, 2), np.float16), "refs": np.zeros((1, 1, 2, 2), np.float16)}
                for k in range(12)]
        write_shard(rows, root / "train" / f"v{v}.parquet")
        inputs.append(InputRecord(f"/raw/v{v}.mp4", f"v{v}", f"id{v}", "train", "1:1", status="done", clips=12,
                                  shard=f"train/v{v}.parquet"))
    inputs.append(InputRecord("/raw/bad.mp4", "bad", "bad", "train", "1:1", status="failed", reason="no audio stream"))
    ShardManifest(ClipSpec(clip_frames=2, motion_frames=1, ref_frames=1, audio_window=5), FeatureShapes(1, 2, 1, 4),
                  bundle="/models/none", models={}, inputs=inputs).save(root)
    return root


def ids(batch):
    return [int(x) for x in batch["latents"][:, 0, 0, 0, 0]]


def test_clip_table_reads_any_clip_by_index(shard_dir):
    from letstalk_platform.data import ClipTable

    table = ClipTable(shard_dir, "train", ["video_id", "clip", "latents"])
    assert len(table) == 60 and table.locate(25) == (2, 1) and table.video_of(59) == "v4"
    got = table.read([59, 0, 25, 13, 25])
    assert ids(got) == [411, 0, 201, 101, 201]
    assert list(got["video_id"]) == ["v4", "v0", "v2", "v1", "v2"] and list(got["clip"]) == [11, 0, 1, 1, 1]
    with pytest.raises(IndexError):
        table.read([60])


def test_order_is_a_replayable_per_epoch_permutation():
    from letstalk_platform.data import epoch_batches, epoch_order

    a, b = epoch_order(60, seed=0, epoch=0), epoch_order(60, seed=0, epoch=1)
    assert sorted(a) == list(range(60)) and not np.array_equal(a, b)  # two epochs, two orders
    assert np.array_equal(a, epoch_order(60, seed=0, epoch=0))  # the same (seed, epoch): the same order
    assert not np.array_equal(a, epoch_order(60, seed=1, epoch=0))
    assert np.array_equal(epoch_order(60, 0, 0, shuffle=False), np.arange(60))
    # the ranks split each step's global batch; together they cover the epoch once (tail dropped)
    per_rank = [epoch_batches(60, 4, 0, 3, rank, 3) for rank in range(3)]
    assert all(p.shape == (5, 4) for p in per_rank)
    seen = np.concatenate([p.ravel() for p in per_rank])
    assert len(set(seen)) == 60 and set(seen) == set(range(60))
    with pytest.raises(ValueError, match="fewer than one step"):
        epoch_batches(7, 4, 0, 0, 0, 2)


def test_batches_mix_videos_and_resume_mid_epoch_reads_nothing_before(shard_dir, monkeypatch):
    from letstalk_platform.data import BatchLoader, ClipTable

    table = ClipTable(shard_dir, "train", ["latents"])
    loader = BatchLoader(table, batch_size=4, seed=7, rank=1, world=2)
    assert loader.batches_per_epoch == 7
    run = [(e, b, ids(x)) for (e, b, x), _ in zip(loader, range(10))]
    assert [(e, b) for e, b, _ in run] == [(0, k) for k in range(7)] + [(1, 0), (1, 1), (1, 2)]
    videos_per_batch = [len({c // 100 for c in clips}) for _, _, clips in run]
    assert np.mean(videos_per_batch) >= 2.5, videos_per_batch  # shard order would give 1 per batch
    assert run[0][2] != run[7][2]  # epoch 1 is not epoch 0 again

    calls: list[list[int]] = []
    original = ClipTable.read
    monkeypatch.setattr(ClipTable, "read", lambda self, idx: calls.append([int(i) for i in idx]) or original(self, idx))
    resumed = BatchLoader(table, batch_size=4, seed=7, rank=1, world=2, start=(0, 5))
    again = [(e, b, ids(x)) for (e, b, x), _ in zip(resumed, range(5))]
    assert again == run[5:10]  # exactly the batches the uninterrupted loader gave
    # the first read is batch (0, 5): the five consumed batches are neither read nor decoded
    assert [100 * (i // 12) + i % 12 for i in calls[0]] == run[5][2]


def test_shard_order_without_shuffle(shard_dir):
    from letstalk_platform.data import BatchLoader, ClipTable

    loader = BatchLoader(ClipTable(shard_dir, "train", ["latents"]), batch_size=3, seed=0, rank=0, world=1,
                         shuffle=False)
    (_, _, first), = [x for x, _ in zip(loader, range(1))]
    assert ids(first) == [0, 1, 2]


def test_every_config_shuffles_by_default():
    from letstalk_platform.runtime import load_config
    from letstalk_platform.train import TrainConfig

    assert TrainConfig(data={"path": "d"}).data.shuffle is True
    for path in sorted((ROOT / "cluster" / "train").glob("*.yaml")):
        assert load_config(TrainConfig, path, {}).data.shuffle is True, path


def test_stale_extension_lock_is_one_line_error_within_seconds(tmp_path):
    """A lock left by a killed build: jobs/train.py stops at once with the path to remove."""
    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    env = os.environ | {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    t0 = time.monotonic()
    job = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--data", str(tmp_path), "--preset", "tiny"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert job.returncode == 2 and time.monotonic() - t0 < 60
    error = job.stderr.strip().splitlines()[-1]
    assert error.startswith("train: error: stale torch extension build lock") and f"rm {lock}" in error


def test_a_lock_with_a_live_builder_is_not_stale(tmp_path):
    from letstalk_platform.runtime import StaleLockError, check_extension_locks

    build = tmp_path / "op"
    build.mkdir()
    (build / "lock").touch()
    builder = subprocess.Popen(["sleep", "30"], cwd=build)  # ninja and the compiler work in the build folder
    try:
        check_extension_locks(tmp_path, wait_s=0.5)
    finally:
        builder.kill()
        builder.wait()
    with pytest.raises(StaleLockError, match=str(build / "lock")):
        check_extension_locks(tmp_path, wait_s=0.5)
    (build / "lock").unlink()
    check_extension_locks(tmp_path, wait_s=0.5)  # no lock, nothing to say


def test_watchdog_says_when_no_step_finishes(capsys):
    from letstalk_platform.train import Watchdog

    dog = Watchdog(limit_s=0.4, rank=1)
    dog.beat(12, "waiting for data")
    time.sleep(1.0)
    dog.beat(13, "in a step")
    time.sleep(0.15)
    dog.close()
    out = capsys.readouterr().out
    assert out.count("train: rank 1: no step finished") == 1 and "after step 12 (waiting for data" in out
