"""Your own avatar from a short clip: preprocess one person's footage, train a person-specific model,
render the held-out seconds from their audio and measure the render against the real footage.

    python jobs/avatar.py --video CLIP.mp4 --holdout-seconds 6 --out out/avatar [--minutes 40] [--mode revoice|portrait]
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/avatar.py --video /data/me.mp4 ...

--mode revoice (default): the person's own footage, the lower face regenerated from the speech. Writes
OUT/report.json (mouth_r vs mouth_r_control, dub_face_psnr, dub_face_ssim, dub_lmd, dub_mouth_r vs
dub_mouth_r_control, mouth_sharpness, resolution, steps, train_seconds, audio_encoder), OUT/revoiced.mp4,
OUT/dubbed.mp4, OUT/side_by_side.mp4 (real | dubbed | re-voiced), OUT/mouth.png and OUT/sheet.png.
--mode portrait: one frame, generated motion (mouth_r, lmd, face_psnr, face_ssim, seam; OUT/holdout.mp4).
The model is registered as models:/avatar-NAME@candidate in OUT/mlflow.db. Recipe and figures:
docs/avatar.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from letstalk_platform.avatar import AvatarConfig, run_avatar
from letstalk_platform.runtime import add_config_flags, load_config

FLAGS = {"--video": "video", "--out": "out", "--holdout-seconds": "holdout_seconds", "--minutes": "minutes",
         "--steps": "steps", "--config": "config", "--preset": "preset", "--face-model": "face_model",
         "--stride": "stride", "--ref-frames": "ref_frames", "--sample-steps": "sample_steps", "--seed": "seed", "--name": "name",
         "--mlflow-uri": "mlflow_uri", "--fresh": "fresh", "--report-only": "report_only",
         "--audio-encoder": "audio_encoder", "--mode": "mode"}
KEYS = {"revoice": ("mouth_r", "mouth_r_control", "dub_face_psnr", "dub_face_ssim", "dub_lmd", "dub_mouth_r",
                    "dub_mouth_r_control", "mouth_sharpness", "resolution", "steps", "train_seconds", "audio_encoder"),
        "portrait": ("mouth_r", "mouth_r_control", "lmd", "face_psnr", "face_ssim", "seam", "resolution", "steps",
                     "train_seconds", "audio_encoder")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_config_flags(p, AvatarConfig, FLAGS)
    args = p.parse_args(argv)
    try:
        cfg = load_config(AvatarConfig, None, vars(args))
        report = run_avatar(cfg)
    except ValueError as e:
        print(f"avatar: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in KEYS[cfg.mode]}, indent=2))
    print(f"report: {cfg.out}/report.json; files: {', '.join(report['files'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
