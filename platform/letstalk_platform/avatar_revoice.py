"""The re-voicing avatar's held-out measures (jobs/avatar.py --mode revoice, docs/avatar.md).

Two renders of the held-out audio, each composited into the footage's 256-pixel crops with the feathered
lower-face mask (letstalk.revoice.Composite), and each against a render of other speech:

- re-voice: the held-out audio over the *training* footage (looped back and forth if shorter). Its mouth
  aperture against the real held-out mouth is `mouth_r`; `mouth_r_control` is the larger of the same
  render against the real track shifted by half its length, and the other speech's render against the
  real track.
- dubbing: the held-out frames themselves, lower face masked, with the held-out audio: `dub_face_psnr`,
  `dub_face_ssim` (the face region, at the model's resolution), `dub_lmd`, `dub_mouth_r`; and
  `dub_mouth_r_control`, other speech over the same masked frames (what the visible upper face leaks).

The composites carry the fine detail of the person's own mouth from the training footage
(letstalk.revoice.MouthDetail): every figure above is of what a viewer sees.

`mouth_sharpness`: generated ÷ real variance of the Laplacian in the mouth box of the 256-pixel composites,
the lower of the two renders (1 = as sharp as the footage). `mouth_sharpness_without_detail`: the same for
the model's crops scaled up alone: a 64-pixel model is far from 1 there even when it renders the real mouth
exactly (`tests/platform/test_avatar.py`); `mouth_sharpness_model_res` is the model's own crops against the
footage's at the model's size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from letstalk import metrics
from letstalk.footage import typical_index
from letstalk.revoice import MOUTH, Composite, MouthDetail, pingpong

MOUTH_BOX = MOUTH  # the mouth's box in crop fractions, where the sharpness is measured

# generate(footage crops at the model's size (n, s, s, 3), audio (samples,)) -> generated crops (n, s, s, 3)
Generate = Callable[[np.ndarray, np.ndarray], np.ndarray]


def pipeline_generator(pipe, reference: np.ndarray, steps: int, seed: int) -> Generate:
    """The re-voicing bundle as a Generate (DDIM `steps`, the reference crop at the model's size)."""
    def generate(crops: np.ndarray, audio: np.ndarray) -> np.ndarray:
        return np.concatenate(list(pipe.iter_revoice(crops, audio, reference, steps=steps, sampler="ddim", seed=seed)))
    return generate


def other_speech(train_audio: np.ndarray, samples: int) -> np.ndarray:
    """`samples` of the training audio from its middle on (wrapping round): speech of the same voice that is
    not the held-out speech, and not the footage's own sound at the frames it is rendered over."""
    start = len(train_audio) // 2
    return np.resize(np.roll(train_audio, -start), samples).astype(np.float32)


def box_pixels(box: tuple[float, float, float, float], side: int) -> tuple[int, int, int, int]:
    return tuple(int(round(v * side)) for v in box)  # type: ignore[return-value]


def score_revoice(generate: Generate, train_full: np.ndarray, train_audio: np.ndarray, real_full: np.ndarray,
                  audio: np.ndarray, model_size: int, latent_size: int, face_model: str, fps: int,
                  sample_rate: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The re-voicing report's figures and what its pictures show.

    train_full (T, S, S, 3), real_full (n, S, S, 3): the training footage's and the held-out seconds' crops
    (S = 256); audio: the held-out audio of those n frames. Returns (figures, {"real", "revoiced",
    "dubbed": (n, S, S, 3) crops; "real_mouth", "revoiced_mouth", "dubbed_mouth", "envelope": (n,) tracks}).
    """
    n, side = len(real_full), real_full.shape[1]
    paste = Composite(latent_size)
    detail = MouthDetail(train_full, model_size)  # the training footage's mouths only: nothing held out
    footage = train_full[pingpong(len(train_full), n)]
    other = other_speech(train_audio, len(audio))

    def render(crops_full: np.ndarray, sound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gen = generate(metrics.resize_frames(crops_full, model_size), sound)[:n]
        detail.reset()
        return np.stack([paste(f, (0, 0, side, side), g, detail(g)) for f, g in zip(crops_full, gen)]), gen

    def plain(crops_full: np.ndarray, gen: np.ndarray) -> np.ndarray:
        return np.stack([paste(f, (0, 0, side, side), g) for f, g in zip(crops_full, gen)])

    (revoiced, revoiced_gen), (revoiced_other, _) = render(footage, audio), render(footage, other)
    (dubbed, dubbed_gen), (dubbed_other, _) = render(real_full, audio), render(real_full, other)

    def track(frames):
        return metrics.mouth_track(frames, face_model, fps=fps)

    real_m, rev_m, rev_o, dub_m, dub_o = (track(f) for f in (real_full, revoiced, revoiced_other, dubbed,
                                                              dubbed_other))
    sync = metrics.landmark_sync(rev_m.aperture, real_m.aperture)
    other_r = metrics.landmark_sync(rev_o.aperture, real_m.aperture).r
    dub = metrics.landmark_sync(dub_m.aperture, real_m.aperture)
    dub_other = metrics.landmark_sync(dub_o.aperture, real_m.aperture)
    small = lambda f: metrics.resize_frames(f, model_size)  # noqa: E731
    face = metrics.face_region(model_size)
    mouth_full, mouth_small = box_pixels(MOUTH_BOX, side), box_pixels(MOUTH_BOX, model_size)

    def sharpness(box, rev, dub, rev_real, dub_real):
        return min(metrics.sharpness_ratio(rev, rev_real, box), metrics.sharpness_ratio(dub, dub_real, box))

    figures: dict[str, Any] = {
        "mouth_r": sync.r, "mouth_lag": sync.lag,
        "mouth_r_control": max(sync.control, other_r), "mouth_r_shifted_real": sync.control,
        "mouth_r_other_speech": other_r,
        "dub_mouth_r": dub.r, "dub_mouth_lag": dub.lag, "dub_mouth_r_control": dub_other.r,
        "dub_lmd": round(metrics.lmd(dub_m.lips, real_m.lips), 4),
        "dub_face_psnr": round(metrics.psnr(metrics.crop_region(small(dubbed), face),
                                            metrics.crop_region(small(real_full), face)), 3),
        "dub_face_ssim": round(metrics.ssim(metrics.crop_region(small(dubbed), face),
                                            metrics.crop_region(small(real_full), face)), 4),
        "dub_face_psnr_full": round(metrics.psnr(metrics.crop_region(dubbed, metrics.face_region(side)),
                                                 metrics.crop_region(real_full, metrics.face_region(side))), 3),
        # the composites against the footage's 256-pixel crops: what a viewer sees
        "mouth_sharpness": round(sharpness(mouth_full, revoiced, dubbed, footage, real_full), 4),
        # the same without the footage's mouth detail: the model's crops scaled up
        "mouth_sharpness_without_detail": round(sharpness(mouth_full, plain(footage, revoiced_gen),
                                                          plain(real_full, dubbed_gen), footage, real_full), 4),
        # the model's own crops against the footage's at the model's size: what the model renders
        "mouth_sharpness_model_res": round(sharpness(mouth_small, revoiced_gen, dubbed_gen, small(footage),
                                                     small(real_full)), 4),
        "frames": n,
        "generated_face_fraction": round(min(rev_m.face_fraction, dub_m.face_fraction), 4),
        "audio_r_generated": metrics.audio_sync(rev_m.aperture, audio, sample_rate, fps).r,
        "audio_r_real": metrics.audio_sync(real_m.aperture, audio, sample_rate, fps).r,
    }
    tracks = {"real": real_full, "revoiced": revoiced, "dubbed": dubbed,
              "real_mouth": real_m.aperture, "revoiced_mouth": rev_m.aperture, "dubbed_mouth": dub_m.aperture,
              "envelope": metrics.sync_envelope(audio, n, sample_rate, fps)}
    return figures, tracks


def reference_crop(pipe, train_full: np.ndarray) -> np.ndarray:
    """The typical training frame at the model's size: the re-voiced render's reference frame."""
    return metrics.resize_frames(train_full[typical_index(pipe, train_full)][None], pipe.image_size)[0]


__all__ = ["MOUTH_BOX", "pipeline_generator", "other_speech", "score_revoice", "reference_crop"]
