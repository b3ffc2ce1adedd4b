"""Train LetsTalk on Ray Train + DeepSpeed ZeRO, track in MLflow, register the EMA model.

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/train.py --config cluster/train/base-a800.yaml
    python jobs/train.py --config cluster/train/tiny-cpu.yaml                 # local Ray on 127.0.0.1
    python jobs/train.py --data shards/ --preset tiny --num-workers 2 --debug-steps 5 \\
        --mlflow-uri sqlite:///m.db --storage runs/                            # no YAML

Each flag overrides one key of the YAML (`--batch-size` = data.batch_size; `--help` names them);
the defaults live in letstalk_platform.train.TrainConfig only. The config and its DeepSpeed JSON are
checked before Ray starts: a bad one exits with code 2 and a one-line error. The final EMA weights
become a render bundle (STORAGE/NAME/bundle) and a registry version `models:/<register_name>@<register_alias>`.
"""

from __future__ import annotations

import argparse

from letstalk.config import PRESETS
from letstalk_platform.train import job_args, run_job

FLAGS = {
    "--data": "data.path",
    "--batch-size": "data.batch_size",
    "--preset": "model.preset",
    "--lr": "optim.lr",
    "--zero-stage": "optim.zero_stage",
    "--deepspeed": "optim.deepspeed",
    "--num-workers": "scaling.num_workers",
    "--use-gpu": "scaling.use_gpu",
    "--cpus-per-worker": "scaling.cpus_per_worker",
    "--placement-strategy": "scaling.placement_strategy",
    "--storage": "tracking.storage",
    "--name": "tracking.name",
    "--mlflow-uri": "tracking.mlflow_uri",
    "--steps": "steps",
    "--time-limit-minutes": "time_limit_minutes",
    "--checkpoint-every": "checkpoint_every",
    "--seed": "seed",
}


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    return job_args(__doc__, FLAGS, "YAML file with TrainConfig sections (cluster/train/*.yaml)", argv,
                    choices={"model.preset": list(PRESETS)})


def main(argv: list[str] | None = None) -> int:
    return run_job("train", get_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
