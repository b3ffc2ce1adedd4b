"""Serving overhead and concurrency: the HTTP API vs a direct LetsTalkPipeline.render, in one run.

    python bench/serve.py [--bundle DIR] [--seconds 2] [--steps 25] [--repeats 3] [--batch-clips]

Prints (1) the end-to-end HTTP render time (upload, validation, Serve hop, render, the end heard
on the event stream, the mp4 downloaded) over the time of rendering the same input straight to an
mp4 with the pipeline in this process (overhead ratio), and the same for a client that polls the
status route every --poll seconds instead, (2) throughput with 4 concurrent requests over 1 at a time (same server), (3) how
soon the Server-Sent Events stream answers and reports `running`, and (4) status polls per second
from one client while a render runs.
Without --bundle a random tiny bundle is used (the model's quality does not matter here).
`--batch-clips` serves with InferenceOptions.batch_clips (the concurrent renders of the replica
share merged forward passes; bench/inference.py compares it with and without in one run).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import soundfile as sf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from letstalk.pipeline import LetsTalkPipeline  # noqa: E402
from letstalk.synthetic import draw_portrait, speech_like_audio  # noqa: E402

TOKEN = "bench-token"


def inputs(seconds: float) -> tuple[bytes, bytes]:
    img, wav = io.BytesIO(), io.BytesIO()
    Image.fromarray(draw_portrait(128, seed=0)).save(img, format="PNG")
    sf.write(wav, speech_like_audio(seconds, seed=0), 16000, format="WAV")
    return img.getvalue(), wav.getvalue()


def http_render(url: str, portrait: bytes, audio: bytes, steps: int, poll_s: float | None = None) -> float:
    """One render as a client sees it; the end is heard over the event stream (what the web page does)
    or, with `poll_s`, by polling the status route every `poll_s` seconds."""
    return timed_http_render(url, portrait, audio, steps, poll_s)[0]


def timed_http_render(url: str, portrait: bytes, audio: bytes, steps: int,
                      poll_s: float | None = None) -> tuple[float, dict]:
    """http_render's seconds, and the job's own `seconds` (the Ingress's prepare, the replica's render)."""
    t0 = time.perf_counter()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = requests.post(f"{url}/v1/renders", headers=auth, timeout=600,
                      files={"portrait": ("p.png", portrait), "audio": ("a.wav", audio)},
                      data={"steps": steps, "sampler": "ddim"})
    r.raise_for_status()
    job = r.json()["id"]
    if poll_s is None:
        with requests.get(f"{url}/v1/renders/{job}/events", headers=auth, stream=True, timeout=600) as events:
            data = [line[6:] for line in events.iter_lines(decode_unicode=True) if line.startswith("data: ")]
        st = json.loads(data[-1])
        if st["status"] != "done":
            raise RuntimeError(f"job {job} ended {st['status']}: {st['error']}")
    else:
        while True:
            st = requests.get(f"{url}/v1/renders/{job}", headers=auth, timeout=60).json()
            if st["status"] == "done":
                break
            if st["status"] not in ("queued", "running"):
                raise RuntimeError(st)
            time.sleep(poll_s)
    video = requests.get(f"{url}/v1/renders/{job}/video", headers=auth, timeout=60)
    video.raise_for_status()
    assert len(video.content) > 1000
    return time.perf_counter() - t0, st["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrent", type=int, default=4)
    p.add_argument("--poll", type=float, default=0.02, help="status-polling interval for the polling client (s)")
    p.add_argument("--batch-clips", action="store_true", help="merge the replica's concurrent renders' steps")
    args = p.parse_args()

    from ray import serve

    from letstalk_platform.runtime import init_ray
    from letstalk_platform.serve import AppArgs, build_app

    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    bundle = args.bundle or str(LetsTalkPipeline.init_tiny().save_pretrained(Path(tmp) / "tiny"))
    portrait, audio = inputs(args.seconds)
    (Path(tmp) / "p.png").write_bytes(portrait)
    (Path(tmp) / "a.wav").write_bytes(audio)

    pipe = LetsTalkPipeline.from_pretrained(bundle)

    def direct() -> float:
        t0 = time.perf_counter()
        pipe.render_to_file(Path(tmp) / "p.png", Path(tmp) / "a.wav", Path(tmp) / "direct.mp4",
                            steps=args.steps, sampler="ddim")
        return time.perf_counter() - t0

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    inference = {"batch_clips": True, "max_batch": args.concurrent} if args.batch_clips else {}
    serve.run(build_app(AppArgs(model=bundle, token=TOKEN, renderer_cpus=0, max_jobs_per_replica=args.concurrent,
                                inference=inference)), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    threads = requests.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60).json()[
        "torch_threads"]
    import torch

    torch.set_num_threads(threads)  # the same intra-op threads as the replica (Ray sets them from num_cpus)
    http_render(url, portrait, audio, args.steps)  # warm-up (first request loads lazily)
    direct()

    direct_t, http_t, polled_t, work_t = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits all three
        direct_t.append(direct())
        elapsed, seconds = timed_http_render(url, portrait, audio, args.steps)
        http_t.append(elapsed)
        work_t.append(seconds["prepare"] + seconds["worker_total"])  # what direct() does, timed inside the server
        polled_t.append(http_render(url, portrait, audio, args.steps, poll_s=args.poll))
    d, h, polled = (statistics.median(x) for x in (direct_t, http_t, polled_t))
    added = [e - w for e, w in zip(http_t, work_t)]  # same request, same moment: immune to the machine's drift
    served = statistics.median([e / w for e, w in zip(http_t, work_t)])
    frames = round(args.seconds * 25)
    print(f"input: {args.seconds:g} s audio -> {frames} frames, DDIM-{args.steps}, {os.cpu_count()} CPUs, "
          f"bundle {Path(bundle).name}, {threads} torch thread(s) in both, batch_clips {args.batch_clips}")
    print(f"direct pipeline render_to_file: median {d:.3f} s  {[round(x, 3) for x in direct_t]}")
    print(f"HTTP end to end (event stream): median {h:.3f} s  {[round(x, 3) for x in http_t]}")
    print(f"HTTP, polling every {args.poll * 1000:g} ms:   median {polled:.3f} s  {[round(x, 3) for x in polled_t]}")
    print(f"overhead ratio HTTP / direct:   {h / d:.2f}  (+{h - d:.3f} s per request); "
          f"polling every {args.poll * 1000:g} ms: {polled / d:.2f} (the polls take CPU from the render)")
    print(f"what serving adds, per request (end to end minus the same request's decode+crop and render "
          f"inside the server): median +{statistics.median(added):.3f} s {[round(x, 3) for x in added]}, "
          f"ratio {served:.3f}")

    n = args.concurrent
    t0 = time.perf_counter()
    for _ in range(n):
        http_render(url, portrait, audio, args.steps)
    serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda _: http_render(url, portrait, audio, args.steps), range(n)))
    parallel = time.perf_counter() - t0
    print(f"throughput 1 at a time: {n / serial:.3f} videos/s; {n} concurrent: {n / parallel:.3f} videos/s; "
          f"ratio {serial / parallel:.2f}")

    # live progress: how soon a client hears of a job over Server-Sent Events, and how many status polls
    # the Ingress answers per second while a render runs
    auth = {"Authorization": f"Bearer {TOKEN}"}
    first, running, polls = [], [], []
    for _ in range(args.repeats):
        job = requests.post(f"{url}/v1/renders", headers=auth, files={"portrait": ("p.png", portrait),
                            "audio": ("a.wav", audio)}, data={"steps": args.steps, "sampler": "ddim"}, timeout=60)
        t0 = time.perf_counter()
        events = []  # (seconds since the POST returned, event name)
        with requests.get(f"{url}/v1/renders/{job.json()['id']}/events", headers=auth, stream=True, timeout=600) as r:
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    events.append((time.perf_counter() - t0, line[7:]))
        first.append(events[0][0])
        running.append(next(t for t, name in events if name == "running"))
        long = requests.post(f"{url}/v1/renders", headers=auth, files={"portrait": ("p.png", portrait),
                             "audio": ("a.wav", audio)}, data={"steps": args.steps * 4, "sampler": "ddim"},
                             timeout=60).json()["id"]
        deadline, count = time.perf_counter() + 2.0, 0
        with requests.Session() as session:
            while time.perf_counter() < deadline:
                session.get(f"{url}/v1/renders/{long}", headers=auth, timeout=60).raise_for_status()
                count += 1
        polls.append(count / 2.0)
        requests.delete(f"{url}/v1/renders/{long}", headers=auth, timeout=60)
    print(f"SSE: first event {statistics.median(first) * 1000:.1f} ms after the POST returned (median of "
          f"{[round(x * 1000, 1) for x in first]}), first 'running' event {statistics.median(running):.3f} s "
          f"after the POST returned")
    print(f"status polls from one client during a render: {statistics.median(polls):.0f} requests/s "
          f"({[round(x) for x in polls]})")
    serve.shutdown()


if __name__ == "__main__":
    main()
