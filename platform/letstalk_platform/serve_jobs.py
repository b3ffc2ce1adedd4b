"""The render jobs of the HTTP API: each one's lifecycle, and an Ingress replica's side of the job table.

    RenderJob   one render request: queued -> running -> done | failed | cancelled, with its live progress
    RenderJobs  what an Ingress replica does with the job table (a database: jobstore.py) that all replicas
                share: it takes one of the service's render slots for a request before its body is read
                (the Admission middleware, serve_http.py, asks), hands it to the new job's row, runs the
                job's render on a Renderer, saves its row while it runs and when it ends, cancels, and
                removes finished jobs after job_ttl_s. The table and the finished videos (storage.py)
                outlive a restart of the replica.

Capacity is one count of the render slots for all Ingress replicas, kept in the table. A heartbeat writes
each replica's progress every heartbeat_s; a replica that is gone (its actor no longer exists, or silent 3
beats) has its unfinished jobs failed by the others (RESTART_REASON): their renders died with it.
"""


import asyncio
import os
import re
import tempfile
import time
import uuid
from pathlib import Path

from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from letstalk.inputs import PreparedInputs, PreparedSpeech

from .jobstore import ACTIVE, JobStore
from .render import RenderOptions, one_line
from .runtime import actor_alive, node_id, this_actor
from .serve_config import AppArgs
from .serve_stream import Spool, append, job_events, table_events
from .storage import VideoStore

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
RESTART_REASON = "the server restarted while this job was queued or running; submit it again"


class RenderJob:
    """One HTTP render request's lifecycle: queued -> running -> done | failed | cancelled."""

    def __init__(self, job_id: str, options: dict, clips_total: int, duration_s: float):
        self.id, self.options = job_id, options
        self.status = "queued"
        self.clips_done, self.clips_total, self.fraction = 0, clips_total, 0.0
        self.duration_s = duration_s
        self.error: str | None = None
        self.created = time.time()
        self.finished: float | None = None
        self.seconds: dict[str, float] = {}
        self.rendered_with: dict | None = None  # the options after the renderer's defaults filled the gaps
        self.task: asyncio.Task | None = None
        self.started: float | None = None  # the first progress event: the ETA's clock
        self.version = 0  # bumped on every change; event streams wait on `changed`
        self.changed = asyncio.Event()
        self.snapshot: dict | None = None  # read back from the table: its state as stored (ETA included)
        self.spool: Path | None = None  # a stream=true job's mp4 so far, while this replica runs it

    @classmethod
    def from_state(cls, state: dict) -> "RenderJob":
        """A job read back from the job table (`public()`'s dict)."""
        p = state["progress"]
        job = cls(state["id"], state["options"], p["clips_total"], state["audio_seconds"])
        job.status, job.error = state["status"], state["error"]
        job.clips_done, job.fraction = p["clips_done"], p["fraction"]
        job.created, job.finished = state["created"], state["finished"]
        job.rendered_with, job.seconds = state["rendered_with"], state["seconds"]
        job.snapshot = state
        return job

    def fail(self, reason: str) -> "RenderJob":
        self.status, self.error, self.finished = "failed", reason, time.time()
        self.snapshot = None
        return self

    def touch(self) -> None:
        """Record a change: wake every event stream waiting on this job."""
        self.version += 1
        self.wake()

    def wake(self) -> None:
        """Wake the streams waiting on this job without a change of state (the spool grew): the
        progress events see the same version and send nothing."""
        self.changed.set()
        self.changed = asyncio.Event()

    @property
    def streamed(self) -> bool:
        return bool(self.options.get("stream"))

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def eta_s(self) -> float | None:
        """Seconds left at the rate so far (None before the first clip's progress, 0 once finished)."""
        if not self.active:
            return 0.0
        if self.started is None or self.fraction <= 0:
            return None
        return round((time.time() - self.started) * (1 - self.fraction) / self.fraction, 1)

    def public(self) -> dict:
        if self.snapshot is not None:
            return self.snapshot
        return {"id": self.id, "status": self.status,
                "progress": {"clips_done": self.clips_done, "clips_total": self.clips_total,
                             "fraction": self.fraction, "eta_s": self.eta_s()},
                "audio_seconds": round(self.duration_s, 3), "options": self.options, "error": self.error,
                "created": self.created, "finished": self.finished,
                "rendered_with": self.rendered_with, "seconds": self.seconds,
                "video": f"/v1/renders/{self.id}/video" if self.status == "done" else None}


class RenderJobs:
    """An Ingress replica's render jobs over the job table that all replicas share (see the module doc).
    Its methods run on the replica's event loop; the table is read and written in the thread pool where
    a request waits on it."""

    def __init__(self, args: AppArgs, renderer: DeploymentHandle):
        self.args, self.renderer = args, renderer
        root = Path(args.work_dir or os.path.join(tempfile.gettempdir(), "letstalk-serve"))
        self.videos = VideoStore(args.storage or root / "videos")
        self.store = JobStore(args.jobs_db or f"sqlite:///{(root / 'jobs.db').resolve()}")
        self.actor = this_actor()  # (name, namespace) in Ray: renders and the other replicas check that it lives
        self.owner = self.actor[0] if self.actor else f"local-{uuid.uuid4().hex}"  # this replica, in the table
        self.own: dict[str, RenderJob] = {}  # this replica's jobs (live progress); the table has them all
        self._slots: set[str] = set()  # slots taken by this replica's requests that are not jobs yet
        self._unsaved: set[str] = set()  # finished jobs whose last save failed: the heartbeat writes them
        replicas = args.max_replicas or args.num_replicas
        # the service's slots, counted in the job table for all Ingress replicas together (take_slot)
        self.capacity = replicas * args.max_jobs_per_replica + args.max_queued_jobs
        self._heart: asyncio.Task | None = None
        self._sweep_orphans()  # the jobs of a replica that died before this one started
        self.node = node_id()  # a Renderer on this node writes the videos straight into self.videos
        self.spool = Spool()  # stream=true jobs' bytes as they arrive, for GET /stream; last: close() removes it

    def close(self) -> None:
        """The replica stops: its spool folder goes (a killed replica's stays behind until the next Ingress
        on this machine starts: serve_stream.sweep_spools)."""
        self.spool.cleanup()

    # ------------------------------------------------------------------ slots

    async def take_slot(self) -> str | None:
        """One of the service's render slots for a request that is not a job yet: its id; None when all
        are in use."""
        slot = await run_in_threadpool(self.store.take_slot, self.owner, self.capacity)
        if slot is not None:
            self._slots.add(slot)
        return slot

    def release(self, slot: str) -> None:
        """Give a request's slot back unless its job took it over (then there is nothing left to give)."""
        self._slots.discard(slot)  # no longer beaten: if the release fails, the sweep frees it in 3 beats
        try:
            self.store.release_slot(slot)
        except Exception as e:
            print(f"Ingress: a render slot was not given back ({one_line(e)}); the orphan sweep frees it",
                  flush=True)

    # ------------------------------------------------------------------ jobs

    def find(self, job_id: str) -> RenderJob | None:
        """This replica's job, or one read back from the table (another replica's, or finished before this
        replica started); None for an id that is no job (or expired)."""
        job = None
        if JOB_ID.fullmatch(job_id):
            job = self.own.get(job_id)
            if job is None and (state := self.store.get(job_id)) is not None:
                job = RenderJob.from_state(state)  # finished before this replica started
        return job

    def page(self, limit: int, offset: int) -> tuple[list[dict], int]:
        """The jobs' states, newest first, and how many there are: this replica's with their live progress."""
        states, total = self.store.page(limit, offset)
        return [self.own[s["id"]].public() if s["id"] in self.own else s for s in states], total  # fresher progress

    def start(self, inputs: PreparedInputs | PreparedSpeech, options: RenderOptions, prepare_s: float, slot: str) -> RenderJob:
        """A new job for an admitted request's prepared inputs: its row takes over the request's `slot`,
        and its render starts. `prepare_s`: the seconds the Ingress spent decoding and cropping them."""
        job = RenderJob(uuid.uuid4().hex, options.model_dump(exclude_none=True), inputs.num_clips,
                        inputs.duration_s)
        job.seconds = {"prepare": prepare_s}  # decode and crop, in the Ingress
        if job.streamed:  # there from the start: /stream can be opened as soon as the id is known
            job.spool = self.spool.path(job.id)
            job.spool.touch()
        try:
            self.store.save(job.public(), self.owner, slot)  # the job's row holds the slot from here
        except BaseException:  # no job: Admission gives the slot back
            if job.spool is not None:
                job.spool.unlink(missing_ok=True)
            raise
        self.own[job.id] = job
        # paste-back decided in the Ingress (_prepare): the photo travels only when the face goes back into it
        decided = job.options | {"paste_back": inputs.photo is not None}
        job.task = asyncio.create_task(self._run(job, inputs, decided))
        return job

    def events(self, job: RenderJob, keepalive_s: float = 15.0):
        """Server-Sent Events for one job: its state now, then every change, the last one final (done,
        failed, cancelled); a comment line every `keepalive_s` keeps proxies from closing it."""
        if job.id not in self.own:  # finished, or another replica's: follow the table
            return table_events(job.public(), self.store.get, min(1.0, self.args.heartbeat_s / 2), keepalive_s)
        return job_events(job, keepalive_s)

    async def cancel(self, job: RenderJob) -> dict:
        """Cancel a queued or running job; its state after. Another replica's job is cancelled through
        the table: this waits up to 3 heartbeats for its row to say so."""
        if job.task is not None:
            job.task.cancel()
            try:
                await job.task
            except asyncio.CancelledError:
                pass
            return job.public()
        # another replica runs it: ask through the table, its next heartbeat cancels it
        await run_in_threadpool(self.store.request_cancel, job.id)
        deadline = time.monotonic() + 3 * self.args.heartbeat_s
        state = job.public()
        while state["status"] in ACTIVE and time.monotonic() < deadline:
            await asyncio.sleep(min(0.5, self.args.heartbeat_s / 4))
            state = await run_in_threadpool(self.store.get, job.id) or state
        return state  # cancelled, or (a silent owner) still running: its row will say, and the sweep fails it

    def forget(self, job_id: str) -> None:
        """A finished job goes: its row, its video, its spool."""
        self.spool.path(job_id).unlink(missing_ok=True)
        self.videos.delete(job_id)
        self.store.delete(job_id)
        self.own.pop(job_id, None)

    def expire(self) -> None:
        """The TTL sweep: finished jobs older than job_ttl_s go, with their videos."""
        for job_id in self.store.finished_before(time.time() - self.args.job_ttl_s):
            self.forget(job_id)

    # ------------------------------------------------------------------ renders

    async def _run(self, job: RenderJob, inputs: PreparedInputs | PreparedSpeech, options: dict) -> None:
        """`options`: the job's, with what the Ingress decided (paste_back) filled in."""
        stream = None
        try:
            path = self.videos.local_path(job.id)  # None: an object store, the Renderer uploads to it
            upload = None if path else (self.videos.uri, job.id)
            stream = self.renderer.options(stream=True).render_stream.remote(
                inputs, options, str(path) if path else None, self.node, self.actor, upload)
            async for event in stream:
                kind = event["event"]
                if kind == "bytes":  # stream=true: the mp4 so far grew; /stream readers wake and send it
                    await run_in_threadpool(append, job.spool, event["data"])
                    job.wake()
                    continue
                if kind == "progress":
                    if job.status == "queued":
                        job.status, job.started = "running", time.time()
                        self.store.save(job.public(), self.owner)
                    job.clips_done, job.clips_total = event["clips_done"], event["clips_total"]
                    job.fraction = event["fraction"]
                elif kind == "failed":
                    job.status, job.error = "failed", event["error"]
                elif kind == "done":
                    if event["video"] is not None:  # a replica on another node: its bytes, stored here
                        await run_in_threadpool(self.videos.put_bytes, job.id, event["video"])
                    job.clips_done, job.fraction, job.seconds = job.clips_total, 1.0, job.seconds | event["seconds"]
                    job.rendered_with = event["options"]
                    job.status = "done"
                job.touch()
        except asyncio.CancelledError:
            job.status = "cancelled"
            if stream is not None:
                stream.cancel()  # reaches the replica: its render stops at the next denoising step
            raise
        except Exception as e:  # the renderer died, or similar: the job fails, the service lives
            job.status, job.error = "failed", f"render failed: {one_line(e)}"
        finally:
            if job.status in ("queued", "running"):
                job.status, job.error = "failed", job.error or "the render ended without a result"
            job.finished = time.time()
            self._save_end(job)
            job.touch()
            if job.spool is not None:  # its readers hold it open and read it to the end; new ones get the video
                job.spool.unlink(missing_ok=True)

    def _save_end(self, job: RenderJob) -> None:
        """A finished job's row, which gives its render slot back. A row already finished stays as it is
        (another replica failed the job as lost, and told its clients so): this replica takes the
        table's word. A failed write is retried by the heartbeat, or the row would hold the slot."""
        try:
            saved = self.store.save(job.public(), self.owner)
        except Exception as e:
            print(f"Ingress: job {job.id} ended but its row was not written ({one_line(e)}); the heartbeat "
                  f"retries", flush=True)
            self._unsaved.add(job.id)
            return
        if not saved and (state := self.store.get(job.id)) is not None:
            job.status, job.error, job.finished = state["status"], state["error"], state["finished"]
            job.snapshot = state

    # ------------------------------------------------------------------ heartbeat and restarts

    def ensure_heartbeat(self) -> None:
        """Start the heartbeat unless it runs (it needs the event loop: every route calls this)."""
        if self._heart is None or self._heart.done():
            self._heart = asyncio.get_running_loop().create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        """Every heartbeat_s: this replica's unfinished jobs' progress and heartbeat into the table, the
        cancels other replicas asked for, and the orphan sweep."""
        while True:
            try:
                unsaved = set(self._unsaved)
                states = [j.public() for j in self.own.values() if j.active or j.id in unsaved]
                for job_id in await run_in_threadpool(self.store.beat, self.owner, states, list(self._slots)):
                    job = self.own.get(job_id)
                    if job is not None and job.task is not None:
                        job.task.cancel()
                self._unsaved -= unsaved  # written now: their rows no longer hold a slot
                await run_in_threadpool(self._sweep_orphans)
            except Exception as e:  # a database hiccup: try again next beat
                print(f"Ingress: heartbeat failed: {one_line(e)}", flush=True)
            await asyncio.sleep(self.args.heartbeat_s)

    def _sweep_orphans(self) -> None:
        """Fail the unfinished jobs whose Ingress replica is gone: its actor no longer exists, or it has
        not beaten for 3 heartbeats. Their renders died with it (the Renderer stops a render whose
        caller is gone) and their uploads were never stored, so they are failed, not re-queued."""
        dead = [] if self.actor is None else [  # outside Ray only the heartbeat tells
            o for o in self.store.unfinished_owners()
            if o != self.owner and not o.startswith("local-") and not actor_alive((o, self.actor[1]))]
        lost = self.store.fail_orphans(3 * self.args.heartbeat_s,
                                       lambda state: RenderJob.from_state(state).fail(RESTART_REASON).public(),
                                       dead, alive=self.owner)
        if lost:
            print(f"Ingress: {len(lost)} unfinished job(s) of a lost replica marked failed: {RESTART_REASON}",
                  flush=True)
