"""``detect predict``, ``detect serve`` and ``detect demo``: the commands that run models."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from detect import demo
from detect.cli.args import non_negative_int, positive_int
from detect.detectors import families
from detect.engines.local import PredictOptions, default_proposal_workers, run
from detect.engines.outputs import FORMATS, check_formats, prepare_output_dir
from detect.errors import ConfigError
from detect.inference import BACKENDS, Refinement, check_thresholds, default_weights, load_model, resolve_classes

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``predict``, ``serve`` and ``demo``."""
    p = sub.add_parser("predict", help="detect objects in image files and folders, writing results under --out")
    p.add_argument("sources", nargs="+", metavar="SRC", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, help="output folder (mirrors the input tree)")
    p.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    p.add_argument("--model", default="faster_rcnn", choices=families(), help="detector family")
    p.add_argument("--weights", help="registered weights name or weights file (default: the bundled <model>_shapes)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    _add_backend_option(p, "torch")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--workers", type=positive_int, default=2, help="image decoding threads")
    p.add_argument("--proposal-workers", type=non_negative_int, default=default_proposal_workers(),
                   help="selective search processes for rcnn/sppnet (default: 0 on 1-2 CPUs, else min(4, CPUs - 1); "
                        "0: in-process)")
    p.add_argument("--score-threshold", type=float)
    p.add_argument("--iou-threshold", type=float)
    p.add_argument("--max-detections", type=positive_int)
    p.add_argument("--classes", help="comma-separated class names or 1-based ids to keep (default: all; a list "
                                      "naming no class is refused)")
    p.add_argument("--format", action="append", choices=FORMATS, help="output format (repeatable; default jsonl)")
    p.add_argument("--save-images", action="store_true", help="also write annotated copies (<name>.annotated.png)")
    p.add_argument("--resume", action="store_true", help="skip inputs the manifest records as done")
    _add_engine_options(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "serve",
        help="run the REST API (settings from DETECT_* environment variables)",
        description="Run the REST API. Settings are DETECT_* environment variables (api/settings.py): models, "
                    "limits, batching, timeouts (DETECT_REQUEST_TIMEOUT_S, DETECT_HEADER_TIMEOUT_S, "
                    "DETECT_BODY_TIMEOUT_S, DETECT_KEEP_ALIVE_S), DETECT_MAX_HEADER_BYTES and DETECT_API_KEY (sent "
                    "by clients as UTF-8 bytes in X-API-Key). An invalid setting is one error line and exit 2.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_backend_option(p, None)
    _add_serve_engine_options(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="detect objects in generated sample images with the bundled weights")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--model", default="faster_rcnn", choices=families(), help="detector family")
    p.add_argument("--weights", help="registered weights name or file (default: the bundled <model>_shapes)")
    p.add_argument("--num-images", type=positive_int, default=6, help="sample images to draw (default 6)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.set_defaults(func=_cmd_demo)


def _add_backend_option(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--backend", choices=BACKENDS, default=default,
        help="runtime: torch, or onnxruntime (pip install 'detect[onnx]'; --weights may be a `detect export` .onnx "
             "file, other weights are exported once into the cache), or pt2 / aoti (--weights a `detect export "
             "--format pt2|aoti` .pt2 file)"
        + ("" if default else "; default: DETECT_BACKEND, else torch"),
    )


RAY_FLAGS = ("address", "actors", "gpus_per_actor", "cpus_per_actor")


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine", "where the job runs (--engine ray: Ray Data on a Ray cluster, pip install 'detect[ray]')")
    g.add_argument("--engine", choices=("local", "ray"), default="local", help="local: this process (default); ray: a Ray cluster")
    g.add_argument("--address", help="Ray cluster: auto, ray://HOST:10001 or HOST:6379 (default: RAY_ADDRESS, else a new "
                                     "local cluster); inputs and --weights paths must be visible to its nodes")
    g.add_argument("--actors", type=positive_int, help="model actors, one model load each (default 1)")
    g.add_argument("--gpus-per-actor", type=float, help="GPUs per actor (default: 1 with a CUDA --device, else 0)")
    g.add_argument("--cpus-per-actor", type=float, help="CPUs per actor, also its torch threads (default 1)")


def _add_serve_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine", "where the service runs (--engine ray: Ray Serve replicas, pip install 'detect[ray]')")
    g.add_argument("--engine", choices=("local", "ray"), default="local", help="local: one uvicorn process; ray: Ray Serve")
    g.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else a new local cluster)")
    scale = g.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=positive_int, help="a fixed number of replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX replicas on ongoing requests")


def _ray_options(args: argparse.Namespace) -> object | None:
    """The Ray engine's options (``None`` for the local engine); Ray flags without ``--engine ray``, or Ray
    missing, are a :class:`ConfigError` (exit 2)."""
    given = [f"--{name.replace('_', '-')}" for name in RAY_FLAGS if getattr(args, name) is not None]
    if args.engine != "ray":
        if given:
            raise ConfigError(f"{given[0]} needs --engine ray")
        return None
    from detect.engines import ray as ray_engine

    ray_engine.require_ray()
    return ray_engine.RayOptions(
        address=args.address,
        actors=args.actors or 1,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=1.0 if args.cpus_per_actor is None else args.cpus_per_actor,
    )


def _cmd_predict(args: argparse.Namespace) -> int:
    check_thresholds(args.score_threshold, args.iou_threshold, args.max_detections)  # before anything is loaded
    formats = tuple(dict.fromkeys(args.format or ["jsonl"]))
    check_formats(formats)
    ray_options = _ray_options(args)
    prepare_output_dir(args.out)
    weights = args.weights or default_weights(args.model)
    if ray_options is not None and args.backend != "torch":
        raise ConfigError(f"--backend {args.backend} runs with the local engine only")
    backend = {} if args.backend == "torch" else {"backend": args.backend}  # torch: load_model's default
    detector = load_model(weights, args.device, args.model, **backend) if ray_options is None else None
    class_names = detector.class_names if detector is not None else weights_class_names(weights)
    classes = None if args.classes is None else resolve_classes([c for c in args.classes.split(",") if c.strip()], class_names)
    options = PredictOptions(
        sources=tuple(args.sources),
        out_dir=Path(args.out),
        recursive=args.recursive,
        batch_size=args.batch_size,
        refinement=Refinement(args.score_threshold, args.iou_threshold, args.max_detections, classes),
        formats=formats,
        save_images=args.save_images,
        resume=args.resume,
        workers=args.workers,
        proposal_workers=args.proposal_workers,
    )
    if ray_options is None:
        summary = run(options, detector, progress=sys.stderr)
    else:
        from detect.engines import ray as ray_engine

        model = ray_engine.ModelSource(weights, args.device, args.model)
        summary = ray_engine.run(options, model, ray_options, progress=sys.stderr)
    if summary.images + summary.failed + summary.skipped == 0:
        print("error[no_inputs]: no image found in the given sources", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_PARTIAL if summary.failed else EXIT_OK


def weights_class_names(weights: str) -> list[str]:
    """The class list of registered weights or a weights file, read from its manifest entry or metadata without
    loading the model (the Ray engine's actors load it); a :class:`WeightsError` (exit 2) when neither exists."""
    from detect import weights as registered_weights

    try:
        return list(registered_weights.resolve(weights).class_names)
    except registered_weights.WeightsError:
        if not Path(weights).is_file():
            raise
        return registered_weights.saved_architecture(weights)[1]


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from api.server import server_config
    from api.service import check_weights
    from api.settings import Settings

    settings = read_settings(Settings)
    if args.backend is not None:
        settings = settings.model_copy(update={"backend": args.backend})
    check_weights(settings)
    if args.engine == "ray":
        return _serve_on_ray(args, settings)
    if args.address is not None or args.replicas is not None or args.autoscale is not None:
        raise ConfigError("--address, --replicas and --autoscale need --engine ray")
    uvicorn.Server(server_config(create_app(settings), settings, args.host, args.port, log_level=args.log_level)).run()
    return EXIT_OK


def read_settings(settings_class: type) -> object:
    """The service settings from the ``DETECT_*`` variables; an invalid one is a :class:`ConfigError` naming the
    variable, its value and the problem (one line, exit 2), never a pydantic traceback: a value out of range or of
    the wrong type, and a JSON-valued setting (``DETECT_MODELS``, ``DETECT_CORS_ORIGINS``) that is not JSON.
    ``DETECT_API_KEY``'s value is never shown."""
    import re

    from pydantic import ValidationError
    from pydantic_settings.exceptions import SettingsError

    try:
        return settings_class()
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first.get("loc") else "?"
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(f"invalid setting {_shown_setting(field)}: {first['msg']}{more}") from None
    except SettingsError as err:  # raised before validation, when a JSON-valued setting does not parse
        found = re.search(r'field "(\w+)"', str(err))
        cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
        raise ConfigError(f"invalid setting {_shown_setting(found.group(1) if found else '?')}: not valid JSON{cause}") from None


def _shown_setting(field: str) -> str:
    """``DETECT_<FIELD>='value'`` (the value cut to 80 characters; the API key's never shown)."""
    variable = f"DETECT_{field.upper()}"
    value = os.environ.get(variable)
    if value is None or field == "api_key":
        return variable
    return f"{variable}={value[:80]!r}"


def _cmd_demo(args: argparse.Namespace) -> int:
    report = demo.run_demo(args.out, args.model, args.weights, args.num_images, args.device)
    print(demo.format_report(report))
    return EXIT_PARTIAL if report["failed"] else EXIT_OK


def _serve_on_ray(args: argparse.Namespace, settings: object) -> int:
    """``detect serve --engine ray``: the same app as Ray Serve replicas behind Serve's HTTP proxy on
    ``--host:--port``, until interrupted (see :mod:`api.ray_serve`)."""
    from detect.engines.ray import RAY_MISSING, require_ray

    require_ray()
    try:
        from api import ray_serve
    except ImportError:  # ray without its serve extra
        raise ConfigError(RAY_MISSING) from None

    scaling = ray_serve.Scaling.parse(args.replicas, args.autoscale)
    ray_serve.serve_blocking(settings, scaling, host=args.host, port=args.port, address=args.address)
    return EXIT_OK
