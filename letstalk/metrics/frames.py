"""Frame-level fidelity against ground truth: PSNR, SSIM (whole frame or a face region), resizing,
and sharpness (variance of the Laplacian), which PSNR and SSIM do not see: a blurred mouth that sits
on the mean of the real ones scores a better PSNR than a sharp one that is a little off.

Frames are uint8 RGB arrays (N, H, W, 3) throughout. SSIM is scikit-image's
`structural_similarity` with the settings of Wang et al. (2004): an 11×11 Gaussian window of
sigma 1.5, population covariances, data range 255, averaged over the three channels; per-frame
values are averaged over the frames of a video.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["check_frame_pair", "resize_frames", "psnr", "ssim", "face_region", "crop_region", "PSNR_CAP", "seam_ratio",
           "laplacian_variance", "sharpness_ratio"]

PSNR_CAP = 100.0  # dB: identical frames have infinite PSNR; tables and MLflow get this instead
MIN_SSIM_SIDE = 11  # the Gaussian window


def _frames(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name}: frames must have shape (N, H, W, 3), got {x.shape}")
    if x.dtype != np.uint8:
        raise ValueError(f"{name}: frames must be uint8, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: no frames")
    return x


def check_frame_pair(generated, target) -> tuple[np.ndarray, np.ndarray]:
    """Validate two frame stacks that are compared frame by frame: same count, same size, uint8 RGB."""
    gen, tgt = _frames(generated, "generated"), _frames(target, "ground truth")
    if gen.shape[0] != tgt.shape[0]:
        raise ValueError(f"frame counts differ: {gen.shape[0]} generated vs {tgt.shape[0]} ground-truth frames")
    if gen.shape[1:3] != tgt.shape[1:3]:
        raise ValueError(f"frame sizes differ: generated {gen.shape[2]}×{gen.shape[1]} vs ground truth "
                         f"{tgt.shape[2]}×{tgt.shape[1]} (resize both to one size first)")
    return gen, tgt


def resize_frames(frames, size: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, size, size, 3) uint8 (bicubic; a no-op at the same size)."""
    frames = _frames(frames, "frames")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if frames.shape[1:3] == (size, size):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.BICUBIC)) for f in frames])


def psnr(generated, target) -> float:
    """Mean over frames of 10·log10(255² / MSE), in dB; identical frames count as `PSNR_CAP`."""
    gen, tgt = check_frame_pair(generated, target)
    mse = ((gen.astype(np.float64) - tgt.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        values = np.where(mse > 0, 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-300)), PSNR_CAP)
    return float(np.minimum(values, PSNR_CAP).mean())


def ssim(generated, target) -> float:
    """Mean over frames of SSIM (scikit-image, Wang et al. settings; see the module docstring)."""
    from skimage.metrics import structural_similarity

    gen, tgt = check_frame_pair(generated, target)
    if min(gen.shape[1:3]) < MIN_SSIM_SIDE:
        raise ValueError(f"frames of {gen.shape[2]}×{gen.shape[1]} are smaller than SSIM's "
                         f"{MIN_SSIM_SIDE}×{MIN_SSIM_SIDE} window")
    values = [structural_similarity(t, g, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False) for g, t in zip(gen, tgt)]
    return float(np.mean(values))


def face_region(size: int, margin: float = 1.8) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the face inside a `size`² crop made by `letstalk.portrait.crop_portrait`.

    That crop is `margin` × the detected face box, centred 0.1 face heights above the face's
    centre, so the face box is the central 1/margin of the side, shifted down by 0.1/margin.
    """
    if not margin >= 1:
        raise ValueError(f"margin must be >= 1, got {margin}")
    side = size / margin
    x0 = (size - side) / 2
    y0 = x0 + 0.1 * side
    box = (round(x0), round(y0), round(x0 + side), round(min(size, y0 + side)))
    return box


def crop_region(frames, box: tuple[int, int, int, int]) -> np.ndarray:
    """(N, H, W, 3) -> (N, y1-y0, x1-x0, 3), the box clipped to the frame; an empty box raises."""
    frames = _frames(frames, "frames")
    h, w = frames.shape[1:3]
    x0, y0, x1, y1 = max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3])
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"region {box} lies outside the {w}×{h} frame")
    return frames[:, y0:y1, x0:x1]


def seam_ratio(videos, clip_len: int) -> float:
    """Temporal seams of clip-by-clip rendering: the mean frame-to-frame change across clip boundaries
    (frame k·clip_len vs the one before it) over the median change within clips, pooled over videos.

    About 1 for seamless video; a model whose clips do not continue each other scores well above it.
    """
    if clip_len < 2:
        raise ValueError(f"clip_len must be >= 2, got {clip_len}")
    boundary, within = [], []
    for i, v in enumerate(videos):
        f = _frames(v, f"video {i}").astype(np.float32)
        d = np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))  # d[t-1] = |f_t - f_{t-1}|
        t = np.arange(1, len(f))
        boundary.append(d[t % clip_len == 0])
        within.append(d[t % clip_len != 0])
    boundary, within = np.concatenate(boundary or [[]]), np.concatenate(within or [[]])
    if boundary.size == 0:
        raise ValueError(f"no clip boundary: the videos must be longer than one clip ({clip_len} frames)")
    median = float(np.median(within)) if within.size else 0.0
    if median <= 1e-6:
        raise ValueError("the frames do not change within clips: a seam ratio is undefined")
    return float(boundary.mean() / median)


_LUMA = np.array([0.299, 0.587, 0.114])


def laplacian_variance(frames, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """(N, H, W, 3) -> (N,) variance of the 4-neighbour Laplacian of the luma inside `box` (the whole
    frame by default), computed over the whole frame so the box's own edges add nothing."""
    frames = _frames(frames, "frames")
    luma = frames.astype(np.float64) @ _LUMA  # (N, H, W)
    lap = np.zeros_like(luma)
    lap[:, 1:-1, 1:-1] = (luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1] + luma[:, 1:-1, :-2] + luma[:, 1:-1, 2:]
                          - 4 * luma[:, 1:-1, 1:-1])
    h, w = luma.shape[1:]
    x0, y0, x1, y1 = box or (0, 0, w, h)
    x0, y0, x1, y1 = max(1, x0), max(1, y0), min(w - 1, x1), min(h - 1, y1)  # where the Laplacian is defined
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"region {box} has no interior pixels in the {w}×{h} frame")
    return lap[:, y0:y1, x0:x1].reshape(len(frames), -1).var(axis=1)


def sharpness_ratio(generated, real, box: tuple[int, int, int, int] | None = None) -> float:
    """Mean Laplacian variance of the generated frames ÷ the real frames' in the same box: 1 as sharp
    as the real footage, below 1 blurred (a box filter of 3 px takes a face to about 0.1-0.3)."""
    real_var = float(laplacian_variance(real, box).mean())
    if real_var <= 1e-9:
        raise ValueError("the real frames are flat in that region: a sharpness ratio is undefined")
    return float(laplacian_variance(generated, box).mean()) / real_var
