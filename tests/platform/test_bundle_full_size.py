"""The weights users have, at full size, round-tripped: `letstalk bundle` → `jobs/preprocess.py` →
render. Random weights with the published configurations: Stable Diffusion's VAE (128-256-512-512
channels, 2 resnets per level, 4 latent channels; 83.7 M parameters) saved as a diffusers folder
and as the original single file, and wav2vec2-base-960h (12 layers × 768; a Wav2Vec2ForCTC folder
with its preprocessor_config.json, as the hub has it)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from letstalk.artifacts import ShardManifest
from letstalk.pipeline import LetsTalkPipeline
from letstalk.synthetic import draw_portrait, speech_like_audio

from conftest import ldm_state_dict, talking_video

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    vae = AutoencoderKL(  # stable-diffusion-v1-5/vae/config.json
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)
    vae.save_pretrained(d / "sd-vae")
    save_file(ldm_state_dict(vae), str(d / "vae-ft-mse-840000-ema-pruned.safetensors"))
    del vae
    w2v = Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=32))  # the defaults are wav2vec2-base's
    w2v.save_pretrained(d / "wav2vec2-base-960h")
    (d / "wav2vec2-base-960h" / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "sampling_rate": 16000, "do_normalize": True}))
    return d


def letstalk(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "letstalk.cli", *map(str, args)], capture_output=True, text=True)


def test_full_size_weights_bundle_preprocess_and_render(weights, tmp_path):
    single, folder = tmp_path / "from-single-file", tmp_path / "from-folder"
    made = letstalk("bundle", single, "--vae", weights / "vae-ft-mse-840000-ema-pruned.safetensors",
                    "--audio-encoder", weights / "wav2vec2-base-960h", "--preset", "tiny", "--image-size", "64")
    assert made.returncode == 0, made.stderr[-2000:]
    assert "vae          83.7 M parameters" in made.stdout and "audio        94.4 M parameters" in made.stdout
    assert letstalk("bundle", folder, "--vae", weights / "sd-vae", "--audio-encoder", weights / "wav2vec2-base-960h",
                    "--transformer", single).returncode == 0
    cfg = json.loads((single / "transformer" / "config.json").read_text())
    assert (cfg["in_channels"], cfg["input_size"], cfg["audio_layers"], cfg["audio_feature_dim"]) == (4, 8, 12, 768)
    a, b = (LetsTalkPipeline.from_pretrained(p).codec.vae.state_dict() for p in (single, folder))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    raw = tmp_path / "raw"
    raw.mkdir()
    talking_video(raw / "spk0.mp4", 24, seed=0, identity="spk0")
    shards = tmp_path / "shards"
    job = subprocess.run([sys.executable, str(ROOT / "jobs" / "preprocess.py"), "--input", str(raw), "--output",
                          str(shards), "--model", str(single), "--face-detector", "haar", "--face-crop", "fixed"],
                         capture_output=True, text=True)
    assert job.returncode == 0, job.stderr[-2000:]
    manifest = ShardManifest.load(shards)
    assert manifest.counts()["done"] == 1
    features = manifest.features
    assert (features.latent_channels, features.latent_size, features.audio_layers, features.audio_feature_dim) == \
        (4, 8, 12, 768)

    pipe = LetsTalkPipeline.from_pretrained(folder)
    result = pipe.render(draw_portrait(64, seed=1), speech_like_audio(0.4, seed=0), steps=2, sampler="ddim")
    assert result.frames.shape == (10, 64, 64, 3)
