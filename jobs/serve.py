"""Serve the LetsTalk HTTP render API (Ray Serve) until Ctrl-C.

    export LETSTALK_API_TOKEN=$(python -c "import secrets; print(secrets.token_urlsafe(32))")
    python jobs/serve.py --model models:/letstalk@production --mlflow-uri sqlite:///mlflow.db
    python jobs/serve.py --model models/demo --port 8000          # a local bundle folder
    python jobs/serve.py --model models/demo --use-gpu --dtype bf16 --compile regional \
        --overlap-decode --batch-clips --max-batch 4 --jobs-per-replica 4   # speed switches (docs/serving.md)

API docs at http://127.0.0.1:8000/docs. The proxy binds 127.0.0.1 unless --host says otherwise;
every /v1 route needs `Authorization: Bearer $LETSTALK_API_TOKEN`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from letstalk_platform.render import RenderDefaults, add_speed_args, speed_options
from letstalk_platform.runtime import init_ray
from letstalk_platform.serve import APP_NAME, TOKEN_ENV, AppArgs, build_app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="bundle folder or models:/<name>@<alias>")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--app", default=APP_NAME)
    p.add_argument("--use-gpu", action="store_true", help="one GPU per renderer replica")
    p.add_argument("--replicas", type=int, default=1, help="renderer replicas (minimum when autoscaling)")
    p.add_argument("--max-replicas", type=int, help="autoscale renderer replicas up to this many")
    p.add_argument("--jobs-per-replica", type=int, default=2)
    p.add_argument("--max-upload-mb", type=float, default=50.0)
    p.add_argument("--max-audio-seconds", type=float, default=600.0)
    p.add_argument("--steps", type=int, default=25, help="default denoising steps")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm"], default="ddim", help="default sampler")
    p.add_argument("--guidance", type=float, default=1.0, help="default audio guidance scale")
    add_speed_args(p)
    args = p.parse_args(argv)
    token = os.environ.get(TOKEN_ENV, "")
    try:
        if not token:
            raise ValueError(f"set {TOKEN_ENV} to the bearer token clients must send (the API never runs open)")
        if not 0 < args.port < 65536:
            raise ValueError(f"--port {args.port} is not a TCP port")
        model = args.model
        from letstalk_platform.tracking import resolve_bundle

        bundle = resolve_bundle(model, args.mlflow_uri)  # fail fast here, not inside a replica
        if not model.startswith("models:/"):
            model = str(bundle.resolve())
        app_args = AppArgs(model=model, mlflow_uri=args.mlflow_uri, token=token, use_gpu=args.use_gpu,
                           num_replicas=args.replicas, max_replicas=args.max_replicas,
                           max_jobs_per_replica=args.jobs_per_replica, max_upload_mb=args.max_upload_mb,
                           max_audio_seconds=args.max_audio_seconds,
                           defaults=RenderDefaults(steps=args.steps, sampler=args.sampler, guidance=args.guidance),
                           inference=speed_options(args))
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
