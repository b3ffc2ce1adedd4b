"""Procedural stand-ins for real inputs (no downloads): a drawn portrait and speech-like audio."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def speech_like_audio(seconds: float, seed: int = 0, sample_rate: int = 16000) -> np.ndarray:
    """(samples,) float32: syllable bursts (3-6 Hz) of a voiced tone with varying pitch, and pauses."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    envelope = np.zeros(n)
    pos = 0.0
    while pos < seconds:
        length = rng.uniform(0.12, 0.3)
        if rng.random() < 0.8:  # a syllable; otherwise a pause
            a, b = int(pos * sample_rate), min(n, int((pos + length) * sample_rate))
            envelope[a:b] = np.sin(np.linspace(0, np.pi, b - a)) * rng.uniform(0.5, 1.0)
        pos += length + rng.uniform(0.02, 0.1)
    pitch = 120 + 40 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voiced = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
    return (0.25 * envelope * voiced + 0.005 * rng.standard_normal(n)).astype(np.float32)


def draw_portrait(size: int = 256, seed: int = 0) -> np.ndarray:
    """(size, size, 3) uint8: a simple frontal cartoon face on a plain background."""
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(40, 200, 3))
    skin = tuple(int(v) for v in rng.integers([170, 120, 90], [240, 190, 160]))
    hair = tuple(int(v) for v in rng.integers(10, 120, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    s = size / 256
    d.ellipse([68 * s, 30 * s, 188 * s, 120 * s], fill=hair)
    d.ellipse([78 * s, 50 * s, 178 * s, 200 * s], fill=skin)
    for x in (104, 152):
        d.ellipse([(x - 10) * s, 105 * s, (x + 10) * s, 117 * s], fill=(255, 255, 255))
        d.ellipse([(x - 4) * s, 107 * s, (x + 4) * s, 115 * s], fill=(30, 30, 30))
    d.line([128 * s, 120 * s, 122 * s, 148 * s, 130 * s, 150 * s], fill=(150, 100, 80), width=max(1, int(2 * s)))
    d.ellipse([110 * s, 162 * s, 146 * s, 174 * s], fill=(150, 50, 60))
    return np.asarray(img)
