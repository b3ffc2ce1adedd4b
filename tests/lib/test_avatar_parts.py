"""The avatar recipe's library parts: log-mel audio features (alignment, normalisation, bundle round
trip), the person's PCA space-to-depth codec, the `avatar` bundle and the time-exact video cut."""

import json

import numpy as np
import pytest
import torch


from letstalk.audio import AudioEncoder, LogMelEncoder, mel_filterbank
from letstalk.media import cut_video, load_audio, probe, write_video
from letstalk.pipeline import LetsTalkPipeline
from letstalk.vae import LatentCodec, SpaceToDepthCodec

SR, FPS = 16000, 25


def tone(freq: float, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_mel_filterbank_rows_are_normalised_triangles_in_order():
    bank = mel_filterbank(SR, 512, 40, 55.0, 7600.0).numpy()
    assert bank.shape == (40, 257)
    np.testing.assert_allclose(bank.sum(axis=1), 1.0, rtol=1e-5)
    peaks = bank.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all() and peaks[-1] > peaks[0] + 100  # low to high frequencies


def test_log_mel_puts_a_tone_in_its_bin_and_a_burst_in_its_frames():
    enc = LogMelEncoder(window=5)
    low, high = enc.hidden_states(tone(300, 2.0), 50), enc.hidden_states(tone(3000, 2.0), 50)
    assert low.shape == (50, 1, 80)
    centres = mel_filterbank(SR, 512, 80, 55.0, 7600.0).numpy().argmax(axis=1) * SR / 512  # Hz at each bin's peak
    raw = torch.stft(torch.from_numpy(tone(300, 2.0)), 512, 160, 400, window=torch.hann_window(400),
                     return_complex=True).abs().pow(2)
    assert abs(centres[(enc.model.bank @ raw).mean(dim=1).argmax()] - 300) < 60
    # silence with a burst of noise in frames 20-24 (0.8-1.0 s): those frames are the loud ones
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.002, 2 * SR).astype(np.float32)  # a quiet room
    audio[int(0.8 * SR):int(1.0 * SR)] += rng.normal(0, 0.3, int(0.2 * SR)).astype(np.float32)
    feats = enc.hidden_states(audio, 50)[:, 0].mean(dim=1).numpy()  # mean normalised log-mel per frame
    loud = np.flatnonzero(feats > feats.mean())
    assert loud.min() in (19, 20) and loud.max() in (24, 25)
    # each bin is normalised over the utterance: the level of the recording does not matter
    torch.testing.assert_close(enc.hidden_states(audio * 0.1, 50), enc.hidden_states(audio, 50), atol=0.01, rtol=0)
    assert not torch.allclose(low, high)


def test_log_mel_windows_and_bundle_round_trip(tmp_path):
    enc = LogMelEncoder(n_mels=40, window=9)
    audio = tone(440, 1.0) + tone(2000, 1.0, 0.2)
    windows = enc(audio, 25)
    assert windows.shape == (25, 9, 1, 40)
    torch.testing.assert_close(windows[10, 4], enc.hidden_states(audio, 25)[10])  # the centre of frame 10's window
    enc.save_pretrained(tmp_path / "audio_encoder")
    assert json.loads((tmp_path / "audio_encoder" / "config.json").read_text())["letstalk_audio_features"] == "log_mel"
    loaded = AudioEncoder.from_pretrained(tmp_path / "audio_encoder", window=9)
    assert isinstance(loaded, LogMelEncoder) and (loaded.num_layers, loaded.hidden_size) == (1, 40)
    torch.testing.assert_close(loaded(audio, 25), windows)
    with pytest.raises(ValueError, match="mono"):
        enc.hidden_states(np.zeros((2, 100), np.float32), 4)


def faces(n: int = 12, size: int = 64) -> np.ndarray:
    from letstalk.synthetic import draw_portrait

    return np.stack([np.roll(draw_portrait(size, seed=i % 3), i % 5, axis=0) for i in range(n)])


def test_pca_codec_keeps_the_person_and_round_trips(tmp_path):
    frames = faces()
    codec = SpaceToDepthCodec.fit(frames, factor=4, channels=16)
    lat = codec.encode(frames)
    assert lat.shape == (12, 16, 16, 16) and codec.latent_channels == 16
    eye = torch.eye(16, dtype=torch.float64)  # the stored fp32 basis, multiplied in fp64 (no fp32 sum rounding)
    torch.testing.assert_close(codec.basis.double() @ codec.basis.double().T, eye, atol=1e-6, rtol=0)
    err = codec.decode(lat).astype(float) - frames
    assert 10 * np.log10(255**2 / (err**2).mean()) > 30  # 16 of 48 components of smooth faces
    assert lat.abs().max() <= codec.sample_range
    few = SpaceToDepthCodec.fit(frames, factor=4, channels=2)
    assert ((few.decode(few.encode(frames)).astype(float) - frames) ** 2).mean() > (err**2).mean()
    codec.save_pretrained(tmp_path / "vae")
    loaded = LatentCodec.from_pretrained(tmp_path / "vae")
    torch.testing.assert_close(loaded.encode(frames), lat)
    plain = SpaceToDepthCodec(4)
    assert np.array_equal(plain.decode(plain.encode(frames)), frames) and plain.latent_channels == 48
    # one block per frame (the avatar preset's codec): the frames' own principal components
    eigen = SpaceToDepthCodec.fit(frames, factor=64, channels=8)
    assert eigen.encode(frames).shape == (12, 8, 1, 1)
    torch.testing.assert_close(eigen.basis.double() @ eigen.basis.double().T, torch.eye(8, dtype=torch.float64),
                               atol=1e-6, rtol=0)  # rows of 12288 values: an fp32 product rounds by ~1e-5
    e8 = eigen.decode(eigen.encode(frames)).astype(float) - frames
    e2 = SpaceToDepthCodec.fit(frames, factor=64, channels=2)
    assert ((e2.decode(e2.encode(frames)).astype(float) - frames) ** 2).mean() > (e8**2).mean() * 2
    with pytest.raises(ValueError, match="basis must be"):
        SpaceToDepthCodec(4, basis=torch.zeros(3, 12), mean=torch.zeros(12))


def test_avatar_bundle_saves_and_loads_with_log_mel(tmp_path):
    pipe = LetsTalkPipeline.init_avatar(faces(), seed=0)
    assert pipe.image_size == 64 and pipe.transformer.cfg.audio_window == 9 and pipe.codec.latent_channels == 16
    assert pipe.codec.factor == 4  # 64² crops over the preset's 16² latents
    assert LetsTalkPipeline.init_avatar(faces(size=128), seed=0).codec.factor == 8  # 128² crops: 8×8 blocks
    with pytest.raises(ValueError, match="square crops"):
        LetsTalkPipeline.init_avatar(faces()[:, :, :48], seed=0)
    with pytest.raises(ValueError, match="channels must be 1..12"):
        SpaceToDepthCodec.fit(faces(), factor=64, channels=16)  # 12 frames span at most 12 components
    pipe.save_pretrained(tmp_path / "bundle")
    loaded = LetsTalkPipeline.from_pretrained(tmp_path / "bundle")
    assert isinstance(loaded.audio_encoder, LogMelEncoder)
    torch.testing.assert_close(loaded.codec.basis, pipe.codec.basis)
    ref = loaded.codec.encode(np.full((1, 64, 64, 3), 128, np.uint8))
    clips = list(loaded.iter_clips(ref, tone(200, 0.5), steps=2, sampler="ddim"))
    assert sum(len(c) for c in clips) == 12 and clips[0].shape[1:] == (64, 64, 3)


def test_cut_video_keeps_the_asked_seconds(tmp_path):
    frames = [np.full((32, 32, 3), 10 * (i % 20), np.uint8) for i in range(100)]  # 4 s; frame i is marked by its value
    src = write_video(tmp_path / "src.mp4", frames, 25, tone(300, 4.0))
    tail = cut_video(src, tmp_path / "tail.mp4", start=3.0)
    head = cut_video(src, tmp_path / "head.mp4", seconds=3.0)
    assert abs(probe(head).duration - 3.0) < 0.1 and abs(probe(tail).duration - 1.0) < 0.1
    assert abs(load_audio(tail).size / SR - 1.0) < 0.06
    from letstalk.media import load_video_frames

    first = load_video_frames(tail)[0].mean()
    assert abs(first - 10 * (75 % 20)) < 6  # the cut starts on frame 75
    assert not list(tmp_path.glob(".*part*"))
    from letstalk.media import MediaError

    with pytest.raises(MediaError, match="not found"):
        cut_video(tmp_path / "missing.mp4", tmp_path / "x.mp4")
