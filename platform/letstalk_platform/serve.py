"""Ray Serve application: the LetsTalk HTTP render API and the Renderer that batch jobs share.

Two deployments, wired by `build_app` (Ray Serve's builder pattern, typed `AppArgs`):

    Ingress   FastAPI on CPU: token check, upload limits, input validation, the web page, the job
              table (a database: jobstore.py) and the finished videos on disk; both outlive a
              restart of the replica. One replica by default; more share the table and its one
              count of the render slots.
    Renderer  loads the bundle once (a folder or models:/name@alias from the MLflow registry),
              renders clip by clip and streams progress back; one GPU per replica when
              `use_gpu`. Runtime defaults (steps, sampler, guidance) come from user_config.

    serve run cluster/serve/render-local.yaml          # or: python jobs/serve.py --model ...
    curl -H "Authorization: Bearer $LETSTALK_API_TOKEN" -F portrait=@face.png -F audio=@speech.wav \
         http://127.0.0.1:8000/v1/renders                   # -> 202 {"id": ...}

This module is the composition; each concern has its own module:

    serve_config.py    AppArgs (the args every part takes) and check_serve_config (a `serve run` config)
    serve_http.py      the Ingress: routes, bearer auth, upload checks, Admission, OpenAPI models and errors
    serve_jobs.py      RenderJob and RenderJobs: render slots, each job's render and row, cancels, sweeps
    serve_stream.py    the growing mp4 of stream=true, the Ingress's spool files, Server-Sent Events
    serve_renderer.py  the Renderer deployment

`jobs/render_batch.py` calls the same Renderer through a DeploymentHandle, so online and batch
renders share its replicas (and their autoscaling). `serve run` configs name `letstalk_platform.serve:build_app`;
the names jobs/ and bench/ use (AppArgs, TOKEN_ENV, build_app, check_serve_config) are importable from here.
"""


from typing import Any

from ray import serve

from .serve_config import TOKEN_ENV, AppArgs, check_serve_config
from .serve_http import Ingress
from .serve_renderer import CONTROL_CALLS, Renderer

__all__ = ["AppArgs", "Ingress", "Renderer", "TOKEN_ENV", "build_app", "check_serve_config"]


def build_app(args: AppArgs) -> serve.Application:
    """The Serve application: Ingress -> Renderer, configured from typed args."""
    args = AppArgs.model_validate(args) if not isinstance(args, AppArgs) else args
    renderer_options: dict[str, Any] = {
        # room for CONTROL_CALLS beside the renders: a restarted Ingress's `info` must not wait for a
        # render to end; renders beyond max_jobs_per_replica wait for one of the replica's render threads
        "max_ongoing_requests": args.max_jobs_per_replica + CONTROL_CALLS,
        "user_config": args.defaults.model_dump(),
        "ray_actor_options": {"num_cpus": args.renderer_cpus, "num_gpus": 1 if args.use_gpu else 0},
    }
    if args.max_replicas and args.max_replicas > args.num_replicas:
        renderer_options["autoscaling_config"] = {"min_replicas": args.num_replicas,
                                                  "max_replicas": args.max_replicas,
                                                  "target_ongoing_requests": 1}
    else:
        renderer_options["num_replicas"] = args.num_replicas
    renderer = Renderer.options(**renderer_options).bind(
        args.model, args.mlflow_uri, args.max_audio_seconds, args.max_image_pixels, args.max_jobs_per_replica,
        args.inference)
    ingress_args = args.model_dump(mode="json") | {"token": args.token.get_secret_value() if args.token else None}
    return Ingress.options(num_replicas=args.ingress_replicas).bind(renderer, ingress_args)
