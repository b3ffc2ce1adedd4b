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
    assert all(o.num_frames == 8 and len(o.video) > 1000 for o in outs)
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
