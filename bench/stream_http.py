"""Streaming through the HTTP API: how soon a client of GET /v1/renders/{id}/stream has a frame.

    python bench/stream_http.py [--seconds 8] [--repeats 3]

Starts a local Ray + Serve app with the shipped demo model (its defaults: DDIM-25), then, `--repeats`
times: POSTs a drawn 256 px portrait and `--seconds` of speech-like audio with stream=true, reads the
/stream body into a file as it arrives while a thread asks ffmpeg every 20 ms how many frames it
decodes to, and follows the job to done. Prints medians: the time from the POST to the first
decodable frame, to the job's end, the real-time factor (end ÷ seconds of video), and against the
same render in this process (bench/stream.py's `--stream` path: first frame and first clip rendered).
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import soundfile as sf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT / "bench")]

from stream import FirstFrame, one  # noqa: E402  (bench/stream.py)

from letstalk.cli import SHIPPED  # noqa: E402
from letstalk.pipeline import LetsTalkPipeline  # noqa: E402
from letstalk.synthetic import draw_portrait, speech_like_audio  # noqa: E402

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def streamed(url: str, portrait: bytes, audio: bytes, out: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    r = requests.post(f"{url}/v1/renders", headers=AUTH, timeout=600, data={"stream": "true"},
                      files={"portrait": ("p.png", portrait), "audio": ("a.wav", audio)})
    r.raise_for_status()
    job = r.json()["id"]
    watcher = FirstFrame(out, t0)
    with requests.get(f"{url}/v1/renders/{job}/stream", headers=AUTH, stream=True, timeout=600) as body, \
            open(out, "wb", buffering=0) as f:
        body.raise_for_status()
        for chunk in body.iter_content(chunk_size=None):
            f.write(chunk)
    state = requests.get(f"{url}/v1/renders/{job}", headers=AUTH, timeout=60).json()
    end = time.perf_counter() - t0
    first = watcher.stop(end)
    if state["status"] != "done":
        raise RuntimeError(f"job {job} ended {state['status']}: {state.get('error')}")
    return {"first_frame": first, "end": end}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from ray import serve

    from letstalk_platform.runtime import init_ray
    from letstalk_platform.serve import AppArgs, build_app

    face, wave = draw_portrait(256, seed=0), speech_like_audio(args.seconds, seed=0)
    img, wav, short = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.fromarray(face).save(img, format="PNG")
    sf.write(wav, wave, 16000, format="WAV")
    sf.write(short, wave[:32000], 16000, format="WAV")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(model=str(SHIPPED), token=TOKEN, renderer_cpus=0)), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    info = requests.get(f"{url}/v1/model", headers=AUTH, timeout=60).json()
    import torch

    torch.set_num_threads(info["torch_threads"])  # the replica's intra-op threads, for the in-process render
    pipe = LetsTalkPipeline.from_pretrained(SHIPPED)
    http_runs, local_runs = [], []
    with tempfile.TemporaryDirectory() as d:
        streamed(url, img.getvalue(), short.getvalue(), Path(d) / "warm.mp4")  # warm-up
        one(pipe, face, wave[:16000], Path(d) / "warm-local.mp4", True)
        for k in range(args.repeats):  # interleaved
            http_runs.append(streamed(url, img.getvalue(), wav.getvalue(), Path(d) / f"http{k}.mp4"))
            local_runs.append(one(pipe, face, wave, Path(d) / f"local{k}.mp4", True))
    serve.shutdown()
    h = {k: statistics.median(r[k] for r in http_runs) for k in http_runs[0]}
    loc = {k: statistics.median(r[k] for r in local_runs) for k in local_runs[0]}
    print(json.dumps({"defaults": info["defaults"], "torch_threads": info["torch_threads"]}))
    print(f"demo model, {args.seconds:g} s audio, 256 px portrait (paste-back), medians of {args.repeats}")
    print(f"HTTP  stream=true: first frame {h['first_frame']:6.2f} s after the POST | done {h['end']:6.2f} s | "
          f"real-time factor {h['end'] / args.seconds:.2f}")
    print(f"local --stream   : first frame {loc['first_frame']:6.2f} s | first clip rendered {loc['first_clip']:5.2f} s"
          f" | done {loc['total']:6.2f} s | real-time factor {loc['total'] / loc['video_s']:.2f}")
    print(f"HTTP first frame / one clip's render: {h['first_frame'] / loc['first_clip']:.2f}")


if __name__ == "__main__":
    main()
