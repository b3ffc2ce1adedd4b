"""Preprocess talking videos into training shards on Ray Data.

    ray job submit --working-dir . -- python jobs/preprocess.py --config cluster/preprocess/hdtf.yaml
    python jobs/preprocess.py --input raw/ --output shards/ --model models/tiny --face-detector haar  # local Ray
    python jobs/preprocess.py --input footage/ --output shards/ --model BUNDLE   # real footage: face models ship
    python jobs/preprocess.py ... --min-speech-fraction 0.5 --face-detector mediapipe  # a filter; the old detector
    python jobs/preprocess.py --config cluster/preprocess/demo.yaml --debug-videos 2 --first-seconds 4  # smoke run

Flags override the YAML; the defaults live in PreprocessConfig only. Prints a summary; the full record is OUTPUT/manifest.json.
"""

from __future__ import annotations

import argparse
import sys

from letstalk_platform.preprocess import PreprocessConfig, quality_table, run_preprocess
from letstalk_platform.runtime import add_config_flags, init_ray, load_config


FLAGS = {"--input": "input", "--output": "output", "--model": "model", "--mlflow-uri": "mlflow_uri",
         "--clip-frames": "clip_frames",
         "--stride": "stride", "--image-size": "image_size", "--eval-fraction": "eval_fraction",
         "--tokenizers": "tokenizers", "--decoders": "decoders", "--use-gpu": "use_gpu", "--debug-videos": "limit",
         "--first-seconds": "first_seconds",
         "--face-detector": "faces.detector", "--face-model": "faces.model", "--face-margin": "faces.margin",
         "--face-crop": "faces.crop",
         "--vad": "vad", "--vad-model": "vad_model",
         "--min-face-fraction": "filters.min_face_fraction", "--max-crop-jitter": "filters.max_crop_jitter",
         "--min-speech-fraction": "filters.min_speech_fraction", "--min-mouth-audio-r": "filters.min_mouth_audio_r"}


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file with PreprocessConfig keys")
    add_config_flags(p, PreprocessConfig, FLAGS)  # types, choices, help and defaults from PreprocessConfig
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        cfg = load_config(PreprocessConfig, args.config, overrides)
        init_ray()
        manifest = run_preprocess(cfg)
    except ValueError as e:
        print(f"preprocess: error: {e}", file=sys.stderr)
        return 2
    c = manifest.counts()
    print(f"{c['done']}/{c['inputs']} videos done, {c['failed']} failed, {c['filtered']} filtered; clips train "
          f"{c['clips']['train']} eval {c['clips']['eval']}; {manifest.last_run['processed']} processed in "
          f"{manifest.last_run['seconds']} s")
    print(quality_table(manifest))
    for e in manifest.inputs:
        if e.status != "done":
            print(f"  {e.status} {e.path}: {e.reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
