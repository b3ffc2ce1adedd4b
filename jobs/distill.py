"""Distil a registered LetsTalk model into a few-step student: Ray Train + DeepSpeed, MLflow, registry.

    python jobs/distill.py --config cluster/train/demo-distill.yaml          # the shipped demo student
    python jobs/distill.py --teacher models:/letstalk@production --data shards/ --student-steps 2 \\
        --teacher-steps 8 --mlflow-uri sqlite:///mlflow.db --storage runs/ --name letstalk-2step
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/distill.py --config distill.yaml

The student starts as a copy of the teacher and learns, in `student_steps` DDIM steps, the samples
the teacher makes in `teacher_steps` (progressive distillation's target, several teacher steps per
student step: letstalk.training.distill_loss_terms). It trains on the shards the teacher's codecs
made, through the same loop as jobs/train.py (ZeRO, exact resume, EMA, MLflow on rank 0). Its
bundle records `"sampler": "ddim", "steps": student_steps` in pipeline.json, so `letstalk render`,
the HTTP API and the batch job render it in those steps without being told. Every TrainConfig key
works here as in jobs/train.py (`--help`); the `distill` section is required.
"""

from __future__ import annotations

import argparse
import json
import sys

from letstalk_platform.configs import check_train
from letstalk_platform.runtime import StaleLockError, add_config_flags, check_extension_locks, init_ray, load_config
from letstalk.artifacts import ShardManifest
from letstalk_platform.train import TrainConfig, absolute_paths, distill_setup, run_training

FLAGS = {
    "--teacher": "distill.teacher",
    "--student-steps": "distill.student_steps",
    "--teacher-steps": "distill.teacher_steps",
    "--guidance": "distill.guidance",
    "--data": "data.path",
    "--batch-size": "data.batch_size",
    "--lr": "optim.lr",
    "--ema-warmup": "optim.ema_warmup",
    "--num-workers": "scaling.num_workers",
    "--use-gpu": "scaling.use_gpu",
    "--cpus-per-worker": "scaling.cpus_per_worker",
    "--storage": "tracking.storage",
    "--name": "tracking.name",
    "--mlflow-uri": "tracking.mlflow_uri",
    "--register-name": "tracking.register_name",
    "--register-alias": "tracking.register_alias",
    "--steps": "steps",
    "--checkpoint-every": "checkpoint_every",
    "--log-every": "log_every",
    "--seed": "seed",
}


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file with TrainConfig sections and a distill section")
    add_config_flags(p, TrainConfig, FLAGS)
    p.add_argument("--debug-steps", type=int, help="smoke run: this many steps, checkpoint at the end")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "debug_steps")}
    if args.debug_steps:
        overrides |= {"steps": args.debug_steps, "checkpoint_every": args.debug_steps, "log_every": 1}
    try:
        cfg = load_config(TrainConfig, args.config, overrides)
        if cfg.distill is None:
            raise ValueError("nothing to distil: give --teacher (a bundle folder or models:/NAME@ALIAS) or a "
                             "distill section in the YAML")
        check_train(cfg)
        distill_setup(absolute_paths(cfg), ShardManifest.load(cfg.data.path))  # the teacher fits: before Ray starts
        check_extension_locks()
        init_ray()
        summary = run_training(cfg)
    except (ValueError, StaleLockError) as e:
        print(f"distill: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
