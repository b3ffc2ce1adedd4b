"""Paste-back: the generated face crop composited into the full portrait, frame by frame.

The model renders the face-centred square `PortraitCrop.box` of the photo at its own size (48 px for
the demo model, 256 px for the paper's). `PasteBack` scales each generated frame to the box, matches
its colour to the photo along the seam and blends it in with a feathered mask, so the result has the
photo's size and, outside the box, the photo's pixels.

    paste = PasteBack(photo, crop.box, max_side=1280)
    frames = (paste(frame) for frame in generated)   # each (H', W', 3) uint8, H' and W' even

`fit_photo` is PasteBack's own scaling on its own: the HTTP ingress scales a large photo to the video's
size before handing it to a renderer (PasteBack then scales nothing).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

DEFAULT_MAX_SIDE = 1920  # the video's longer side at most, unless a caller says otherwise


def fit_photo(photo: np.ndarray, box: tuple[int, int, int, int], max_side: int = DEFAULT_MAX_SIDE
              ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The photo at the video's size and the crop box in its pixels.

    Args:
        photo: (H, W, 3) uint8 RGB.
        box: (x0, y0, x1, y1) inside it, x1 and y1 exclusive.
        max_side: the longer side at most (>= 16); the photo is only ever scaled down.
    Returns:
        (H', W', 3) uint8 with H', W' even (H.264's 4:2:0 needs them) and the box scaled with it. A
        photo already fitted comes back as it is (the same array, the same box).
    """
    if not (isinstance(photo, np.ndarray) and photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 3):
        raise ValueError("paste-back needs the portrait as an (H, W, 3) uint8 RGB array")
    if max_side < 16:
        raise ValueError(f"max_side must be >= 16, got {max_side}")
    h, w = photo.shape[:2]
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"crop box {box} is not inside the {w}x{h} portrait")
    scale = min(1.0, max_side / max(h, w))
    out_w, out_h = max(2, int(w * scale) // 2 * 2), max(2, int(h * scale) // 2 * 2)
    if (out_w, out_h) == (w, h):
        return photo, tuple(box)
    sx, sy = out_w / w, out_h / h
    photo = np.asarray(Image.fromarray(photo).resize((out_w, out_h), Image.Resampling.LANCZOS))
    box = (round(x0 * sx), round(y0 * sy), max(round(x0 * sx) + 1, round(x1 * sx)),
           max(round(y0 * sy) + 1, round(y1 * sy)))
    return photo, box


class PasteBack:
    """Composite generated crops into `photo` at `box` (x0, y0, x1, y1; the crop's square in the photo).

    `feather`: the blend ramp's width as a fraction of the box side (the mask is 1 in the middle, 0 at
    the box's edges). `max_side`: the output's longer side at most (the photo is scaled down, box
    with it); sides are rounded down to even numbers (H.264's 4:2:0 needs them).
    """

    def __init__(self, photo: np.ndarray, box: tuple[int, int, int, int], *, feather: float = 0.15,
                 max_side: int = DEFAULT_MAX_SIDE):
        if not 0 < feather <= 0.5:
            raise ValueError(f"feather must be in (0, 0.5], got {feather}")
        photo, self.box = fit_photo(photo, box, max_side)
        self.photo = np.ascontiguousarray(photo)
        bx0, by0, bx1, by1 = self.box
        bw, bh = bx1 - bx0, by1 - by0
        ramp = max(1.0, feather * min(bw, bh))

        def edge(n: int) -> np.ndarray:  # 0 at both ends, 1 from `ramp` pixels in
            d = np.minimum(np.arange(n) + 0.5, n - 0.5 - np.arange(n))
            return np.clip(d / ramp, 0.0, 1.0)

        mask = np.outer(edge(bh), edge(bw)).astype(np.float32)
        self.mask = (mask * mask * (3 - 2 * mask))[..., None]  # smoothstep: no visible kink at the ramp's end
        self.seam = (self.mask[..., 0] > 0) & (self.mask[..., 0] < 1)  # where the two meet: colours matched here
        self.region = self.photo[by0:by1, bx0:bx1].astype(np.float32)
        self.size = self.photo.shape[:2]  # (H', W')

    def __call__(self, face: np.ndarray) -> np.ndarray:
        """One generated (s, s, 3) uint8 crop -> the photo-sized (H', W', 3) uint8 frame."""
        bx0, by0, bx1, by1 = self.box
        face = np.asarray(Image.fromarray(face).resize((bx1 - bx0, by1 - by0), Image.Resampling.BICUBIC),
                          dtype=np.float32)
        if self.seam.any():  # shift each channel so the generated face's seam has the photo's mean colour
            face = face + (self.region[self.seam].mean(0) - face[self.seam].mean(0))
        blended = self.region + self.mask * (face - self.region)
        out = self.photo.copy()
        out[by0:by1, bx0:bx1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return out
