"""Register a training checkpoint's EMA weights as a render bundle in the MLflow model registry.

    python jobs/register.py --checkpoint runs/tiny-cpu/checkpoint_... --data out/demo/shards \\
        --mlflow-uri sqlite:///out/demo/mlflow.db --name letstalk-demo --alias production

The bundle = the checkpoint's transformer/ (EMA, safetensors) + the codec and audio encoder the
shards were tokenized with. It then loads anywhere as `models:/<name>@<alias>`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from letstalk.artifacts import ShardManifest, export_bundle
from letstalk_platform import tracking
from letstalk_platform.runtime import add_config_flags, load_config
from letstalk_platform.tracking import RegisterConfig


FLAGS = {"--checkpoint": "checkpoint", "--data": "data", "--mlflow-uri": "mlflow_uri", "--name": "name",
         "--alias": "alias", "--experiment": "experiment", "--run-id": "run_id"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML with RegisterConfig keys; flags override it")
    add_config_flags(p, RegisterConfig, FLAGS)  # types, help and defaults from RegisterConfig
    args = p.parse_args(argv)
    try:
        cfg = load_config(RegisterConfig, args.config, {k: v for k, v in vars(args).items() if k in FLAGS.values()})
        ckpt = Path(cfg.checkpoint)
        manifest = ShardManifest.load(cfg.data)
        run_id = cfg.run_id or tracking.start_run(cfg.mlflow_uri, cfg.experiment, f"register-{cfg.name}",
                                                  {"checkpoint": str(ckpt.resolve()), "data": cfg.data})
        with tempfile.TemporaryDirectory() as d:
            bundle = export_bundle(ckpt, manifest, Path(d) / "bundle")
            version = tracking.register_bundle(cfg.mlflow_uri, run_id, bundle, cfg.name, cfg.alias)
    except ValueError as e:
        print(f"register: error: {e}", file=sys.stderr)
        return 2
    print(f"registered models:/{cfg.name}@{cfg.alias} (version {version}, run {run_id})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
