"""`letstalk bundle`: a bundle from the weights users have, with small components of the real layouts
(an AutoencoderKL with LDM-compatible groups, saved as a diffusers folder and as original single
files; a wav2vec2 folder; a transformer folder, a training checkpoint). The full-size SD-VAE and
wav2vec2-base round trip through preprocessing and rendering is tests/platform/test_bundle.py."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from letstalk.artifacts import CheckpointState
from letstalk.audio import tiny_audio_encoder
from letstalk.bundle import BundleError, assemble, load_vae
from letstalk.cli import main
from letstalk.diffusion import ClipTarget
from letstalk.pipeline import LetsTalkPipeline
from letstalk.synthetic import draw_portrait, speech_like_audio
from letstalk.transformer import LetsTalkTransformer
from letstalk.vae import SD_SCALING_FACTOR, LatentCodec

from conftest import ldm_state_dict


def small_vae(latent_channels: int = 4, seed: int = 0) -> AutoencoderKL:
    """SD's VAE layout at small widths (GroupNorm(32), ×4 down): a file in LDM layout can hold it."""
    torch.manual_seed(seed)
    return AutoencoderKL(latent_channels=latent_channels, layers_per_block=1, block_out_channels=(32, 64, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         scaling_factor=SD_SCALING_FACTOR)


def small_transformer(**overrides) -> LetsTalkTransformer:
    torch.manual_seed(1)
    return LetsTalkTransformer.from_preset("tiny", **{"in_channels": 4, "input_size": 8, **overrides})


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("parts")
    vae = small_vae()
    vae.save_pretrained(d / "vae")
    save_file(ldm_state_dict(vae), str(d / "vae-ft-mse.safetensors"))
    tiny_audio_encoder().save_pretrained(d / "wav2vec2")  # 4 layers x 32 features: the tiny preset's
    small_transformer().save_pretrained(d / "transformer")
    return d


def frames(n: int = 2, size: int = 32) -> np.ndarray:
    return np.stack([draw_portrait(size, seed=s) for s in range(n)])


def test_single_file_vaes_load_as_the_folder_does(parts, tmp_path):
    """The original single-file layout (alone, inside a full SD checkpoint, and as a .ckpt) gives
    the folder's VAE: the same tensors, the same latents, SD's scaling factor."""
    folder = load_vae(parts / "vae")
    state = ldm_state_dict(folder.vae)
    full = {f"first_stage_model.{k}": v for k, v in state.items()} | {"model.diffusion_model.out.0.bias": torch.ones(3)}
    save_file(full, str(tmp_path / "v1-5-pruned.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "vae.ckpt")
    x = frames()
    for path in (parts / "vae-ft-mse.safetensors", tmp_path / "v1-5-pruned.safetensors", tmp_path / "vae.ckpt"):
        codec = load_vae(path)
        assert codec.scaling_factor == SD_SCALING_FACTOR and codec.downsample == 4 and codec.latent_channels == 4
        theirs, ours = codec.vae.state_dict(), folder.vae.state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours), path.name
        assert torch.equal(codec.encode(x), folder.encode(x))
    assert load_vae(parts / "vae-ft-mse.safetensors", scaling_factor=0.13025).scaling_factor == 0.13025


def test_broken_single_files_are_named(parts, tmp_path):
    state = ldm_state_dict(load_vae(parts / "vae").vae)
    save_file({k: v for k, v in state.items() if "attn_1.q." not in k}, str(tmp_path / "missing.safetensors"))
    with pytest.raises(BundleError, match=r"missing.safetensors: 4 VAE tensors are not in the file"):
        load_vae(tmp_path / "missing.safetensors")
    save_file({"conv.weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(BundleError, match="not an LDM VAE"):
        load_vae(tmp_path / "other.safetensors")
    save_file({**state, "encoder.conv_in.weight": state["encoder.conv_in.weight"].to(torch.int8)},
              str(tmp_path / "int8.safetensors"))
    with pytest.raises(BundleError, match="dtype torch.int8"):
        load_vae(tmp_path / "int8.safetensors")


def test_bundle_from_a_transformer_folder_renders(parts, tmp_path, capsys):
    """`letstalk bundle` from three folders: a bundle the pipeline loads and renders with, the
    single-file VAE giving the same bundle as the folder one."""
    out = tmp_path / "mine"
    assert main(["bundle", str(out), "--vae", str(parts / "vae-ft-mse.safetensors"),
                 "--audio-encoder", str(parts / "wav2vec2"), "--transformer", str(parts / "transformer")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 32x32 px frames" in printed and "untrained" not in printed
    pipe = LetsTalkPipeline.from_pretrained(out)
    assert pipe.image_size == 32 and pipe.settings.fps == 25 and pipe.settings.prediction == "epsilon"
    assert json.loads((out / "sources.json").read_text())["transformer_kind"] == "transformer folder"
    result = pipe.render(draw_portrait(32, seed=3), speech_like_audio(0.3, seed=0), steps=2, sampler="ddim")
    assert result.frames.shape == (8, 32, 32, 3)
    # the same weights as the folder VAE, which a second bundle takes
    assert main(["bundle", str(tmp_path / "b"), "--vae", str(parts / "vae"), "--audio-encoder", str(parts / "wav2vec2"),
                 "--transformer", str(parts / "transformer")]) == 0
    a, b = pipe.codec.vae.state_dict(), LatentCodec.from_pretrained(tmp_path / "b" / "vae").vae.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bundle_from_a_training_checkpoint_keeps_how_it_was_trained(parts, tmp_path):
    ckpt = tmp_path / "checkpoint_000000500"
    small_transformer().save_pretrained(ckpt / "transformer")
    CheckpointState(step=500, data_position=(1, 2), world_size=2, target=ClipTarget(True, 12.0, "portrait"),
                    prediction="v_prediction").save(ckpt)
    report = assemble(tmp_path / "b", vae=parts / "vae", audio_encoder=parts / "wav2vec2", transformer=ckpt, fps=30)
    assert report.transformer == "training checkpoint, step 500"
    settings = json.loads((tmp_path / "b" / "pipeline.json").read_text())
    assert (settings["prediction"], settings["residual"], settings["residual_scale"], settings["fps"]) == \
        ("v_prediction", True, 12.0, 30)
    # a bundle as --transformer keeps its pipeline.json too (here: swapping nothing)
    assemble(tmp_path / "c", vae=parts / "vae", audio_encoder=parts / "wav2vec2", transformer=tmp_path / "b")
    assert json.loads((tmp_path / "c" / "pipeline.json").read_text()) == settings


def test_a_preset_takes_its_input_sizes_from_the_components(parts, tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["bundle", str(out), "--vae", str(parts / "vae"), "--audio-encoder", str(parts / "wav2vec2"),
                 "--preset", "S", "--image-size", "64"]) == 0
    assert "the transformer is untrained" in capsys.readouterr().out
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["depth"]) == (384, 12)  # preset S
    assert (cfg["in_channels"], cfg["input_size"], cfg["audio_layers"], cfg["audio_feature_dim"]) == (4, 16, 4, 32)


def bundle_error(capsys, *args) -> str:
    """Run `letstalk bundle ...` that must fail: exit 2 and one error line (after any loading bars)."""
    code = main(["bundle", *map(str, args)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("letstalk: error: "), lines
    assert not any("Traceback" in line or "error" in line for line in lines[:-1]), lines
    return lines[-1]


def test_components_that_do_not_fit_are_one_line_errors(parts, tmp_path, capsys):
    """Both shapes named, nothing written."""
    sixteen = tmp_path / "t16"
    small_transformer(in_channels=16).save_pretrained(sixteen)
    out = tmp_path / "out"
    err = bundle_error(capsys, out, "--vae", parts / "vae", "--audio-encoder", parts / "wav2vec2", "--transformer", sixteen)
    assert "the VAE makes 4-channel latents; the transformer takes 16 channels" in err

    wide = tmp_path / "t1024"  # wav2vec2-large's 1024 features, against 768
    small_transformer(audio_layers=2, audio_feature_dim=1024).save_pretrained(wide)
    tiny_audio_encoder(hidden_size=768, num_layers=2).save_pretrained(tmp_path / "w768")
    err = bundle_error(capsys, out, "--vae", parts / "vae", "--audio-encoder", tmp_path / "w768", "--transformer", wide)
    assert "the audio encoder gives 2 layers × 768 features; the transformer takes 2 × 1024" in err

    err = bundle_error(capsys, out, "--vae", parts / "vae", "--audio-encoder", parts / "wav2vec2",
                       "--transformer", parts / "transformer", "--image-size", "64")
    assert "--image-size 64 does not fit" in err and "are 32 px" in err
    err = bundle_error(capsys, out, "--vae", parts / "vae", "--audio-encoder", parts / "wav2vec2", "--preset", "tiny",
                       "--image-size", "36")
    assert "must be a multiple of 8" in err
    err = bundle_error(capsys, out, "--vae", parts / "wav2vec2", "--audio-encoder", parts / "wav2vec2", "--preset", "tiny")
    assert "not an AutoencoderKL" in err
    err = bundle_error(capsys, out, "--vae", parts / "vae", "--audio-encoder", parts / "vae", "--preset", "tiny")
    assert "not wav2vec2" in err
    (tmp_path / "w16k").mkdir()
    tiny_audio_encoder().save_pretrained(tmp_path / "w16k")
    (tmp_path / "w16k" / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 16000}))
    err = bundle_error(capsys, out, "--vae", parts / "vae", "--audio-encoder", tmp_path / "w16k", "--preset", "tiny",
                       "--sample-rate", "22050")
    assert "expects 16000 Hz audio" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written
    out.mkdir()
    err = bundle_error(capsys, out, "--vae", parts / "vae", "--audio-encoder", parts / "wav2vec2", "--preset", "tiny")
    assert "exists" in err
