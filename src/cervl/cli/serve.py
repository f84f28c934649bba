"""``cervl serve``: parsing and printing."""

from __future__ import annotations

from pathlib import Path

from cervl.cli.options import check_model_choice, load_predictor, zero_shot_options
from cervl.core.errors import UserError


def run_serve(args) -> int:
    import os

    from cervl.serve import check_exposure, serve
    from cervl.serve.app import ServeSettings, run_summary

    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    check_exposure(args.host, key, args.insecure_no_auth)  # before the model loads
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, align=args.align, api_key=key,
                             max_body_bytes=args.max_body_mb * 2**20, max_video_seconds=args.max_video_seconds,
                             request_timeout_s=args.timeout, max_request_pixels=int(args.max_request_mp * 1e6),
                             max_inflight_pixels=int(args.max_inflight_mp * 1e6), max_video_jobs=args.max_video_jobs)
    check_model_choice(args)
    predictor = load_predictor(args)
    info = run_summary(args.run) if args.run else {"base_model": args.model, "lineage": [], "run": None}
    print(f"serving {args.run or args.model} on http://{args.host}:{args.port} (page: /, API docs: /docs)")
    serve(predictor, host=args.host, port=args.port, settings=settings, run_info=info,
          insecure_no_auth=args.insecure_no_auth)
    return 0


def add_parsers(add) -> None:
    """The serve sub-commands: arguments, and which function runs each."""
    p = add("serve", help="serve a trained run (or, zero-shot, a base model) over HTTP: REST API, web page, metrics")
    p.add_argument("--run", type=Path, help="run directory written by cervl train")
    zero_shot_options(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--align", action="store_true",
                   help="align faces by default (MTCNN + 5-point alignment of the largest face; align=false per request)")
    p.add_argument("--max-batch", type=int, default=32, help="images per model call (1 = no batching)")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    p.add_argument("--api-key-env", help="name of an environment variable holding the API key")
    p.add_argument("--insecure-no-auth", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--max-body-mb", type=int, default=20, help="largest image request body (MB)")
    p.add_argument("--max-video-seconds", type=float, default=600.0, help="longest uploaded video")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request model timeout (s)")
    p.add_argument("--max-request-mp", type=float, default=80.0,
                   help="decoded megapixels per request, all its images together (checked on the headers)")
    p.add_argument("--max-inflight-mp", type=float, default=160.0, help="decoded megapixels held by all requests "
                   "at once; a request that does not fit waits up to 10 s, then gets 503")
    p.add_argument("--max-video-jobs", type=int, default=4, help="video jobs queued or running at once (then 429)")
    p.set_defaults(func=run_serve)


COMMANDS = {"serve": run_serve}
