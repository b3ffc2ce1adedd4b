
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from letstalk.audio import AudioEncoder, tiny_audio_encoder, window_indices
from letstalk.media import load_video_frames, probe
from letstalk.pipeline import LetsTalkPipeline

SR = 16000


def speech_like(seconds: float, seed: int = 0, sr: int = SR) -> np.ndarray:
    """Syllable-like bursts of a pitched tone, with pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 6)), 0, None) ** 2
    return (0.3 * envelope * np.sin(2 * np.pi * (140 + 40 * np.sin(2 * np.pi * 0.5 * t)) * t)).astype(np.float32)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle") / "tiny"
    LetsTalkPipeline.init_tiny(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(bundle):
    return LetsTalkPipeline.from_pretrained(bundle)


@pytest.fixture
def portrait(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "portrait.png"
    Image.fromarray(rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("seconds", [1.0, 3.7, 10.0])
def test_audio_features_shape_and_alignment(seconds):
    enc = tiny_audio_encoder()
    frames = round(seconds * 25)
    feats = enc(speech_like(seconds), frames)
    assert feats.shape == (frames, 5, 4, 32)
    # the window of frame i is frames i-2..i+2 clamped: the centre slot is frame i itself
    centre = feats[:, 2]
    assert torch.equal(feats[0, 0], centre[0]) and torch.equal(feats[0, 1], centre[0])  # clamped at the start
    assert torch.equal(feats[5, 4], centre[7]) and torch.equal(feats[-1, 4], centre[-1])
    assert window_indices(3, 5).tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 2], [0, 1, 2, 2, 2]]


def test_audio_features_follow_the_audio_in_time():
    """Silence in the second half of the audio shows up in the second half of the frames."""
    enc = tiny_audio_encoder()
    wave = speech_like(4.0)
    wave[len(wave) // 2:] = 0
    feats = enc(wave, 100)[:, 2, 0]  # (frames, D): layer-1 centre features
    loud, quiet = feats[10:40], feats[60:90]
    assert loud.std(dim=0).mean() > 3 * quiet.std(dim=0).mean()


def test_audio_encoder_save_load(tmp_path):
    enc = tiny_audio_encoder(seed=3)
    enc.save_pretrained(tmp_path)
    wave = speech_like(1.0)
    assert torch.equal(AudioEncoder.from_pretrained(tmp_path)(wave, 25), enc(wave, 25))


def test_bundle_round_trip(bundle, pipe):
    fresh = LetsTalkPipeline.init_tiny(seed=0)
    for a, b in ((fresh.transformer, pipe.transformer), (fresh.codec.vae, pipe.codec.vae),
                 (fresh.audio_encoder.model, pipe.audio_encoder.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert pipe.image_size == 64 and (bundle / "transformer" / "diffusion_pytorch_model.safetensors").exists()


def test_render_length_and_seed(pipe, portrait):
    wave = speech_like(1.3)  # 32.5 -> 32 frames at 25 fps: clips of 8, the last one full
    a = pipe.render(portrait, wave, steps=3, sampler="ddim", seed=1)
    b = pipe.render(portrait, wave, steps=3, sampler="ddim", seed=1)
    c = pipe.render(portrait, wave, steps=3, sampler="ddim", seed=2)
    assert a.frames.shape == (round(1.3 * 25), 64, 64, 3) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames) and not np.array_equal(a.frames, c.frames)
    assert a.face_found is False  # noise has no face: centre crop, reported
    odd = pipe.render(portrait, speech_like(0.9), steps=2, sampler="ddpm", seed=0)  # 22.5 -> 22: last clip of 6
    assert odd.frames.shape[0] == 22


def test_render_to_mp4_matches_the_audio_duration(pipe, portrait, tmp_path):
    seconds = 2.2
    wav = tmp_path / "speech.wav"
    sf.write(wav, np.stack([speech_like(seconds, sr=22050), speech_like(seconds, 1, sr=22050)], 1), 22050)  # stereo
    out = tmp_path / "out.mp4"
    steps = []
    result = pipe.render_to_file(portrait, wav, out, steps=2, sampler="dpm", progress=lambda d, n: steps.append((d, n)))
    info = probe(out)
    frames = load_video_frames(out)
    assert result.num_frames == len(frames) == round(seconds * 25)
    assert info.has_audio and abs(info.duration - seconds) <= 0.1
    assert frames.shape[1:] == (64, 64, 3)
    assert steps[-1] == (2 * 7, 2 * 7)  # 55 frames = 7 clips of 8
    assert {"audio", "denoise", "decode", "mux"} <= result.seconds.keys()


def test_a_streamed_render_is_playable_while_it_renders(pipe, portrait, tmp_path):
    """`stream=True`: a fragmented mp4 at `out` that a decoder reads while later clips are still being
    denoised (all of clip k but at most its last frame by the time clip k + 1 is done); complete and
    the same length at the end. Without `stream`, nothing is at `out` until the end."""
    import re
    import subprocess
    import time

    from letstalk.media import ffmpeg_exe

    wav = tmp_path / "speech.wav"
    sf.write(wav, speech_like(1.5), 16000)

    def decodable(path) -> int:
        run = subprocess.run([ffmpeg_exe(), "-v", "error", "-stats", "-i", str(path), "-map", "0:v", "-f", "null", "-"],
                             capture_output=True, text=True)
        counts = re.findall(r"frame=\s*(\d+)", run.stderr)
        return int(counts[-1]) if run.returncode == 0 and counts else 0

    for stream in (True, False):
        out = tmp_path / f"stream-{stream}.mp4"
        seen: list[tuple[int, int]] = []  # (clips finished, frames decodable then)

        def progress(done, total, out=out, seen=seen, wait=5 if stream else 0):
            if done % 2 == 0 and done < total:  # a clip (2 steps) has just been denoised
                want = 8 * (done // 2 - 1) - 1  # the clips before it, less the frame ffmpeg holds back
                deadline = time.monotonic() + wait
                while (n := decodable(out) if out.exists() else 0) < want and time.monotonic() < deadline:
                    time.sleep(0.05)
                seen.append((done // 2, n))

        result = pipe.render_to_file(portrait, wav, out, steps=2, sampler="ddim", progress=progress, stream=stream)
        assert result.num_frames == len(load_video_frames(out)) == round(1.5 * 25) and probe(out).has_audio
        if stream:
            assert [n for k, n in seen[1:]] and all(n >= 8 * (k - 1) - 1 for k, n in seen), seen
        else:
            assert all(n == 0 for _, n in seen), seen


def test_motion_frames_link_the_clips():
    """Clip 2 sees clip 1 only through its last latents (motion frames)."""
    pipe = LetsTalkPipeline.init_tiny(seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a random "trained-like" model: no zero-initialised paths
        for p in pipe.transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    cfg = pipe.transformer.cfg
    ref = torch.randn(1, 4, 8, 8, generator=g)
    feats_a = torch.randn(2 * cfg.num_frames, 5, 4, 32, generator=g)
    feats_b = feats_a.clone()
    feats_b[: cfg.num_frames] = torch.randn(cfg.num_frames, 5, 4, 32, generator=g)  # change clip 1's audio only

    def clips(feats):
        return list(pipe.denoise_clips(ref, feats, steps=2, sampler="ddim", guidance=1.0, seed=0))

    a, b = clips(feats_a), clips(feats_b)
    assert [c.shape[1] for c in a] == [cfg.num_frames, cfg.num_frames]
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with torch.no_grad():
        for block in pipe.transformer.blocks:  # cut the temporal-attention path
            block.temporal_fc.weight.zero_()
            block.temporal_fc.bias.zero_()
    a, b = clips(feats_a), clips(feats_b)
    assert torch.equal(a[1], b[1])


def test_bad_inputs_are_one_line_errors(pipe, portrait, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="steps must be in 1..1000"):
        next(pipe.iter_clips(portrait, speech_like(0.5), steps=0))
    with pytest.raises(ValueError, match="sampler must be one of"):
        next(pipe.iter_clips(portrait, speech_like(0.5), sampler="heun"))
    with pytest.raises(ValueError, match="too short"):
        pipe.render(portrait, np.zeros(100, np.float32), steps=1)
    with pytest.raises(ValueError):
        pipe.render(text, speech_like(0.5), steps=1)
    with pytest.raises(ValueError):
        pipe.render(portrait, text, steps=1)
    silent = pipe.render(portrait, np.zeros(SR, np.float32), steps=1, sampler="ddim")
    assert silent.frames.shape[0] == 25
    limited = LetsTalkPipeline(pipe.transformer, pipe.codec, pipe.audio_encoder)
    limited.settings.max_audio_seconds = 1.0
    with pytest.raises(ValueError, match="limit"):
        limited.render(portrait, speech_like(2.0), steps=1)


def test_render_reports_a_found_face(pipe):
    data = pytest.importorskip("skimage.data")
    result = pipe.render(data.astronaut(), speech_like(0.2), steps=1, sampler="ddim")
    assert result.face_found is True and result.frames.shape == (5, 64, 64, 3)


def test_a_bundle_renders_with_its_own_sampler_and_steps_unless_told(bundle, portrait, tmp_path):
    """A distilled student's pipeline.json says ddim 2: a render that names nothing takes 2 steps per
    clip (and gives the frames of an explicit ddim-2 render); a named sampler without steps gets
    DDIM-25's default count, not the student's 2; a bundle without them renders DDIM-25."""
    import json
    import shutil

    student = tmp_path / "student"
    shutil.copytree(bundle, student)
    settings = json.loads((student / "pipeline.json").read_text()) | {"sampler": "ddim", "steps": 2}
    (student / "pipeline.json").write_text(json.dumps(settings))
    pipe = LetsTalkPipeline.from_pretrained(student)
    plain = LetsTalkPipeline.from_pretrained(bundle)
    wave = speech_like(0.64)  # 16 frames: 2 clips of 8

    def steps_taken(p, **kwargs):
        seen = []
        frames = p.render(portrait, wave, seed=0, progress=lambda done, total: seen.append(total), **kwargs).frames
        return seen[-1], frames

    total, frames = steps_taken(pipe)
    assert total == 2 * 2 and pipe.sampling() == ("ddim", 2)
    assert np.array_equal(frames, steps_taken(pipe, sampler="ddim", steps=2)[1])
    assert steps_taken(pipe, sampler="dpm")[0] == 2 * 25 and steps_taken(pipe, steps=3)[0] == 2 * 3
    assert steps_taken(plain)[0] == 2 * 25 and plain.sampling() == ("ddim", 25)
