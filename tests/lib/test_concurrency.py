"""Renders run in several threads of one Serve replica: shared modules must not mix requests up."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from letstalk.audio import tiny_audio_encoder
from letstalk.synthetic import draw_portrait, speech_like_audio


def test_audio_encoder_is_thread_safe():
    enc = tiny_audio_encoder(32, 4, seed=0)
    waves = [speech_like_audio(1.0 + 0.3 * k, seed=k) for k in range(6)]
    serial = [enc(w, 25 + 8 * k) for k, w in enumerate(waves)]
    with ThreadPoolExecutor(6) as pool:
        parallel = list(pool.map(lambda kw: enc(kw[1], 25 + 8 * kw[0]), enumerate(waves)))
    for a, b in zip(serial, parallel):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


def test_render_worker_threads_match_serial_renders(bundle):
    from letstalk_platform.render import RenderWorker

    worker = RenderWorker(bundle)
    face = draw_portrait(96, seed=4)
    jobs = [(speech_like_audio(0.4 + 0.2 * k, seed=k), {"steps": 3, "seed": k}) for k in range(4)]
    serial = [worker.render(face, w, o) for w, o in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda job: worker.render(face, *job), jobs))
    for a, b in zip(serial, parallel):
        assert a["frames"] == b["frames"] and a["options"] == b["options"] and len(b["video"]) > 1000
    # the decoded pixels are what matters: same frames from serial and threaded renders
    from letstalk.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.from_pretrained(bundle)
    ref = [pipe.render(face, w, steps=3, sampler="ddim", seed=o["seed"]).frames for w, o in jobs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda wo: pipe.render(face, wo[0], steps=3, sampler="ddim", seed=wo[1]["seed"]).frames,
                            jobs))
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
