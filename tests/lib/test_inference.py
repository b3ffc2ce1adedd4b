"""Inference speed switches (letstalk.accel, letstalk.batching): each one keeps the frames.

The tiny model's adaLN-Zero init makes a fresh transformer output zeros (a render would then not
depend on the network at all), so these tests perturb its weights first.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from letstalk.accel import InferenceOptions, overlapped, sdpa_backend
from letstalk.batching import ClipBatcher
from letstalk.pipeline import LetsTalkPipeline
from letstalk.synthetic import draw_portrait, speech_like_audio

from conftest import live_pipeline

RENDER = {"steps": 3, "sampler": "ddim"}


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture
def pipe():
    return live_pipeline()


@pytest.fixture(scope="module")
def face():
    return draw_portrait(96, seed=1)


@pytest.fixture(scope="module")
def wave():
    return speech_like_audio(0.8, seed=1)  # 20 frames = clips of 8, 8 and 4


def tiny_inputs(batch: int = 1, frames: int = 8, motion: int = 2, seed: int = 0):
    cfg = LetsTalkPipeline.init_tiny().transformer.cfg
    g = torch.Generator().manual_seed(seed)
    s, c = cfg.input_size, cfg.in_channels
    return (torch.randn(batch, frames, c, s, s, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, c, s, s, generator=g),
            torch.randn(batch, frames, cfg.audio_window, cfg.audio_layers, cfg.audio_feature_dim, generator=g),
            torch.randn(batch, motion, c, s, s, generator=g) if motion else None)


# ------------------------------------------------------------------------------ defaults and errors


def test_default_options_leave_the_pipeline_as_it_was(pipe, face, wave):
    before = pipe.render(face, wave, **RENDER).frames
    forward, _ = pipe._forward()
    assert forward == pipe.transformer.forward_with_guidance  # no wrapper, no context: bit-identical by construction
    pipe.set_inference(dtype="bf16", sdpa_backend="math", overlap_decode=True, batch_clips=True)
    assert not np.array_equal(pipe.render(face, wave, **RENDER).frames, before)  # bf16 changed something
    assert pipe.set_inference(InferenceOptions()).is_default and pipe.batcher is None
    np.testing.assert_array_equal(pipe.render(face, wave, **RENDER).frames, before)  # switched back: identical


@pytest.mark.parametrize("options, words", [
    ({"dtype": "fp8"}, "dtype must be one of"),
    ({"sdpa_backend": "cudnn"}, "sdpa_backend must be one of"),
    ({"compile": "max-autotune"}, "compile must be one of"),
    ({"overlap_decode": "yes"}, "overlap_decode must be true or false"),
    ({"max_batch": 0}, "max_batch must be an integer >= 1"),
    ({"batch_wait_ms": -1}, "batch_wait_ms must be"),
    ({"batch_size": 4}, "unknown inference option(s) ['batch_size']"),
])
def test_invalid_options_are_one_line_errors(pipe, options, words):
    with pytest.raises(ValueError) as err:
        pipe.set_inference(options)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert pipe.inference.is_default  # nothing was applied


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusals")
@pytest.mark.parametrize("changes, words", [
    ({"dtype": "fp16"}, "needs a CUDA device"),
    ({"sdpa_backend": "efficient"}, "sdpa_backend 'efficient' has no kernel for fp32 attention on cpu"),
])
def test_options_the_device_cannot_run_are_refused(pipe, changes, words):
    with pytest.raises(ValueError, match=words) as err:
        pipe.set_inference(**changes)
    assert "\n" not in str(err.value) and pipe.inference.is_default


# ------------------------------------------------------------------------------ autocast and SDPA


def test_bf16_autocast_on_cpu_is_close_to_fp32(pipe, face, wave):
    """Stated tolerance: relative L2 error of the denoised latents < 3 %, mean pixel error < 1 level."""
    ref, _ = pipe.prepare_portrait(face)
    feats = pipe.audio_encoder(wave, 20)
    kwargs = dict(steps=3, sampler="ddim", guidance=2.0, seed=0)
    fp32 = torch.cat(list(pipe.denoise_clips(ref, feats, **kwargs)), dim=1)
    frames32 = pipe.render(face, wave, **RENDER).frames
    pipe.set_inference(dtype="bf16")
    bf16 = torch.cat(list(pipe.denoise_clips(ref, feats, **kwargs)), dim=1)
    frames16 = pipe.render(face, wave, **RENDER).frames
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # autocast ran, the sampler stayed fp32
    assert ((bf16 - fp32).norm() / fp32.norm()).item() < 0.03
    assert np.abs(frames16.astype(int) - frames32.astype(int)).mean() < 1.0


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_sdpa_backends_on_cpu_give_the_same_frames(pipe, face, wave, backend):
    ref = pipe.render(face, wave, **RENDER).frames
    pipe.set_inference(sdpa_backend=backend)
    got = pipe.render(face, wave, **RENDER).frames
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_sdpa_scope_keeps_the_flags_while_any_thread_is_inside():
    """torch's sdpa_kernel flags are process-wide: a thread leaving must not restore them for another."""
    assert torch.backends.cuda.math_sdp_enabled()
    inside, leave = threading.Barrier(2), threading.Event()

    def first():
        with sdpa_backend("flash"):
            inside.wait()
            leave.wait()  # leaves while the second thread is still inside

    t = threading.Thread(target=first)
    t.start()
    with sdpa_backend("flash"):
        inside.wait()
        leave.set()
        t.join()
        assert not torch.backends.cuda.math_sdp_enabled()  # still restricted for this thread
    assert torch.backends.cuda.math_sdp_enabled()  # and restored when the last one left


# ------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_compile_wraps_the_blocks_or_the_model_and_can_be_undone(pipe, mode):
    """Dynamo tracing only (backend "eager": no code generation, so this stays fast)."""
    x, t, portrait, audio, motion = tiny_inputs()
    model = pipe.transformer
    with torch.no_grad():
        eager = model(x, t, portrait, audio, motion)
        pipe.set_inference(compile=mode, compile_backend="eager")
        wrapped = [m for m in (model, *model.blocks) if m._compiled_call_impl is not None]
        assert wrapped == ([model] if mode == "full" else list(model.blocks))
        torch.testing.assert_close(model(x, t, portrait, audio, motion), eager, rtol=1e-5, atol=1e-5)
        pipe.set_inference(compile="none")
        assert all(m._compiled_call_impl is None for m in (model, *model.blocks))
        assert torch.equal(model(x, t, portrait, audio, motion), eager)


# ------------------------------------------------------------------------------ decode overlap


def test_overlap_decode_gives_identical_frames_from_a_background_thread(pipe, face, wave):
    ref = pipe.render(face, wave, **RENDER).frames
    threads = []
    decode = pipe.codec.decode

    def spy(latents):
        threads.append(threading.current_thread().name)
        return decode(latents)

    pipe.codec.decode = spy
    pipe.set_inference(overlap_decode=True)
    got = pipe.render(face, wave, **RENDER).frames
    np.testing.assert_array_equal(got, ref)  # three different clips: equal arrays mean the same order
    assert len(threads) == 3 and all(name.startswith("letstalk-decode") for name in threads)


def test_overlap_propagates_errors_from_either_side(pipe, face, wave):
    pipe.set_inference(overlap_decode=True)
    calls = []
    decode = pipe.codec.decode

    def failing(latents):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("decode broke on clip 2")
        return decode(latents)

    pipe.codec.decode = failing
    with pytest.raises(RuntimeError, match="decode broke on clip 2"):
        pipe.render(face, wave, **RENDER)
    pipe.codec.decode = decode

    class Stop(Exception):
        pass

    def stop(done, total):
        if done > 4:  # during clip 2, while clip 1 decodes
            raise Stop("stop")

    with pytest.raises(Stop):
        pipe.render(face, wave, progress=stop, **RENDER)
    assert not [t for t in threading.enumerate() if t.name.startswith("letstalk-decode")]


def test_overlapped_keeps_order_and_waits_for_the_decode_in_flight():
    import time

    seen = []

    def slow(clip):
        time.sleep(0.02 * (3 - int(clip)))  # the first clips take longest
        seen.append(int(clip))
        return int(clip) * 10

    assert list(overlapped((torch.tensor(k) for k in range(4)), slow)) == [0, 10, 20, 30]
    gen = overlapped((torch.tensor(k) for k in range(4)), slow)
    assert next(gen) == 0
    gen.close()  # clip 1 was decoding: close waits for it, and no thread is left
    assert not [t for t in threading.enumerate() if t.name.startswith("letstalk-decode")]


# ------------------------------------------------------------------------------ batching


def test_batcher_merges_concurrent_calls_and_splits_results(pipe):
    model = pipe.transformer
    calls = [tiny_inputs(seed=k) for k in range(4)]
    with torch.no_grad():
        alone = [model.forward_with_guidance(*args, guidance=2.0) for args in calls]
    batcher = ClipBatcher(model.forward_with_guidance, max_batch=4, wait_ms=1000)
    start = threading.Barrier(4)

    def one(args):
        with torch.no_grad(), batcher.session():
            start.wait()  # all four in flight: the group runs as soon as the fourth call arrives
            return batcher(*args, guidance=2.0)

    with ThreadPoolExecutor(4) as pool:
        merged = list(pool.map(one, calls))
    assert (batcher.forwards, batcher.calls) == (1, 4)
    for a, b in zip(alone, merged):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("max_batch, forwards", [(2, 2), (1, 4)])
def test_batcher_respects_max_batch(pipe, max_batch, forwards):
    batcher = ClipBatcher(pipe.transformer.forward_with_guidance, max_batch=max_batch, wait_ms=1000)
    start = threading.Barrier(4)

    def one(seed):
        with torch.no_grad(), batcher.session():
            start.wait()
            return batcher(*tiny_inputs(seed=seed))

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(4)))
    assert (batcher.forwards, batcher.calls) == (forwards, 4)


def test_batcher_keeps_unlike_calls_apart_and_errors_reach_every_caller(pipe):
    model = pipe.transformer
    shapes = [(8, 2), (4, 2), (8, 0), (8, 2)]  # (frames, motion frames): the two (8, 2) calls merge
    batcher = ClipBatcher(model.forward_with_guidance, max_batch=8, wait_ms=300)
    start = threading.Barrier(4)

    def one(k):
        f, m = shapes[k]
        args = tiny_inputs(frames=f, motion=m, seed=k)
        with torch.no_grad():
            start.wait()
            got = batcher(*args)
            torch.testing.assert_close(got, model(*args), rtol=1e-4, atol=1e-5)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(4)))  # no session: each group waits its 300 ms, then runs
    assert (batcher.forwards, batcher.calls) == (3, 4)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    batcher = ClipBatcher(broken, max_batch=2, wait_ms=1000)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(batcher, *tiny_inputs(seed=k)) for k in range(2)]
        for f in futures:
            with pytest.raises(RuntimeError, match="out of memory"):
                f.result()


def test_concurrent_renders_with_batching_match_sequential_renders(pipe, face):
    waves = [speech_like_audio(0.3, seed=k) for k in range(2)]  # 8 frames: one clip each
    kwargs = {"steps": 8, "sampler": "ddim", "guidance": 1.5}
    serial = [pipe.render(face, w, seed=k, **kwargs).frames for k, w in enumerate(waves)]
    pipe.set_inference(batch_clips=True, max_batch=4, batch_wait_ms=1000)
    both_denoising = threading.Barrier(2)

    def render(k):
        first = [True]

        def progress(done, total):
            if first[0]:  # after step 1 both renders are inside their denoising loop
                first[0] = False
                both_denoising.wait()

        return pipe.render(face, waves[k], seed=k, progress=progress, **kwargs).frames

    with ThreadPoolExecutor(2) as pool:
        merged = list(pool.map(render, range(2)))
    b = pipe.batcher
    assert b.calls == 16 and b.forwards <= 9  # at least steps 2-8 ran as one batch of two
    for a, got in zip(serial, merged):
        assert a.shape == got.shape and np.abs(got.astype(int) - a.astype(int)).max() <= 1


# ------------------------------------------------------------------------------ GPU


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["flash", "efficient", "auto"])
def test_half_precision_attention_kernels_on_gpu(face, wave, dtype, backend):
    pipe = live_pipeline(device="cuda")
    ref = pipe.render(face, wave, **RENDER).frames
    pipe.set_inference(dtype=dtype, sdpa_backend=backend)
    got = pipe.render(face, wave, **RENDER).frames
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 1.0


@gpu
def test_overlap_and_batching_on_gpu(face, wave):
    pipe = live_pipeline(device="cuda")
    ref = pipe.render(face, wave, **RENDER).frames
    pipe.set_inference(overlap_decode=True)
    np.testing.assert_array_equal(pipe.render(face, wave, **RENDER).frames, ref)  # decode on its own stream
    pipe.set_inference(batch_clips=True, batch_wait_ms=200)
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda _: pipe.render(face, wave, **RENDER).frames, range(3)))
    assert pipe.batcher.forwards < pipe.batcher.calls
    for g in got:
        assert np.abs(g.astype(int) - ref.astype(int)).max() <= 1


@gpu
def test_regional_compile_on_gpu(face, wave):
    pipe = live_pipeline(device="cuda")
    ref = pipe.render(face, wave, **RENDER).frames
    pipe.set_inference(compile="regional", dtype="bf16")
    got = pipe.render(face, wave, **RENDER).frames
    assert np.abs(got.astype(int) - ref.astype(int)).mean() < 1.0


def test_the_thread_count_leaves_busy_cores_alone():
    """Default threads = usable CPUs that are idle now: a process spinning on all but one of them
    leaves one thread (bench/threads.py: 2 threads beside a busy core took 2.1× as long as 1)."""
    import subprocess
    import sys
    import time

    from letstalk.accel import auto_threads, set_threads, usable_cpus

    usable = usable_cpus()
    if usable < 2:
        pytest.skip("one usable CPU: the count cannot go down")
    before = torch.get_num_threads()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable - 1)]
    try:
        time.sleep(0.5)
        assert auto_threads() == 1
        assert set_threads() == 1 and torch.get_num_threads() == 1
        assert set_threads(2) == 2 and torch.get_num_threads() == 2  # asked for: given
    finally:
        for hog in hogs:
            hog.kill()
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        set_threads(0)
