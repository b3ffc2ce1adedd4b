"""The learned demo model's pieces: space-to-depth codec, `demo` preset and bundle, x0 clipping,
the training knobs (LR schedule, EMA warmup), and the shipped letstalk/models/demo bundle."""

import json

import numpy as np
import pytest
import torch

from letstalk.cli import SHIPPED, SHIPPED_MODELS
from letstalk.config import LetsTalkConfig
from letstalk.diffusion import ClipTarget, GaussianDiffusion
from letstalk.pipeline import LetsTalkPipeline
from letstalk.training import EMA
from letstalk.vae import LatentCodec, SpaceToDepthCodec, codec_downsample, load_codec, tiny_codec



def test_space_to_depth_codec_is_lossless_and_saves(tmp_path):
    codec = SpaceToDepthCodec(factor=4, scaling_factor=1.0)
    frames = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    lat = codec.encode(frames)
    assert lat.shape == (3, 48, 12, 12) and lat.dtype == torch.float32
    assert lat.abs().max() <= 1.0 and codec.sample_range == 1.0
    assert np.array_equal(codec.decode(lat), frames)
    # channel c·f² + dy·f + dx of latent pixel (i, j) is image pixel (4i + dy, 4j + dx), colour c
    assert lat[1, 2 * 16 + 3 * 4 + 1, 5, 7] == pytest.approx(frames[1, 4 * 5 + 3, 4 * 7 + 1, 2] / 127.5 - 1)
    codec.save_pretrained(tmp_path / "vae")
    for loaded in (LatentCodec.from_pretrained(tmp_path / "vae"), load_codec(tmp_path / "vae")):
        assert isinstance(loaded, SpaceToDepthCodec) and loaded.factor == 4
    assert codec_downsample(tmp_path / "vae") == 4
    with pytest.raises(ValueError, match="multiple of 4"):
        codec.encode(frames[:, :46])
    with pytest.raises(ValueError, match="latents must have shape"):
        codec.decode(lat[:, :47])


def test_autoencoder_codec_still_loads(tmp_path):
    tiny_codec().save_pretrained(tmp_path / "vae")
    codec = LatentCodec.from_pretrained(tmp_path / "vae")
    assert isinstance(codec, LatentCodec) and codec.sample_range is None
    assert codec_downsample(tmp_path / "vae") == 8


def test_demo_bundle_round_trip_and_render(tmp_path):
    cfg = LetsTalkConfig.from_name("demo")
    assert (cfg.input_size, cfg.in_channels, cfg.num_frames) == (12, 48, 8)
    pipe = LetsTalkPipeline.init_demo(seed=0)
    path = pipe.save_pretrained(tmp_path / "demo")
    assert json.loads((path / "vae" / "config.json").read_text())["_class_name"] == "SpaceToDepthCodec"
    loaded = LetsTalkPipeline.from_pretrained(path)
    assert isinstance(loaded.codec, SpaceToDepthCodec) and loaded.image_size == 48
    wave = np.random.default_rng(0).standard_normal(16000 // 2).astype(np.float32) * 0.1  # 0.5 s: 12 frames
    res = loaded.render(np.full((80, 80, 3), 128, np.uint8), wave, steps=2, sampler="ddim")
    assert res.frames.shape == (12, 48, 48, 3)


def test_clip_range_bounds_the_predicted_x0():
    """A model whose ε is far off would leave the data range; clipping x0 keeps the sample inside it."""
    diffusion = GaussianDiffusion(learn_sigma=False)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def bad(x, t):
        return -5 * x  # ε pointing the wrong way: x0 = (x + 5·sqrt(1-ᾱ)·x) / sqrt(ᾱ) explodes

    for sampler in ("ddim", "ddpm"):
        free = diffusion.sample(bad, noise, sampler=sampler, steps=5, generator=torch.Generator().manual_seed(1))
        clipped = diffusion.sample(bad, noise, sampler=sampler, steps=5, clip_range=1.0,
                                   generator=torch.Generator().manual_seed(1))
        assert free.abs().max() > 10
        assert clipped.abs().max() <= 1.0 + 1e-4
    with pytest.raises(ValueError, match="clip_range"):
        diffusion.make_scheduler("ddim", 5, clip_range=0.0)


def test_lr_schedule_and_ema_warmup():
    from letstalk_platform.train import TrainConfig, lr_factor

    cfg = TrainConfig(data={"path": "x"}, steps=1000,
                      optim={"warmup_steps": 100, "schedule": "cosine", "min_lr_ratio": 0.1})
    assert lr_factor(cfg, 0) == pytest.approx(0.01) and lr_factor(cfg, 99) == pytest.approx(1.0)
    assert lr_factor(cfg, 100) == pytest.approx(1.0) and lr_factor(cfg, 1000) == pytest.approx(0.1)
    assert lr_factor(cfg, 550) == pytest.approx(0.55)
    assert lr_factor(TrainConfig(data={"path": "x"}), 10**5) == 1.0  # the defaults: constant, no warmup

    ema = EMA({"w": torch.zeros(2)}, decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.update({"w": torch.ones(2)})  # weight 0.9 on the new value at the first update
    assert torch.allclose(ema.shadow["w"], torch.full((2,), 0.9))
    ema.updates = 10**6
    assert ema.current_decay() == 0.999


@pytest.mark.skipif(not (SHIPPED / "pipeline.json").is_file(), reason="letstalk/models/demo not built yet")
def test_shipped_demo_model_loads_and_fits_the_budget():
    """The shipped models together (the demo model and its student) stay within 20 MiB."""
    size = sum(p.stat().st_size for m in SHIPPED_MODELS.values() for p in m.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, f"letstalk/models is {size / 2**20:.1f} MiB"
    pipe = LetsTalkPipeline.from_pretrained(SHIPPED)
    assert isinstance(pipe.codec, SpaceToDepthCodec) and pipe.image_size == 48
    assert pipe.transformer.cfg == LetsTalkConfig.from_name("demo")


@pytest.mark.skipif(not (SHIPPED / "pipeline.json").is_file(), reason="letstalk/models/demo not built yet")
def test_shipped_demo_model_moves_the_mouth_with_the_audio():
    """The learned part, on identities it never saw (new random draws): rendered from the first frame
    and the video's own audio, the mouth follows the audio (the issue's bar: sync >= 0.5 and >= 0.3
    above the shuffled-audio control)."""
    from letstalk import metrics, synthetic

    pipe = LetsTalkPipeline.from_pretrained(SHIPPED)
    mouths, envs = [], []
    for seed in (101, 202, 303):
        ident = synthetic.Identity.sample(np.random.default_rng(seed))
        frames, audio, _ = synthetic.make_talking_video(ident, seconds=4.0, seed=seed, size=64)
        _, crop = pipe.prepare_portrait(frames[0])
        out = pipe.render(frames[0], audio, steps=10, sampler="ddim").frames  # 13 clips chained by motion frames
        mouths.append(metrics.mouth_opening(out, metrics.ProceduralFace(ident, 64, pipe.image_size, crop.box)))
        envs.append(metrics.sync_envelope(audio, len(out)))
    sync = metrics.sync_score(mouths, envs)
    assert sync.videos == 3
    assert sync.score >= 0.5 and sync.score - sync.control >= 0.3, sync


STUDENT = SHIPPED_MODELS["demo-2step"]


@pytest.mark.skipif(not (STUDENT / "pipeline.json").is_file(), reason="letstalk/models/demo-2step not shipped")
def test_shipped_student_renders_in_two_steps_and_moves_the_mouth():
    """The distilled student (docs/distill.md) on identities it never saw: rendered with no sampler or
    step count named, it takes its own 2 DDIM steps per clip, and the mouth follows the audio as the
    issue's bar asks of the teacher (sync >= 0.5, >= 0.3 above the shuffled-audio control)."""
    from letstalk import metrics, synthetic

    pipe = LetsTalkPipeline.from_pretrained(STUDENT)
    teacher = LetsTalkPipeline.from_pretrained(SHIPPED)
    assert pipe.sampling() == ("ddim", 2) and pipe.transformer.cfg == teacher.transformer.cfg
    assert {k: v for k, v in vars(pipe.settings).items() if k not in ("sampler", "steps")} == \
        {k: v for k, v in vars(teacher.settings).items() if k not in ("sampler", "steps")}
    mouths, envs, steps = [], [], []
    for seed in (101, 202, 303):
        ident = synthetic.Identity.sample(np.random.default_rng(seed))
        frames, audio, _ = synthetic.make_talking_video(ident, seconds=4.0, seed=seed, size=64)
        _, crop = pipe.prepare_portrait(frames[0])
        out = pipe.render(frames[0], audio, progress=lambda done, total: steps.append(total)).frames
        mouths.append(metrics.mouth_opening(out, metrics.ProceduralFace(ident, 64, pipe.image_size, crop.box)))
        envs.append(metrics.sync_envelope(audio, len(out)))
    assert steps[-1] == 2 * 13  # 100 frames: 13 clips of 8 (the last 4), 2 steps each
    sync = metrics.sync_score(mouths, envs)
    assert sync.videos == 3
    assert sync.score >= 0.5 and sync.score - sync.control >= 0.3, sync


def test_strength_starts_from_the_noised_init():
    """strength < 1: only the grid steps at or below strength·T run, starting from x_init noised there."""
    diffusion = GaussianDiffusion(learn_sigma=False)
    init = torch.full((1, 2, 3, 4, 4), 0.5)
    calls = []

    def perfect(x, t):  # knows x0 = init: ε = (x - sqrt(ᾱ)·x0) / sqrt(1 - ᾱ)
        calls.append(int(t[0]))
        ab = torch.as_tensor(diffusion.alphas_cumprod[t.long()], dtype=x.dtype).view(-1, 1, 1, 1, 1)
        return (x - ab.sqrt() * init) / (1 - ab).sqrt()

    out = diffusion.sample(perfect, torch.randn(init.shape), sampler="ddim", steps=10, clip_range=1.0,
                           x_init=init, strength=0.45)
    assert calls == [399, 299, 199, 99]
    assert torch.allclose(out, init, atol=1e-4)
    with pytest.raises(ValueError, match="strength"):
        diffusion.sample(perfect, torch.randn(init.shape), sampler="ddim", steps=10, x_init=init, strength=0.0)


def test_residual_target_is_the_clip_minus_its_portrait():
    from letstalk.training import Augment, prepare_batch

    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 8, 48, 12, 12, generator=g), "audio": torch.randn(2, 12, 4, 32, generator=g),
             "motion": torch.randn(2, 2, 48, 12, 12, generator=g), "refs": torch.randn(2, 1, 48, 12, 12, generator=g)}
    aug = Augment(flip_prob=0.0, audio_dropout=0.0, motion_noise=0.0, motion_ref_prob=0.0)
    plain = prepare_batch(batch, aug, 5)
    res = prepare_batch(batch, aug, 5, target=ClipTarget(residual=True))
    assert torch.equal(plain["x0"], batch["latents"])
    assert torch.allclose(res["x0"], batch["latents"] - batch["refs"][:, 0, None])
    scaled = prepare_batch(batch, aug, 5, target=ClipTarget(residual=True, scale=8.0))
    assert torch.allclose(scaled["x0"], 8.0 * res["x0"])
    # the motion base: the residual to the clip's last motion frame (what the avatar recipe learns)
    moving = prepare_batch(batch, aug, 5, target=ClipTarget(residual=True, base="motion"))
    assert torch.allclose(moving["x0"], batch["latents"] - batch["motion"][:, -1, None])
    no_motion = {**batch, "motion": batch["motion"][:, :0]}  # no motion frames: the portrait again
    assert torch.allclose(prepare_batch(no_motion, aug, 5, target=ClipTarget(True, base="motion"))["x0"], res["x0"])
    with pytest.raises(ValueError, match="residual base"):
        ClipTarget(True, base="previous")


def test_scaled_target_round_trips_and_bounds_its_range():
    g = torch.Generator().manual_seed(0)
    clip, portrait = torch.rand(2, 3, 4, 5, 5, generator=g) * 2 - 1, torch.rand(2, 4, 5, 5, generator=g) * 2 - 1
    for target in (ClipTarget(), ClipTarget(True), ClipTarget(True, 12.0), ClipTarget(False, 0.5)):
        x0 = target.encode(clip, portrait)
        assert torch.allclose(target.decode(x0, portrait), clip, atol=1e-6)
        assert x0.abs().max() <= target.sample_range(1.0)
    assert ClipTarget(True, 12.0).sample_range(1.0) == 24.0 and ClipTarget(True).sample_range(None) is None
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="scale"):
            ClipTarget(True, bad)


@pytest.mark.parametrize("learn_sigma", [False, True])
@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_perfect_v_and_x0_models_recover_x0(learn_sigma, prediction):
    diffusion = GaussianDiffusion(learn_sigma=learn_sigma, prediction=prediction)
    x0 = torch.rand(1, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) - 0.5

    def perfect(x, t):
        ab = torch.as_tensor(diffusion.alphas_cumprod[t.long()], dtype=x.dtype).view(-1, 1, 1, 1, 1)
        v = ab.sqrt() * (x - ab.sqrt() * x0) / (1 - ab).sqrt() - (1 - ab).sqrt() * x0
        v = x0.expand_as(x) if prediction == "sample" else v
        return torch.cat([v, torch.zeros_like(v)], 2) if learn_sigma else v

    def wrong(x, t):  # the other parameterisation's answer: a large loss
        out = perfect(x, t)
        return -out if prediction == "sample" else torch.cat([x0.expand_as(x)] * (2 if learn_sigma else 1), 2)

    assert diffusion.training_losses(wrong, x0, torch.tensor([700]))["mse"].item() > 1e-3

    assert diffusion.training_losses(perfect, x0, torch.tensor([700]))["mse"].item() < 1e-10
    for sampler in ("ddim", "ddpm", "dpm"):
        out = diffusion.sample(perfect, torch.randn(x0.shape), sampler=sampler, steps=20, clip_range=1.0)
        assert torch.allclose(out, x0, atol=1e-4), sampler
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(prediction="x0")


def test_motion_weights_favour_the_moving_pixels_and_average_one():
    from letstalk.training import motion_weights

    x0 = torch.zeros(2, 8, 3, 6, 6)
    x0[:, ::2, :, 4, 2] = 1.0  # one pixel blinks on and off (the "mouth"); the rest is still
    w = motion_weights(x0, 3.0)
    assert w.shape == (2, 1, 1, 6, 6)
    assert torch.allclose(w.mean(dim=(-1, -2)), torch.ones(2, 1, 1))
    assert w[0, 0, 0, 4, 2] > 10 * w[0, 0, 0, 0, 0]
    assert torch.allclose(motion_weights(x0, 0.0), torch.ones_like(w))
    with pytest.raises(ValueError, match="strength"):
        motion_weights(x0, -1.0)
