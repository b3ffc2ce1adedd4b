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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder written by jobs/train.py")
    p.add_argument("--data", required=True, help="the shard folder the model was trained on")
    p.add_argument("--mlflow-uri", required=True)
    p.add_argument("--name", default="letstalk")
    p.add_argument("--alias", default="candidate")
    p.add_argument("--experiment", default="letstalk")
    p.add_argument("--run-id", help="attach to this run (default: a new run named register-<name>)")
    args = p.parse_args(argv)
    try:
        ckpt = Path(args.checkpoint)
        manifest = ShardManifest.load(args.data)
        run_id = args.run_id or tracking.start_run(args.mlflow_uri, args.experiment, f"register-{args.name}",
                                                   {"checkpoint": str(ckpt.resolve()), "data": args.data})
        with tempfile.TemporaryDirectory() as d:
            bundle = export_bundle(ckpt, manifest, Path(d) / "bundle")
            version = tracking.register_bundle(args.mlflow_uri, run_id, bundle, args.name, args.alias)
    except ValueError as e:
        print(f"register: error: {e}", file=sys.stderr)
        return 2
    print(f"registered models:/{args.name}@{args.alias} (version {version}, run {run_id})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
