"""Evaluate models on the eval split: FID, FVD, SSIM, PSNR, E-FID, lip sync -> a table on stdout, on disk, in MLflow.

    python jobs/evaluate.py --model models:/letstalk@production --data shards/ --out out/eval \\
        --inception weights/inception-2015-12-05.pt --i3d weights/i3d_torchscript.pt --face-recon weights/epoch_20.pth
    python jobs/evaluate.py --models letstalk@symbiotic,letstalk@siamese --data shards/   # ablation: one row each
    python jobs/evaluate.py --model models/tiny --data shards/ --debug-videos 2           # smoke run
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/evaluate.py --config eval.yaml

Flags override the YAML. Without a weights file a metric is reported as "not computed (no weights)".
"""

from __future__ import annotations

import argparse
import sys

from letstalk_platform.evaluate import EvalConfig, evaluate_models
from letstalk_platform.runtime import load_config


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file with EvalConfig keys")
    p.add_argument("--model", action="append", help="bundle dir or models:/<name>@<alias> (repeat for more rows)")
    p.add_argument("--models", help="comma-separated registry names name@alias (or models:/... / dirs)")
    p.add_argument("--data", help="shard folder from jobs/preprocess.py")
    p.add_argument("--out", help="folder for table.md and table.json")
    p.add_argument("--mlflow-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--experiment")
    p.add_argument("--steps", type=int)
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm"])
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--frames", type=int, help="frames per eval video (default 16, the paper's first clip)")
    p.add_argument("--size", type=int, help="evaluation resolution (default: the shards' crop size)")
    p.add_argument("--max-videos", type=int)
    p.add_argument("--inception", help="TorchScript Inception weights (FID)")
    p.add_argument("--i3d", help="TorchScript I3D weights (FVD)")
    p.add_argument("--face-recon", help="Deep3DFaceRecon epoch_20.pth or TorchScript (E-FID)")
    p.add_argument("--device", help="auto | cpu | cuda")
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
    print(f"MLflow: {cfg.mlflow_uri}, experiment {cfg.experiment!r}, runs {', '.join(report.run_ids)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
