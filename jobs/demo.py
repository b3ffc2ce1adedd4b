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
from letstalk_platform.runtime import load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML with DemoConfig keys")
    p.add_argument("--out")
    p.add_argument("--videos", type=int)
    p.add_argument("--seconds", type=float)
    p.add_argument("--train-steps", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--batch-videos", type=int)
    p.add_argument("--eval-videos", type=int)
    p.add_argument("--steps", type=int, help="sampler steps for renders and evaluation")
    p.add_argument("--compare", action="append", help="another bundle to score in the same table (repeatable)")
    p.add_argument("--fresh", action="store_true", default=None, help="delete --out first")
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
