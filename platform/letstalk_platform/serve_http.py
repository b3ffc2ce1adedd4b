"""The HTTP surface of the render API: the Ingress deployment (FastAPI on CPU) and everything a client sees.

    routes      /v1/model, /v1/renders (create, list, status, events, video, stream, delete), /v1/crop,
                /healthz, and the web page at / (platform/letstalk_platform/web: no build step, no CDN)
    auth        a bearer token on every /v1 route (args.token, else $LETSTALK_API_TOKEN in the replica's
                env; the API refuses to run open), declared in OpenAPI as BEARER
    uploads     limits (size, audio seconds, image pixels) and input checks: the uploads are decoded,
                cropped and counted here, once, so bad input is a 4xx before any renderer time is spent
    Admission   ASGI middleware of POST /v1/renders: 401, 413 or 503 from the headers, before the body is
                read; otherwise it takes a render slot (serve_jobs.RenderJobs) for the request
    OpenAPI     typed responses (JobState, JobList, Accepted, ErrorBody, ...) and each route's error codes;
                every error is {"error": "<one line>"} (ApiError); /docs and /redoc load nothing from a CDN

    curl -H "Authorization: Bearer $LETSTALK_API_TOKEN" -F portrait=@face.png -F audio=@speech.wav \
         http://127.0.0.1:8000/v1/renders                   # -> 202 {"id": ...}
    curl ... -F audio=@speech.wav http://127.0.0.1:8000/v1/renders   # a re-voicing avatar: the speech alone

The routes stay thin: the job table and each job's render are serve_jobs.py's, the byte and event streams
serve_stream.py's. One Ingress replica by default; more share the table and its one count of the render
slots.
"""


import hmac
import io
import os
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import File, Form, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer
from fastapi_offline import FastAPIOffline
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUpload
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from letstalk.diffusion import Sampler
from letstalk.inputs import (InputSpec, LimitExceeded, PreparedInputs, PreparedSpeech, prepare, prepare_portrait,
                             prepare_speech)
from letstalk.paste import DEFAULT_MAX_SIDE
from letstalk.portrait import PortraitCrop

from .render import MAX_SIDE, MAX_SIDE_HELP, MIN_SIDE, PASTE_BACK_HELP, STREAM_HELP, RenderOptions, one_line
from .serve_config import TOKEN_ENV, AppArgs
from .serve_jobs import RenderJob, RenderJobs
from .serve_stream import spooled, video_response

RENDERS_PATH = "/v1/renders"  # POST: a new render, admitted by `Admission` before its body is read
SLOT_KEY = "letstalk.slot"  # the ASGI scope key of the render slot Admission took for the request
FORM_ALLOWANCE = 64 * 1024  # a render request's body beyond its two files: form fields, part headers


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
    route in the ASGI scope (SLOT_KEY), where the new job's row takes it over, and gives it back
    (RenderJobs.release) on every way out where no job took it: a 4xx, an error, the client gone."""

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
                ingress.jobs.release(slot)
            await send(message)

        scope[SLOT_KEY] = slot
        try:
            await self.app(scope, limited, answer)
        finally:
            if not released:
                ingress.jobs.release(slot)


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
    """The HTTP API (see the module doc): it checks and prepares each request; `jobs` (RenderJobs) runs it."""

    def __init__(self, renderer: DeploymentHandle, args: dict):
        self.args = AppArgs.model_validate(args)
        token = self.args.token.get_secret_value() if self.args.token else os.environ.get(TOKEN_ENV, "")
        if not token:
            raise RuntimeError(f"no API token: set {TOKEN_ENV} (or args.token); the API refuses to run open")
        self._token = token.encode()
        self.renderer = renderer
        self.jobs = RenderJobs(self.args, renderer)  # the job table, this replica's jobs and their renders
        self.max_upload = int(self.args.max_upload_mb * 1024 * 1024)
        self.max_body = 2 * self.max_upload + FORM_ALLOWANCE  # a render request: two files and the form
        self.body_limit_error = (f"the request is over the upload limit: two files of at most "
                                 f"{self.args.max_upload_mb:g} MB each")
        self._model_info: dict | None = None

    def __del__(self) -> None:
        """Serve calls it when it stops the replica: the spool folder goes with it (a killed replica's
        stays behind until the next Ingress on this machine starts: sweep_spools)."""
        if hasattr(self, "jobs"):
            self.jobs.close()

    # ------------------------------------------------------------------ helpers

    def _auth(self, request: Request) -> None:
        self.jobs.ensure_heartbeat()  # every route passes here, on the event loop
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           {"WWW-Authenticate": "Bearer"})

    def _job(self, job_id: str) -> RenderJob:
        job = self.jobs.find(job_id)
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
        slot = await self.jobs.take_slot()
        if slot is None:
            raise ApiError(503, f"all {self.jobs.capacity} render slots are busy; retry later",
                           {"Retry-After": str(self.args.retry_after_s)})
        return slot

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

    def _prepare(self, info: dict, image_bytes: bytes | None, audio_bytes: bytes | None,
                 options: RenderOptions | None = None) -> PreparedInputs | PreparedSpeech | PortraitCrop:
        """The uploads decoded, cropped and counted here, once: bad input is a 4xx before any
        renderer time is spent, and the renderer gets them ready to use (no audio: the crop only; no
        image: a re-voicing avatar's speech).
        Paste-back is decided here (`options`): the inputs carry the photo, at the video's size, only
        when the render pastes the face back into it (PreparedInputs.for_renderer)."""
        options = options or RenderOptions()
        try:
            if audio_bytes is None:
                return prepare_portrait(image_bytes, input_spec(self.args, info))
            if image_bytes is None:
                return prepare_speech(audio_bytes, input_spec(self.args, info))
            inputs = prepare(image_bytes, audio_bytes, input_spec(self.args, info))
            return inputs.for_renderer(options.paste_back, options.max_side or DEFAULT_MAX_SIDE)
        except LimitExceeded as e:
            raise ApiError(413, one_line(e)) from None
        except ValueError as e:
            raise ApiError(400, one_line(e)) from None

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
        self.jobs.ensure_heartbeat()
        in_use = await run_in_threadpool(self.jobs.store.slots_in_use)
        return {"status": "ok", "active_jobs": in_use, "capacity": self.jobs.capacity}

    @api.get("/v1/model", summary="The model being served, its defaults and the request limits",
             dependencies=SECURED, responses=errors(401))
    async def model(self, request: Request) -> dict:
        self._auth(request)
        info = await self.renderer.info.remote()  # fresh: user_config may have changed the defaults
        return {**info, "limits": {"max_upload_mb": self.args.max_upload_mb,
                                   "max_audio_seconds": min(self.args.max_audio_seconds, info["max_audio_seconds"]),
                                   "max_image_pixels": self.args.max_image_pixels,
                                   "concurrent_jobs": self.jobs.capacity}}

    @api.post("/v1/renders", status_code=202, summary="Start a render: portrait image + speech audio (a re-voicing "
              "avatar: the audio alone)",
              response_model=Accepted, dependencies=SECURED, responses=errors(400, 401, 413, 422, 503))
    async def create(self, request: Request,
                     portrait: UploadFile | None = File(None, description="portrait image (PNG, JPEG, WebP, ...); "
                                                        "at most the upload and pixel limits of GET /v1/model. None "
                                                        "when the model is a re-voicing avatar (GET /v1/model: mode "
                                                        "revoice): it speaks over its own footage"),
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
        self.jobs.expire()
        info = await self._info()
        if info.get("mode") == "revoice":  # a re-voicing avatar speaks over its own footage
            if isinstance(portrait, StarletteUpload):
                raise ApiError(400, "portrait: this server's model is a re-voicing avatar that speaks over its own "
                                    "footage (GET /v1/model: mode); send the audio alone")
            image_bytes = None
        else:
            image_bytes = await self._read(portrait, "portrait")
        audio_bytes = await self._read(audio, "audio")
        t0 = time.perf_counter()
        inputs = await run_in_threadpool(self._prepare, info, image_bytes, audio_bytes, options)
        # the job's row takes the slot over; prepare: decode and crop, here in the Ingress
        job = self.jobs.start(inputs, options, round(time.perf_counter() - t0, 4), slot)
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
        self.jobs.expire()
        live, total = self.jobs.page(limit, offset)  # this replica's jobs with their live progress
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
        return StreamingResponse(self.jobs.events(self._job(job_id)), media_type="text/event-stream",
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
        return StreamingResponse(spooled(job, spool), media_type="video/mp4",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def _video(self, job: RenderJob):
        """A done job's mp4, from the folder or streamed from the object store."""
        response = await video_response(self.jobs.videos, job.id)
        if response is None:
            raise ApiError(404, f"the video of job {job.id} is gone from the storage")
        return response

    @api.delete("/v1/renders/{job_id}", summary="Cancel a queued or running render; delete a finished one",
                response_model=JobState | Deleted, dependencies=SECURED, responses=errors(401, 404))
    async def delete(self, job_id: str, request: Request) -> dict:
        self._auth(request)
        job = self._job(job_id)
        if job.active:  # cancelled here, or (another replica's) through the table
            return await self.jobs.cancel(job)
        self.jobs.forget(job.id)
        return {"id": job.id, "status": "deleted"}
