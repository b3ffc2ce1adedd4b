"""Distil a registered LetsTalk model into a few-step student: Ray Train + DeepSpeed, MLflow, registry.

    python jobs/distill.py --config cluster/train/demo-distill.yaml          # the shipped demo student
    python jobs/distill.py --teacher models:/letstalk@production --data shards/ --student-steps 2 \\
        --teacher-steps 8 --mlflow-uri sqlite:///mlflow.db --storage runs/ --name letstalk-2step
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/distill.py --config distill.yaml

The student starts as a copy of the teacher (or, with --init-from, as an earlier student's
transformer/diffusion_pytorch_model.safetensors, to go on distilling) and learns, in `student_steps` DDIM steps, the samples
the teacher makes in `teacher_steps` (progressive distillation's target, several teacher steps per
student step: letstalk.training.distill_loss_terms). It trains on the shards the teacher's codecs
made, through the same loop as jobs/train.py (ZeRO, exact resume, EMA, MLflow on rank 0). Its
bundle records `"sampler": "ddim", "steps": student_steps` in pipeline.json, so `letstalk render`,
the HTTP API and the batch job render it in those steps without being told. Every TrainConfig key
works here as in jobs/train.py (`--help`); the `distill` section is required.
"""

from __future__ import annotations

import argparse

from letstalk_platform.train import job_args, run_job

FLAGS = {
    "--teacher": "distill.teacher",
    "--student-steps": "distill.student_steps",
    "--teacher-steps": "distill.teacher_steps",
    "--guidance": "distill.guidance",
    "--init-from": "model.init_from",
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
    return job_args(__doc__, FLAGS, "YAML file with TrainConfig sections and a distill section", argv)


def main(argv: list[str] | None = None) -> int:
    return run_job("distill", get_args(argv), distill=True)


if __name__ == "__main__":
    raise SystemExit(main())
