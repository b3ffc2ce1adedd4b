"""The speed switches seen from the platform: the Serve render worker batches concurrent renders,
and the Serve app's args and jobs/serve.py refuse bad switches before Ray starts."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from letstalk.synthetic import draw_portrait, speech_like_audio

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def test_render_worker_batches_its_concurrent_renders(bundle):
    from letstalk_platform.render import RenderWorker

    worker = RenderWorker(bundle, inference={"batch_clips": True, "overlap_decode": True, "batch_wait_ms": 1000})
    assert worker.info()["inference"]["batch_clips"] is True
    face = draw_portrait(96, seed=2)
    both_denoising = threading.Barrier(2)

    def render(k):
        first = [True]

        def progress(clips_done, clips_total, fraction):
            if first[0]:
                first[0] = False
                both_denoising.wait()

        return worker.render(face, speech_like_audio(0.3, seed=k), {"steps": 6, "seed": k}, progress=progress)

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(render, range(2)))
    assert all(o["frames"] == 8 and len(o["video"]) > 1000 for o in outs)
    assert worker.pipe.batcher.calls == 12 and worker.pipe.batcher.forwards <= 7


def test_serve_args_and_flags_check_the_switches(bundle, monkeypatch, capsys):
    from pydantic import ValidationError

    from letstalk_platform.serve import AppArgs

    args = AppArgs(model="m", use_gpu=True, inference={"dtype": "fp16", "batch_clips": True, "max_batch": 8})
    assert args.inference["max_batch"] == 8 and args.inference["compile"] == "none"  # filled in
    for bad, words in (({"max_batch": 0}, "max_batch must be"), ({"dtype": "fp16"}, "needs use_gpu"),
                       ({"batch": True}, "unknown inference option")):
        with pytest.raises(ValidationError, match=words):
            AppArgs(model="m", inference=bad)

    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "jobs" / "serve.py"
    spec = importlib.util.spec_from_file_location("job_serve_flags", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    monkeypatch.setenv("LETSTALK_API_TOKEN", "t0k3n-for-the-test")
    assert job.main(["--model", str(bundle), "--batch-clips", "--max-batch", "0"]) == 2  # before Ray starts
    err = capsys.readouterr().err
    assert "max_batch must be an integer >= 1" in err and len(err.strip().splitlines()) == 1
    assert job.main(["--model", str(bundle), "--dtype", "fp16"]) == 2
    assert "needs use_gpu" in capsys.readouterr().err


def test_each_input_is_decoded_once_per_request(bundle, tmp_path, monkeypatch):
    """The HTTP path (the ingress prepares the upload, the renderer renders it), the batch path
    (file bytes to the renderer) and the CLI path (files to the pipeline): every decoder, the face
    detector and the codec's encode run once per request, and the mp4 is written once, in place.
    Paste-back (on by default: the 96 px portrait is larger than the 64 px crop) decodes nothing
    again: the ingress hands the renderer the photo it decoded, already at the video's size."""
    import sys
    from collections import Counter
    from types import SimpleNamespace

    from letstalk import media, portrait
    from letstalk.media import load_video_frames
    from letstalk.pipeline import LetsTalkPipeline
    from letstalk_platform.render import RenderOptions, RenderWorker
    from letstalk_platform.serve_config import AppArgs
    from letstalk_platform.serve_http import ApiError, Ingress

    calls = Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    originals = {"load_image": portrait.load_image, "load_audio": media.load_audio,
                 "detect_face": portrait.detect_face, "crop_portrait": portrait.crop_portrait}
    for module in [m for n, m in sys.modules.items() if n.startswith(("letstalk.", "letstalk_platform."))]:
        for name, fn in originals.items():  # wherever a module holds the function, count its calls
            if getattr(module, name, None) is fn:
                monkeypatch.setattr(module, name, counted(name, fn))

    worker = RenderWorker(bundle)
    monkeypatch.setattr(worker.pipe.codec, "encode", counted("encode", worker.pipe.codec.encode))
    face, speech = tmp_path / "face.png", tmp_path / "speech.wav"
    from PIL import Image
    import soundfile as sf

    Image.fromarray(draw_portrait(96, seed=1)).save(face)
    sf.write(speech, speech_like_audio(0.5, seed=1), 16000)
    once = {"load_image": 1, "load_audio": 1, "detect_face": 1, "crop_portrait": 1, "encode": 1}

    ingress = SimpleNamespace(args=AppArgs(model="unused"))
    prepared = Ingress.func_or_class._prepare(ingress, worker.info(), face.read_bytes(), speech.read_bytes(),
                                              RenderOptions(max_side=80))
    assert prepared.photo.shape == (80, 80, 3)  # scaled to the video's size in the ingress, not in the renderer
    result = worker.render(prepared, None, {"steps": 2, "paste_back": True}, out=tmp_path / "http.mp4")
    assert dict(calls) == once and prepared.num_clips == result["clips"] == 2
    assert result["video"] is None and result["video_path"] == str(tmp_path / "http.mp4")
    assert load_video_frames(tmp_path / "http.mp4").shape == (12, 80, 80, 3) and result["frames"] == 12
    unpasted = Ingress.func_or_class._prepare(ingress, worker.info(), face.read_bytes(), speech.read_bytes(),
                                              RenderOptions(paste_back=False))
    assert unpasted.photo is None  # nothing to paste into: the photo does not travel

    calls.clear()  # the batch path: file bytes, the mp4's bytes back (no folder on this machine given)
    result = worker.render(face.read_bytes(), speech.read_bytes(), {"steps": 2})
    assert dict(calls) == once and result["video_path"] is None and len(result["video"]) > 1000
    assert result["options"]["paste_back"] is True  # auto, decided on the portrait: the result says which

    calls.clear()  # the CLI path
    pipe = LetsTalkPipeline.from_pretrained(bundle)
    monkeypatch.setattr(pipe.codec, "encode", counted("encode", pipe.codec.encode))
    pipe.render_to_file(face, speech, tmp_path / "cli.mp4", steps=2, sampler="ddim", paste_back=None)
    assert dict(calls) == once and load_video_frames(tmp_path / "cli.mp4").shape == (12, 96, 96, 3)

    # limits are a type, not a phrase: over a limit -> 413, anything else unusable -> 400
    small = SimpleNamespace(args=AppArgs(model="unused", max_image_pixels=1000))
    for args, image, status in ((small, face.read_bytes(), 413), (ingress, b"not an image", 400)):
        with pytest.raises(ApiError) as e:
            Ingress.func_or_class._prepare(args, worker.info(), image, speech.read_bytes())
        assert e.value.status == status and e.value.message.startswith("portrait: ")


def test_a_student_bundle_renders_in_its_own_steps_through_the_worker(bundle, tmp_path):
    """The HTTP API and batch jobs render through RenderWorker: a bundle whose pipeline.json says
    ddim 2 (jobs/distill.py's student) renders 2 steps per clip when the request and the deployment
    name none, says so in /v1/model's defaults and in the result; a request's own steps still win."""
    import json
    import shutil

    from letstalk_platform.render import RenderDefaults, RenderWorker

    student = tmp_path / "student"
    shutil.copytree(bundle, student)
    settings = json.loads((student / "pipeline.json").read_text()) | {"sampler": "ddim", "steps": 2}
    (student / "pipeline.json").write_text(json.dumps(settings))
    worker = RenderWorker(student)
    assert worker.info()["defaults"] | {"guidance": 1.0} == {"steps": 2, "sampler": "ddim", "guidance": 1.0}
    fractions = []
    face, speech = draw_portrait(96, seed=2), speech_like_audio(0.3, seed=1)
    out = worker.render(face, speech, {}, progress=lambda done, total, fraction: fractions.append(fraction))
    assert out["options"]["steps"] == 2 and out["options"]["sampler"] == "ddim" and len(fractions) == 2
    assert worker.render(face, speech, {"steps": 3})["options"]["steps"] == 3
    # a deployment's default (user_config) beats the bundle's; the plain bundle renders DDIM-25
    worker.defaults = RenderDefaults(steps=4)
    assert worker.render(face, speech, {})["options"]["steps"] == 4
    assert RenderWorker(bundle).info()["defaults"]["steps"] == 25
