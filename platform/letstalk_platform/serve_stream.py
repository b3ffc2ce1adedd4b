"""Streaming for the render API: a video while it renders, a job's progress as it changes, a finished mp4.

    Growing        the Renderer's side of stream=true: the bytes a render's fragmented mp4 gained since the
                   last read (ffmpeg only appends to it), sent back as "bytes" events every STREAM_POLL_S
    Spool          the Ingress's side: one folder per Ingress process (SPOOL_PREFIX + its pid) that holds each
                   stream=true job's mp4 so far, for GET /v1/renders/{id}/stream. Another replica may run on
                   another node, so each replica serves its own jobs' spools; a killed replica's folder is
                   removed by the next Ingress that starts on the machine (sweep_spools)
    spooled        a spool file's bytes so far, then each addition, until the job ends
    job_events     Server-Sent Events of a job this replica runs: its state now, then every change
    table_events   the same for a job it does not run (finished, or another replica's): its row, re-read
    video_response a done job's mp4, from the folder or streamed from the object store

The `job` these take is a serve_jobs.RenderJob (that module imports this one): its `version`, `changed`,
`active` and `public()`.
"""


import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from .jobstore import ACTIVE
from .storage import VideoStore

STREAM_POLL_S = 0.1  # how often a streamed render's growing mp4 is read for new bytes
STREAM_CHUNK = 1 << 20  # the most bytes in one "bytes" event
SPOOL_PREFIX = "letstalk-spool-"  # + the Ingress process's pid + "-" + tempfile's random suffix


# ---------------------------------------------------------------------------------- growing mp4


class Growing:
    """The bytes a file gained since the last `read`: a streamed render's fragmented mp4, which ffmpeg
    only appends to (its header comes with the first fragment: delay_moov), so what was read stays valid."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.file = Path(path), None

    def read(self) -> list[bytes]:
        if self.file is None:
            try:  # ffmpeg creates it with the first frame; kept open, it can be read to its end if removed
                self.file = open(self.path, "rb", buffering=0)
            except FileNotFoundError:
                return []
        chunks = []
        while chunk := self.file.read(STREAM_CHUNK):  # unbuffered: each read asks the file for what is new
            chunks.append(chunk)
        return chunks

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ---------------------------------------------------------------------------------- spools


def sweep_spools(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the stream spool folders under `root` (this machine's temporary folder) whose Ingress
    process is gone: a killed replica never runs its cleanup. Returns the folders removed."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{SPOOL_PREFIX}*-*"):
        pid = folder.name[len(SPOOL_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: a check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class Spool:
    """stream=true jobs' bytes as they arrive, for GET /stream: this replica's own (another replica may be
    on another node), in a folder removed with the replica (`cleanup`)."""

    def __init__(self):
        sweep_spools()  # those of replicas killed on this machine before they could remove theirs
        self.folder = tempfile.TemporaryDirectory(prefix=f"{SPOOL_PREFIX}{os.getpid()}-")

    def path(self, job_id: str) -> Path:
        return Path(self.folder.name) / f"{job_id}.mp4"

    def cleanup(self) -> None:
        self.folder.cleanup()


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


async def spooled(job, spool):
    """The spool's bytes so far, then each addition, until the job ends; the job's state is read
    before the file, so a job seen ended has nothing left to add once the file reads empty.
    `spool`: the job's spool file, opened unbuffered; closed here."""
    try:
        while True:
            active, waiter = job.active, job.changed
            chunk = await run_in_threadpool(spool.read, STREAM_CHUNK)
            if chunk:
                yield chunk
            elif not active:
                return
            else:
                await waiter.wait()
    finally:
        spool.close()


# ---------------------------------------------------------------------------------- events


async def job_events(job, keepalive_s: float):
    """Server-Sent Events for a job this replica runs: its state now, then every change, the last one
    final (done, failed, cancelled); a comment line every `keepalive_s` keeps proxies from closing it."""
    seen = -1
    while True:
        # taken before the yield below: a change while the reader holds an event sets this one
        waiter = job.changed
        if job.version != seen:
            seen, state = job.version, job.public()
            yield f"event: {state['status']}\ndata: {json.dumps(state)}\n\n"
            if state["status"] not in ACTIVE:  # the state sent decides: the last one sent is final
                return
        try:
            await asyncio.wait_for(waiter.wait(), keepalive_s)
        except asyncio.TimeoutError:
            yield ": keep-alive\n\n"


async def table_events(state: dict, read: Callable[[str], dict | None], poll_s: float, keepalive_s: float):
    """job_events for a job this replica does not run: its row (`read`: JobStore.get), re-read every
    `poll_s` (half a heartbeat, at most a second)."""
    last, quiet = None, time.monotonic()
    while state is not None:
        if state != last:
            last, quiet = state, time.monotonic()
            yield f"event: {state['status']}\ndata: {json.dumps(state)}\n\n"
            if state["status"] not in ACTIVE:
                return
        elif time.monotonic() - quiet > keepalive_s:
            quiet = time.monotonic()
            yield ": keep-alive\n\n"
        await asyncio.sleep(poll_s)
        state = await run_in_threadpool(read, state["id"])


# ---------------------------------------------------------------------------------- finished video


async def video_response(videos: VideoStore, job_id: str) -> Response | None:
    """A done job's mp4, from the folder or streamed from the object store; None when the storage
    no longer has it."""
    path = videos.local_path(job_id)
    if path is not None:
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")
    size = await run_in_threadpool(videos.size, job_id)
    if size is None:
        return None
    return StreamingResponse(iterate_in_threadpool(videos.chunks(job_id)), media_type="video/mp4",
                             headers={"Content-Length": str(size),
                                      "Content-Disposition": f'attachment; filename="{job_id}.mp4"'})
