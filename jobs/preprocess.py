"""Preprocess talking videos into training shards on Ray Data.

    ray job submit --working-dir . -- python jobs/preprocess.py --config cluster/preprocess/hdtf.yaml
    python jobs/preprocess.py --input raw/ --output shards/ --model models/tiny      # local Ray, no YAML
    python jobs/preprocess.py --config cluster/preprocess/demo.yaml --debug-videos 2  # smoke run

Flags override the YAML. Prints a summary; the full record is OUTPUT/manifest.json.
"""

from __future__ import annotations

import argparse
import sys

from letstalk_platform.preprocess import PreprocessConfig, run_preprocess
from letstalk_platform.runtime import init_ray, load_config


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file with PreprocessConfig keys")
    p.add_argument("--input", help="folder, glob or .txt list of videos")
    p.add_argument("--output", help="shard folder")
    p.add_argument("--model", help="bundle dir with vae/ and audio_encoder/")
    p.add_argument("--clip-frames", type=int)
    p.add_argument("--stride", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--eval-fraction", type=float)
    p.add_argument("--tokenizers", type=int)
    p.add_argument("--decoders", type=int)
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument("--debug-videos", type=int, dest="limit", help="process at most N pending videos")
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
    print(f"{c['done']}/{c['inputs']} videos done, {c['failed']} failed; clips train {c['clips']['train']} "
          f"eval {c['clips']['eval']}; {manifest.last_run['processed']} processed in {manifest.last_run['seconds']} s")
    for e in manifest.inputs:
        if e.status != "done":
            print(f"  failed {e.path}: {e.reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
