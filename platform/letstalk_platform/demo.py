"""The whole platform on one machine: data -> Ray Data -> Ray Train + DeepSpeed -> MLflow registry ->
Ray Serve (HTTP + batch) -> evaluation on held-out identities -> a results table and pictures.

    make demo                       # = python jobs/demo.py --out out/demo
    python jobs/demo.py --train-steps 300 --videos 48      # shorter

Each stage reuses what an earlier run finished (the dataset, the shards, a trained run of the same
name); `--fresh` starts over. Everything runs on a local Ray on 127.0.0.1.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from letstalk import metrics
from letstalk.artifacts import InputRecord, ShardManifest
from letstalk.cli import SHIPPED  # the shipped demo model (package data)
from letstalk.clips import ClipSpec
from letstalk.faces import FaceSettings
from letstalk.diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS
from letstalk.media import iter_video_frames, load_video_frames
from letstalk.pipeline import LetsTalkPipeline
from letstalk.synthetic import make_dataset
from letstalk.viz import contact_sheet

from .preprocess import manifest_faces
from .runtime import load_config

REPO = Path(__file__).resolve().parents[2]


class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: str = "out/demo"
    videos: int = Field(96, ge=4, description="procedural videos (one identity each)")
    seconds: float = Field(8.0, gt=0, description="length of each video; the rendered videos are this long")
    size: int = Field(64, ge=32, description="raw video frame size (the model works on 48x48 face crops)")
    seed: int = 0
    preprocess: str = "cluster/preprocess/demo-quick.yaml"
    train: str = "cluster/train/demo-quick.yaml"
    train_steps: int | None = Field(None, ge=1, description="override the train config's steps")
    num_workers: int | None = Field(None, ge=1)
    batch_videos: int = Field(3, ge=1, description="held-out videos rendered by the batch job")
    steps: int = Field(DEFAULT_STEPS, ge=1, description="sampler steps for the renders and the evaluation")
    sampler: str = DEFAULT_SAMPLER
    eval_videos: int = Field(6, ge=2)
    compare: list[str] = Field(default_factory=lambda: [str(SHIPPED)],
                               description="other bundles scored in the same table (skipped if missing)")
    fresh: bool = False


class Stages:
    """Prints "[k/n] name ..." and records seconds per stage."""

    def __init__(self, names: list[str]):
        self.names, self.seconds, self.k = names, {}, 0

    def __call__(self, name: str):
        self.k += 1
        print(f"\n[{self.k}/{len(self.names)}] {name}", flush=True)
        self._name, self._t0 = name, time.perf_counter()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.seconds[self._name] = time.perf_counter() - self._t0
        print(f"    done in {self.seconds[self._name]:.0f} s", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bundle_dir(path: str) -> Path | None:
    """A bundle folder as given, or relative to the repository; None if neither exists."""
    return next((p.resolve() for p in (Path(path), REPO / path) if (p / "pipeline.json").is_file()), None)


def _held_out(manifest: ShardManifest, shards: Path, n: int) -> list[InputRecord]:
    entries = manifest.done("eval")
    if not entries:
        raise ValueError(f"{shards}: no held-out (eval) videos")
    return [entries[k % len(entries)] for k in range(n)]


def _inputs_for(entry: InputRecord, folder: Path) -> tuple[Path, Path]:
    """A held-out video -> its first frame as the portrait (PNG) and its speech (WAV)."""
    import soundfile as sf
    from PIL import Image

    from letstalk.media import load_audio

    vid = entry.video_id
    portrait, audio = folder / f"{vid}.png", folder / f"{vid}.wav"
    if not portrait.is_file():
        frames = iter_video_frames(entry.path)
        Image.fromarray(next(frames)).save(portrait)
        frames.close()
    if not audio.is_file():
        sf.write(audio, load_audio(entry.path, 16000), 16000)
    return portrait, audio


def _http_render(url: str, token: str, portrait: Path, audio: Path, options: dict, out: Path) -> dict:
    import requests

    auth = {"Authorization": f"Bearer {token}"}
    with portrait.open("rb") as p, audio.open("rb") as a:
        r = requests.post(f"{url}/v1/renders", headers=auth, timeout=120,
                          files={"portrait": (portrait.name, p), "audio": (audio.name, a)}, data=options)
    if r.status_code != 202:
        raise RuntimeError(f"HTTP render refused: {r.status_code} {r.text[:300]}")
    return {"id": r.json()["id"], "url": url, "auth": auth, "out": out}


def _http_wait(job: dict) -> dict:
    import requests

    last = -1
    while True:
        st = requests.get(f"{job['url']}/v1/renders/{job['id']}", headers=job["auth"], timeout=60).json()
        done, total = st["progress"]["clips_done"], st["progress"]["clips_total"]
        if done != last:
            print(f"    HTTP job {job['id'][:8]}: {st['status']}, clip {done}/{total}", flush=True)
            last = done
        if st["status"] not in ("queued", "running"):
            break
        time.sleep(0.5)
    if st["status"] != "done":
        raise RuntimeError(f"HTTP render {st['status']}: {st['error']}")
    video = requests.get(f"{job['url']}/v1/renders/{job['id']}/video", headers=job["auth"], timeout=120)
    video.raise_for_status()
    part = job["out"].with_name(f".{job['out'].name}.part")
    part.write_bytes(video.content)
    part.rename(job["out"])
    return st


def mouth_plot(mouth: np.ndarray, envelope: np.ndarray, fps: float, title: str, path: Path) -> None:
    """Mouth opening measured in the rendered frames vs the audio loudness, both standardised."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def z(x):
        return (x - x.mean()) / (x.std() + 1e-8)

    t = np.arange(len(mouth)) / fps
    fig, ax = plt.subplots(figsize=(10, 2.8), dpi=100)
    ax.plot(t, z(envelope[: len(t)]), color="#999999", lw=1.2, label="audio envelope")
    ax.plot(t, z(mouth), color="#c0392b", lw=1.4, label="mouth opening (rendered pixels)")
    ax.set_xlabel("seconds")
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    fig.tight_layout()
    part = path.with_name(f".{path.name}.part.png")
    fig.savefig(part)
    plt.close(fig)
    part.rename(path)


def video_figures(video: Path, entry: InputRecord, spec: ClipSpec, faces: FaceSettings, out: Path) -> dict[str, float]:
    """Contact sheet + mouth-vs-audio plot for one rendered video; returns its own sync figures."""
    from letstalk.clips import decode_video

    from .evaluate import procedural_face

    frames = load_video_frames(video)
    vid = video.stem
    contact_sheet(frames, spec.fps, cols=10, max_frames=40).save(out / f"{vid}_sheet.png")
    decoded = decode_video(entry.path, spec, faces, vad=False)
    face = procedural_face(entry.path, frames.shape[1], decoded.box)
    if face is None:
        return {}
    mouth = metrics.mouth_opening(frames, face)
    env = metrics.sync_envelope(decoded.audio, len(frames), spec.sample_rate, spec.fps)
    gt_mouth = metrics.mouth_opening(metrics.resize_frames(decoded.frames[: len(frames)], frames.shape[1]), face)
    r = metrics.sync_score([mouth], [env])  # control: the same audio shifted by half its length
    r_gt = metrics.sync_score([gt_mouth], [env[: len(gt_mouth)]])
    mouth_plot(mouth, env, spec.fps, f"{vid}: rendered mouth vs audio, r = {r.score:.2f} (shifted-audio control "
                                        f"{r.control:.2f}; ground-truth video {r_gt.score:.2f})", out / f"{vid}_mouth.png")
    return {"sync_r": r.score, "control_r": r.control, "ground_truth_r": r_gt.score, "frames": len(frames),
            "seconds": len(frames) / spec.fps}


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from ray import serve

    from . import batch
    from .evaluate import EvalConfig, evaluate_models
    from .preprocess import PreprocessConfig, run_preprocess
    from .runtime import init_ray
    from .serve import AppArgs, build_app
    from .train import TrainConfig, run_training

    out = Path(cfg.out).resolve()
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    raw, shards, data_bundle = out / "raw", out / "shards", out / "data-bundle"
    mlflow_uri = f"sqlite:///{out / 'mlflow.db'}"
    stages = Stages(["dataset", "preprocess (Ray Data)", "train (Ray Train + DeepSpeed)",
                     "render: HTTP endpoint + batch job (Ray Serve)", "evaluate (held-out identities)", "figures"])
    t_start = time.perf_counter()

    with stages("dataset"):
        make_dataset(raw, videos=cfg.videos, seconds=cfg.seconds, seed=cfg.seed, size=cfg.size, progress=True)
        if not (data_bundle / "pipeline.json").is_file():
            LetsTalkPipeline.init_demo(seed=cfg.seed).save_pretrained(data_bundle)

    init_ray()
    with stages("preprocess (Ray Data)"):
        pcfg = load_config(PreprocessConfig, REPO / cfg.preprocess,
                           {"input": str(raw), "output": str(shards), "model": str(data_bundle)})
        manifest = run_preprocess(pcfg)
        print(f"    {json.dumps(manifest.counts())}")

    with stages("train (Ray Train + DeepSpeed)"):
        overrides = {"data.path": str(shards), "tracking.storage": str(out / "runs"), "tracking.mlflow_uri": mlflow_uri,
                     "steps": cfg.train_steps, "scaling.num_workers": cfg.num_workers}
        tcfg = load_config(TrainConfig, REPO / cfg.train, overrides)
        if cfg.train_steps is not None:
            tcfg = tcfg.model_copy(update={"checkpoint_every": min(tcfg.checkpoint_every, cfg.train_steps)})
        summary = run_training(tcfg)
        model_uri = f"models:/{tcfg.tracking.register_name}@{tcfg.tracking.register_alias}"
        print(f"    {summary['steps']} steps, loss {summary['loss']:.4f}, registered {summary.get('registered')}")

    videos_dir = out / "videos"
    inputs_dir = out / "inputs"
    videos_dir.mkdir(exist_ok=True)
    inputs_dir.mkdir(exist_ok=True)
    spec = manifest.clip_spec
    with stages("render: HTTP endpoint + batch job (Ray Serve)"):
        entries = _held_out(manifest, shards, cfg.batch_videos + 1)
        token, port = secrets.token_urlsafe(24), _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(AppArgs(model=model_uri, mlflow_uri=mlflow_uri, token=token, renderer_cpus=0,
                                    max_jobs_per_replica=2, defaults={"steps": cfg.steps, "sampler": cfg.sampler})),
                  name="letstalk-demo", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        print(f"    Serve app up at {url} (docs: {url}/docs)")
        http_entry = entries[-1]
        portrait, audio = _inputs_for(http_entry, inputs_dir)
        http_video = videos_dir / f"{http_entry.video_id}-http.mp4"
        job = _http_render(url, token, portrait, audio, {"seed": cfg.seed}, http_video)
        rows = []
        for e in entries[:-1]:
            p, a = _inputs_for(e, inputs_dir)
            rows.append({"id": e.video_id, "portrait": str(p), "audio": str(a)})
        manifest_path = inputs_dir / "batch.jsonl"
        manifest_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        items = batch.plan_items(batch.read_manifest(manifest_path), inputs_dir)
        handle = serve.get_deployment_handle("Renderer", app_name="letstalk-demo")
        records = batch.run_batch(items, videos_dir, batch.serve_render(handle), concurrency=1)
        _http_wait(job)
        serve.shutdown()  # the app and Serve itself (its HTTP port was this demo's choice)
        rendered = {r["id"]: Path(r["output"]) for r in records if r["status"] == "done"}
        failed = [r for r in records if r["status"] == "failed"]
        if failed:
            raise RuntimeError(f"batch rows failed: {[(r['id'], r['error']) for r in failed]}")
        rendered[http_video.stem] = http_video
        print(f"    batch: {len(records)} videos (results.parquet in {videos_dir}); HTTP: {http_video.name}")

    with stages("evaluate (held-out identities)"):
        compare = [str(p) for c in cfg.compare for p in [_bundle_dir(c)] if p is not None]
        frames = int(round(cfg.seconds * spec.fps)) - 1
        report = evaluate_models(EvalConfig(models=[model_uri, *compare], data=str(shards), out=str(out / "eval"),
                                            mlflow_uri=mlflow_uri, experiment="letstalk-demo-eval", steps=cfg.steps,
                                            sampler=cfg.sampler, frames=frames, max_videos=cfg.eval_videos,
                                            seed=cfg.seed))

    with stages("figures"):
        by_id = {e.video_id: e for e in entries}
        per_video = {}
        for name, path in rendered.items():
            vid = name.removesuffix("-http")
            per_video[name] = video_figures(path, by_id[vid], spec, manifest_faces(manifest), videos_dir)

    total = time.perf_counter() - t_start
    lines = ["# LetsTalk demo results", "", f"Total {total / 60:.1f} min on this machine. Stages:", ""]
    lines += [f"- {k}: {v:.0f} s" for k, v in stages.seconds.items()]
    lines += ["", f"Model: `{model_uri}` ({summary['steps']} steps, final loss {summary['loss']:.4f}) in "
              f"{mlflow_uri}", "", "## Evaluation", "", report.markdown, "## Rendered videos", ""]
    for name, fig in per_video.items():
        sync = (f"sync r = {fig['sync_r']:.2f}, shifted-audio control {fig['control_r']:.2f}, ground-truth video "
                f"{fig['ground_truth_r']:.2f}; " if fig.get("sync_r") is not None else "")
        lines.append(f"- `videos/{name}.mp4` ({fig.get('seconds', 0):.1f} s): {sync}`videos/{name}_sheet.png`, "
                     f"`videos/{name}_mouth.png`")
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    print("\n" + text)
    return {"seconds": stages.seconds, "total": total, "summary": summary, "rows": report.rows,
            "videos": per_video, "results": str(out / "results.md")}
