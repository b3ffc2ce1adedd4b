"""The Renderer deployment: loads a render bundle once and renders, clip by clip, for the HTTP API and
for batch jobs.

    Renderer  loads the bundle once (a folder or models:/name@alias from the MLflow registry), renders clip
              by clip and streams progress back; one GPU per replica when `use_gpu`. Runtime defaults
              (steps, sampler, guidance) come from user_config (`reconfigure`).

The Ingress (serve_http.py) calls `render_stream`, one call per job; `jobs/render_batch.py` calls `render`
through a DeploymentHandle, so online and batch renders share its replicas (and their autoscaling). A
render whose caller is gone (an Ingress crash) stops within CALLER_CHECK_S instead of holding a slot.
"""


import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray import serve

from letstalk.accel import torch_thread_pool
from letstalk.inputs import PreparedInputs

from .render import Cancel, RenderCancelled, RenderDefaults, RenderWorker, one_line
from .runtime import actor_alive, local_target
from .serve_stream import STREAM_POLL_S, Growing
from .storage import VideoStore

CONTROL_CALLS = 2  # Renderer calls that are not renders (info, renders_running) it answers while rendering
CALLER_CHECK_S = 2.0  # how often a render checks that the Ingress that asked for it still exists


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
