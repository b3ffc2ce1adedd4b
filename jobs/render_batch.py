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

from letstalk_platform.batch import BatchConfig, data_results, plan_items, read_manifest, run_batch, serve_render
from letstalk_platform.render import add_speed_args, check_renderer_device
from letstalk_platform.runtime import add_config_flags, init_ray, load_config
from letstalk_platform.serve import TOKEN_ENV, AppArgs, build_app

FLAGS = {"--manifest": "manifest", "--out": "out", "--model": "model", "--mlflow-uri": "mlflow_uri", "--app": "app",
         "--standalone": "standalone", "--concurrency": "concurrency", "--use-gpu": "use_gpu", "--cpus": "cpus",
         "--steps": "steps", "--sampler": "sampler", "--guidance": "guidance", "--paste-back": "paste_back",
         "--max-side": "max_side", "--progress": "progress"}


def running_app(name: str) -> bool:
    from ray import serve

    app = serve.status().applications.get(name)
    return app is not None and str(app.status).endswith("RUNNING")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML with BatchConfig keys; flags override it")
    add_config_flags(p, BatchConfig, FLAGS)  # types, choices, help and defaults from BatchConfig
    add_speed_args(p)  # for the renderers this job starts (a running app keeps its own)
    args = p.parse_args(argv)
    started = False
    app = None
    try:
        given = {k: v for k, v in vars(args).items() if k in FLAGS.values() or k.startswith("inference.")}
        cfg = load_config(BatchConfig, args.config, given)
        app, out, manifest = cfg.app, Path(cfg.out), Path(cfg.manifest)
        items = plan_items(read_manifest(manifest), manifest.resolve().parent, cfg.row_options())
        defaults = cfg.defaults()
        mlflow_uri = cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        model = cfg.model
        if model is not None:
            from letstalk_platform.tracking import resolve_bundle

            model = str(resolve_bundle(model, mlflow_uri).resolve())  # resolved here: workers have another cwd
        check_renderer_device(cfg.inference, cfg.use_gpu)
        init_ray()
        if cfg.standalone:
            if model is None:
                raise ValueError("--standalone needs --model")
            records = run_batch(items, out, None, progress=cfg.progress, results_iter=data_results(
                model, out, actors=cfg.concurrency or 1, use_gpu=cfg.use_gpu, cpus_per_actor=cfg.cpus,
                defaults=defaults.model_dump(), inference=cfg.inference))
        else:
            from ray import serve

            if not running_app(app):
                if model is None:
                    raise ValueError(f"no Serve application {app!r} is running: give --model to start one")
                app_args = AppArgs(model=model, mlflow_uri=mlflow_uri, use_gpu=cfg.use_gpu, renderer_cpus=cfg.cpus,
                                   defaults=defaults, inference=cfg.inference,
                                   token=os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(32))
                print(f"render_batch: starting Serve application {app!r} (no HTTP route) for this batch",
                      file=sys.stderr)
                serve.run(build_app(app_args), name=app, route_prefix=None)
                started = True
            handle = serve.get_deployment_handle("Renderer", app_name=app)
            records = run_batch(items, out, serve_render(handle), concurrency=cfg.concurrency or 2,
                                progress=cfg.progress)
    except ValueError as e:
        print(f"render_batch: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        if started:
            from ray import serve

            serve.delete(app)
    counts = Counter("reused" if r["reused"] else r["status"] for r in records)
    print(f"render_batch: {counts.get('done', 0)} rendered, {counts.get('reused', 0)} already there, "
          f"{counts.get('failed', 0)} failed -> {out / 'results.parquet'}")
    for r in records:
        if r["status"] == "failed":
            print(f"  row {r['row']} ({r['id']}): {r['error']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
