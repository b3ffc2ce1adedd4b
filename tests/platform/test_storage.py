"""Where the render API keeps videos (letstalk_platform.storage.VideoStore): a folder, and S3 as
spoken by a real local S3 server (moto's, on 127.0.0.1; the s3_server fixture) through pyarrow."""

import pytest

from letstalk_platform.storage import VideoStore

JOB = "0123456789abcdef" * 2


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
