"""Pictures people would rather look at than read: contact sheets of frames."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def contact_sheet(frames: np.ndarray, fps: float, cols: int = 8, max_frames: int = 32) -> Image.Image:
    """(N, H, W, 3) uint8 -> a grid of up to `max_frames` evenly spaced frames, each labelled with its time."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must have shape (N, H, W, 3) with N >= 1, got {frames.shape}")
    idx = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
    h, w = frames.shape[1:3]
    rows = -(-len(idx) // cols)
    sheet = Image.new("RGB", (cols * w, rows * (h + 14)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, i in enumerate(idx):
        x, y = (k % cols) * w, (k // cols) * (h + 14)
        sheet.paste(Image.fromarray(frames[i]), (x, y))
        draw.text((x + 2, y + h + 1), f"{i / fps:.2f}s", fill=(0, 0, 0))
    return sheet
