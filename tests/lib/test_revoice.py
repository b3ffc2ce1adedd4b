"""Re-voicing (letstalk.revoice): the lower-face mask, what the model sees of a frame, the transformer's
condition channels, the training batch, the composite into the footage and the back-and-forth loop."""

import numpy as np
import pytest
import torch

from letstalk.diffusion import ClipTarget, GaussianDiffusion
from letstalk.pipeline import LetsTalkPipeline
from letstalk.revoice import LOWER_FACE, Composite, MouthDetail, condition, latent_mask, pingpong, soft_mask
from letstalk.training import Augment, loss_terms, mask_weights, prepare_batch
from letstalk.transformer import LetsTalkTransformer


def test_latent_mask_covers_the_lower_face_cells_only():
    mask = latent_mask(16)
    rows, cols = np.nonzero(mask.numpy())
    # LOWER_FACE (0.20, 0.55, 0.80, 0.96) on a 16-cell grid: rows 8..15, columns 3..12, nothing else
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (8, 15, 3, 12)
    assert int(mask.sum()) == 8 * 10
    # the mouth corners and the chin measured on real crops (the module docstring) lie inside it
    for x, y in [(0.31, 0.56), (0.71, 0.75), (0.52, 0.91), (0.26, 0.70)]:
        assert mask[int(y * 16), int(x * 16)] == 1
    assert mask[int(0.43 * 16), int(0.37 * 16)] == 0  # an eye stays visible
    with pytest.raises(ValueError, match="fractions"):
        latent_mask(16, (0.5, 0.6, 0.4, 0.9))


def test_condition_hides_the_masked_cells_and_appends_the_mask():
    latents = torch.randn(2, 3, 4, 8, 8)
    mask = latent_mask(8)
    cond = condition(latents, mask)
    assert cond.shape == (2, 3, 5, 8, 8)
    m = mask.bool()
    assert (cond[:, :, :4][..., m] == 0).all()
    torch.testing.assert_close(cond[:, :, :4][..., ~m], latents[..., ~m])
    torch.testing.assert_close(cond[:, :, 4], mask.expand(2, 3, 8, 8))
    # what is under the mask never reaches the model: two frames differing only there condition alike
    other = latents.clone()
    other[..., m] += 5
    torch.testing.assert_close(condition(other, mask), cond)
    with pytest.raises(ValueError, match="does not match"):
        condition(latents, latent_mask(16))


def tiny_revoice_model(seed=0):
    torch.manual_seed(seed)
    return LetsTalkTransformer.from_preset("tiny", cond_channels=5).eval()


def test_the_transformer_reads_its_condition_channels():
    model = tiny_revoice_model()
    for p in model.parameters():  # adaLN-Zero starts every block at the identity: wake them up
        p.data.add_(0.02 * torch.randn_like(p))
    cfg = model.cfg
    x, t = torch.randn(1, 3, 4, 8, 8), torch.tensor([500])
    portrait = torch.randn(1, 4, 8, 8)
    audio = torch.randn(1, 3, cfg.audio_window, cfg.audio_layers, cfg.audio_feature_dim)
    cond = condition(torch.randn(1, 3, 4, 8, 8), latent_mask(8))
    with torch.no_grad():
        out = model(x, t, portrait, audio, cond=cond)
        assert out.shape == (1, 3, 8, 8, 8)
        other = cond.clone()
        other[:, 1, :4] += 1.0  # frame 1's visible part changes
        changed = model(x, t, portrait, audio, cond=other)
        assert not torch.allclose(changed, out)
        guided = model.forward_with_guidance(x, t, portrait, audio, guidance=2.0, cond=cond)
        assert guided.shape == out.shape and not torch.allclose(guided, out)
    with pytest.raises(ValueError, match="cond must have shape"):
        model(x, t, portrait, audio)
    with pytest.raises(ValueError, match="no condition channels"):
        LetsTalkTransformer.from_preset("tiny")(x, t, portrait, audio, cond=cond)


def test_prepare_batch_builds_the_condition_from_the_clip_and_keeps_the_models_motion_frames():
    b, f, c, h = 2, 4, 4, 8
    batch = {"latents": torch.randn(b, f, c, h, h), "audio": torch.randn(b, f + 4, 1, 6),
             "motion": torch.randn(b, 2, c, h, h), "refs": torch.randn(b, 3, c, h, h)}
    mask = latent_mask(h)
    inputs = prepare_batch(batch, Augment(flip_prob=0.0, audio_dropout=0.0, motion_noise=0.0, motion_ref_prob=0.0),
                           5, torch.Generator().manual_seed(0), target=ClipTarget(residual=True, scale=2.0),
                           cond_mask=mask, motion_frames=0)
    torch.testing.assert_close(inputs["cond"], condition(batch["latents"], mask))
    assert inputs["motion"].shape == (b, 0, c, h, h)
    # with no motion frames the residual is taken from the reference frame
    refs = batch["refs"]
    assert any(torch.allclose(inputs["x0"][0] / 2 + refs[0, k], batch["latents"][0], atol=1e-5) for k in range(3))
    plain = prepare_batch(batch, Augment(flip_prob=0.0), 5, torch.Generator().manual_seed(0))
    assert "cond" not in plain and plain["motion"].shape[1] == 2


def test_soft_mask_stays_inside_the_regenerated_cells_and_reaches_one():
    side = 256
    soft = soft_mask(side, 16)
    hard = np.kron(latent_mask(16).numpy(), np.ones((16, 16)))
    assert soft.shape == (side, side) and soft.max() == pytest.approx(1.0)
    assert (soft[hard == 0] == 0).all()  # never takes a pixel the model did not regenerate
    assert ((soft > 0) & (soft < 1)).sum() > 0.1 * (hard == 1).sum()  # a ramp, not a hard edge
    assert soft[int(0.78 * side), side // 2] == 1.0  # the mouth itself comes from the model


def test_composite_changes_only_the_lower_face_and_matches_colour():
    rng = np.random.default_rng(0)
    frame = rng.integers(30, 220, (300, 400, 3), dtype=np.uint8)
    box = (100, 20, 356, 276)  # a 256-pixel square
    paste = Composite(latent_size=16)
    crop = frame[20:276, 100:356]
    # the model's copy of the frame, 20 levels too bright and at the model's 64 px: no seam, no shift
    generated = np.clip(np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(crop).resize((64, 64)),
                                   np.int16) + 20, 0, 255).astype(np.uint8)
    out = paste(frame, box, generated)
    weight = soft_mask(256, 16)
    outside = np.ones(frame.shape[:2], bool)
    outside[20:276, 100:356] = weight == 0
    assert (out[outside] == frame[outside]).all()  # outside the mask: the frame's own pixels, exactly
    inner = out[20:276, 100:356][weight == 1].astype(float)
    assert abs(inner.mean() - crop[weight == 1].mean()) < 3  # the brightness offset is matched away
    # a different mouth comes through where the mask is 1
    mouth = generated.copy()
    mouth[48:60, 24:40] = 0
    dark = paste(frame, box, mouth)[20:276, 100:356]
    y, x = int(0.84 * 256), int(0.5 * 256)
    assert dark[y, x].mean() < out[20:276, 100:356][y, x].mean() - 40
    with pytest.raises(ValueError, match="square inside"):
        paste(frame, (100, 20, 356, 300), generated)


def _small(crop: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.BICUBIC))


def test_mouth_detail_restores_the_footages_texture_from_the_best_matching_mouth():
    """Footage of mouths with fine stripes and a different opening each: a small crop of one (colour-shifted,
    as a model's may be) finds that frame, and its detail brings the composite back to the real frame's
    sharpness and pixels, which the small crop scaled up alone cannot."""
    from letstalk.metrics import sharpness_ratio

    rng = np.random.default_rng(0)
    side, small = 128, 32
    yy, xx = np.mgrid[:side, :side]
    stripes = (40 * np.sin(xx * 1.9) * np.cos(yy * 2.3))[..., None]
    crops = []
    for opening in (4, 10, 16, 22, 28):
        face = np.full((side, side, 3), 150.0) + stripes + rng.normal(0, 3, (side, side, 3))
        face[88 - opening // 2:88 + opening // 2, 48:80] = 30  # the mouth: a dark gap, taller when open
        crops.append(np.clip(face, 0, 255).astype(np.uint8))
    crops = np.stack(crops)
    detail = MouthDetail(crops, small)
    real = crops[3]
    generated = np.clip(_small(real, small).astype(int) + 6, 0, 255).astype(np.uint8)
    assert detail.nearest(generated) == 3
    paste, box = Composite(8), (0, 0, side, side)
    plain, sharp = paste(real, box, generated), paste(real, box, generated, detail(generated))
    m = soft_mask(side, 8) == 1
    err = lambda x: np.abs(x.astype(int) - real.astype(int))[m].mean()  # noqa: E731
    assert err(sharp) < 0.3 * err(plain)
    mouth = (48, 72, 80, 104)
    assert sharpness_ratio(plain[None], real[None], mouth) < 0.5 < 0.8 < sharpness_ratio(sharp[None], real[None], mouth)
    # a mouth that holds still keeps its source frame; reset forgets it
    detail.reset()
    assert [detail.nearest(_small(crops[i], small)) for i in (1, 1, 4)] == [1, 1, 4]
    with pytest.raises(ValueError, match="generated crop must be"):
        detail(generated[:16])
    with pytest.raises(ValueError, match="square RGB"):
        MouthDetail(crops[:, :, :100], small)
    with pytest.raises(ValueError, match="model size"):
        MouthDetail(crops, 256)


def test_mask_weights_put_the_loss_on_the_regenerated_lower_face():
    mask = latent_mask(8)
    cond = condition(torch.randn(2, 3, 4, 8, 8), mask)
    w = mask_weights(cond, 0.1)
    assert w.shape == (2, 3, 1, 8, 8) and torch.allclose(w.mean(dim=(-1, -2)), torch.ones(2, 3, 1))
    inside, outside = w[0, 0, 0][mask.bool()], w[0, 0, 0][~mask.bool()]
    assert torch.allclose(inside / outside.mean(), torch.full_like(inside, 10.0))
    assert torch.allclose(mask_weights(cond, 1.0), torch.ones_like(w))
    with pytest.raises(ValueError, match="unmasked weight"):
        mask_weights(cond, 1.5)

    # the training loss with weight 0 outside the mask ignores errors there (a model that predicts x0 = 0:
    # its error is the clip itself)
    def zeros(x, t, portrait, audio, motion, cond=None):
        return torch.zeros_like(x)

    x0 = torch.randn(2, 3, 4, 8, 8)
    inputs = {"x0": x0, "portrait": None, "audio": None, "motion": None, "cond": condition(x0, mask)}
    diffusion = GaussianDiffusion(learn_sigma=False, prediction="sample")

    def mse(x0, **kw):
        return loss_terms(zeros, diffusion, dict(inputs, x0=x0), torch.Generator().manual_seed(0), **kw)["mse"]

    louder_outside = torch.where(mask.bool(), x0, 3 * x0)
    assert torch.allclose(mse(x0, unmasked_weight=0.0), mse(louder_outside, unmasked_weight=0.0))
    assert mse(louder_outside) > 3 * mse(x0)
    assert mse(louder_outside, unmasked_weight=0.1) < 0.5 * mse(louder_outside)


def test_pingpong_loops_footage_back_and_forth_without_a_jump():
    idx = pingpong(5, 20)
    assert idx[:10].tolist() == [0, 1, 2, 3, 4, 3, 2, 1, 0, 1]
    assert (np.abs(np.diff(idx)) == 1).all()
    assert set(idx.tolist()) == set(range(5))
    assert pingpong(5, 3, start=4).tolist() == [4, 3, 2]
    assert pingpong(1, 3).tolist() == [0, 0, 0]
    assert pingpong(7, 0).shape == (0,)
    with pytest.raises(ValueError, match="pingpong"):
        pingpong(0, 3)


def test_a_revoice_bundle_renders_over_footage_and_refuses_without_it(tmp_path):
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 255, (40, 64, 64, 3), dtype=np.uint8)
    pipe = LetsTalkPipeline.init_avatar(crops, preset="avatar-revoice")
    assert pipe.revoices and pipe.transformer.cfg.cond_channels == pipe.transformer.cfg.in_channels + 1
    pipe.save_pretrained(tmp_path / "bundle")
    pipe = LetsTalkPipeline.from_pretrained(tmp_path / "bundle")
    assert pipe.revoices
    audio = rng.normal(0, 0.1, 16000).astype(np.float32)  # 1 s: 25 frames
    clips = list(pipe.iter_revoice(crops[:11], audio, crops[0], steps=2, sampler="ddim"))
    assert [c.shape for c in clips] == [(8, 64, 64, 3), (3, 64, 64, 3)]
    with pytest.raises(ValueError, match="fewer than the 40 footage frames"):
        next(pipe.iter_revoice(crops, audio[:8000], crops[0], steps=2, sampler="ddim"))
    with pytest.raises(ValueError, match="renders over footage"):
        next(pipe.iter_clips(pipe.codec.encode(crops[:1]), audio, steps=2, sampler="ddim"))
    plain = LetsTalkPipeline.init_avatar(crops)
    with pytest.raises(ValueError, match="does not re-voice"):
        next(plain.iter_revoice(crops[:4], audio, crops[0], steps=2))


def test_render_avatar_speaks_over_the_bundles_own_footage_looping_it(tmp_path, capsys):
    """`letstalk render --avatar BUNDLE speech.wav`: the footage travels in the bundle; the video has the
    footage's size and the speech's length (footage looped back and forth), and outside the lower face it
    is the footage itself."""
    import subprocess
    import sys

    from conftest import DRAWN_FACES, ROOT, talking_video
    from letstalk.faces import FaceSettings
    from letstalk.footage import add_footage, load_footage
    from letstalk.media import load_video_frames, probe
    from letstalk.synthetic import speech_like_audio
    import soundfile as sf

    video = talking_video(tmp_path / "me.mp4", frames=30, seed=3, size=128) or tmp_path / "me.mp4"
    footage = load_footage(video, FaceSettings(**DRAWN_FACES))
    assert len(footage) == 30 and footage.frames.shape[1:] == (128, 128, 3) and footage.crops.shape[1:] == (256, 256, 3)
    pipe = LetsTalkPipeline.init_avatar(footage.crops[:, ::4, ::4].copy(), preset="avatar-revoice")
    bundle = pipe.save_pretrained(tmp_path / "avatar")
    add_footage(bundle, video, DRAWN_FACES)
    sf.write(tmp_path / "speech.wav", speech_like_audio(2.0, seed=1), 16000)  # 50 frames: longer than the footage
    out = tmp_path / "talk.mp4"
    run = subprocess.run([sys.executable, "-m", "letstalk.cli", "render", "--avatar", str(bundle),
                          str(tmp_path / "speech.wav"), "-o", str(out), "--steps", "1", "--sampler", "ddim"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "looped back and forth" in run.stdout
    info = probe(out)
    assert (info.width, info.height, info.has_audio) == (128, 128, True) and abs(info.duration - 2.0) < 0.1
    frames = load_video_frames(out)
    assert len(frames) == 50
    real = load_video_frames(video)
    order = pingpong(30, 50)
    top = slice(0, 40)  # the crop's top rows (eyes, forehead): never regenerated
    err = np.abs(frames[:, top].astype(int) - real[order][:, top].astype(int)).mean()
    shifted = np.abs(frames[:, top].astype(int) - real[np.roll(order, 7)][:, top].astype(int)).mean()
    assert err < 4 and err < shifted  # frame k is footage frame order[k] up there
    # without the footage's mouth detail: the same video above the mask, another below it
    from letstalk.cli import main

    bare_out = tmp_path / "talk-plain.mp4"
    assert main(["render", "--avatar", str(bundle), str(tmp_path / "speech.wav"), "-o", str(bare_out), "--steps", "1",
                 "--sampler", "ddim", "--no-mouth-detail"]) == 0
    without = load_video_frames(bare_out)
    lower = (slice(None), slice(80, 118), slice(40, 88))  # inside the lower-face mask of the 128-px footage's crops
    assert np.abs(without[:, top].astype(int) - frames[:, top].astype(int)).mean() < 1.5
    assert np.abs(without[lower].astype(int) - frames[lower].astype(int)).mean() > 1.5
    # one line, no traceback, for an avatar bundle without footage or a portrait bundle given as --avatar
    bare = pipe.save_pretrained(tmp_path / "bare")
    assert main(["render", "--avatar", str(bare), str(tmp_path / "speech.wav"), "-o", str(out)]) == 2
    assert "holds no footage" in capsys.readouterr().err
    assert main(["render", "--avatar", str(bundle), "x.png", str(tmp_path / "speech.wav"), "-o", str(out)]) == 2
    assert "speech audio alone" in capsys.readouterr().err
    plain = LetsTalkPipeline.init_avatar(footage.crops[:, ::4, ::4].copy()).save_pretrained(tmp_path / "plain")
    assert main(["render", "--avatar", str(plain), str(tmp_path / "speech.wav"), "-o", str(out)]) == 2
    assert "not a re-voicing avatar" in capsys.readouterr().err
