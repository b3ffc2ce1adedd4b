"""Evaluate models on held-out shards and/or real footage: the metrics table on stdout, on disk and in MLflow.

    python jobs/evaluate.py --model models:/letstalk@production --data shards/ --out out/eval \\
        --inception weights/inception-2015-12-05.pt --i3d weights/i3d_torchscript.pt --face-recon weights/epoch_20.pth
    python jobs/evaluate.py --models letstalk@symbiotic,letstalk@siamese --data shards/   # ablation: one row each
    python jobs/evaluate.py --model models/tiny --data shards/ --split all --debug-videos 2  # smoke run
    python jobs/evaluate.py --model letstalk/models/demo --reference-videos 'footage/*.mp4' --max-seconds 8 \\
        --out out/eval-real   # --face-model: another MediaPipe .task (default: the one shipped with letstalk)
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/evaluate.py --config eval.yaml

Flags override the YAML; the defaults (and the sampler choices) live in EvalConfig only. Without a
weights file a metric is reported as "not computed (no weights)". The MLflow store defaults to
$MLFLOW_TRACKING_URI, else OUT/mlflow.db (--out), else ~/.cache/letstalk/eval/mlflow.db.
"""

from __future__ import annotations

import argparse
import sys

from letstalk_platform.evaluate import EvalConfig, evaluate_models
from letstalk_platform.runtime import add_config_flags, load_config

FLAGS = {"--data": "data", "--split": "split", "--reference-videos": "reference_videos", "--face-model": "face_model",
         "--max-seconds": "max_seconds", "--out": "out", "--mlflow-uri": "mlflow_uri", "--experiment": "experiment",
         "--steps": "steps", "--sampler": "sampler", "--guidance": "guidance", "--seed": "seed", "--frames": "frames",
         "--size": "size", "--max-videos": "max_videos", "--inception": "inception", "--i3d": "i3d",
         "--face-recon": "face_recon", "--device": "device"}


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file with EvalConfig keys")
    p.add_argument("--model", action="append", help="bundle dir or models:/<name>@<alias> (repeat for more rows)")
    p.add_argument("--models", help="comma-separated registry names name@alias (or models:/... / dirs)")
    add_config_flags(p, EvalConfig, FLAGS)  # types, choices, help and defaults from EvalConfig
    p.add_argument("--debug-videos", type=int, help="smoke run: this many videos, 2 sampling steps")
    return p.parse_args(argv)


def _models(args: argparse.Namespace) -> list[str] | None:
    models = list(args.model or [])
    for name in (args.models or "").split(","):
        name = name.strip()
        if name:
            models.append(name if name.startswith("models:/") or "@" not in name else f"models:/{name}")
    return models or None


def main(argv: list[str] | None = None) -> int:
    args = get_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "model", "models", "debug_videos")}
    overrides["models"] = _models(args)
    if args.debug_videos:
        overrides |= {"max_videos": args.debug_videos, "steps": 2}
    try:
        cfg = load_config(EvalConfig, args.config, overrides)
        report = evaluate_models(cfg)
    except ValueError as e:
        print(f"evaluate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(report.markdown)
    if report.files:
        print("wrote " + ", ".join(report.files))
    print(f"MLflow: {report.mlflow_uri}, experiment {cfg.experiment!r}, runs {', '.join(report.run_ids)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
