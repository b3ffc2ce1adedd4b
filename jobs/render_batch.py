"""Render a manifest of (portrait, audio) rows into talking videos: one mp4 per row + results.parquet.

    python jobs/render_batch.py --manifest rows.csv --out renders/ --model models:/letstalk@production
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/render_batch.py --manifest ... --out ...

By default the rows go to the Ray Serve Renderer deployment (the one behind the HTTP API, so batch
and online renders share its replicas); when no such app runs, it is started from --model and
removed at the end. --standalone renders on a Ray Data actor pool instead. Re-runs skip rows whose
mp4 exists; bad rows are recorded in results.parquet with the reason and never stop the batch.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections import Counter
from pathlib import Path

from letstalk.diffusion import SAMPLERS
from letstalk_platform.batch import data_results, plan_items, read_manifest, run_batch, serve_render
from letstalk_platform.render import RenderDefaults, add_speed_args, check_renderer_device, speed_options
from letstalk_platform.runtime import init_ray
from letstalk_platform.serve import APP_NAME, TOKEN_ENV, AppArgs, build_app


def running_app(name: str) -> bool:
    from ray import serve

    app = serve.status().applications.get(name)
    return app is not None and str(app.status).endswith("RUNNING")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True, help=".csv, .jsonl or .parquet with columns portrait, audio "
                                                     "[, id, steps, sampler, guidance, seed]")
    p.add_argument("--out", required=True, help="output folder: <id>.mp4 per row and results.parquet")
    p.add_argument("--model", help="bundle folder or models:/<name>@<alias> (needed unless the app runs)")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--app", default=APP_NAME, help="the Serve application to use or start")
    p.add_argument("--standalone", action="store_true", help="render on Ray Data actors instead of Serve")
    p.add_argument("--concurrency", type=int, default=None,
                   help="rows in flight (Serve; default replicas x jobs per replica) or actors (standalone; default 1)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per renderer replica / actor")
    p.add_argument("--cpus", type=float, default=AppArgs.model_fields["renderer_cpus"].default,
                   help="CPUs per renderer replica / actor (default: AppArgs.renderer_cpus)")
    p.add_argument("--steps", type=int, help="default denoising steps for rows without their own")
    p.add_argument("--sampler", choices=SAMPLERS, help="default sampler for rows without their own")
    p.add_argument("--guidance", type=float, help="default guidance for rows without their own")
    p.add_argument("--no-progress", action="store_true")
    add_speed_args(p)  # for the renderers this job starts (a running app keeps its own)
    args = p.parse_args(argv)
    out = Path(args.out)
    started = False
    try:
        if args.concurrency is not None and args.concurrency < 1:
            raise ValueError("--concurrency must be >= 1")
        manifest = Path(args.manifest)
        items = plan_items(read_manifest(manifest), manifest.resolve().parent)
        defaults = RenderDefaults.model_validate(
            {k: v for k, v in {"steps": args.steps, "sampler": args.sampler, "guidance": args.guidance}.items()
             if v is not None})
        model = args.model
        if model is not None:
            from letstalk_platform.tracking import resolve_bundle

            model = str(resolve_bundle(model, args.mlflow_uri).resolve())  # resolved here: workers have another cwd
        inference = speed_options(args)
        check_renderer_device(inference, args.use_gpu)
        init_ray()
        if args.standalone:
            if model is None:
                raise ValueError("--standalone needs --model")
            actors = args.concurrency or 1
            records = run_batch(items, out, None, progress=not args.no_progress, results_iter=data_results(
                model, out, actors=actors, use_gpu=args.use_gpu, cpus_per_actor=args.cpus, defaults=defaults.model_dump(),
                inference=inference))
        else:
            from ray import serve

            if not running_app(args.app):
                if model is None:
                    raise ValueError(f"no Serve application {args.app!r} is running: give --model to start one")
                app_args = AppArgs(model=model, mlflow_uri=args.mlflow_uri, use_gpu=args.use_gpu,
                                   renderer_cpus=args.cpus, defaults=defaults, inference=inference,
                                   token=os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(32))
                print(f"render_batch: starting Serve application {args.app!r} (no HTTP route) for this batch",
                      file=sys.stderr)
                serve.run(build_app(app_args), name=args.app, route_prefix=None)
                started = True
            handle = serve.get_deployment_handle("Renderer", app_name=args.app)
            concurrency = args.concurrency or 2
            records = run_batch(items, out, serve_render(handle), concurrency=concurrency,
                                progress=not args.no_progress)
    except ValueError as e:
        print(f"render_batch: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        if started:
            from ray import serve

            serve.delete(args.app)
    counts = Counter(r["status"] for r in records)
    print(f"render_batch: {counts.get('rendered', 0)} rendered, {counts.get('skipped', 0)} skipped (already "
          f"there), {counts.get('failed', 0)} failed -> {out / 'results.parquet'}")
    for r in records:
        if r["status"] == "failed":
            print(f"  row {r['row']} ({r['id']}): {r['error']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
