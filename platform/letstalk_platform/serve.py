"""Ray Serve application: the LetsTalk HTTP render API and the Renderer that batch jobs share.

Two deployments, wired by `build_app` (Ray Serve's builder pattern, typed `AppArgs`):

    Ingress   FastAPI on CPU: token check, upload limits, input validation, the web page, the job
              table (a database: jobstore.py) and the finished videos on disk; both outlive a
              restart of the replica. One replica by default; more share the table and its one
              count of the render slots.
    Renderer  loads the bundle once (a folder or models:/name@alias from the MLflow registry),
              renders clip by clip and streams progress back; one GPU per replica when
              `use_gpu`. Runtime defaults (steps, sampler, guidance) come from user_config.

    serve run cluster/serve/render-local.yaml          # or: python jobs/serve.py --model ...
    curl -H "Authorization: Bearer $LETSTALK_API_TOKEN" -F portrait=@face.png -F audio=@speech.wav \
         http://127.0.0.1:8000/v1/renders                   # -> 202 {"id": ...}

`jobs/render_batch.py` calls the same Renderer through a DeploymentHandle, so online and batch
renders share its replicas (and their autoscaling). `check_serve_config` checks a `serve run` config
(or a RayService's serveConfigV2) of this application: tests/platform/test_cluster_configs.py runs it
on every one under cluster/.
"""


import asyncio
import hmac
import importlib.util
import io
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import File, Form, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer
from fastapi_offline import FastAPIOffline
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from ray import serve
from ray.serve.config import AutoscalingConfig
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import (DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema, ServeApplicationSchema,
                              ServeDeploySchema)
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUpload
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from letstalk.accel import InferenceOptions, torch_thread_pool
from letstalk.diffusion import Sampler
from letstalk.inputs import InputSpec, LimitExceeded, PreparedInputs, prepare, prepare_portrait
from letstalk.paste import DEFAULT_MAX_SIDE
from letstalk.portrait import PortraitCrop

from .configs import ConfigError, check_known, error_line, parse_config, require
from .jobstore import ACTIVE, JobStore
from .storage import VideoStore
from .runtime import actor_alive, local_target, node_id, this_actor
from .render import (MAX_SIDE, MAX_SIDE_HELP, MIN_SIDE, PASTE_BACK_HELP, STREAM_HELP, Cancel, RenderCancelled,
                     RenderDefaults, RenderOptions, RenderWorker, check_renderer_device, one_line)

TOKEN_ENV = "LETSTALK_API_TOKEN"
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
CONTROL_CALLS = 2  # Renderer calls that are not renders (info, renders_running) it answers while rendering
CALLER_CHECK_S = 2.0  # how often a render checks that the Ingress that asked for it still exists
STREAM_POLL_S = 0.1  # how often a streamed render's growing mp4 is read for new bytes
STREAM_CHUNK = 1 << 20  # the most bytes in one "bytes" event
RESTART_REASON = "the server restarted while this job was queued or running; submit it again"
RENDERS_PATH = "/v1/renders"  # POST: a new render, admitted by `Admission` before its body is read
SLOT_KEY = "letstalk.slot"  # the ASGI scope key of the render slot Admission took for the request
FORM_ALLOWANCE = 64 * 1024  # a render request's body beyond its two files: form fields, part headers


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of a Serve config, or jobs/serve.py's flags)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="bundle folder or models:/<name>@<alias>")
    mlflow_uri: str | None = Field(None, description="registry for models:/ URIs (default: MLFLOW_TRACKING_URI)")
    token: SecretStr | None = Field(None, description=f"bearer token; default: ${TOKEN_ENV} in the replica's env")
    use_gpu: bool = Field(False, description="one GPU per Renderer replica")
    renderer_cpus: float = Field(1.0, ge=0, description="CPUs per Renderer replica")
    num_replicas: int = Field(1, ge=1, description="Renderer replicas (the minimum when autoscaling)")
    max_replicas: int | None = Field(None, ge=1, description="autoscale Renderer replicas up to this many")
    max_jobs_per_replica: int = Field(2, ge=1, description="renders one replica runs at once")
    max_queued_jobs: int = Field(0, ge=0, description="accepted jobs beyond the running ones before 503")
    max_upload_mb: float = Field(50.0, gt=0, description="largest upload per file (413 above it)")
    max_audio_seconds: float = Field(600.0, gt=0, description="longest audio (413 above it)")
    max_image_pixels: int = Field(40_000_000, gt=0, description="largest portrait (413 above it)")
    retry_after_s: int = Field(10, ge=1)
    job_ttl_s: float = Field(24 * 3600, gt=0, description="finished jobs (and videos) kept this long")
    work_dir: str | None = Field(None, description="the job table (jobs.db) and the finished videos: they outlive "
                                 "a restart (default: TMP/letstalk-serve)")
    jobs_db: str | None = Field(None, description="SQLAlchemy URL of the job table, SQLite or PostgreSQL (default: "
                                "sqlite:///WORK_DIR/jobs.db)")
    storage: str | None = Field(None, description="where finished videos go: a folder (default WORK_DIR/videos) or a "
                                "pyarrow filesystem URI, e.g. s3://bucket/prefix?region=eu-west-1 (credentials from "
                                "the environment), which Renderers on any node upload to")
    ingress_replicas: int = Field(1, ge=1, description="Ingress (HTTP) replicas sharing the job table and its one "
                                  "count of the render slots; WORK_DIR must be one folder for all of them")
    heartbeat_s: float = Field(5.0, gt=0, description="how often an Ingress replica records that its jobs live; a job "
                               "whose replica is gone (or silent 3 beats) is failed")
    defaults: RenderDefaults = RenderDefaults()
    inference: dict = Field(default_factory=lambda: InferenceOptions().to_dict(), description=(
        "speed switches (letstalk.accel.InferenceOptions): dtype fp32|bf16|fp16, sdpa_backend "
        "auto|flash|efficient|math, compile none|regional|full, overlap_decode, batch_clips, max_batch, "
        "batch_wait_ms"))

    @field_validator("inference")
    @classmethod
    def _check_inference(cls, value: dict) -> dict:
        return InferenceOptions.from_dict(value).to_dict()  # one source of truth for names and ranges

    @model_validator(mode="after")
    def _fp16_needs_a_gpu(self) -> "AppArgs":
        check_renderer_device(self.inference, self.use_gpu)
        return self


SPOOL_PREFIX = "letstalk-spool-"  # + the Ingress process's pid + "-" + tempfile's random suffix


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


# ---------------------------------------------------------------------------------- Renderer


@serve.deployment(name="Renderer", max_ongoing_requests=2 + CONTROL_CALLS, max_queued_requests=1000)
class Renderer:
    """Wraps RenderWorker: `render` (one call, for batch) and `render_stream` (progress events)."""

    def __init__(self, model: str, mlflow_uri: str | None = None, max_audio_seconds: float | None = None,
                 max_image_pixels: int = 40_000_000, threads: int = 2, inference: dict | None = None):
        from .tracking import resolve_bundle

        bundle = resolve_bundle(model, mlflow_uri)
        self.model = model
        # with inference["batch_clips"], the `threads` renders running at once share merged forward passes
        self.worker = RenderWorker(bundle, max_audio_seconds=max_audio_seconds, max_image_pixels=max_image_pixels,
                                   inference=inference)
        self.pool = torch_thread_pool(threads, "render")  # each render thread gets the replica's torch threads
        self.running = 0
        self.stores: dict[str, VideoStore] = {}  # upload targets (render_stream's `upload`), opened once

    def reconfigure(self, config: dict) -> None:
        """user_config: {steps, sampler, guidance} defaults, applied to requests that omit them."""
        self.worker.defaults = RenderDefaults.model_validate(config or {})

    def info(self) -> dict:
        return {"model": self.model, **self.worker.info()}

    def renders_running(self) -> int:
        """Renders in progress on this replica (both kinds of call)."""
        return self.running

    async def render(self, portrait: Any, audio: Any = None, options: dict | None = None, out: str | None = None,
                     out_node: str | None = None) -> dict:
        """One render (RenderWorker.render's arguments); the mp4 is written to `out` when the caller
        runs on this replica's node (`out_node`), else sent back. Bad input comes back as
        {"status": "failed", "error": ...}, never raised."""
        loop = asyncio.get_running_loop()
        cancel = Cancel()
        out = local_target(out, out_node)
        self.running += 1
        try:
            return await loop.run_in_executor(self.pool, lambda: self.worker.render(portrait, audio, options, out=out,
                                                                                     cancelled=cancel))
        except asyncio.CancelledError:
            cancel.set()
            raise
        except (ValueError, ValidationError) as e:
            return {"status": "failed", "error": one_line(e)}
        finally:
            self.running -= 1

    async def render_stream(self, inputs: PreparedInputs, options: dict | None = None, out: str | None = None,
                            out_node: str | None = None, caller: tuple[str, str] | None = None,
                            upload: tuple[str, str] | None = None):
        """Yields {"event": "progress", ...} while rendering, then one "done" or "failed" event.
        `caller` (runtime.this_actor() of the requester): when that actor dies (an Ingress crash), the
        render stops within CALLER_CHECK_S instead of holding this replica's slot for nobody.
        `upload` (a VideoStore URI, the job id): the mp4 goes straight there, from this node.
        With options' `stream`: also {"event": "bytes", "data": ...}, the bytes the growing mp4 gained
        since the last such event, all of them before "done" (they add up to the finished file)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = Cancel()
        stream = bool((options or {}).get("stream"))
        target = local_target(out, out_node)
        # a file this replica can read while it grows: a streamed render for a caller on another node
        # gets one too (the bytes then travel twice, as events and in "done", which stores them as today)
        scratch = tempfile.TemporaryDirectory(prefix="letstalk-upload-") if upload or (stream and not target) else None
        out = str(Path(scratch.name) / "video.mp4") if scratch else target
        growing = Growing(out) if stream else None
        last = [-1, 0.0]

        def progress(clips_done: int, clips_total: int, fraction: float) -> None:
            now = time.monotonic()
            if clips_done != last[0] or now - last[1] > 0.25:  # every clip, and at most 4/s between
                last[:] = [clips_done, now]
                event = {"event": "progress", "clips_done": clips_done, "clips_total": clips_total,
                         "fraction": round(fraction, 4)}
                loop.call_soon_threadsafe(events.put_nowait, event)

        self.running += 1
        job = loop.run_in_executor(self.pool, lambda: self.worker.render(inputs, None, options, out=out,
                                                                         progress=progress, cancelled=cancel))
        job.add_done_callback(lambda _: setattr(self, "running", self.running - 1))

        async def watch_caller() -> None:  # apart from the loop below: a yield to a dead reader may block
            while caller is not None and not job.done():
                await asyncio.sleep(CALLER_CHECK_S)
                if not await loop.run_in_executor(None, actor_alive, caller):
                    print(f"Renderer: the requester {caller[0]} is gone; stopping its render", flush=True)
                    cancel.set()  # the render ends at its next denoising step
                    return

        watcher = asyncio.ensure_future(watch_caller())
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                # a streamed render wakes every STREAM_POLL_S as well, to pass on what the file gained
                done, _ = await asyncio.wait({getter, job}, timeout=STREAM_POLL_S if growing else None,
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                else:
                    getter.cancel()
                if growing:
                    for chunk in await loop.run_in_executor(None, growing.read):
                        yield {"event": "bytes", "data": chunk}
                if getter not in done and job.done():
                    break
            try:
                out = job.result()
            except (ValueError, ValidationError) as e:
                yield {"event": "failed", "error": one_line(e)}
                return
            except RenderCancelled:
                yield {"event": "failed", "error": "stopped: the server that asked for this render is gone"}
                return
            if growing:  # the file is complete: its last bytes, before "done"
                for chunk in await loop.run_in_executor(None, growing.read):
                    yield {"event": "bytes", "data": chunk}
            if upload:
                await loop.run_in_executor(None, self._store(upload[0]).put_file, upload[1], out["video_path"])
                out = out | {"video_path": None}
            elif scratch:  # a streamed render for a caller on another node: the bytes as without stream
                out = out | {"video": await loop.run_in_executor(None, Path(out["video_path"]).read_bytes),
                             "video_path": None}
            yield out | {"event": "done"}
        except (asyncio.CancelledError, GeneratorExit):
            cancel.set()
            raise
        finally:
            watcher.cancel()
            if growing:
                growing.close()
            if scratch:
                scratch.cleanup()

    def _store(self, uri: str) -> VideoStore:
        if uri not in self.stores:
            self.stores[uri] = VideoStore(uri)
        return self.stores[uri]


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


# ---------------------------------------------------------------------------------- Ingress


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
                "rendered_with": self.rendered_with, "seconds": self.seconds, "video": f"/v1/renders/{self.id}/video" if self.status == "done" else None}


JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]


class ErrorBody(BaseModel):
    error: str = Field(description="one line saying what was wrong")


class Progress(BaseModel):
    clips_done: int
    clips_total: int
    fraction: float = Field(description="denoising steps done / all steps of the video, 0..1")
    eta_s: float | None = Field(description="seconds left at the rate so far (null before the first progress)")


class JobState(BaseModel):
    id: str
    status: JobStatus
    progress: Progress
    audio_seconds: float
    options: dict[str, Any] = Field(description="the options the request gave")
    error: str | None
    created: float = Field(description="Unix time")
    finished: float | None
    rendered_with: dict[str, Any] | None = Field(description="the options after the server's defaults filled the gaps")
    seconds: dict[str, float] = Field(description="time spent per stage (audio, denoise, decode, ...)")
    video: str | None = Field(description="the mp4's URL once done")


class Accepted(BaseModel):
    id: str
    status: JobStatus
    frames: int
    clips_total: int
    status_url: str


class JobList(BaseModel):
    jobs: list[JobState]
    total: int
    next: str | None = Field(description="the next page's URL, null on the last page")


class Deleted(BaseModel):
    id: str
    status: Literal["deleted"]


class Health(BaseModel):
    status: Literal["ok"]
    active_jobs: int = Field(description="render slots in use (unfinished jobs and requests being admitted), by "
                                         "all Ingress replicas together")
    capacity: int = Field(description="the service's render slots")


_ERRORS = {
    400: "unusable input: an unreadable or empty image/audio file, a file name with path parts",
    401: "missing or wrong bearer token",
    404: "no such render job (or it expired)",
    409: "the video is not ready: the job is queued, running, failed or cancelled",
    413: "over a limit: upload size, audio length or image pixels (GET /v1/model lists them)",
    422: f"a field out of range or missing (steps 1..1000, guidance 0..20, max_side {MIN_SIDE}..{MAX_SIDE}, sampler "
         "one of the enum)",
    503: "all render slots are busy; the Retry-After header says when to try again",
}


def errors(*codes: int) -> dict:
    """OpenAPI `responses` for the error codes a route can answer, all with the ErrorBody shape."""
    return {c: {"model": ErrorBody, "description": _ERRORS[c]} for c in codes}


def input_spec(args: AppArgs, info: dict) -> InputSpec:
    """What the Ingress checks uploads against: the served model's sizes (Renderer.info) and the app's limits."""
    return InputSpec(info["image_size"], info["sample_rate"], info["fps"], info["clip_frames"],
                     min(args.max_audio_seconds, info["max_audio_seconds"]), args.max_image_pixels)


# the security scheme OpenAPI declares (Swagger's Authorize button); Ingress._auth does the checking
BEARER = HTTPBearer(auto_error=False, description=f"the API token (${TOKEN_ENV} of the server)")
SECURED = [Security(BEARER)]


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# FastAPIOffline: /docs (Swagger UI) and /redoc with their scripts served by this app, not a CDN
api = FastAPIOffline(
    title="LetsTalk render API",
    version="1",
    description="Portrait image + speech audio -> talking video (mp4, H.264 + AAC), rendered clip by clip. "
                "Every /v1 route needs `Authorization: Bearer <token>` (the Authorize button).",
)


WEB = Path(__file__).parent / "web"  # the page at / : plain HTML, CSS and JavaScript, no build step
api.mount("/web", StaticFiles(directory=WEB), name="web")


class Admission:
    """ASGI middleware of POST /v1/renders: it answers from the headers, before a byte of the body is
    read. FastAPI reads a multipart body whole (into temporary files) before the route runs, so checks
    in the route come after the upload. 401 without the bearer token, 413 when Content-Length is over
    two files at the upload limit (a body without one is cut off with 413 there), 503 when all the
    service's render slots are in use. Otherwise it takes a slot (Ingress._admit), passes it to the
    route in the ASGI scope (SLOT_KEY), where the new job's row takes it over, and gives it back on
    every way out where no job took it: a 4xx, an error, the client gone."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if scope["type"] != "http" or scope["method"] != "POST" or path != RENDERS_PATH:
            await self.app(scope, receive, send)
            return
        ingress = serve.get_replica_context().servable_object  # this replica's Ingress
        try:
            slot = await ingress._admit(Request(scope))
        except ApiError as e:
            await JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)(scope, receive, send)
            return
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > ingress.max_body:  # only a body without Content-Length gets here
                raise StarletteHTTPException(413, ingress.body_limit_error)
            return message

        released = False

        async def answer(message: dict) -> None:
            nonlocal released
            if message["type"] == "http.response.start":  # given back before the client hears the answer
                released = True
                ingress._release(slot)
            await send(message)

        scope[SLOT_KEY] = slot
        try:
            await self.app(scope, limited, answer)
        finally:
            if not released:
                ingress._release(slot)


# added before _docs_stay_local, so it runs inside it: the 413 `limited` raises reaches the route as
# it is (raised through that BaseHTTPMiddleware's task group, it would come as an ExceptionGroup: a 400)
api.add_middleware(Admission)


@api.middleware("http")
async def _docs_stay_local(request: Request, call_next):
    """/docs and /redoc fetch nothing from other hosts: ReDoc's credit line would load its logo from
    cdn.redoc.ly on every visit (a lookup that leaks from an air-gapped server); images come from here."""
    response = await call_next(request)
    if request.url.path in ("/docs", "/redoc"):
        response.headers["Content-Security-Policy"] = "img-src 'self' data:"
    return response


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(x) for x in err['loc'] if x != 'body') or 'request'}: {err['msg']}"
             for err in exc.errors()]
    return JSONResponse({"error": "; ".join(parts)}, status_code=422)


@serve.deployment(name="Ingress", num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, renderer: DeploymentHandle, args: dict):
        self.args = AppArgs.model_validate(args)
        token = self.args.token.get_secret_value() if self.args.token else os.environ.get(TOKEN_ENV, "")
        if not token:
            raise RuntimeError(f"no API token: set {TOKEN_ENV} (or args.token); the API refuses to run open")
        self._token = token.encode()
        self.renderer = renderer
        root = Path(self.args.work_dir or os.path.join(tempfile.gettempdir(), "letstalk-serve"))
        self.videos = VideoStore(self.args.storage or root / "videos")
        self.store = JobStore(self.args.jobs_db or f"sqlite:///{(root / 'jobs.db').resolve()}")
        self.actor = this_actor()  # (name, namespace) in Ray: renders and the other replicas check that it lives
        self.owner = self.actor[0] if self.actor else f"local-{uuid.uuid4().hex}"  # this replica, in the table
        self.jobs: dict[str, RenderJob] = {}  # this replica's jobs (live progress); the table has them all
        self._slots: set[str] = set()  # slots taken by this replica's requests that are not jobs yet
        self._unsaved: set[str] = set()  # finished jobs whose last save failed: the heartbeat writes them
        replicas = self.args.max_replicas or self.args.num_replicas
        # the service's slots, counted in the job table for all Ingress replicas together (take_slot)
        self.capacity = replicas * self.args.max_jobs_per_replica + self.args.max_queued_jobs
        self._heart: asyncio.Task | None = None
        self._sweep_orphans()  # the jobs of a replica that died before this one started
        self.max_upload = int(self.args.max_upload_mb * 1024 * 1024)
        self.max_body = 2 * self.max_upload + FORM_ALLOWANCE  # a render request: two files and the form
        self.body_limit_error = (f"the request is over the upload limit: two files of at most "
                                 f"{self.args.max_upload_mb:g} MB each")
        self.node = node_id()  # a Renderer on this node writes the videos straight into self.videos
        self._model_info: dict | None = None
        # stream=true jobs' bytes as they arrive, for GET /stream: this replica's own (another replica
        # may be on another node), removed with the replica
        sweep_spools()  # those of replicas killed on this machine before they could remove theirs
        self._spool = tempfile.TemporaryDirectory(prefix=f"{SPOOL_PREFIX}{os.getpid()}-")

    def __del__(self) -> None:
        """Serve calls it when it stops the replica: the spool folder goes with it (a killed replica's
        stays behind until the next Ingress on this machine starts: sweep_spools)."""
        if hasattr(self, "_spool"):
            self._spool.cleanup()

    # ------------------------------------------------------------------ helpers

    def _auth(self, request: Request) -> None:
        self._ensure_heartbeat()  # every route passes here, on the event loop
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           {"WWW-Authenticate": "Bearer"})

    def _job(self, job_id: str) -> RenderJob:
        job = None
        if JOB_ID.fullmatch(job_id):
            job = self.jobs.get(job_id)
            if job is None and (state := self.store.get(job_id)) is not None:
                job = RenderJob.from_state(state)  # finished before this replica started
        if job is None:
            raise ApiError(404, f"no render job {job_id[:64]!r}")
        return job

    async def _admit(self, request: Request) -> str:
        """Admission's checks, from the headers alone (401, 413, 503), then one of the service's render
        slots for the request: its id."""
        self._auth(request)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, self.body_limit_error)
        slot = await run_in_threadpool(self.store.take_slot, self.owner, self.capacity)
        if slot is None:
            raise ApiError(503, f"all {self.capacity} render slots are busy; retry later",
                           {"Retry-After": str(self.args.retry_after_s)})
        self._slots.add(slot)
        return slot

    def _release(self, slot: str) -> None:
        """Give a request's slot back unless its job took it over (then there is nothing left to give)."""
        self._slots.discard(slot)  # no longer beaten: if the release fails, the sweep frees it in 3 beats
        try:
            self.store.release_slot(slot)
        except Exception as e:
            print(f"Ingress: a render slot was not given back ({one_line(e)}); the orphan sweep frees it",
                  flush=True)

    def _expire(self) -> None:
        """The TTL sweep: finished jobs older than job_ttl_s go, with their videos."""
        for job_id in self.store.finished_before(time.time() - self.args.job_ttl_s):
            self._forget(job_id)

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

    def _ensure_heartbeat(self) -> None:
        if self._heart is None or self._heart.done():
            self._heart = asyncio.get_running_loop().create_task(self._heartbeat())

    async def _heartbeat(self) -> None:
        """Every heartbeat_s: this replica's unfinished jobs' progress and heartbeat into the table, the
        cancels other replicas asked for, and the orphan sweep."""
        while True:
            try:
                unsaved = set(self._unsaved)
                states = [j.public() for j in self.jobs.values() if j.active or j.id in unsaved]
                for job_id in await run_in_threadpool(self.store.beat, self.owner, states, list(self._slots)):
                    job = self.jobs.get(job_id)
                    if job is not None and job.task is not None:
                        job.task.cancel()
                self._unsaved -= unsaved  # written now: their rows no longer hold a slot
                await run_in_threadpool(self._sweep_orphans)
            except Exception as e:  # a database hiccup: try again next beat
                print(f"Ingress: heartbeat failed: {one_line(e)}", flush=True)
            await asyncio.sleep(self.args.heartbeat_s)

    def _forget(self, job_id: str) -> None:
        (Path(self._spool.name) / f"{job_id}.mp4").unlink(missing_ok=True)
        self.videos.delete(job_id)
        self.store.delete(job_id)
        self.jobs.pop(job_id, None)

    async def _read(self, upload: UploadFile | None, field: str) -> bytes:
        if not isinstance(upload, StarletteUpload):
            raise ApiError(422, f"{field}: a file upload is required")
        name = upload.filename or ""
        if "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
            raise ApiError(400, f"{field}: the file name must be a plain name without path parts, got {name[:100]!r}")
        data = await upload.read(self.max_upload + 1)
        if len(data) > self.max_upload:
            raise ApiError(413, f"{field}: over the upload limit of {self.args.max_upload_mb:g} MB")
        if not data:
            raise ApiError(400, f"{field}: the file is empty")
        return data

    async def _info(self) -> dict:
        if self._model_info is None:
            self._model_info = await self.renderer.info.remote()
        return self._model_info

    def _prepare(self, info: dict, image_bytes: bytes, audio_bytes: bytes | None,
                 options: RenderOptions | None = None) -> PreparedInputs | PortraitCrop:
        """The uploads decoded, cropped and counted here, once: bad input is a 4xx before any
        renderer time is spent, and the renderer gets them ready to use (no audio: the crop only).
        Paste-back is decided here (`options`): the inputs carry the photo, at the video's size, only
        when the render pastes the face back into it (PreparedInputs.for_renderer)."""
        options = options or RenderOptions()
        try:
            if audio_bytes is None:
                return prepare_portrait(image_bytes, input_spec(self.args, info))
            inputs = prepare(image_bytes, audio_bytes, input_spec(self.args, info))
            return inputs.for_renderer(options.paste_back, options.max_side or DEFAULT_MAX_SIDE)
        except LimitExceeded as e:
            raise ApiError(413, one_line(e)) from None
        except ValueError as e:
            raise ApiError(400, one_line(e)) from None

    async def _run(self, job: RenderJob, inputs: PreparedInputs, options: dict) -> None:
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

    async def _events(self, job: RenderJob, keepalive_s: float = 15.0):
        """Server-Sent Events for one job: its state now, then every change, the last one final
        (done, failed, cancelled); a comment line every `keepalive_s` keeps proxies from closing it."""
        if job.id not in self.jobs:  # finished, or another replica's: follow the table
            async for event in self._table_events(job.public(), keepalive_s):
                yield event
            return
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

    async def _table_events(self, state: dict, keepalive_s: float):
        """_events for a job this replica does not run: its row, re-read every half heartbeat."""
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
            await asyncio.sleep(min(1.0, self.args.heartbeat_s / 2))
            state = await run_in_threadpool(self.store.get, state["id"])

    # ------------------------------------------------------------------ routes

    @api.get("/", include_in_schema=False, response_class=HTMLResponse)
    def page(self) -> HTMLResponse:
        """The web page (platform/letstalk_platform/web): token, portrait, speech, render, progress, video."""
        return HTMLResponse((WEB / "index.html").read_text(), headers={"Cache-Control": "no-cache"})

    @api.get("/ui", include_in_schema=False)
    def ui(self) -> RedirectResponse:
        return RedirectResponse("/")

    @api.get("/healthz", summary="Liveness (no token needed)", response_model=Health)
    async def healthz(self) -> dict:
        self._ensure_heartbeat()
        in_use = await run_in_threadpool(self.store.slots_in_use)
        return {"status": "ok", "active_jobs": in_use, "capacity": self.capacity}

    @api.get("/v1/model", summary="The model being served, its defaults and the request limits",
             dependencies=SECURED, responses=errors(401))
    async def model(self, request: Request) -> dict:
        self._auth(request)
        info = await self.renderer.info.remote()  # fresh: user_config may have changed the defaults
        return {**info, "limits": {"max_upload_mb": self.args.max_upload_mb,
                                   "max_audio_seconds": min(self.args.max_audio_seconds, info["max_audio_seconds"]),
                                   "max_image_pixels": self.args.max_image_pixels,
                                   "concurrent_jobs": self.capacity}}

    @api.post("/v1/renders", status_code=202, summary="Start a render: portrait image + speech audio",
              response_model=Accepted, dependencies=SECURED, responses=errors(400, 401, 413, 422, 503))
    async def create(self, request: Request,
                     portrait: UploadFile = File(..., description="portrait image (PNG, JPEG, WebP, ...); at most "
                                                 "the upload and pixel limits of GET /v1/model"),
                     audio: UploadFile = File(..., description="speech (WAV, MP3, M4A, OGG, ...); at most the "
                                              "upload and audio-seconds limits of GET /v1/model"),
                     steps: int | None = Form(None, description="denoising steps, 1..1000 (default: the server's)"),
                     sampler: Sampler | None = Form(None, description="ddim or dpm: 10-50 steps; ddpm: the "
                                                    "paper's sampler, ~250 steps (default: the server's)"),
                     guidance: float | None = Form(None, description="audio classifier-free guidance scale, 0..20 "
                                                   "(default: the server's)"),
                     seed: int = Form(0, description="0..2147483647: the same seed and inputs give the same video"),
                     paste_back: bool | None = Form(None, description=PASTE_BACK_HELP),
                     max_side: int | None = Form(None, description=MAX_SIDE_HELP),
                     stream: bool = Form(False, description=STREAM_HELP))\
            -> JSONResponse:
        self._auth(request)
        slot = request.scope[SLOT_KEY]  # taken by Admission before the body was read; it gives it back
        try:
            options = RenderOptions(steps=steps, sampler=sampler, guidance=guidance, seed=seed, paste_back=paste_back,
                                    max_side=max_side, stream=stream)
        except ValidationError as e:
            raise ApiError(422, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
        self._expire()
        image_bytes = await self._read(portrait, "portrait")
        audio_bytes = await self._read(audio, "audio")
        info = await self._info()
        t0 = time.perf_counter()
        inputs = await run_in_threadpool(self._prepare, info, image_bytes, audio_bytes, options)
        job = RenderJob(uuid.uuid4().hex, options.model_dump(exclude_none=True), inputs.num_clips,
                        inputs.duration_s)
        job.seconds = {"prepare": round(time.perf_counter() - t0, 4)}  # decode and crop, here in the Ingress
        if job.streamed:  # there from the start: /stream can be opened as soon as the id is known
            job.spool = Path(self._spool.name) / f"{job.id}.mp4"
            job.spool.touch()
        try:
            self.store.save(job.public(), self.owner, slot)  # the job's row holds the slot from here
        except BaseException:  # no job: Admission gives the slot back
            if job.spool is not None:
                job.spool.unlink(missing_ok=True)
            raise
        self.jobs[job.id] = job
        # paste-back decided here (_prepare): the photo travels only when the face goes back into it
        decided = job.options | {"paste_back": inputs.photo is not None}
        job.task = asyncio.create_task(self._run(job, inputs, decided))
        return JSONResponse({"id": job.id, "status": job.status, "frames": inputs.num_frames,
                             "clips_total": inputs.num_clips,
                             "status_url": f"/v1/renders/{job.id}"}, status_code=202,
                            headers={"Location": f"/v1/renders/{job.id}"})

    @api.post("/v1/crop", summary="The face crop a render would use for this portrait (PNG)",
              dependencies=SECURED, responses=errors(400, 401, 413, 422) | {200: {
                  "content": {"image/png": {}},
                  "description": "the crop at the model's image size; header X-Face-Found: true | false "
                                 "(false: no face detected, the centre square)"}})
    async def crop(self, request: Request,
                   portrait: UploadFile = File(..., description="portrait image (PNG, JPEG, WebP, ...)")) -> Response:
        self._auth(request)
        image_bytes = await self._read(portrait, "portrait")
        info = await self._info()
        crop = await run_in_threadpool(self._prepare, info, image_bytes, None)
        buf = io.BytesIO()
        Image.fromarray(crop.image).save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png",
                        headers={"X-Face-Found": str(crop.face_found).lower(), "Cache-Control": "no-store"})

    @api.get("/v1/renders", summary="The render jobs, newest first (paginated: limit, offset)",
             response_model=JobList, dependencies=SECURED, responses=errors(401, 422))
    async def list_jobs(self, request: Request, limit: int = Query(20, ge=1, le=100),
                  offset: int = Query(0, ge=0, le=2**31 - 1)) -> dict:
        self._auth(request)
        self._expire()
        states, total = self.store.page(limit, offset)
        live = [self.jobs[s["id"]].public() if s["id"] in self.jobs else s for s in states]  # fresher progress
        more = offset + limit < total
        return {"jobs": live, "total": total,
                "next": f"/v1/renders?limit={limit}&offset={offset + limit}" if more else None}

    @api.get("/v1/renders/{job_id}/events", summary="Live progress as Server-Sent Events (text/event-stream)",
             response_class=StreamingResponse, dependencies=SECURED, responses=errors(401, 404) | {200: {
                 "description": "one event per change: `event: <status>` and `data: <JobState as JSON>`; the "
                                "stream ends after done, failed or cancelled",
                 "content": {"text/event-stream": {}}}})
    async def events(self, job_id: str, request: Request) -> StreamingResponse:
        self._auth(request)
        return StreamingResponse(self._events(self._job(job_id)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @api.get("/v1/renders/{job_id}", summary="Status, progress (clips done / total, ETA) and any error",
             response_model=JobState, dependencies=SECURED, responses=errors(401, 404))
    async def status(self, job_id: str, request: Request) -> dict:
        self._auth(request)
        return self._job(job_id).public()

    @api.get("/v1/renders/{job_id}/video", summary="The finished mp4", response_class=FileResponse,
             dependencies=SECURED, responses=errors(401, 404, 409) | {200: {"content": {"video/mp4": {}},
                                                                          "description": "H.264 + AAC"}})
    async def video(self, job_id: str, request: Request):
        self._auth(request)
        job = self._job(job_id)
        if job.status != "done":
            raise ApiError(409, f"job {job.id} is {job.status}" + (f": {job.error}" if job.error else ""))
        return await self._video(job)

    @api.get("/v1/renders/{job_id}/stream", summary="The mp4 while it renders (a stream=true job), to play at once",
             response_class=StreamingResponse, dependencies=SECURED, responses=errors(401, 404) | {
                 409: {"model": ErrorBody, "description": "the job was not started with stream=true, it failed or "
                                                          "was cancelled, or another Ingress replica runs it"},
                 200: {"content": {"video/mp4": {}},
                       "description": "a fragmented mp4 (H.264 + AAC, one fragment per frame), chunked: the bytes "
                                      "so far, then the rest as it renders; it ends when the job is done, and then "
                                      "holds the whole video (the same bytes as /video); it ends early if the "
                                      "job fails or is cancelled. Once done, the finished video"}})
    async def stream(self, job_id: str, request: Request):
        self._auth(request)
        job = self._job(job_id)
        if not job.streamed:
            raise ApiError(409, f"job {job.id} was not started with stream=true: GET its /video when done")
        if job.status == "done":
            return await self._video(job)
        if not job.active:
            raise ApiError(409, f"job {job.id} is {job.status}" + (f": {job.error}" if job.error else ""))
        if job.spool is None:  # listed in the table, run by another replica: its spool is there
            raise ApiError(409, f"job {job.id} is rendered by another Ingress replica; GET its /video when done")
        # opened here, with no await since the checks: the spool is removed only after the job ends
        spool = open(job.spool, "rb", buffering=0)
        return StreamingResponse(self._spooled(job, spool), media_type="video/mp4",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def _spooled(self, job: RenderJob, spool):
        """The spool's bytes so far, then each addition, until the job ends; the job's state is read
        before the file, so a job seen ended has nothing left to add once the file reads empty."""
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

    async def _video(self, job: RenderJob):
        """A done job's mp4, from the folder or streamed from the object store."""
        path = self.videos.local_path(job.id)
        if path is not None:
            return FileResponse(path, media_type="video/mp4", filename=f"{job.id}.mp4")
        size = await run_in_threadpool(self.videos.size, job.id)
        if size is None:
            raise ApiError(404, f"the video of job {job.id} is gone from the storage")
        return StreamingResponse(iterate_in_threadpool(self.videos.chunks(job.id)), media_type="video/mp4",
                                 headers={"Content-Length": str(size),
                                          "Content-Disposition": f'attachment; filename="{job.id}.mp4"'})

    @api.delete("/v1/renders/{job_id}", summary="Cancel a queued or running render; delete a finished one",
                response_model=JobState | Deleted, dependencies=SECURED, responses=errors(401, 404))
    async def delete(self, job_id: str, request: Request) -> dict:
        self._auth(request)
        job = self._job(job_id)
        if job.active and job.task is not None:
            job.task.cancel()
            try:
                await job.task
            except asyncio.CancelledError:
                pass
            return job.public()
        if job.active:  # another replica runs it: ask through the table, its next heartbeat cancels it
            await run_in_threadpool(self.store.request_cancel, job.id)
            deadline = time.monotonic() + 3 * self.args.heartbeat_s
            state = job.public()
            while state["status"] in ACTIVE and time.monotonic() < deadline:
                await asyncio.sleep(min(0.5, self.args.heartbeat_s / 4))
                state = await run_in_threadpool(self.store.get, job.id) or state
            return state  # cancelled, or (a silent owner) still running: its row will say, and the sweep fails it
        self._forget(job.id)
        return {"id": job.id, "status": "deleted"}


# ---------------------------------------------------------------------------------- builder


def build_app(args: AppArgs) -> serve.Application:
    """The Serve application: Ingress -> Renderer, configured from typed args."""
    args = AppArgs.model_validate(args) if not isinstance(args, AppArgs) else args
    renderer_options: dict[str, Any] = {
        # room for CONTROL_CALLS beside the renders: a restarted Ingress's `info` must not wait for a
        # render to end; renders beyond max_jobs_per_replica wait for one of the replica's render threads
        "max_ongoing_requests": args.max_jobs_per_replica + CONTROL_CALLS,
        "user_config": args.defaults.model_dump(),
        "ray_actor_options": {"num_cpus": args.renderer_cpus, "num_gpus": 1 if args.use_gpu else 0},
    }
    if args.max_replicas and args.max_replicas > args.num_replicas:
        renderer_options["autoscaling_config"] = {"min_replicas": args.num_replicas,
                                                  "max_replicas": args.max_replicas,
                                                  "target_ongoing_requests": 1}
    else:
        renderer_options["num_replicas"] = args.num_replicas
    renderer = Renderer.options(**renderer_options).bind(
        args.model, args.mlflow_uri, args.max_audio_seconds, args.max_image_pixels, args.max_jobs_per_replica,
        args.inference)
    return Ingress.options(num_replicas=args.ingress_replicas).bind(renderer, args.model_dump(mode="json") | {"token": args.token.get_secret_value()
                                                                   if args.token else None})


# ---------------------------------------------------------------------------------- config check


def check_serve_config(cfg: Any, gpus_per_pod: dict[str, int] | None = None, where: str = "serve config") -> None:
    """A Serve config (`serve run` YAML, a RayService's serveConfigV2) through Ray Serve's schema models
    (they allow unknown keys, so those are checked here), and our application's builder args through
    AppArgs / RenderDefaults. `gpus_per_pod`: GPUs per pod of each worker group (None: no GPU needed).
    Raises ConfigError."""
    require(isinstance(cfg, dict), f"{where}: a Serve config must be a mapping")
    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as e:
        raise ConfigError(f"{where}: {error_line(e)}") from None
    check_known(cfg, set(ServeDeploySchema.model_fields), where)
    check_known(cfg.get("http_options") or {}, set(HTTPOptionsSchema.model_fields), f"{where} http_options")
    apps = cfg.get("applications") or []
    require(apps, f"{where}: no applications")
    gpu_replica_max = 0.0
    for app in apps:
        awhere = f"{where} app {app.get('name')}"
        check_known(app, set(ServeApplicationSchema.model_fields), awhere)
        module, _, attr = app["import_path"].partition(":")
        require(module and attr.isidentifier(), f"{awhere}: import_path must be 'module:builder'")
        # The module itself may not exist yet; its top-level package must.
        require(importlib.util.find_spec(module.split(".")[0]) is not None, f"{awhere}: no package for {module}")
        if app["import_path"] == "letstalk_platform.serve:build_app":
            parse_config(AppArgs, app.get("args") or {})
            names = {d.get("name") for d in app.get("deployments") or []}
            require(names <= {"Ingress", "Renderer"}, f"{awhere}: build_app makes Ingress and Renderer, not {names}")
            for dep in app.get("deployments") or []:
                if dep.get("name") == "Ingress":  # the job table lives in its one replica
                    require(dep.get("num_replicas", 1) == 1 and "autoscaling_config" not in dep,
                            f"{awhere}: Ingress must have exactly one replica")
                if dep.get("name") == "Renderer" and "user_config" in dep:
                    parse_config(RenderDefaults, dep["user_config"])
        for dep in app.get("deployments") or []:
            dwhere = f"{awhere} deployment {dep.get('name')}"
            check_known(dep, set(DeploymentSchema.model_fields), dwhere)
            if "autoscaling_config" in dep:
                check_known(dep["autoscaling_config"], set(AutoscalingConfig.model_fields), f"{dwhere} autoscaling")
                try:
                    AutoscalingConfig(**dep["autoscaling_config"])  # e.g. max_replicas >= min_replicas
                except (ValidationError, ValueError) as e:
                    raise ConfigError(f"{dwhere} autoscaling: {error_line(e)}") from None
            opts = dep.get("ray_actor_options") or {}
            check_known(opts, set(RayActorOptionsSchema.model_fields), f"{dwhere} ray_actor_options")
            gpu_replica_max = max(gpu_replica_max, float(opts.get("num_gpus", 0)))
    if gpus_per_pod is None:
        return
    require(gpu_replica_max > 0, f"{where}: no deployment asks for a GPU (num_gpus)")
    require(max(gpus_per_pod.values(), default=0) >= gpu_replica_max,
            f"{where}: no worker group has {gpu_replica_max} GPU(s) per pod for a replica")
