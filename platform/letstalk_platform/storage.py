"""Where the render API keeps finished videos: a folder, or any filesystem pyarrow opens by URI.

    VideoStore("/srv/letstalk/videos")                       # a local folder (or a shared mount)
    VideoStore("s3://bucket/letstalk/videos?region=eu-west-1") # S3 (credentials from the environment or
                                                             # the instance role, as pyarrow finds them)
    VideoStore("gs://bucket/videos"), VideoStore("hdfs://namenode/videos"), ...

Keys are the API's own 32-hex-digit job ids, never a client's name. A local store writes to a
hidden `.part` name and renames when complete; an object store's PUT is atomic (the object appears
only whole), so a reader never sees half a video in either. A renderer on the store's machine
encodes straight into the folder, under letstalk.media.write_video's hidden `.JOB.mp4.XXXX.part`;
one killed mid-encode leaves that file behind (never a name ending in .mp4), and `delete`, which the
API's expiry sweep calls for every job, takes it away with the job.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow.fs as pafs

_JOB = re.compile(r"^[0-9a-f]{32}$")
CHUNK = 1 << 20


class VideoStore:
    def __init__(self, root: str | os.PathLike):
        root = str(root)
        if "://" in root and not root.startswith("file://"):
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(root)
            except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
                message = _redact(str(e).splitlines()[0] if str(e) else type(e).__name__)
                raise ValueError(f"video storage {_redact(root)!r}: {message}") from None
            self.local: Path | None = None
            self.fs.create_dir(self.root, recursive=True)  # a bucket prefix; creates the bucket only if allowed
        else:
            self.local = Path(root.removeprefix("file://")).resolve()
            self.local.mkdir(parents=True, exist_ok=True)
            self.fs, self.root = pafs.LocalFileSystem(), str(self.local)
        self.uri = root

    def _key(self, job_id: str) -> str:
        if not _JOB.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id[:64]!r}")
        return f"{self.root.rstrip('/')}/{job_id}.mp4"

    def local_path(self, job_id: str) -> Path | None:
        """The file's path when the store is a folder (renderers on this node write it in place)."""
        return None if self.local is None else self.local / f"{self._key(job_id).rsplit('/', 1)[1]}"

    def put_file(self, job_id: str, src: str | os.PathLike) -> None:
        """Copy a finished local file in (then the caller may delete it)."""
        with open(src, "rb") as f:
            self._put(job_id, iter(lambda: f.read(CHUNK), b""))

    def put_bytes(self, job_id: str, data: bytes) -> None:
        self._put(job_id, [data])

    def _put(self, job_id: str, chunks: Iterable[bytes]) -> None:
        """A folder: a hidden .part file renamed when whole; an object store: one PUT (atomic itself)."""
        key = self._key(job_id)
        part = f"{key.rsplit('/', 1)[0]}/.{key.rsplit('/', 1)[1]}.part" if self.local is not None else key
        with self.fs.open_output_stream(part) as out:
            for chunk in chunks:
                out.write(chunk)
        if part != key:
            self.fs.move(part, key)

    def size(self, job_id: str) -> int | None:
        info = self.fs.get_file_info(self._key(job_id))
        return info.size if info.type == pafs.FileType.File else None

    def chunks(self, job_id: str) -> Iterator[bytes]:
        with self.fs.open_input_stream(self._key(job_id)) as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def delete(self, job_id: str) -> None:
        """The job's video; in a folder also its temporaries (`.JOB.mp4.*part*`) that a killed writer left."""
        try:
            self.fs.delete_file(self._key(job_id))
        except FileNotFoundError:
            pass
        if self.local is not None:
            for part in self.local.glob(f".{job_id}.mp4.*part*"):  # job_id is checked by _key: hex digits only
                part.unlink(missing_ok=True)


def _redact(uri: str) -> str:
    """The URI without credentials (s3://KEY:SECRET@bucket -> s3://***@bucket), for messages and logs."""
    return re.sub(r"://[^/@]*@", "://***@", uri)
