"""Re-voicing: a person's own footage with only the lower face regenerated to match new speech.

The avatar's default mode (docs/avatar.md). Each generated frame sees the real frame it replaces with
the lower face masked out (masked latent + the mask, `condition`), a reference frame of the person and
the audio; the model generates the whole crop and only the masked part is kept: `Composite` blends it
into the footage, at the footage's resolution, with a feathered edge.

The mask is fixed in the face crop (the crops follow the face: letstalk.faces.crop_boxes). It covers
the mouth, jaw, chin and the cheeks beside them, so the mouth cannot be read from the frame: measured
on the MediaPipe landmarks of three real clips, the mouth corners lie at x 0.31-0.71, y 0.56-0.75 of
the crop, the chin reaches y 0.91, the jaw's sides x 0.26-0.75; the nose tip sits at y 0.46-0.63 (the mask
may take the nostrils: on a 16-cell latent grid its top edge falls at y 0.50).

    mask = latent_mask(16)                            # (16, 16) 0/1, the latent cells of LOWER_FACE
    cond = condition(latents, mask)                   # (..., C + 1, 16, 16): what the model sees
    paste = Composite(box_side=512, latent_size=16)   # blends a generated crop's lower face
    frame = paste(real_frame, box, generated_crop)

Footage shorter than the speech is looped back and forth (`pingpong`): frame order reverses at each
end, so no frame follows one it was not next to.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from PIL import Image

# (x0, y0, x1, y1) as fractions of the face crop's side
LOWER_FACE: tuple[float, float, float, float] = (0.20, 0.55, 0.80, 0.96)
# the mouth's box (inside the mask: the mouth corners and lips of real crops lie here)
MOUTH: tuple[float, float, float, float] = (0.30, 0.58, 0.70, 0.86)


def _check_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"mask box {tuple(box)} must be fractions 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1")
    return x0, y0, x1, y1


def latent_mask(size: int, box: Sequence[float] = LOWER_FACE) -> torch.Tensor:
    """(size, size) float 0/1: the latent cells that overlap `box` (crop fractions) are 1 (masked)."""
    if size < 1:
        raise ValueError(f"latent size must be >= 1, got {size}")
    x0, y0, x1, y1 = _check_box(box)
    mask = torch.zeros(size, size)
    r0, r1 = int(np.floor(y0 * size)), int(np.ceil(y1 * size))
    c0, c1 = int(np.floor(x0 * size)), int(np.ceil(x1 * size))
    mask[r0:r1, c0:c1] = 1.0
    return mask


def condition(latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(..., C, h, w) frame latents, (h, w) 0/1 mask -> (..., C + 1, h, w): the latents with the masked
    cells zeroed, then the mask. What the re-voicing transformer sees of the frame it regenerates."""
    if latents.shape[-2:] != mask.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the latents' {tuple(latents.shape[-2:])}")
    m = mask.to(latents.device, latents.dtype)
    keep = latents * (1 - m)
    return torch.cat([keep, m.expand(*latents.shape[:-3], 1, *m.shape)], dim=-3)


def soft_mask(side: int, latent_size: int, box: Sequence[float] = LOWER_FACE, feather: float = 0.06) -> np.ndarray:
    """(side, side) float32 in [0, 1]: where a crop of `side` pixels takes the generated pixels. 1 well inside
    the latent mask, falling smoothly to 0 at its edge over `feather` × side pixels (all inside the mask,
    so no pixel the model did not regenerate is ever taken from it)."""
    if side < 2:
        raise ValueError(f"side must be >= 2, got {side}")
    if not 0 < feather <= 0.25:
        raise ValueError(f"feather must be in (0, 0.25], got {feather}")
    cells = latent_mask(latent_size, box).numpy().astype(np.uint8)
    hard = cv2.resize(cells, (side, side), interpolation=cv2.INTER_NEAREST)
    padded = np.pad(hard, 1)  # the crop's border counts as outside, so the ramp also reaches 0 there
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    ramp = np.clip(dist / max(1.0, feather * side), 0.0, 1.0)
    return (ramp * ramp * (3 - 2 * ramp)).astype(np.float32)  # smoothstep


class Composite:
    """Blend generated crops' lower faces into real frames.

    `__call__(frame, box, generated)`: frame (H, W, 3) uint8, box (x0, y0, x1, y1) the crop's square in
    it, generated (s, s, 3) uint8 the model's crop -> (H, W, 3) uint8, pixels outside the mask exactly
    the frame's. The generated crop is scaled to the box and shifted per channel so that its colour
    along the blend's ramp matches the frame's (no visible seam from a colour offset). `detail` (S, S, 3)
    float32, from `MouthDetail`, is added to the generated crop scaled up to S before it goes into the box.
    """

    def __init__(self, latent_size: int, box: Sequence[float] = LOWER_FACE, feather: float = 0.06):
        self.latent_size, self.box, self.feather = latent_size, _check_box(box), feather
        self._masks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def mask(self, side: int) -> tuple[np.ndarray, np.ndarray]:
        """(side, side, 1) blend weights and the (side, side) bool ramp (0 < weight < 1), cached per side."""
        if side not in self._masks:
            m = soft_mask(side, self.latent_size, self.box, self.feather)
            self._masks[side] = (m[..., None], (m > 0) & (m < 1))
        return self._masks[side]

    def __call__(self, frame: np.ndarray, box: Sequence[int], generated: np.ndarray,
                 detail: np.ndarray | None = None) -> np.ndarray:
        x0, y0, x1, y1 = (int(v) for v in box)
        h, w = frame.shape[:2]
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h) or x1 - x0 != y1 - y0:
            raise ValueError(f"crop box {tuple(box)} is not a square inside the {w}x{h} frame")
        side = x1 - x0
        weight, ramp = self.mask(side)
        region = frame[y0:y1, x0:x1].astype(np.float32)
        if detail is None:
            face = _resize(generated, side)
        else:  # the detail is added at its own size (the footage crops'), then the whole face scaled to the box
            face = _resize(generated, detail.shape[0]) + detail
            if detail.shape[0] != side:
                face = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA if side < detail.shape[0]
                                  else cv2.INTER_CUBIC)
        if ramp.any():
            face = face + (region[ramp].mean(0) - face[ramp].mean(0))
        out = frame.copy()
        out[y0:y1, x0:x1] = np.clip(np.rint(region + weight * (face - region)), 0, 255).astype(np.uint8)
        return out


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    """(h, w, 3) uint8 -> (side, side, 3) float32, bicubic (as the model's crops are made)."""
    if image.shape[0] == side and image.shape[1] == side:
        return image.astype(np.float32)
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC), np.float32)


class MouthDetail:
    """The fine detail of the person's own mouth, for a lower face generated at a small size.

    A model that renders 64-pixel crops cannot draw the lips' edges, teeth and stubble of a 256-pixel
    crop: scaled up, its mouth keeps 4-9 % of the real mouth's Laplacian variance however right its
    shape (docs/avatar.md). The footage has that detail. For each generated crop this finds the footage
    frame whose mouth, at the model's size, looks most like it (sum of squared differences in `key_box`,
    each crop's mean colour removed) and returns that frame's high frequencies: its crop minus
    the crop scaled down to the model's size and back up. Added to the scaled-up generated crop, it
    restores the texture while the shape, the opening and the timing stay the model's. This is the
    retrieval of mouth texture from the person's own footage that Suwajanakorn et al. (2017) used for
    their Obama, on the model's output instead of a landmark sketch.

        detail = MouthDetail(footage_crops, model_size=64)    # crops (N, S, S, 3), S >= 64
        frame = Composite(16)(real_frame, box, generated, detail(generated))

    A frame keeps the previous frame's source while that still matches within `stick` (a fraction of the
    best distance), so the texture does not flicker between look-alikes of a mouth that holds still.
    """

    def __init__(self, crops: np.ndarray, model_size: int, key_box: Sequence[float] = MOUTH, stick: float = 0.05):
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[0] < 1 or crops.shape[1] != crops.shape[2] or crops.shape[3] != 3:
            raise ValueError(f"footage crops must be (N, S, S, 3) square RGB crops, got {crops.shape}")
        if crops.dtype != np.uint8:
            raise ValueError(f"footage crops must be uint8, got {crops.dtype}")
        if not 2 <= model_size <= crops.shape[1]:
            raise ValueError(f"model size must be 2..{crops.shape[1]} (the crops' side), got {model_size}")
        if not 0 <= stick < 1:
            raise ValueError(f"stick must be in [0, 1), got {stick}")
        self.crops, self.model_size, self.stick = crops, model_size, stick
        x0, y0, x1, y1 = _check_box(key_box)
        cells = np.zeros((model_size, model_size), bool)
        cells[int(y0 * model_size):int(np.ceil(y1 * model_size)), int(x0 * model_size):int(np.ceil(x1 * model_size))] = True
        self._where = np.nonzero(cells)
        self._keys = np.stack([self._key(_resize(c, model_size)) for c in crops])  # (N, pixels · 3)
        self._last: int | None = None

    def reset(self) -> None:
        """Forget the previous frame's source (call before a new, unrelated sequence of crops)."""
        self._last = None

    def _key(self, small: np.ndarray) -> np.ndarray:
        region = small[self._where]  # (pixels, 3)
        return (region - region.mean(0)).ravel()

    def nearest(self, generated: np.ndarray) -> int:
        """The index of the footage crop whose lower face best matches `generated` (s, s, 3) uint8."""
        if generated.shape != (self.model_size, self.model_size, 3):
            raise ValueError(f"generated crop must be ({self.model_size}, {self.model_size}, 3), got {generated.shape}")
        d = ((self._keys - self._key(generated.astype(np.float32))) ** 2).sum(1)
        best = int(d.argmin())
        if self._last is not None and d[self._last] <= d[best] * (1 + self.stick):
            best = self._last
        self._last = best
        return best

    def __call__(self, generated: np.ndarray) -> np.ndarray:
        """(s, s, 3) uint8 generated crop -> (S, S, 3) float32 detail to add to it scaled up to S."""
        crop = self.crops[self.nearest(generated)]
        side = crop.shape[0]
        return crop.astype(np.float32) - _resize(_resize(crop, self.model_size).round().clip(0, 255).astype(np.uint8),
                                                 side)


def pingpong(length: int, count: int, start: int = 0) -> np.ndarray:
    """(count,) indices into footage of `length` frames, from `start`, running forward to the end, back
    to the start and so on: consecutive indices always differ by one (by 0 only when length is 1)."""
    if length < 1 or count < 0 or not 0 <= start < length:
        raise ValueError(f"pingpong needs length >= 1, count >= 0 and 0 <= start < length; got {length}, {count}, "
                         f"{start}")
    if length == 1:
        return np.zeros(count, np.int64)
    period = 2 * (length - 1)
    k = (np.arange(count) + start) % period
    return np.where(k < length, k, period - k).astype(np.int64)


__all__ = ["LOWER_FACE", "latent_mask", "condition", "soft_mask", "Composite", "MouthDetail", "pingpong"]
