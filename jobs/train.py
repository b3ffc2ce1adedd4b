"""Train LetsTalk on Ray Train + DeepSpeed ZeRO, track in MLflow, register the EMA model.

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/train.py --config cluster/train/base-a800.yaml
    python jobs/train.py --config cluster/train/tiny-cpu.yaml                 # local Ray on 127.0.0.1
    python jobs/train.py --data shards/ --preset tiny --num-workers 2 --debug-steps 5 \\
        --mlflow-uri sqlite:///m.db --storage runs/                            # no YAML

Flags override the YAML. The final EMA weights become a render bundle (STORAGE/NAME/bundle) and a
registry version `models:/<register_name>@<register_alias>`.
"""

from __future__ import annotations

import argparse
import json
import sys

from letstalk.config import PRESETS
from letstalk_platform.runtime import StaleLockError, check_extension_locks, init_ray, load_config
from letstalk_platform.train import TrainConfig, run_training


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file with TrainConfig keys")
    p.add_argument("--data", help="shard folder from jobs/preprocess.py")
    p.add_argument("--preset", choices=list(PRESETS))
    p.add_argument("--num-workers", type=int)
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    p.add_argument("--mlflow-uri")
    p.add_argument("--storage", help="folder for Ray Train run state and checkpoints")
    p.add_argument("--name", help="run name (storage sub-folder and MLflow run name)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument("--cpus-per-worker", type=float, help="CPUs Ray reserves for each worker (e.g. 0.5 on a laptop)")
    p.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_SPREAD"],
                   help="STRICT_SPREAD: one worker per node")
    p.add_argument("--debug-steps", type=int, help="smoke run: this many steps, checkpoint at the end")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "debug_steps")}
    if args.debug_steps:
        overrides |= {"steps": args.debug_steps, "checkpoint_every": args.debug_steps, "log_every": 1}
    try:
        cfg = load_config(TrainConfig, args.config, overrides)
        check_extension_locks()  # seconds, not a silent hang in every worker
        init_ray()
        summary = run_training(cfg)
    except (ValueError, StaleLockError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
