"""The Ray Serve render API and the batch job, on a real local Ray Serve with real HTTP clients."""

import io
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import schemathesis
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from PIL import Image

from letstalk.media import MediaError, load_video_frames, probe
from letstalk.synthetic import draw_portrait, speech_like_audio

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-1234"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEFAULT_STEPS = 5  # the app's user_config default, distinct from RenderDefaults' 25


def png_bytes(seed: int = 1, size: int = 96) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(draw_portrait(size, seed=seed)).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(seconds: float, seed: int = 1, silent: bool = False) -> bytes:
    buf = io.BytesIO()
    wave = np.zeros(int(seconds * 16000), np.float32) if silent else speech_like_audio(seconds, seed=seed)
    sf.write(buf, wave, 16000, format="WAV")
    return buf.getvalue()


def load_job(name: str):
    """A jobs/*.py script as a module, to call its main() in this process (and this Ray)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_args(bundle, tmp_path_factory):
    """The app as `jobs/serve.py` deploys it: one renderer replica running one job at a time."""
    from letstalk_platform.serve import AppArgs

    return AppArgs(model=str(bundle), token=TOKEN, renderer_cpus=0, max_jobs_per_replica=1, max_upload_mb=1,
                   max_audio_seconds=20, retry_after_s=7, work_dir=str(tmp_path_factory.mktemp("serve")),
                   defaults={"steps": DEFAULT_STEPS, "sampler": "ddim"},
                   # the decode overlap and the batcher on the HTTP path (progress, cancel); with one job at
                   # a time the batcher never waits (docs/serving.md)
                   inference={"overlap_decode": True, "batch_clips": True})


@pytest.fixture(scope="module")
def server(ray_local, app_args):
    from ray import serve

    from letstalk_platform.serve import build_app

    port = free_port()
    serve.shutdown()  # an earlier test's Serve would keep its own HTTP options
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="letstalk", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def post(url, portrait=None, audio=None, names=("face.png", "speech.wav"), headers=AUTH, **options):
    files = {}
    if portrait is not None:
        files["portrait"] = (names[0], portrait)
    if audio is not None:
        files["audio"] = (names[1], audio)
    return requests.post(f"{url}/v1/renders", headers=headers, files=files,
                         data={k: str(v) for k, v in options.items()}, timeout=60)


def wait_done(url, job_id, timeout=120, poll=0.05):
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = requests.get(f"{url}/v1/renders/{job_id}", headers=AUTH, timeout=10).json()
        seen.append(st)
        if st["status"] not in ("queued", "running"):
            return st, seen
        time.sleep(poll)
    raise AssertionError(f"job {job_id} still {seen[-1]['status']} after {timeout} s")


def test_health_auth_and_openapi(server):
    assert requests.get(f"{server}/healthz", timeout=10).json()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = requests.get(f"{server}/v1/model", headers=headers, timeout=10)
        assert r.status_code == 401 and "token" in r.json()["error"]
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert post(server, png_bytes(), wav_bytes(0.5), headers={}).status_code == 401
    model = requests.get(f"{server}/v1/model", headers=AUTH, timeout=30).json()
    assert model["image_size"] == 64 and model["clip_frames"] == 8
    assert model["defaults"]["steps"] == DEFAULT_STEPS
    assert model["limits"]["max_audio_seconds"] == 20
    assert model["inference"]["overlap_decode"] and model["inference"]["batch_clips"]
    spec = requests.get(f"{server}/openapi.json", timeout=10).json()
    paths = spec["paths"]
    assert {"/v1/renders", "/v1/renders/{job_id}", "/v1/renders/{job_id}/video", "/v1/renders/{job_id}/events",
            "/v1/renders/{job_id}/stream", "/v1/model", "/healthz"} <= set(paths)
    # the Authorize button: a bearer scheme, required by every /v1 operation
    schemes = spec["components"]["securitySchemes"]
    assert [s["scheme"] for s in schemes.values()] == ["bearer"]
    for path, ops in paths.items():
        for op in ops.values():
            assert ("security" in op) == path.startswith("/v1/"), path
            if path.startswith("/v1/"):
                assert op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert {"400", "401", "413", "422", "503"} <= set(paths["/v1/renders"]["post"]["responses"])
    assert "409" in paths["/v1/renders/{job_id}/video"]["get"]["responses"]
    streamed = paths["/v1/renders/{job_id}/stream"]["get"]["responses"]
    assert {"200", "401", "404", "409"} <= set(streamed) and "video/mp4" in streamed["200"]["content"]
    ok = paths["/v1/renders/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/JobState")
    form = spec["components"]["schemas"][paths["/v1/renders"]["post"]["requestBody"]["content"]
                                         ["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert {"enum": ["ddpm", "ddim", "dpm"], "type": "string"} in form["properties"]["sampler"]["anyOf"]
    assert {"type": "boolean"} in form["properties"]["paste_back"]["anyOf"]
    assert {"type": "integer"} in form["properties"]["max_side"]["anyOf"]
    assert "auto" in form["properties"]["paste_back"]["description"]
    assert "16..4096" in form["properties"]["max_side"]["description"]
    assert form["properties"]["stream"]["type"] == "boolean" and form["properties"]["stream"]["default"] is False
    # /docs and /redoc load their scripts from this server, not a CDN

    for page in ("docs", "redoc"):
        html = requests.get(f"{server}/{page}", timeout=10).text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets and not [a for a in assets if "//" in a], assets
        scripts = [a for a in assets if a.endswith(".js")]
        assert scripts
        for asset in assets:
            r = requests.get(f"{server}{asset}", timeout=10)
            assert r.status_code == 200 and len(r.content) > (100_000 if asset.endswith(".js") else 1000), asset
    assert "'/openapi.json'" in requests.get(f"{server}/docs", timeout=10).text


def download(url, job_id, path) -> Path:
    video = requests.get(f"{url}/v1/renders/{job_id}/video", headers=AUTH, timeout=30)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path.write_bytes(video.content)
    return path


def test_render_through_the_api(server, tmp_path):
    """A 1.5 s clip: 38 frames in 5 clips of 8; progress rises clip by clip; the mp4 matches the audio.
    Paste-back: by default the video has the portrait's size (96 px, larger than the model's 64 px
    crop); paste_back=false gives the crop; max_side caps the longer side, keeping the aspect."""
    r = post(server, png_bytes(), wav_bytes(1.5), steps=120, sampler="ddpm", seed=3)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["frames"] == 38 and body["clips_total"] == 5
    final, seen = wait_done(server, body["id"])
    assert final["status"] == "done", final
    assert final["progress"] == {"clips_done": 5, "clips_total": 5, "fraction": 1.0, "eta_s": 0.0}
    fractions = [s["progress"]["fraction"] for s in seen]
    assert fractions == sorted(fractions)
    running_clips = {s["progress"]["clips_done"] for s in seen if s["status"] == "running"}
    assert len(running_clips) >= 3, f"progress did not move clip by clip: {running_clips}"
    assert final["rendered_with"] == {"steps": 120, "sampler": "ddpm", "guidance": 1.0, "seed": 3, "paste_back": True,
                                      "max_side": 1920, "stream": False, "dtype": "fp32"}
    path = download(server, body["id"], tmp_path / "out.mp4")
    info = probe(path)
    assert info.has_audio and abs(info.duration - 1.5) < 0.1
    frames = load_video_frames(path)
    assert frames.shape == (38, 96, 96, 3)  # the portrait's size: the face pasted back into it
    # defaults from user_config apply to requests that leave options out; paste_back=false: the crop alone
    r = post(server, png_bytes(), wav_bytes(0.4), paste_back="false")
    final, _ = wait_done(server, r.json()["id"])
    assert final["rendered_with"]["steps"] == DEFAULT_STEPS and final["rendered_with"]["sampler"] == "ddim"
    assert final["options"] == {"seed": 0, "paste_back": False, "stream": False}
    assert final["rendered_with"]["paste_back"] is False
    crop = probe(download(server, r.json()["id"], tmp_path / "crop.mp4"))
    assert (crop.width, crop.height) == (64, 64)
    assert requests.delete(f"{server}/v1/renders/{r.json()['id']}", headers=AUTH, timeout=10).json()["status"] == "deleted"
    assert requests.get(f"{server}/v1/renders/{r.json()['id']}", headers=AUTH, timeout=10).status_code == 404
    # a 256 x 192 portrait with max_side 128: 128 x 96 (auto: pasted back, scaled down with its aspect)
    wide = io.BytesIO()
    Image.fromarray(draw_portrait(256, seed=5)[32:224]).save(wide, format="PNG")
    r = post(server, wide.getvalue(), wav_bytes(0.4), max_side=128)
    final, _ = wait_done(server, r.json()["id"])
    assert final["status"] == "done" and final["rendered_with"]["max_side"] == 128, final
    assert load_video_frames(download(server, r.json()["id"], tmp_path / "capped.mp4")).shape == (10, 96, 128, 3)


def test_cancel_frees_the_renderer_and_full_means_503(server):
    long = post(server, png_bytes(), wav_bytes(12.0), steps=250, sampler="ddpm")  # ~1 min of rendering here
    assert long.status_code == 202
    job = long.json()["id"]
    deadline = time.monotonic() + 60
    while requests.get(f"{server}/v1/renders/{job}", headers=AUTH, timeout=10).json()["progress"]["fraction"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    busy = post(server, png_bytes(), wav_bytes(0.4))
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "7", busy.text
    assert "busy" in busy.json()["error"]
    assert requests.get(f"{server}/v1/renders/{job}/video", headers=AUTH, timeout=10).status_code == 409
    cancelled = requests.delete(f"{server}/v1/renders/{job}", headers=AUTH, timeout=30).json()
    assert cancelled["status"] == "cancelled"
    # the renderer thread stopped: a short render now finishes long before the long one would have
    t0 = time.monotonic()
    r = post(server, png_bytes(), wav_bytes(0.4))
    assert r.status_code == 202, r.text
    final, _ = wait_done(server, r.json()["id"], timeout=40)
    assert final["status"] == "done" and time.monotonic() - t0 < 30
    assert requests.get(f"{server}/v1/renders/{job}/video", headers=AUTH, timeout=10).status_code == 409


def decodable_frames(data: bytes, path: Path) -> int:
    """How many frames the bytes so far of a (growing) mp4 decode to; 0 before the first."""
    path.write_bytes(data)
    try:
        return len(load_video_frames(path))
    except MediaError:
        return 0


def spooled(job_id: str) -> list[Path]:
    """The Ingress's spool file of a job (its replica runs on this machine, in its temp folder)."""
    import tempfile

    return list(Path(tempfile.gettempdir()).glob(f"letstalk-spool-*/{job_id}.mp4"))


def test_sweep_spools_removes_only_the_folders_of_dead_processes(tmp_path):
    """An Ingress killed mid-stream leaves its spool folder (named by its pid) in the temporary
    folder; the next Ingress on the machine removes it, and leaves a live replica's and others' alone."""
    from letstalk_platform.serve_stream import SPOOL_PREFIX, sweep_spools

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f"{SPOOL_PREFIX}{gone.pid}-abc123"
    live = tmp_path / f"{SPOOL_PREFIX}{os.getpid()}-def456"
    other = [tmp_path / f"{SPOOL_PREFIX}x1y2z3", tmp_path / "letstalk-upload-99999999-q"]
    for folder in (dead, live, *other):
        folder.mkdir()
        (folder / "job.mp4").write_bytes(b"\0" * 10)
    assert sweep_spools(tmp_path) == [dead]
    assert not dead.exists() and live.is_dir() and all(o.is_dir() for o in other)


def test_streaming_a_render_while_it_renders(server, tmp_path):
    """stream=true: GET /v1/renders/{id}/stream sends the fragmented mp4 as it grows. Bytes that decode
    to a frame arrive while the job still has clips to render; the whole body is the finished video
    byte for byte (/video's bytes) and decodes to all its frames; once done, /stream serves that file.
    401 without the token, 404 for an unknown job, 409 for a job without stream=true, and the stream
    of a job cancelled while it renders ends then, short."""
    r = post(server, png_bytes(), wav_bytes(5.0, seed=6), steps=80, sampler="ddim", stream="true")
    assert r.status_code == 202, r.text
    job, frames, clips = r.json()["id"], r.json()["frames"], r.json()["clips_total"]
    assert frames == 125 and clips == 16
    stream_url, status_url = f"{server}/v1/renders/{job}/stream", f"{server}/v1/renders/{job}"
    assert requests.get(stream_url, timeout=10).status_code == 401
    body, first, t0 = b"", None, time.monotonic()
    with requests.get(stream_url, headers=AUTH, stream=True, timeout=120) as s:
        assert s.status_code == 200 and s.headers["content-type"] == "video/mp4", s.text
        assert s.headers.get("transfer-encoding") == "chunked" and "content-length" not in s.headers
        for chunk in s.iter_content(chunk_size=None):
            body += chunk
            if first is None:
                state = requests.get(status_url, headers=AUTH, timeout=10).json()  # as the chunk arrived
                if decoded := decodable_frames(body, tmp_path / "partial.mp4"):
                    first = (time.monotonic() - t0, decoded, state)
    assert first is not None, "the stream never held a decodable frame"
    seconds, decoded, state = first
    print(f"first decodable frame(s) after {seconds:.2f} s: {decoded} of {frames}, job {state['status']} "
          f"at clip {state['progress']['clips_done']} of {clips}")
    assert state["status"] == "running" and state["progress"]["clips_done"] < clips - 1, state
    assert decoded < frames
    final = requests.get(status_url, headers=AUTH, timeout=10).json()
    assert final["status"] == "done" and final["options"]["stream"] is True and final["rendered_with"]["stream"]
    video = requests.get(f"{server}/v1/renders/{job}/video", headers=AUTH, timeout=30).content
    assert body == video and len(body) > 10_000
    (tmp_path / "streamed.mp4").write_bytes(body)
    assert load_video_frames(tmp_path / "streamed.mp4").shape == (frames, 96, 96, 3)
    assert probe(tmp_path / "streamed.mp4").has_audio
    again = requests.get(stream_url, headers=AUTH, timeout=30)  # done: the finished file
    assert again.status_code == 200 and again.content == video
    assert spooled(job) == []  # the spool goes when the job ends
    # the errors: no such job; a job without stream=true (one line saying so)
    assert requests.get(f"{server}/v1/renders/{'0' * 32}/stream", headers=AUTH, timeout=10).status_code == 404
    plain = post(server, png_bytes(), wav_bytes(0.4)).json()["id"]
    refused = requests.get(f"{server}/v1/renders/{plain}/stream", headers=AUTH, timeout=10)
    assert refused.status_code == 409 and "stream=true" in refused.json()["error"], refused.text
    assert "\n" not in refused.json()["error"]
    assert wait_done(server, plain)[0]["status"] == "done"
    assert requests.get(f"{server}/v1/renders/{plain}/stream", headers=AUTH, timeout=10).status_code == 409
    # cancelled while streaming: the stream ends at the cancel, with what was rendered so far
    long = post(server, png_bytes(), wav_bytes(12.0), steps=250, sampler="ddpm", stream="true").json()["id"]
    body, cancelled_at = b"", None
    with requests.get(f"{server}/v1/renders/{long}/stream", headers=AUTH, stream=True, timeout=60) as s:
        for chunk in s.iter_content(chunk_size=None):
            body += chunk
            if cancelled_at is None and decodable_frames(body, tmp_path / "cut.mp4"):
                assert requests.delete(f"{server}/v1/renders/{long}", headers=AUTH,
                                       timeout=30).json()["status"] == "cancelled"
                cancelled_at = time.monotonic()
    assert cancelled_at is not None and time.monotonic() - cancelled_at < 10
    assert 0 < decodable_frames(body, tmp_path / "cut.mp4") < 300
    gone = requests.get(f"{server}/v1/renders/{long}/stream", headers=AUTH, timeout=10)
    assert gone.status_code == 409 and "cancelled" in gone.json()["error"]
    assert spooled(long) == []


def test_a_streamed_render_for_a_caller_on_another_node(server, app_args):
    """The Renderer's side of stream=true when the caller is on another node (no folder of its own to
    write in): "bytes" events before "done", which also carries the whole mp4 (stored as without
    stream), and the events' bytes are that mp4."""
    from ray import serve

    from letstalk.inputs import prepare
    from letstalk_platform.serve_http import input_spec

    handle = serve.get_deployment_handle("Renderer", app_name="letstalk")
    spec = input_spec(app_args, handle.info.remote().result(timeout_s=30))
    inputs = prepare(png_bytes(), wav_bytes(1.0), spec).for_renderer(False, 1920)
    options = {"steps": 3, "paste_back": False, "stream": True}
    events = list(handle.options(stream=True).render_stream.remote(inputs, options, "/no/such/folder/v.mp4", None))
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "done" and "bytes" in kinds and "progress" in kinds, kinds
    done = events[-1]
    assert done["video_path"] is None and done["frames"] == 25
    assert b"".join(e["data"] for e in events if e["event"] == "bytes") == done["video"]


def read_events(url, job_id, timeout=120):
    """The job's Server-Sent Events as (event, data) pairs, until the server closes the stream."""
    events, kind = [], None
    with requests.get(f"{url}/v1/renders/{job_id}/events", headers=AUTH, stream=True, timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    return events


def test_live_progress_events_and_the_job_list(server):
    first = post(server, png_bytes(), wav_bytes(2.0), steps=12, sampler="ddim")
    assert first.status_code == 202, first.text
    job = first.json()["id"]
    events = read_events(server, job)
    kinds = [k for k, _ in events]
    order = {"queued": 0, "running": 1, "done": 2}
    assert kinds[-1] == "done" and all(order[a] <= order[b] for a, b in zip(kinds, kinds[1:])), kinds
    assert [k for k, d in events] == [d["status"] for _, d in events]
    running = [d for k, d in events if k == "running"]
    done = [d["progress"]["clips_done"] for d in running]
    assert len(running) >= 2 and done == sorted(done), done  # more than one progress step was streamed
    assert any(d["progress"]["eta_s"] is not None and d["progress"]["eta_s"] > 0 for d in running)
    final = events[-1][1]
    assert final["progress"]["fraction"] == 1.0 and final["progress"]["eta_s"] == 0 and final["video"]
    assert read_events(server, job) == [("done", requests.get(f"{server}/v1/renders/{job}", headers=AUTH,
                                                               timeout=10).json())]  # finished: one final event
    assert requests.get(f"{server}/v1/renders/{'0' * 32}/events", headers=AUTH, timeout=10).status_code == 404
    assert requests.get(f"{server}/v1/renders/{job}/events", timeout=10).status_code == 401
    # the list: newest first, paginated
    second = post(server, png_bytes(), wav_bytes(0.4))
    wait_done(server, second.json()["id"])
    page = requests.get(f"{server}/v1/renders", params={"limit": 1}, headers=AUTH, timeout=10).json()
    assert [j["id"] for j in page["jobs"]] == [second.json()["id"]] and page["total"] >= 2
    rest = requests.get(f"{server}{page['next']}", headers=AUTH, timeout=10).json()
    assert rest["jobs"][0]["id"] == job
    assert requests.get(f"{server}/v1/renders", params={"limit": 0}, headers=AUTH, timeout=10).status_code == 422
    assert requests.get(f"{server}/v1/renders", timeout=10).status_code == 401


def test_a_burst_never_takes_more_than_the_slots(server):
    """20 POSTs at once against the app's slots: at most `capacity` renders are accepted, the others get
    503 + Retry-After, /healthz never counts more than the capacity, and the accepted ones finish."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    capacity = requests.get(f"{server}/healthz", timeout=10).json()["capacity"]
    portrait, audio = png_bytes(), wav_bytes(3.0)
    gate = threading.Barrier(20)

    def one(_):
        gate.wait()  # all 20 leave together
        return post(server, portrait, audio, steps=150, sampler="ddim")  # ~8 s of rendering: outlasts the burst

    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], requests.get(f"{server}/healthz", timeout=10).json()["active_jobs"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(one, range(20)))
        accepted = [r for r in answers if r.status_code == 202]
        busy = [r for r in answers if r.status_code == 503]
        assert 1 <= len(accepted) <= capacity and len(busy) == 20 - len(accepted), [r.status_code for r in answers]
        assert all(r.headers["Retry-After"] == "7" and "busy" in r.json()["error"] for r in busy)
        for r in accepted:
            final, _ = wait_done(server, r.json()["id"], timeout=90)
            assert final["status"] == "done", final
    finally:
        stop.set()
        watcher.join()
    assert 1 <= peak[0] <= capacity


def declared_upload(url: str, headers: dict, length: int, wait_s: float = 0.0) -> tuple[int, dict, int]:
    """POST /v1/renders over a raw socket with a `length`-byte multipart body (one portrait file of
    zeros): the headers, then (after `wait_s`, unless answered by then) the body in 64 KiB pieces, from
    a second thread, until the answer comes. Returns (status, the answer's JSON, the body bytes the
    socket had taken when the answer came: the most the server can have read, give or take a piece)."""
    import threading
    from urllib.parse import urlsplit

    part = (b"--letstalk\r\nContent-Disposition: form-data; name=\"portrait\"; filename=\"face.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n")
    end = b"\r\n--letstalk--\r\n"
    payload = memoryview(part + bytes(length - len(part) - len(end)) + end)
    host, port = urlsplit(url).hostname, urlsplit(url).port
    sock = socket.create_connection((host, port), timeout=60)
    head = ["POST /v1/renders HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {length}",
            "Content-Type: multipart/form-data; boundary=letstalk", *[f"{k}: {v}" for k, v in headers.items()]]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    sent, answered = [0], threading.Event()

    def send_body():
        answered.wait(wait_s)
        try:
            while sent[0] < length and not answered.is_set():
                sent[0] += sock.send(payload[sent[0]:sent[0] + 64 * 1024])
        except OSError:  # the server closed the connection after answering, or we did
            pass

    sender = threading.Thread(target=send_body)
    sender.start()
    reply = b""
    try:
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            assert chunk, "the server closed the connection without an answer"
            reply += chunk
        at_answer = sent[0]
        answered.set()
        head, _, body = reply.partition(b"\r\n\r\n")
        size = int(re.search(rb"(?im)^content-length: *(\d+)", head)[1])
        while len(body) < size:
            body += sock.recv(65536)
    finally:
        answered.set()
        sock.shutdown(socket.SHUT_RDWR)  # wakes the sender if it is blocked in send
        sock.close()
        sender.join()
    return int(head.split()[1]), json.loads(body), at_answer


def test_a_refused_upload_is_answered_before_its_body_is_read(server):
    """401 (no token), 413 (Content-Length over two files at the upload limit) and 503 (no free slot)
    come from the headers alone: a client that declares a 50 MB upload and waits before sending it gets
    its answer having sent none of it (FastAPI used to read the whole multipart body before the route
    could refuse: the old code answered after all 50 MB). A client that sends at full speed is answered
    after some of the body, which Ray Serve's HTTP proxy reads as it arrives whatever the replica does:
    printed. A body without Content-Length is cut off at the limit."""
    big = 50 * 1024 * 1024
    for headers, status, word in [({}, 401, "token"), (AUTH, 413, "upload limit")]:
        code, body, read = declared_upload(server, headers, big, wait_s=10)
        print(f"{status}: a client that waited had sent {read} bytes of the body when the answer ({code}) came")
        assert (code, read) == (status, 0) and word in body["error"], (code, body, read)
        code, body, read = declared_upload(server, headers, big)
        # not asserted: how much the proxy takes in before the answer depends on the machine's load
        print(f"{status}: a client sending 50 MB at full speed had sent {read / 2**20:.2f} MB when the answer came")
        assert code == status, (code, body, read)
    # no Content-Length (chunked): read until over the limit (2 MB and a little here), then 413
    part = (b'--x\r\nContent-Disposition: form-data; name="portrait"; filename="face.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    pieces = itertools.chain([part], (bytes(64 * 1024) for _ in range(128)))  # 8 MB
    r = requests.post(f"{server}/v1/renders", headers=AUTH | {"Content-Type": "multipart/form-data; boundary=x"},
                      data=pieces, timeout=60)
    assert r.status_code == 413 and "upload limit" in r.json()["error"], r.text
    # every slot busy: 503 for a body within the limit (2 MB), before any of it
    long = post(server, png_bytes(), wav_bytes(12.0), steps=250, sampler="ddpm")
    assert long.status_code == 202, long.text
    try:
        code, body, read = declared_upload(server, AUTH, 2 * 1024 * 1024, wait_s=10)
        assert (code, read) == (503, 0) and "busy" in body["error"], (code, body, read)
    finally:
        requests.delete(f"{server}/v1/renders/{long.json()['id']}", headers=AUTH, timeout=30)
    assert requests.get(f"{server}/healthz", timeout=10).json()["active_jobs"] == 0


def test_a_failed_save_gives_the_slot_back(server, app_args):
    """The job table refuses to write (a real SQLite trigger that aborts, as a full disk would): the
    request fails with 500 and its slot comes back at once (the job used to stay queued in the
    replica, holding its slot for good); a job whose final save fails holds its slot only until the
    heartbeat writes its end."""
    import sqlite3

    def sql(statement: str) -> None:
        db = sqlite3.connect(Path(app_args.work_dir) / "jobs.db", timeout=30)
        with db:
            db.execute(statement)
        db.close()

    sql("CREATE TRIGGER refuse_jobs BEFORE INSERT ON render_jobs BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    try:
        r = post(server, png_bytes(), wav_bytes(0.4))
    finally:
        sql("DROP TRIGGER refuse_jobs")
    assert r.status_code == 500, r.text
    assert requests.get(f"{server}/healthz", timeout=10).json()["active_jobs"] == 0
    # the end of a job not written: the slot is held (the row says running) until the heartbeat writes it
    sql("CREATE TRIGGER refuse_ends BEFORE UPDATE ON render_jobs WHEN NEW.status NOT IN ('queued', 'running') "
        "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    try:
        r = post(server, png_bytes(), wav_bytes(0.4))
        assert r.status_code == 202, r.text
        assert wait_done(server, r.json()["id"])[0]["status"] == "done"  # this replica knows
        assert requests.get(f"{server}/healthz", timeout=10).json()["active_jobs"] == 1
    finally:
        sql("DROP TRIGGER refuse_ends")
    wait_until(lambda: requests.get(f"{server}/healthz", timeout=10).json()["active_jobs"] == 0,
               3 * app_args.heartbeat_s, "the heartbeat writes the job's end")
    again = post(server, png_bytes(), wav_bytes(0.4))
    assert again.status_code == 202, again.text
    assert wait_done(server, again.json()["id"])[0]["status"] == "done"


def test_job_state_is_only_touched_on_the_event_loop():
    """FastAPI runs a plain `def` route in a thread pool; a route that reads the job table from there races
    the event loop that admits jobs (/healthz once counted a job and its still-held reservation: 2 of 1
    slots). Every route that reads jobs must be a coroutine, so it runs on the loop between awaits."""
    import inspect

    from letstalk_platform.serve import Ingress

    routes = {name: f for name, f in vars(Ingress.func_or_class.__wrapped__).items()
              if not name.startswith("_") and callable(f) and name not in ("page", "ui")}  # page, ui: static
    assert {"healthz", "list_jobs", "status", "events", "video", "stream", "create", "delete"} <= set(routes)
    assert [name for name, f in routes.items() if not inspect.iscoroutinefunction(f)] == []


def test_the_final_event_is_sent_when_the_job_ends_during_a_yield():
    """serve_stream.job_events driven directly, the job changed while the reader holds an event
    (between two __anext__ calls, as with a slow client): a job that ends then still gets its final
    event, and a progress change then goes out at once, not after the keep-alive wait."""
    import asyncio

    from letstalk_platform.serve_jobs import RenderJob
    from letstalk_platform.serve_stream import job_events

    def kinds(events: list[str]) -> list[str]:
        return [e.split("\n", 1)[0] for e in events]

    async def scenario() -> None:
        ended, moving = RenderJob("a" * 32, {}, 2, 1.0), RenderJob("b" * 32, {}, 2, 1.0)
        events = job_events(ended, keepalive_s=30)
        first = await asyncio.wait_for(events.__anext__(), 5)
        ended.status, ended.finished = "done", time.time()  # while the reader holds the queued event
        ended.touch()
        assert kinds([first] + [e async for e in events]) == ["event: queued", "event: done"]
        events = job_events(moving, keepalive_s=30)
        first = await asyncio.wait_for(events.__anext__(), 5)
        moving.status, moving.clips_done = "running", 1
        moving.touch()
        try:  # the old code waited out the keep-alive first
            second = await asyncio.wait_for(events.__anext__(), 5)
        finally:
            await events.aclose()
        assert kinds([first, second]) == ["event: queued", "event: running"]

    asyncio.run(scenario())


def chromium(*flags: str, log_network: bool = False):
    """Headless Chromium through chromedriver (Debian's chromium + chromium-driver), or a skip saying why;
    `flags`: more command-line switches; `log_network`: keep Chrome's performance (DevTools network) and
    console logs, for browser.get_log("performance") / get_log("browser")."""
    import shutil

    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("needs Chromium and chromedriver: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1500",
                 "--autoplay-policy=no-user-gesture-required", *flags):
        options.add_argument(flag)
    if log_network:
        options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.browser
@pytest.mark.slow
def test_the_web_page_in_a_real_browser(server, tmp_path):
    """The page as a person uses it: token, portrait (its crop shown), speech, quality, Render; the
    progress bar reaches 100 %, the video plays and lasts as long as the audio; a text file given as
    audio shows the API's message. Screenshots of each state go to $LETSTALK_SCREENSHOTS (docs/web.md).
    "Play while rendering" unchecked: the video appears when done (the page as without streaming)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    shots = Path(os.environ.get("LETSTALK_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    (tmp_path / "face.png").write_bytes(png_bytes(seed=3, size=160))
    (tmp_path / "speech.wav").write_bytes(wav_bytes(2.0, seed=4))
    (tmp_path / "notes.txt").write_text("not audio\n")
    browser = chromium()
    try:
        wait = WebDriverWait(browser, 60, poll_frequency=0.05)
        el = browser.find_element
        browser.get(f"{server}/")
        assert browser.title.startswith("LetsTalk")
        browser.save_screenshot(str(shots / "1-empty.png"))
        el(By.ID, "token").send_keys(TOKEN + "\t")  # the change event loads the model line
        wait.until(lambda b: el(By.ID, "model").text.startswith("Model"))
        el(By.ID, "portrait").send_keys(str(tmp_path / "face.png"))
        wait.until(lambda b: el(By.ID, "crop-figure").is_displayed()
                   and b.execute_script("return document.getElementById('crop').naturalWidth") == 64)
        el(By.ID, "audio").send_keys(str(tmp_path / "speech.wav"))
        Select(el(By.ID, "quality")).select_by_value("ddim:10")
        assert el(By.ID, "paste-back").is_selected()  # checked: the API's auto paste-back
        assert el(By.ID, "stream").is_selected()  # checked by default; test_the_web_page_plays_while_rendering
        browser.save_screenshot(str(shots / "2-ready.png"))
        el(By.ID, "stream").click()
        el(By.ID, "render").click()
        wait.until(lambda b: el(By.ID, "progress-text").text.startswith("Rendering clip"))
        browser.save_screenshot(str(shots / "3-progress.png"))
        assert not el(By.ID, "video").is_displayed()  # no stream asked for: nothing to play before the end
        wait.until(lambda b: el(By.ID, "video").is_displayed())
        assert el(By.ID, "progress").get_attribute("value") == "1" and "Done" in el(By.ID, "progress-text").text
        duration = wait.until(lambda b: b.execute_script(
            "const v = document.getElementById('video'); return v.readyState >= 1 ? v.duration : null"))
        assert abs(duration - 2.0) <= 0.1, duration
        # the face pasted back: the video has the 160 px portrait's size, not the 64 px crop's
        assert browser.execute_script("const v = document.getElementById('video'); return [v.videoWidth, "
                                      "v.videoHeight]") == [160, 160]
        played = browser.execute_async_script(
            "const done = arguments[arguments.length - 1], v = document.getElementById('video'); v.muted = true;"
            "v.play().then(() => setTimeout(() => done(v.currentTime), 600), (e) => done('error: ' + e));")
        assert isinstance(played, float) and played > 0.2, played
        assert el(By.ID, "download").get_attribute("download").endswith(".mp4")
        assert "done" in el(By.ID, "past").text
        browser.save_screenshot(str(shots / "4-done.png"))
        # an error: a text file as the speech; the page shows the API's one-line message
        el(By.ID, "audio").send_keys(str(tmp_path / "notes.txt"))
        el(By.ID, "render").click()
        wait.until(lambda b: el(By.ID, "error").is_displayed())
        assert el(By.ID, "error").text.startswith("audio:"), el(By.ID, "error").text
        browser.save_screenshot(str(shots / "5-error.png"))
    finally:
        browser.quit()


@pytest.mark.browser
@pytest.mark.slow
def test_the_web_page_plays_while_rendering(server, tmp_path):
    """"Play while rendering" (checked by default): the page reads /stream into a MediaSource and the
    video plays while the job is still running (the API says so at that moment); when done, the video
    holds all of it (its duration is the audio's, at the portrait's size) and the download link gives
    the finished mp4, byte for byte /video's. Screenshot 6 goes with the others (docs/web.md)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    shots = Path(os.environ.get("LETSTALK_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    (tmp_path / "face.png").write_bytes(png_bytes(seed=3, size=160))
    (tmp_path / "speech.wav").write_bytes(wav_bytes(3.0, seed=4))
    browser = chromium()
    try:
        wait = WebDriverWait(browser, 90, poll_frequency=0.05)
        el = browser.find_element
        browser.get(f"{server}/")
        el(By.ID, "token").send_keys(TOKEN + "\t")
        wait.until(lambda b: el(By.ID, "model").text.startswith("Model"))
        assert el(By.ID, "stream").is_selected() and el(By.ID, "stream").is_enabled()  # this browser has MSE
        el(By.ID, "portrait").send_keys(str(tmp_path / "face.png"))
        wait.until(lambda b: el(By.ID, "crop-figure").is_displayed())
        el(By.ID, "audio").send_keys(str(tmp_path / "speech.wav"))
        Select(el(By.ID, "quality")).select_by_value("ddpm:250")  # 10 clips of 250 steps: seconds of rendering
        el(By.ID, "render").click()
        playing = wait.until(lambda b: b.execute_script(
            "const v = document.getElementById('video');"
            "return v.currentTime > 0 && v.readyState >= 2 ? [state.job, v.currentTime] : null"))
        job, position = playing
        st = requests.get(f"{server}/v1/renders/{job}", headers=AUTH, timeout=10).json()
        browser.save_screenshot(str(shots / "6-playing-while-rendering.png"))
        print(f"playing at {position:.2f} s while the job is {st['status']}, clip {st['progress']['clips_done']} "
              f"of {st['progress']['clips_total']}")
        assert st["status"] == "running" and st["progress"]["clips_done"] < st["progress"]["clips_total"], st
        assert el(By.ID, "progress-text").text.startswith("Rendering clip")
        wait.until(lambda b: "Done" in el(By.ID, "progress-text").text and el(By.ID, "download").is_displayed())
        assert requests.get(f"{server}/v1/renders/{job}", headers=AUTH, timeout=10).json()["status"] == "done"
        video = browser.execute_script(
            "const v = document.getElementById('video'); return [v.duration, v.videoWidth, v.videoHeight]")
        assert abs(video[0] - 3.0) <= 0.1 and video[1:] == [160, 160], video
        downloaded = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(document.getElementById('download').href).then((r) => r.arrayBuffer())"
            ".then((b) => done(Array.from(new Uint8Array(b))), (e) => done('error: ' + e));")
        finished = requests.get(f"{server}/v1/renders/{job}/video", headers=AUTH, timeout=30).content
        assert isinstance(downloaded, list) and bytes(downloaded) == finished, len(downloaded)
        played = browser.execute_async_script(
            "const done = arguments[arguments.length - 1], v = document.getElementById('video'); v.muted = true;"
            "v.currentTime = 0; v.play().then(() => setTimeout(() => done(v.currentTime), 600),"
            "(e) => done('error: ' + e));")
        assert isinstance(played, float) and played > 0.2, played
    finally:
        browser.quit()


# every host name but 127.0.0.1 fails to resolve: the browser is offline, as on an air-gapped server
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"
# ReDoc's sidebar credit ("API docs by Redocly") always asks its CDN for this logo; the app's
# Content-Security-Policy keeps the browser from asking
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.mark.browser
@pytest.mark.slow
def test_swagger_and_redoc_work_offline_in_a_real_browser(server):
    """/docs and /redoc with the network cut off: their scripts and styles come from this server
    (FastAPIOffline), so Swagger UI lists every operation, its Authorize dialog takes the bearer token
    and "Try it out" gets a 401 without it and a 200 with it; ReDoc lists every operation by summary."""
    from urllib.parse import urlsplit

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    spec = requests.get(f"{server}/openapi.json", timeout=10).json()  # no token needed for the schema
    operations = [op for ops in spec["paths"].values() for op in ops.values()]
    (scheme_name, scheme), = spec["components"]["securitySchemes"].items()
    assert scheme["scheme"] == "bearer"

    def off_origin(urls):
        return [u for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")
                and f"{urlsplit(u).scheme}://{urlsplit(u).netloc}" != server]

    def requested(browser) -> list[str]:
        """The URLs the browser asked for since the last call (reading drains Chrome's performance log),
        less those its Content-Security-Policy blocked before they left (logged, then refused)."""
        messages = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
        blocked = {m["params"]["requestId"] for m in messages if m["method"] == "Network.loadingFailed"
                   and m["params"].get("blockedReason") == "csp"}
        return [m["params"]["request"]["url"] for m in messages if m["method"] == "Network.requestWillBeSent"
                and m["params"]["requestId"] not in blocked]

    def assets_are_local(browser):
        assets = browser.execute_script("return [...document.querySelectorAll('script[src], link[href]')]"
                                        ".map(e => e.src || e.href)")
        assert assets and off_origin(assets) == [], assets

    browser = chromium(OFFLINE, log_network=True)
    try:
        wait = WebDriverWait(browser, 30, poll_frequency=0.05)
        css = lambda selector, root=browser: root.find_elements(By.CSS_SELECTOR, selector)  # noqa: E731

        # Swagger UI: one block per operation
        browser.get(f"{server}/docs")
        assets_are_local(browser)
        wait.until(lambda b: css(".opblock"))
        assert len(css(".opblock")) == len(operations)

        # "Try it out" on GET /v1/model, first without the token
        op, = css('.opblock-get:has(.opblock-summary-path[data-path="/v1/model"])')
        op.find_element(By.CSS_SELECTOR, ".opblock-summary-control").click()
        wait.until(lambda b: css(".try-out__btn", op))[0].click()

        def execute() -> str:
            for old in css(".btn-clear", op):  # drop the previous response, so the code read is the new one
                old.click()
            wait.until(lambda b: css(".execute", op))[0].click()
            code = wait.until(lambda b: css(".live-responses-table tbody .response-col_status", op))[0]
            return code.text.strip()

        assert execute() == "401"

        # Authorize: the dialog shows the bearer scheme; the token goes in, then Close
        css(".btn.authorize")[0].click()
        dialog = wait.until(lambda b: css(".dialog-ux .modal-ux"))[0]
        title = dialog.find_element(By.CSS_SELECTOR, ".auth-container h4").text
        assert scheme_name in title and "Bearer" in title, title
        dialog.find_element(By.CSS_SELECTOR, "input").send_keys(TOKEN)
        dialog.find_element(By.CSS_SELECTOR, "button.modal-btn.authorize").click()
        wait.until(lambda b: "Authorized" in dialog.text)
        dialog.find_element(By.CSS_SELECTOR, "button.btn-done").click()
        wait.until(lambda b: not css(".dialog-ux"))
        # now the same call carries the token: 200, and the curl line shows the header Swagger sent
        assert execute() == "200"
        assert f"Authorization: Bearer {TOKEN}" in css(".curl-command", op)[0].text
        docs_urls = requested(browser)
        assert f"{server}/v1/model" in docs_urls
        assert off_origin(docs_urls) == []

        # ReDoc: every operation listed, by summary
        browser.get(f"{server}/redoc")
        assets_are_local(browser)
        wait.until(lambda b: b.execute_script("return document.body.innerText.includes(arguments[0])",
                                              operations[0]["summary"]))
        text = browser.find_element(By.TAG_NAME, "body").text
        assert [op["summary"] for op in operations if op["summary"] not in text] == []
        assert scheme_name in text  # each secured operation names its authorization
        assert off_origin(requested(browser)) == []  # not even the credit's logo
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"
                  and REDOC_LOGO not in e["message"]]  # the policy's refusal of the logo is logged
        assert errors == []  # no script error on either page
    finally:
        browser.quit()


@pytest.mark.parametrize("case, expect, words", [
    ("portrait_not_image", 400, ["portrait"]),
    ("audio_corrupt", 400, ["audio"]),
    ("audio_empty", 400, ["audio", "empty"]),
    ("audio_is_image", 400, ["audio"]),
    ("upload_too_big", 413, ["portrait", "limit"]),
    ("audio_too_long", 413, ["audio", "limit"]),
    ("missing_audio", 422, ["audio"]),
    ("missing_portrait", 422, ["portrait"]),  # optional in the schema: a re-voicing avatar takes none
    ("zero_steps", 422, ["steps"]),
    ("unknown_sampler", 422, ["sampler"]),
    ("max_side_too_small", 422, ["max_side", "greater than or equal to 16"]),
    ("max_side_too_large", 422, ["max_side", "less than or equal to 4096"]),
    ("max_side_not_a_number", 422, ["max_side", "integer"]),
    ("paste_back_not_a_bool", 422, ["paste_back", "boolean"]),
    ("path_in_filename", 400, ["path"]),
])
def test_bad_input_gets_a_4xx_reason(server, case, expect, words):
    face, speech = png_bytes(), wav_bytes(0.4)
    kwargs = {
        "portrait_not_image": dict(portrait=b"just some text, not an image"),
        "audio_corrupt": dict(audio=bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8))),
        "audio_empty": dict(audio=b""),
        "audio_is_image": dict(audio=face),
        "upload_too_big": dict(portrait=b"\x89PNG" + bytes(1_200_000)),
        "audio_too_long": dict(audio=wav_bytes(25.0, silent=True)),
        "missing_audio": dict(audio=None),
        "missing_portrait": dict(portrait=None),
        "zero_steps": dict(steps=0),
        "unknown_sampler": dict(sampler="euler"),
        "max_side_too_small": dict(max_side=8),
        "max_side_too_large": dict(max_side=100_000),
        "max_side_not_a_number": dict(max_side="big"),
        "paste_back_not_a_bool": dict(paste_back="sometimes"),
        "path_in_filename": dict(names=("../../etc/face.png", "speech.wav")),
    }[case]
    kwargs = {"portrait": face, "audio": speech} | kwargs
    r = post(server, kwargs.pop("portrait"), kwargs.pop("audio"), **kwargs)
    assert r.status_code == expect, r.text
    error = r.json()["error"]
    assert "\n" not in error and all(w in error for w in words), error
    health = requests.get(f"{server}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["active_jobs"] == 0


def test_unknown_job_ids(server):
    for job in ("0" * 32, "not-a-job"):
        r = requests.get(f"{server}/v1/renders/{job}", headers=AUTH, timeout=10)
        assert r.status_code == 404 and "no render job" in r.json()["error"]
        assert requests.delete(f"{server}/v1/renders/{job}", headers=AUTH, timeout=10).status_code == 404
    r = requests.get(f"{server}/v1/renders/..%2F..%2Fetc%2Fpasswd/video", headers=AUTH, timeout=10)
    assert r.status_code == 404 and r.json()["error"]


def ingress_replicas() -> dict[str, str]:
    """The app's live Ingress replicas: actor name -> namespace."""
    import ray

    return {a["name"]: a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True)
            if "#Ingress#" in a["name"]}


def kill_the_ingress(name: str | None = None) -> str:
    """Kill the app's Ingress replica (its actor, as a crash would), or the one named; Serve starts a new one."""
    import ray

    replicas = ingress_replicas()
    if name is None:
        assert len(replicas) == 1, replicas
        (name,) = replicas
    ray.kill(ray.get_actor(name, namespace=replicas[name]), no_restart=True)
    return name


def renders_running() -> int:
    from ray import serve

    return serve.get_deployment_handle("Renderer", app_name="letstalk").renders_running.remote().result(timeout_s=30)


@pytest.mark.slow
def test_jobs_outlive_an_ingress_restart(server):
    """The job table is a database: after the Ingress replica dies and Serve restarts it, a finished job
    is still listed and its video downloads byte for byte; the job that was running is failed with the
    reason, its render stops (nobody is left to collect it), and new renders work."""
    finished = post(server, png_bytes(), wav_bytes(0.6))
    assert wait_done(server, finished.json()["id"])[0]["status"] == "done"
    fid = finished.json()["id"]
    video = requests.get(f"{server}/v1/renders/{fid}/video", headers=AUTH, timeout=30).content
    running = post(server, png_bytes(), wav_bytes(12.0), steps=250, sampler="ddpm")
    rid = running.json()["id"]
    deadline = time.monotonic() + 60
    while requests.get(f"{server}/v1/renders/{rid}", headers=AUTH, timeout=10).json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    old = kill_the_ingress()
    stopped = time.monotonic() + 30
    while renders_running() > 0:  # the orphan render (~80 s) stops
        assert time.monotonic() < stopped, "the render of the dead Ingress still runs"
        time.sleep(0.5)
    deadline = time.monotonic() + 120
    while True:  # the new replica answers
        try:
            st = requests.get(f"{server}/v1/renders/{fid}", headers=AUTH, timeout=5)
            if st.status_code == 200:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the Ingress did not come back"
        time.sleep(0.5)
    import ray

    assert old not in [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert st.json()["status"] == "done"
    assert requests.get(f"{server}/v1/renders/{fid}/video", headers=AUTH, timeout=30).content == video
    lost = requests.get(f"{server}/v1/renders/{rid}", headers=AUTH, timeout=10).json()
    assert lost["status"] == "failed" and "restarted" in lost["error"], lost
    assert read_events(server, rid) == [("failed", lost)]
    listed = requests.get(f"{server}/v1/renders", params={"limit": 100}, headers=AUTH, timeout=10).json()
    assert {fid, rid} <= {j["id"] for j in listed["jobs"]}
    again = post(server, png_bytes(), wav_bytes(0.4))
    assert again.status_code == 202, again.text
    assert wait_done(server, again.json()["id"], timeout=150)[0]["status"] == "done"
    # deleting a finished job removes its row and its video
    assert requests.delete(f"{server}/v1/renders/{fid}", headers=AUTH, timeout=10).json()["status"] == "deleted"
    assert requests.get(f"{server}/v1/renders/{fid}", headers=AUTH, timeout=10).status_code == 404


def test_the_api_against_its_own_schema(server):
    """schemathesis over /openapi.json, every operation with a bounded budget (25 examples each, fixed
    seed): no 5xx, every status code documented, every body matching its declared schema, the token
    enforced. (Its pytest plugin's lazy fixtures do not run under pytest 9: strategies per operation.)"""
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                  database=None)
        def check(case):
            # excluded: "schema-valid data must be accepted" — a schema cannot say "a decodable image" or
            # "audio ffmpeg reads", so random bytes in the file fields rightly get a documented 400
            case.call_and_validate(base_url=server, headers=AUTH, timeout=60, excluded_checks=[positive_data_acceptance])

        check()


def write_inputs(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"face": folder / "face.png", "speech": folder / "speech.wav", "short": folder / "short.wav",
             "text": folder / "notes.png"}
    paths["face"].write_bytes(png_bytes(2))
    paths["speech"].write_bytes(wav_bytes(1.0, seed=2))
    paths["short"].write_bytes(wav_bytes(0.5, seed=3))
    paths["text"].write_text("not an image")
    return paths


def test_batch_through_the_serve_app(server, tmp_path):
    """Good rows rendered by the running app's Renderer, bad rows recorded, a re-run renders nothing.
    Per-row paste-back: by default the 96 px portrait's size (larger than the 64 px crop), false: the
    crop, max_side: capped; a row with a bad max_side fails alone."""
    render_batch = load_job("render_batch")
    write_inputs(tmp_path / "in")  # face.png, speech.wav, short.wav, notes.png beside the manifest
    manifest = tmp_path / "in" / "rows.csv"
    manifest.write_text(
        "id,portrait,audio,steps,sampler,paste_back,max_side\n"
        "alice,face.png,speech.wav,,,,\n"
        "bob,face.png,short.wav,10,dpm,false,\n"
        "carol,face.png,missing.wav,,,,\n"        # no such file
        "dave,notes.png,short.wav,,,,\n"          # not an image: fails inside the renderer
        "../evil,face.png,short.wav,,,,\n"        # unsafe id
        "erin,face.png,short.wav,,euler,,\n"      # unknown sampler
        "alice,face.png,short.wav,,,,\n"          # duplicate id
        "gina,face.png,short.wav,,,,8\n"          # max_side below 16
        "frank,face.png,short.wav,,,,48\n")       # capped: 48 px, below even the crop's 64
    out = tmp_path / "out"
    assert render_batch.main(["--manifest", str(manifest), "--out", str(out), "--no-progress"]) == 0
    rows = {r["row"]: r for r in pq.read_table(out / "results.parquet").to_pylist()}
    statuses = ["done", "done"] + ["failed"] * 6 + ["done"]
    assert [rows[i]["status"] for i in range(9)] == statuses
    assert not any(rows[i]["reused"] for i in range(9))
    errors = [rows[i]["error"] for i in range(2, 8)]
    for error, word in zip(errors, ["not found", "portrait", "plain name", "sampler", "earlier row", "max_side"]):
        assert word in error, errors
    assert "\n" not in rows[7]["error"]
    assert load_video_frames(out / "alice.mp4").shape == (25, 96, 96, 3)  # pasted back: the portrait's size
    assert load_video_frames(out / "bob.mp4").shape == (12, 64, 64, 3) and rows[1]["clips"] == 2  # the crop
    assert load_video_frames(out / "frank.mp4").shape == (12, 48, 48, 3)
    assert rows[0]["seconds_total"] > 0 and rows[0]["frames"] == 25
    assert (rows[0]["paste_back"], rows[0]["max_side"], rows[1]["paste_back"], rows[8]["max_side"]) == \
        (True, 1920, False, 48)
    assert (rows[1]["steps"], rows[1]["sampler"], rows[1]["dtype"]) == (10, "dpm", "fp32")
    assert sorted(p.name for p in out.iterdir()) == ["alice.mp4", "bob.mp4", "frank.mp4", "results.parquet"]
    mtime = (out / "alice.mp4").stat().st_mtime_ns
    assert render_batch.main(["--manifest", str(manifest), "--out", str(out), "--no-progress"]) == 0
    again = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["status"] for r in again] == statuses
    assert [r["reused"] for r in again] == [True, True] + [False] * 6 + [True]
    assert (out / "alice.mp4").stat().st_mtime_ns == mtime


def test_batch_standalone_on_ray_data_from_the_registry(ray_local, bundle, tmp_path):
    """--standalone with the model taken from the MLflow registry by alias."""
    from letstalk_platform import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.register_bundle(uri, tracking.start_run(uri, "serve", "r", {}), bundle, "talk", "production")
    render_batch = load_job("render_batch")
    inputs = write_inputs(tmp_path / "in")
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [
        {"id": "one", "portrait": str(inputs["face"]), "audio": str(inputs["short"]), "seed": 1},
        {"id": "two", "portrait": str(inputs["face"]), "audio": str(inputs["text"])},  # not audio
    ]) + "\n")
    out = tmp_path / "out"
    code = render_batch.main(["--manifest", str(manifest), "--out", str(out), "--standalone", "--model",
                              "models:/talk@production", "--mlflow-uri", uri, "--steps", "4", "--cpus", "0.5",
                              "--dtype", "bf16", "--overlap-decode", "--max-side", "80", "--no-progress"])
    assert code == 0
    rows = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["done", "failed"]
    # the speed switches reached the Ray Data actors: the row says what rendered it
    assert (rows[0]["dtype"], rows[0]["steps"], rows[0]["sampler"]) == ("bf16", 4, "ddim")
    assert "audio" in rows[1]["error"]
    # the job-wide --max-side: the 96 px portrait pasted back (auto), capped at 80
    assert (rows[0]["paste_back"], rows[0]["max_side"]) == (True, 80)
    assert load_video_frames(out / "one.mp4").shape == (12, 80, 80, 3)


def test_batch_starts_and_removes_its_own_app(server, bundle, tmp_path):
    import pyarrow as pa
    from ray import serve

    render_batch = load_job("render_batch")
    inputs = write_inputs(tmp_path / "in")
    manifest = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"portrait": [str(inputs["face"])], "audio": [str(inputs["short"])]}), manifest)
    out = tmp_path / "out"
    args = ["--manifest", str(manifest), "--out", str(out), "--app", "batch-only", "--no-progress"]
    assert render_batch.main(args) == 2  # no such app and no --model: a clear error, nothing started
    assert render_batch.main(args + ["--model", str(bundle), "--dtype", "fp16"]) == 2  # fp16 needs a GPU
    assert render_batch.main(args + ["--model", str(bundle), "--max-batch", "0"]) == 2
    assert render_batch.main(args + ["--model", str(bundle), "--max-side", "5"]) == 2  # below 16
    assert not out.exists() and "batch-only" not in serve.status().applications
    assert render_batch.main(args + ["--model", str(bundle), "--cpus", "0", "--steps", "3", "--no-paste-back"]) == 0
    assert load_video_frames(out / "row00000.mp4").shape == (12, 64, 64, 3)  # the job-wide flag: the crop only
    assert "batch-only" not in serve.status().applications


def test_jobs_refuse_bad_setup(bundle, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LETSTALK_API_TOKEN"}
    r = subprocess.run([sys.executable, "jobs/serve.py", "--model", str(bundle)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "LETSTALK_API_TOKEN" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "jobs/serve.py", "--model", str(bundle), "--batch-wait-ms", "5000"], cwd=ROOT,
                       env=dict(env, LETSTALK_API_TOKEN=TOKEN), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "batch_wait_ms" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "m.csv").write_text("portrait\nface.png\n")
    r = subprocess.run([sys.executable, "jobs/render_batch.py", "--manifest", str(tmp_path / "m.csv"),
                        "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "audio" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_serve_job_from_a_shell(bundle, tmp_path):
    """`python jobs/serve.py` as a user runs it: its own Ray, 127.0.0.1, token from the environment."""
    port = free_port()
    env = dict(os.environ, LETSTALK_API_TOKEN=TOKEN, RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen([sys.executable, "jobs/serve.py", "--model", str(bundle), "--port", str(port),
                             "--steps", "3"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the app not ready
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(1)
        r = post(url, png_bytes(), wav_bytes(0.6))
        assert r.status_code == 202, r.text
        final, _ = wait_done(url, r.json()["id"], poll=0.2)
        assert final["status"] == "done" and final["rendered_with"]["steps"] == 3
    finally:
        proc.send_signal(2)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_until(condition, timeout: float, what: str, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(every)
    return value


@pytest.mark.slow
def test_two_ingress_replicas_admit_from_one_count_of_slots(server, app_args):
    """The render slots are the service's, not split per replica: with two Ingress replicas and the
    app's one slot (one Renderer running one job), 16 POSTs at once, spread over both replicas, give
    exactly one 202 and fifteen 503s (each replica used to admit max(1, 1 // 2) = 1: two jobs); both
    replicas report the same slot in use, and the job finishes."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from letstalk_platform.serve import build_app

    serve.run(build_app(app_args.model_copy(update={"ingress_replicas": 2, "heartbeat_s": 1.0})), name="letstalk",
              route_prefix="/")
    wait_until(lambda: len(ingress_replicas()) == 2, 120, "two Ingress replicas")
    assert requests.get(f"{server}/healthz", timeout=10).json()["capacity"] == 1
    portrait, audio = png_bytes(), wav_bytes(3.0)
    gate = threading.Barrier(16)

    def one(_):
        gate.wait()
        return post(server, portrait, audio, steps=150, sampler="ddim")  # ~8 s of rendering: outlasts the burst

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(16)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [202] + [503] * 15, codes
    accepted = next(r for r in answers if r.status_code == 202).json()["id"]
    assert {requests.get(f"{server}/healthz", timeout=10).json()["active_jobs"] for _ in range(8)} == {1}
    assert wait_done(server, accepted, timeout=120)[0]["status"] == "done"


@pytest.mark.slow
def test_two_ingress_replicas_share_the_job_table(server, app_args):
    """Two Ingress replicas on one job table (the same app redeployed with ingress_replicas=2): either
    answers for the other's job, with the progress of the owner's last heartbeat; a replica that
    crashes and restarts does not fail the jobs the other one runs; the jobs of a replica that dies are
    failed (their render stops) once another replica notices, within a few heartbeats."""
    from ray import serve

    from letstalk_platform.jobstore import JobStore
    from letstalk_platform.serve import build_app
    from letstalk_platform.serve_jobs import RESTART_REASON

    serve.run(build_app(app_args.model_copy(update={"ingress_replicas": 2, "heartbeat_s": 1.0})), name="letstalk",
              route_prefix="/")
    wait_until(lambda: len(ingress_replicas()) == 2, 120, "two Ingress replicas")
    store = JobStore(f"sqlite:///{Path(app_args.work_dir) / 'jobs.db'}")

    def owner(job_id):
        with store.engine.connect() as db:
            return db.exec_driver_sql("SELECT owner FROM render_jobs WHERE id = ?", (job_id,)).scalar()

    def status(job_id):
        for _ in range(5):  # a request the proxy routed to the replica just killed times out: retry, as clients do
            try:
                return requests.get(f"{server}/v1/renders/{job_id}", headers=AUTH, timeout=10).json()
            except requests.RequestException:
                time.sleep(1)
        return requests.get(f"{server}/v1/renders/{job_id}", headers=AUTH, timeout=10).json()

    try:
        long = post(server, png_bytes(), wav_bytes(12.0), steps=250, sampler="ddpm")  # ~80 s: outlives the test
        assert long.status_code == 202, long.text
        lid = long.json()["id"]
        wait_until(lambda: status(lid)["status"] == "running", 60, "the long job runs")
        first_owner = owner(lid)
        assert first_owner in ingress_replicas()
        # 12 reads spread over both replicas: all find the job, running, with progress moving
        seen = [status(lid) for _ in range(12)]
        assert {s["status"] for s in seen} == {"running"}
        wait_until(lambda: status(lid)["progress"]["fraction"] > seen[0]["progress"]["fraction"], 30,
                   "the heartbeat carries progress to the table")
        # the other replica crashes; the one Serve starts in its place does not fail the running job
        other = next(n for n in ingress_replicas() if n != first_owner)
        kill_the_ingress(other)
        wait_until(lambda: len(ingress_replicas()) == 2 and other not in ingress_replicas(), 120,
                   "the replacement replica")
        for _ in range(8):  # the new replica has started (and swept) by now; both still answer "running"
            assert status(lid)["status"] == "running"
        time.sleep(3.5)  # past 3 heartbeats: the owner's beats keep it alive
        assert status(lid)["status"] == "running" and renders_running() == 1
        # the owner crashes: its job is failed by the surviving replica, and its render stops
        kill_the_ingress(first_owner)
        lost = wait_until(lambda: (s := status(lid))["status"] == "failed" and s, 30, "the lost job fails")
        assert lost["error"] == RESTART_REASON and lost["video"] is None
        wait_until(lambda: renders_running() == 0, 30, "the orphan render stops")
        # new work: accepted, finished, and its video the same from whichever replica answers
        wait_until(lambda: len(ingress_replicas()) == 2, 120, "two replicas again")
        done = post(server, png_bytes(), wav_bytes(0.4))
        final, _ = wait_done(server, done.json()["id"], timeout=120)
        assert final["status"] == "done"
        videos = {requests.get(f"{server}{final['video']}", headers=AUTH, timeout=30).content for _ in range(6)}
        assert len(videos) == 1 and len(videos.pop()) > 1000
    finally:
        store.close()



@pytest.mark.slow
def test_videos_on_s3(server, app_args, s3_server):
    """`storage` an S3 URI (a real local S3 server): the Renderer uploads the mp4 to the bucket itself,
    nothing is kept on the Ingress's disk, the API streams the object back byte for byte, and a DELETE
    removes the object."""
    from ray import serve

    from letstalk_platform.serve import build_app
    from letstalk_platform.storage import VideoStore

    uri = s3_server("serve-test/videos")
    serve.run(build_app(app_args.model_copy(update={"storage": uri})), name="letstalk", route_prefix="/")
    wait_until(lambda: len(ingress_replicas()) == 1, 120, "the redeployed Ingress")
    job = post(server, png_bytes(), wav_bytes(0.6))
    assert job.status_code == 202, job.text
    jid = job.json()["id"]
    final, _ = wait_done(server, jid, timeout=120)
    assert final["status"] == "done", final
    stored = b"".join(VideoStore(uri).chunks(jid))
    r = requests.get(f"{server}/v1/renders/{jid}/video", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert r.content == stored and int(r.headers["content-length"]) == len(stored) > 1000
    assert f'filename="{jid}.mp4"' in r.headers["content-disposition"]
    assert not list(Path(app_args.work_dir).rglob(f"*{jid}*"))  # no local copy anywhere in the work dir
    # stream=true: the Renderer streams from its scratch file, then uploads that file: the same bytes
    streamed = post(server, png_bytes(), wav_bytes(0.6), stream="true").json()["id"]
    with requests.get(f"{server}/v1/renders/{streamed}/stream", headers=AUTH, stream=True, timeout=120) as s:
        assert s.status_code == 200, s.text
        body = b"".join(s.iter_content(chunk_size=None))
    assert wait_done(server, streamed)[0]["status"] == "done"
    assert body == b"".join(VideoStore(uri).chunks(streamed)) and len(body) > 1000
    assert requests.delete(f"{server}/v1/renders/{jid}", headers=AUTH, timeout=10).json()["status"] == "deleted"
    assert VideoStore(uri).size(jid) is None
