"""Metrics: Fréchet distance against closed forms and a second implementation, SSIM/PSNR against
scikit-image, lip sync on procedural ground truth, feature networks through their real loaders."""

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from letstalk import metrics, synthetic
from letstalk.metrics import frechet_distance, frechet_distance_from_features


# ------------------------------------------------------------------------------ Fréchet distance


def test_frechet_closed_form_on_known_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.2, 3.0, 6), rng.uniform(0.2, 3.0, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # the same covariances in a rotated basis (they commute): the distance does not change
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T) == \
        pytest.approx(expected, rel=1e-7)
    # 1-D: (m1 - m2)² + (s1 - s2)²
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    # samples from two known Gaussians approach the closed form
    x = rng.normal(size=(20000, 3)) * np.sqrt([1.0, 2.0, 0.5])
    y = rng.normal(size=(20000, 3)) * np.sqrt([2.0, 2.0, 1.0]) + [1.0, 0.0, 0.0]
    closed = 1.0 + sum(p + r - 2 * np.sqrt(p * r) for p, r in ((1, 2), (2, 2), (0.5, 1)))
    assert frechet_distance_from_features(x, y) == pytest.approx(closed, abs=0.05)


def test_frechet_matches_scipy_and_torchmetrics_on_random_features():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    fake = rng.normal(size=(250, 16)) @ rng.normal(size=(16, 16)) + 0.3
    mu1, s1, mu2, s2 = real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    ours = frechet_distance_from_features(real, fake)
    assert ours == pytest.approx(reference, rel=1e-8)
    second = float(_compute_fid(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2))))  # eigenvalue route
    assert ours == pytest.approx(second, rel=1e-6)
    assert frechet_distance_from_features(real, real) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance_from_features(fake, real) == pytest.approx(ours, rel=1e-8)
    # fewer samples than dimensions (singular covariances) still gives a finite number
    assert np.isfinite(frechet_distance_from_features(real[:5], fake[:7]))


@pytest.mark.parametrize("real, fake, message", [
    (np.zeros((0, 4)), np.zeros((5, 4)), "empty"),
    (np.zeros((1, 4)), np.zeros((5, 4)), "too few for a covariance"),
    (np.zeros((5, 4)), np.zeros((5, 3)), "dimensions differ"),
    (np.full((5, 4), np.nan), np.zeros((5, 4)), "NaN"),
    (np.zeros(5), np.zeros((5, 4)), "shape"),
])
def test_frechet_bad_input(real, fake, message):
    with pytest.raises(ValueError, match=message) as e:
        frechet_distance_from_features(real, fake)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ SSIM / PSNR


def _noisy_pair(n=3, size=40, seed=0):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 256, (n, size, size, 3)).astype(np.uint8)
    target = np.stack([synthetic.smooth(t.reshape(-1).astype(float), 2).reshape(t.shape) for t in target])
    target = target.clip(0, 255).astype(np.uint8)
    gen = np.clip(target.astype(int) + rng.integers(-30, 31, target.shape), 0, 255).astype(np.uint8)
    return gen, target


def test_ssim_and_psnr_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    from torchmetrics.functional.image import structural_similarity_index_measure

    gen, target = _noisy_pair()
    expected = np.mean([structural_similarity(t, g, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False) for g, t in zip(gen, target)])
    assert metrics.ssim(gen, target) == pytest.approx(expected, abs=1e-9)
    as_tensor = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).double()  # noqa: E731
    assert metrics.ssim(gen, target) == pytest.approx(  # a second implementation, same definition
        float(structural_similarity_index_measure(as_tensor(gen), as_tensor(target), data_range=255.0)), abs=2e-3)
    assert metrics.psnr(gen, target) == pytest.approx(
        np.mean([peak_signal_noise_ratio(t, g, data_range=255) for g, t in zip(gen, target)]), rel=1e-9)
    assert metrics.ssim(target, target) == pytest.approx(1.0)
    assert metrics.psnr(target, target) == metrics.PSNR_CAP
    # worse frames score lower
    worse = np.clip(target.astype(int) + np.random.default_rng(5).integers(-90, 91, target.shape), 0, 255)
    assert metrics.ssim(worse.astype(np.uint8), target) < metrics.ssim(gen, target)


@pytest.mark.parametrize("gen, target, message", [
    (np.zeros((3, 32, 32, 3), np.uint8), np.zeros((4, 32, 32, 3), np.uint8), "frame counts differ: 3 generated vs 4"),
    (np.zeros((3, 32, 32, 3), np.uint8), np.zeros((3, 48, 48, 3), np.uint8), "frame sizes differ"),
    (np.zeros((0, 32, 32, 3), np.uint8), np.zeros((0, 32, 32, 3), np.uint8), "no frames"),
    (np.zeros((2, 32, 32, 3), np.float32), np.zeros((2, 32, 32, 3), np.uint8), "uint8"),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.uint8), "smaller than SSIM"),
])
def test_frame_metrics_bad_input(gen, target, message):
    with pytest.raises(ValueError, match=message):
        metrics.ssim(gen, target)


def test_face_region_is_inside_the_crop():
    x0, y0, x1, y1 = metrics.face_region(256)
    assert 0 < x0 < x1 < 256 and 0 < y0 < y1 <= 256 and x1 - x0 == round(256 / 1.8)
    assert metrics.crop_region(np.zeros((2, 256, 256, 3), np.uint8), (x0, y0, x1, y1)).shape == (2, y1 - y0, x1 - x0, 3)


# ------------------------------------------------------------------------------ lip sync, blinks


@pytest.fixture(scope="module")
def procedural():
    """Six procedural videos rendered in memory: (frames, audio, meta, identity)."""
    out = []
    for i in range(6):
        identity, seed, ident_id = synthetic.dataset_item(3, i)
        frames, audio, meta = synthetic.make_talking_video(identity, 5.0, seed, size=64, identity_id=ident_id)
        out.append((frames, audio, meta, identity))
    return out


def test_sync_is_high_on_ground_truth_and_near_zero_with_mismatched_audio(procedural):
    mouths, envs = [], []
    for frames, audio, meta, identity in procedural:
        face = metrics.ProceduralFace.from_sidecar(meta, size=64)
        m = metrics.mouth_opening(frames, face)
        assert np.allclose(m, synthetic.measure_mouth_open(frames, identity))  # the same measure, uncropped
        mouths.append(m)
        envs.append(metrics.sync_envelope(audio, len(frames)))
    result = metrics.sync_score(mouths, envs)
    assert result.score > 0.9 and result.lag in (1, 2) and result.videos == 6
    assert abs(result.control) < 0.25
    single = metrics.sync_score(mouths[:1], envs[:1])
    assert single.score > 0.85 and abs(single.control) < 0.3
    # a model that ignores the audio: a mouth track from another video scores like the control
    assert metrics.sync_score(mouths[1:] + mouths[:1], envs).score < 0.3
    # a still mouth says nothing: 0, never NaN
    still = metrics.sync_score([np.zeros(50)], [envs[0][:50]])
    assert (still.score, still.videos) == (0.0, 0)


def test_sync_bad_input():
    with pytest.raises(ValueError, match="no videos"):
        metrics.sync_score([], [])
    with pytest.raises(ValueError, match="video 0: 10 mouth frames but 12 audio frames"):
        metrics.sync_score([np.zeros(10)], [np.zeros(12)])
    with pytest.raises(ValueError, match="too short"):
        metrics.sync_score([np.zeros(4)], [np.zeros(4)])


def test_mouth_box_follows_the_face_crop(procedural):
    """A face crop of the video (as preprocessing makes) measures the same mouth as the full frame."""
    from PIL import Image

    frames, _, meta, identity = procedural[0]
    box = (6, 4, 58, 56)  # a 52 px square of the 64 px frame, resized to 48
    crop = np.stack([np.asarray(Image.fromarray(f[4:56, 6:58]).resize((48, 48), Image.Resampling.LANCZOS))
                     for f in frames])
    face = metrics.ProceduralFace.from_sidecar(meta, size=48, crop=box)
    r = np.corrcoef(metrics.mouth_opening(crop, face), synthetic.measure_mouth_open(frames, identity))[0, 1]
    assert r > 0.9
    with pytest.raises(ValueError, match="face layout is for 48×48"):
        metrics.mouth_opening(frames, face)
    with pytest.raises(ValueError, match="not a procedural video"):
        metrics.ProceduralFace.from_sidecar({"identity": "x"}, 64)


def test_blink_count_at_128px():
    found, truth = 0, 0
    for i in range(3):
        identity, seed, _ = synthetic.dataset_item(0, i)
        frames, _, meta = synthetic.make_talking_video(identity, 8.0, seed, size=128)
        face = metrics.ProceduralFace.from_sidecar(meta, size=128)
        found += metrics.count_blinks(metrics.eye_spread(frames, face))
        truth += int(np.count_nonzero(np.diff(np.concatenate([[0], meta["blink"]])) == 1))
    assert truth >= 5 and abs(found - truth) <= 1
    assert metrics.count_blinks(np.ones(30)) == 0


def test_expression_proxy():
    feats = metrics.expression_proxy(np.array([0.0, 0.5, 0.25]))
    assert feats.tolist() == [[0.5, 0.5], [0.25, -0.25]]
    with pytest.raises(ValueError, match="at least 2 frames"):
        metrics.expression_proxy(np.zeros(1))


# ------------------------------------------------------------------------------ feature networks


class TinyInception(nn.Module):
    """The interface of NVlabs' TorchScript Inception: uint8 (N, 3, H, W) -> (N, D) with return_features."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 16, 12)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1)  # (N, 48)
        y = self.proj(x)
        return y if return_features else y.softmax(-1)


class TinyI3D(nn.Module):
    """The interface of the StyleGAN-V TorchScript I3D: (N, 3, T, H, W) in [-1, 1] -> (N, D)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 2 * 4, 10)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        return self.proj(nn.functional.adaptive_avg_pool3d(x, (2, 2, 2)).flatten(1))


def test_feature_networks_load_through_their_real_paths(tmp_path):
    torch.manual_seed(0)
    torch.jit.script(TinyInception()).save(str(tmp_path / "inception.pt"))
    torch.jit.script(TinyI3D()).save(str(tmp_path / "i3d.pt"))
    recon = metrics.FaceReconNet(width=8, blocks=(1, 2, 1, 1), planes=(4, 8, 8, 8)).eval()
    torch.save({"net_recon": recon.state_dict(), "epoch": 20}, tmp_path / "epoch_20.pth")
    torch.jit.trace(recon, torch.rand(1, 3, 224, 224)).save(str(tmp_path / "recon_ts.pt"))

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 32, 32, 3)).astype(np.uint8)
    inception = metrics.load_inception(tmp_path / "inception.pt")
    assert inception(frames).shape == (5, 12)
    i3d = metrics.load_i3d(tmp_path / "i3d.pt")
    assert i3d(rng.integers(0, 256, (3, 16, 24, 24, 3)).astype(np.uint8)).shape == (3, 10)
    with pytest.raises(ValueError, match="16 frames"):
        i3d(np.zeros((2, 8, 24, 24, 3), np.uint8))
    expr = metrics.load_face_recon(tmp_path / "epoch_20.pth")(frames)
    assert expr.shape == (5, 64)
    x = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255, size=224,
                                        mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert np.allclose(expr, recon(x)[:, 80:144].numpy(), atol=1e-5)  # the loaded weights are the saved ones
    assert np.allclose(metrics.load_face_recon(tmp_path / "recon_ts.pt")(frames), expr, atol=1e-5)
    # the full-size layout is ResNet-50's 2048 channels
    assert metrics.FaceReconNet().backbone.out_channels == 2048

    with pytest.raises(ValueError, match="not found"):
        metrics.load_inception(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript I3D"):
        metrics.load_i3d(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="neither TorchScript nor a readable checkpoint"):
        metrics.load_face_recon(tmp_path / "junk.pt")
    torch.save({"net_recon": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a Deep3DFaceRecon"):
        metrics.load_face_recon(tmp_path / "other.pth")


def test_seam_ratio_finds_jumps_at_clip_boundaries():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 100, (1, 32, 32, 3)).astype(np.float32)
    drift = np.arange(40, dtype=np.float32)[:, None, None, None] * 2.0  # a steady change every frame
    smooth = (base + drift).clip(0, 255).astype(np.uint8)
    assert metrics.seam_ratio([smooth], 8) == pytest.approx(1.0, abs=0.05)
    jumpy = (base + drift + 12.0 * (np.arange(40) // 8)[:, None, None, None]).clip(0, 255).astype(np.uint8)
    assert metrics.seam_ratio([jumpy], 8) > 5
    with pytest.raises(ValueError, match="no clip boundary"):
        metrics.seam_ratio([smooth[:8]], 8)
    with pytest.raises(ValueError, match="do not change"):
        metrics.seam_ratio([np.repeat(smooth[:1], 20, axis=0)], 8)


def test_sharpness_ratio_sees_blur_that_psnr_rewards():
    """A mouth blurred towards the mean scores a better PSNR than a sharp, slightly shifted one; the
    sharpness ratio tells them apart (real: 1, blurred: well below 1, shifted sharp: about 1)."""
    import cv2

    from letstalk.synthetic import draw_portrait

    real = np.stack([draw_portrait(96, seed=s) for s in range(4)])
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 2.0) for f in real])
    shifted = np.roll(real, 2, axis=2)
    box = (24, 48, 72, 88)
    assert metrics.sharpness_ratio(real, real, box) == pytest.approx(1.0)
    assert metrics.psnr(blurred, real) > metrics.psnr(shifted, real)
    assert metrics.sharpness_ratio(blurred, real, box) < 0.3
    assert 0.8 < metrics.sharpness_ratio(shifted, real, box) < 1.25
    assert metrics.laplacian_variance(real, box).shape == (4,)
    with pytest.raises(ValueError, match="flat"):
        metrics.sharpness_ratio(real, np.full_like(real, 128), box)
