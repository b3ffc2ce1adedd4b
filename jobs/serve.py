"""Serve the LetsTalk HTTP render API (Ray Serve) until Ctrl-C.

    export LETSTALK_API_TOKEN=$(python -c "import secrets; print(secrets.token_urlsafe(32))")
    python jobs/serve.py --model models:/letstalk@production --mlflow-uri sqlite:///mlflow.db
    python jobs/serve.py --model letstalk/models/demo --port 8000          # a local bundle folder
    python jobs/serve.py --model letstalk/models/demo --use-gpu --dtype bf16 --compile regional \
        --overlap-decode --batch-clips --max-batch 4 --jobs-per-replica 4   # speed switches (docs/serving.md)

API docs at http://127.0.0.1:8000/docs. The proxy binds 127.0.0.1 unless --host says otherwise;
every /v1 route needs `Authorization: Bearer $LETSTALK_API_TOKEN`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from letstalk_platform.render import APP_NAME, add_speed_args
from letstalk_platform.runtime import add_config_flags, init_ray, load_config
from letstalk_platform.serve import TOKEN_ENV, AppArgs, build_app

# flag -> AppArgs setting: types, choices, defaults and help come from AppArgs (no default twice)
FLAGS = {"--model": "model", "--mlflow-uri": "mlflow_uri", "--use-gpu": "use_gpu", "--replicas": "num_replicas",
         "--max-replicas": "max_replicas", "--jobs-per-replica": "max_jobs_per_replica",
         "--max-upload-mb": "max_upload_mb", "--max-audio-seconds": "max_audio_seconds",
         "--steps": "defaults.steps", "--sampler": "defaults.sampler", "--guidance": "defaults.guidance",
         "--work-dir": "work_dir", "--jobs-db": "jobs_db", "--storage": "storage",
         "--ingress-replicas": "ingress_replicas"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML with AppArgs keys (the `args:` of a Serve config); flags override it")
    add_config_flags(p, AppArgs, FLAGS)
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--app", default=APP_NAME)
    add_speed_args(p)
    args = p.parse_args(argv)
    token = os.environ.get(TOKEN_ENV, "")
    try:
        if not token:
            raise ValueError(f"set {TOKEN_ENV} to the bearer token clients must send (the API never runs open)")
        if not 0 < args.port < 65536:
            raise ValueError(f"--port {args.port} is not a TCP port")
        given = {k: v for k, v in vars(args).items() if k in FLAGS.values() or k.startswith("inference.")}
        app_args = load_config(AppArgs, args.config, given | {"token": token})
        from letstalk_platform.tracking import resolve_bundle

        mlflow_uri = app_args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        bundle = resolve_bundle(app_args.model, mlflow_uri)  # fail fast here, not inside a replica
        if app_args.storage:
            from letstalk_platform.storage import VideoStore

            VideoStore(app_args.storage)  # unreachable or malformed: one line now, not a replica crash loop
        if not app_args.model.startswith("models:/"):
            app_args = app_args.model_copy(update={"model": str(bundle.resolve())})
    except ValueError as e:
        print(f"serve: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    from ray import serve

    init_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(app_args), name=args.app, route_prefix="/")
    print(f"serve: {args.app} ready at http://{args.host}:{args.port}/ (docs: /docs); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
