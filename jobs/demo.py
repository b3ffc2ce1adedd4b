"""The main job: the whole platform end to end on this machine (what `make demo` runs).

    python jobs/demo.py [--out out/demo] [--train-steps N] [--videos N] [--fresh]

dataset -> preprocess (Ray Data) -> train (Ray Train + DeepSpeed, MLflow, registry alias) -> render
held-out identities through the HTTP endpoint and the batch job (Ray Serve) -> evaluate -> a results
table (out/demo/results.md) and, per video, a contact sheet and a mouth-vs-audio plot.
"""

from __future__ import annotations

import argparse
import sys

from letstalk_platform.demo import DemoConfig, run_demo
from letstalk_platform.runtime import add_config_flags, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML with DemoConfig keys")
    add_config_flags(p, DemoConfig, {"--out": "out", "--videos": "videos", "--seconds": "seconds",
                                     "--train-steps": "train_steps", "--num-workers": "num_workers",
                                     "--batch-videos": "batch_videos", "--eval-videos": "eval_videos",
                                     "--steps": "steps", "--compare": "compare", "--fresh": "fresh"})
    args = p.parse_args(argv)
    try:
        cfg = load_config(DemoConfig, args.config, {k: v for k, v in vars(args).items() if k != "config"})
        run_demo(cfg)
    except ValueError as e:
        print(f"demo: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
