"""Speech-like audio for procedural talking faces: syllable bursts in phrases with pauses
(`speech_like_audio`), its per-video-frame loudness (`audio_envelope`), and the zero-phase
Gaussian smoothing (`smooth`) that turns that loudness into a mouth track."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["speech_like_audio", "audio_envelope", "smooth"]


def speech_like_audio(seconds: float, seed: int = 0, sample_rate: int = 16000,
                      pitch: float | None = None) -> np.ndarray:
    """(samples,) float32: speech-like sound — phrases of syllables (about 3-6 per second) with
    pauses between them; each syllable is a voiced tone with a vowel-like spectrum and a gliding
    pitch, some start with a short noisy consonant. `pitch` (Hz) is the speaker's mean pitch
    (default: drawn from the seed)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    if n <= 0:
        return np.zeros(0, np.float32)
    t = np.arange(n) / sample_rate
    base = float(pitch) if pitch is not None else rng.uniform(100, 200)
    envelope = np.zeros(n)
    noise_env = np.zeros(n)
    formant = np.zeros(n)  # brightness of the vowel: shapes the harmonic weights
    pos = rng.uniform(0.05, 0.3)
    while pos < seconds:
        for _ in range(int(rng.integers(2, 9))):  # one phrase
            length = rng.uniform(0.1, 0.3)
            a, b = int(pos * sample_rate), min(n, int((pos + length) * sample_rate))
            if b > a:
                k = np.linspace(0, 1, b - a)
                shape = np.clip(k / 0.2, 0, 1) * np.clip((1 - k) / 0.45, 0, 1)  # quick rise, slow fall
                envelope[a:b] = np.maximum(envelope[a:b], shape ** 1.5 * rng.uniform(0.45, 1.0))
                formant[a:b] = rng.uniform(0, 1)
                if rng.random() < 0.4:  # a consonant burst before the vowel
                    c = min(n, a + int(0.04 * sample_rate))
                    noise_env[a:c] = rng.uniform(0.1, 0.3)
            pos += length + rng.uniform(0.01, 0.08)
            if pos >= seconds:
                break
        pos += rng.uniform(0.25, 0.8)  # a pause between phrases
    glide = 1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 6)) \
        + 0.05 * np.sin(2 * np.pi * rng.uniform(2, 4) * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(base * glide) / sample_rate
    voiced = np.zeros(n)
    for h in range(1, 9):
        if h * base * 1.2 >= sample_rate / 2:
            break
        weight = (1 / h) * (1 + formant * (h in (2, 3)) + (1 - formant) * (h == 1))
        voiced += weight * np.sin(h * phase)
    burst = np.convolve(noise_env, np.ones(40) / 40, mode="same")
    noise = rng.standard_normal(n)
    audio = 0.22 * envelope * voiced / 2.0 + burst * noise * 0.3 + 0.003 * rng.standard_normal(n)
    return np.clip(audio, -1, 1).astype(np.float32)


def audio_envelope(audio: np.ndarray, sample_rate: int = 16000, fps: float = 25) -> np.ndarray:
    """(frames,) float32 in [0, 1]: the RMS loudness of each video frame's slice of `audio`,
    with frames = round(len(audio) / sample_rate * fps). A noise floor is subtracted and the
    result scaled by its 98th percentile (then clipped), so pauses are ~0 and loud syllables ~1.
    Silence gives zeros."""
    audio = np.asarray(audio, np.float64)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if fps <= 0 or sample_rate <= 0:
        raise ValueError("fps and sample_rate must be positive")
    frames = int(round(len(audio) / sample_rate * fps))
    if frames == 0:
        return np.zeros(0, np.float32)
    edges = np.round(np.arange(frames + 1) * sample_rate / fps).astype(np.int64)
    padded = np.zeros(max(int(edges[-1]), len(audio)))
    padded[:len(audio)] = audio
    sq = np.concatenate([[0.0], np.cumsum(padded * padded)])
    counts = np.maximum(np.diff(edges), 1)
    rms = np.sqrt(np.maximum(sq[edges[1:]] - sq[edges[:-1]], 0) / counts)
    floor = max(float(np.percentile(rms, 5)), 1e-4)
    top = float(np.percentile(rms, 98))
    if top <= floor * 1.5:
        return np.zeros(frames, np.float32)
    return np.clip((rms - floor) / (top - floor), 0, 1).astype(np.float32)


def smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Zero-phase Gaussian smoothing (edges padded by repetition)."""
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    return np.convolve(np.pad(x, r, mode="edge"), k, mode="valid")
