"""Renders run in several threads of one Serve replica: shared modules must not mix requests up."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from letstalk.audio import tiny_audio_encoder
from letstalk.cli import SHIPPED
from letstalk.media import load_video_frames
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


# The renders use the shipped demo model (letstalk/models/demo, SHIPPED): what it renders depends on
# the portrait and on the audio. A fresh tiny bundle's transformer outputs exactly 0 (adaLN-Zero): its
# renders of a seed are all the same, so a thread that took another request's input went unseen.
ROUNDS = 3  # concurrent rounds: a race need not show in every one

# four requests of the same length (so their frames compare): each differs from the first in one input
FACES = [draw_portrait(96, seed=s) for s in (4, 5)]
WAVES = [speech_like_audio(0.6, seed=s) for s in (0, 1)]
JOBS = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 1)]  # (portrait, audio, seed)


def check_teeth(frames: list[np.ndarray]) -> None:
    """Another portrait, another audio (same seed) give other frames: a thread that took another
    request's input would show in the comparison with the serial renders."""
    def apart(a, b):
        return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()

    assert apart(frames[0], frames[1]) > 10, "the portrait does not change the render"
    assert apart(frames[0], frames[2]) > 0.2, "the audio does not change the render"


def test_render_worker_threads_match_serial_renders(tmp_path, one_intra_op_thread):
    from letstalk_platform.render import RenderWorker

    worker = RenderWorker(SHIPPED)

    def render(k: int, folder: str) -> np.ndarray:
        face, wave, seed = JOBS[k]
        out = tmp_path / folder / f"{k}.mp4"
        out.parent.mkdir(exist_ok=True)
        result = worker.render(FACES[face], WAVES[wave], {"steps": 3, "seed": seed, "paste_back": False}, out=out)
        assert result["frames"] == 15 and result["options"]["seed"] == seed
        return load_video_frames(out)

    serial = [render(k, "serial") for k in range(len(JOBS))]
    check_teeth(serial)
    for r in range(ROUNDS):
        with ThreadPoolExecutor(len(JOBS)) as pool:
            parallel = list(pool.map(lambda k: render(k, f"threads{r}"), range(len(JOBS))))
        for a, b in zip(serial, parallel):  # the decoded pixels: same frames from serial and threaded renders
            np.testing.assert_array_equal(a, b)

    # the pipeline itself, shared by threads (the frames before encoding)
    from letstalk.pipeline import LetsTalkPipeline

    pipe = LetsTalkPipeline.from_pretrained(SHIPPED)

    def frames(k: int) -> np.ndarray:
        face, wave, seed = JOBS[k]
        return pipe.render(FACES[face], WAVES[wave], steps=3, sampler="ddim", seed=seed).frames

    ref = [frames(k) for k in range(len(JOBS))]
    check_teeth(ref)
    for _ in range(ROUNDS):
        with ThreadPoolExecutor(len(JOBS)) as pool:
            got = list(pool.map(frames, range(len(JOBS))))
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a, b)
