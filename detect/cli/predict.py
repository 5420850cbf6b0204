"""``detect predict``, ``detect serve`` and ``detect demo``: the commands that run models."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import glob
import math
import os
import sys
from pathlib import Path

from detect import demo
from detect.cli.args import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, non_negative_int, positive_int
from detect.detectors import families
from detect.drawing import Style
from detect.engines.local import PredictOptions, default_proposal_workers, run
from detect.engines.outputs import FORMATS, check_formats, next_run_dir, prepare_output_dir
from detect.errors import ConfigError
from detect.inference import (
    BACKENDS,
    DEFAULT_SCORE_THRESHOLD,
    Refinement,
    check_thresholds,
    default_weights,
    load_model,
    resolve_classes,
    resolve_device,
)
from detect.io import DEFAULT_MAX_PIXELS
from detect.slicing import MERGES, SliceOptions
from detect.sources import UrlPolicy, allow_pixels, expand_lists, kind_of

__all__ = ["EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE", "add_parser"]
DEVICE_HELP = "auto (CUDA when present; the default), cpu, cuda, cuda:1, ..."


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``predict``, ``serve`` and ``demo``."""
    p = sub.add_parser("predict", help="detect objects in images, videos, streams, URLs, writing results under --out")
    p.add_argument("sources", nargs="*", metavar="SRC",
                   help="image files, folders, glob patterns, http(s) image URLs, .txt lists of those, - (one image on "
                        "stdin), video files, rtsp:// rtmp:// or http(s) video streams")
    p.add_argument("--out", help="output folder, mirroring the input tree (default: runs/predict, or runs/predict2, "
                                 "... when that exists)")
    p.add_argument("--recursive", "-r", action="store_true", help="descend into sub-folders")
    p.add_argument("--model", default="faster_rcnn", choices=families(), help="detector family")
    p.add_argument("--weights", help="registered weights name or weights file (default: the bundled <model>_shapes)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    _add_backend_option(p, "torch")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--workers", type=positive_int, default=2, help="image decoding threads")
    p.add_argument("--proposal-workers", type=non_negative_int, default=default_proposal_workers(),
                   help="selective search processes for rcnn/sppnet (default: 0 on 1-2 CPUs, else min(4, CPUs - 1); "
                        "0: in-process)")
    p.add_argument("--score-threshold", type=float, help=f"keep detections scoring at least this (default "
                   f"{DEFAULT_SCORE_THRESHOLD}; 0 keeps everything the model keeps, e.g. for evaluation)")
    p.add_argument("--iou-threshold", type=float)
    p.add_argument("--max-detections", type=positive_int)
    p.add_argument("--classes", help="comma-separated class names or 1-based ids to keep (default: all; a list "
                                      "naming no class is refused)")
    p.add_argument("--format", action="append", choices=FORMATS, help="output format (repeatable; default jsonl)")
    p.add_argument("--save-images", action="store_true", help="also write annotated copies (<name>.annotated.jpg for "
                                                               "a JPEG, else the input's format or PNG)")
    p.add_argument("--line-width", type=positive_int, help="box lines in pixels (default: scaled to the image)")
    p.add_argument("--hide-labels", action="store_true", help="draw boxes without their labels")
    p.add_argument("--hide-scores", action="store_true", help="draw class names without their scores")
    p.add_argument("--resume", action="store_true",
                   help="skip inputs the manifest records as done; a video file continues after its last finished frame")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels (default {DEFAULT_MAX_PIXELS}); raise it deliberately for "
                        "very large images (with --slice)")
    _add_source_options(p)
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
    p.add_argument("--weights", help="serve this one model: a weights file or registered name (instead of DETECT_MODELS)")
    p.add_argument("--model", help="its name in the API (default: its detector family, e.g. faster_rcnn); "
                                   "with DETECT_MODELS instead of --weights: the default model")
    p.add_argument("--device", help=f"{DEVICE_HELP} (default: DETECT_DEVICE, else auto)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--insecure", action="store_true",
                   help="serve beyond loopback without DETECT_API_KEY on purpose (silences the warning)")
    _add_backend_option(p, None)
    _add_serve_engine_options(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("demo", help="detect objects in generated sample images with the bundled weights")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--model", default="faster_rcnn", choices=families(), help="detector family")
    p.add_argument("--weights", help="registered weights name or file (default: the bundled <model>_shapes)")
    p.add_argument("--num-images", type=positive_int, default=6, help="sample images to draw (default 6)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=_cmd_demo)


def _add_backend_option(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--backend", choices=BACKENDS, default=default,
        help="runtime: torch, or onnxruntime (pip install 'detect[onnx]'; --weights may be a `detect export` .onnx "
             "file, other weights are exported once into the cache), or pt2 / aoti (--weights a `detect export "
             "--format pt2|aoti` .pt2 file)"
        + ("" if default else "; default: DETECT_BACKEND, else torch"),
    )


def _add_source_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("videos, streams and cameras")
    g.add_argument("--source", type=non_negative_int, metavar="N", help="a camera index (0: the first camera)")
    g.add_argument("--vid-stride", type=positive_int, default=1, metavar="N", help="process every Nth frame (default 1)")
    g.add_argument("--save-video", action="store_true",
                   help="write <name>.annotated.mp4 (the source's size; its fps divided by --vid-stride)")
    g.add_argument("--track", action="store_true", help="link detections across frames (ByteTrack): track_id per detection")
    g = p.add_argument_group("large images", "sliced inference: detect in overlapping tiles, merge the boxes back")
    g.add_argument("--slice", type=positive_int, metavar="PIXELS", help="tile side, e.g. 640 (default: no slicing)")
    g.add_argument("--overlap", type=float, help="overlap of neighbouring tiles, 0 to below 1 (default 0.2)")
    g.add_argument("--slice-merge", choices=MERGES, help="greedy: merge boxes cut by tile edges (default); nms: class-wise NMS")
    g.add_argument("--slice-full", action="store_true", help="also detect in the whole image, downscaled")
    g = p.add_argument_group("URLs")
    g.add_argument("--allow-private-urls", action="store_true",
                   help="allow URLs that resolve to loopback, private or link-local addresses (refused by default)")
    g.add_argument("--url-timeout", type=float, default=30.0, metavar="S", help="the most seconds one URL may take (default 30)")
    g.add_argument("--url-max-bytes", type=positive_int, default=32 * 1024 * 1024, metavar="N",
                   help="the most bytes one URL or stdin may send (default 32 MiB)")


def _slice_options(args: argparse.Namespace, batch_size: int) -> SliceOptions | None:
    """``--slice`` and its companions; the companions without ``--slice`` are a :class:`ConfigError`."""
    if args.slice is None:
        if args.overlap is not None or args.slice_merge is not None or args.slice_full:
            raise ConfigError("--overlap, --slice-merge and --slice-full need --slice")
        return None
    overlap = 0.2 if args.overlap is None else args.overlap
    return SliceOptions(args.slice, overlap, batch_size=batch_size, full_image=args.slice_full,
                        merge=args.slice_merge or "greedy")


def _url_policy(args: argparse.Namespace) -> UrlPolicy:
    if not (math.isfinite(args.url_timeout) and args.url_timeout > 0):
        raise ConfigError(f"--url-timeout must be above 0, got {args.url_timeout}")
    return UrlPolicy(
        connect_timeout_s=min(5.0, args.url_timeout), read_timeout_s=min(10.0, args.url_timeout),
        total_timeout_s=args.url_timeout, max_bytes=args.url_max_bytes, allow_private=args.allow_private_urls,
    )


def _split_sources(args: argparse.Namespace) -> tuple[list[str], list[str | int]]:
    """(image sources, video sources): ``.txt`` lists expanded, videos and streams apart, the camera last."""
    images, videos = [], []
    for source in expand_lists(args.sources):
        if kind_of(source) == "video" and glob.has_magic(source):  # clips/*.mp4: the matching files, sorted
            videos.extend(sorted(p for p in glob.glob(source, recursive=True) if os.path.isfile(p)))
        else:
            (videos if kind_of(source) in ("video", "stream") else images).append(source)
    if args.source is not None:
        videos.append(args.source)
    if not images and not videos:
        raise ConfigError("no input: give SRC (files, folders, URLs, -, videos, streams) or --source N (a camera)")
    if images.count("-") > 1:
        raise ConfigError("- (stdin) may be given once")
    return images, videos


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
    g.add_argument("--ingress", choices=("auto", "haproxy", "proxy"),
                   help="what answers on --port for a local Ray cluster: haproxy (straight to the replicas), proxy "
                        "(Serve's HTTP proxy); default auto: haproxy when it is installed")


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
    if args.out is None and args.resume:
        raise ConfigError("--resume needs --out (the folder of the run to resume)")
    slicing = _slice_options(args, args.batch_size)
    url_policy = _url_policy(args)
    image_sources, video_sources = _split_sources(args)
    if ray_options is not None and (slicing is not None or video_sources or any(kind_of(s) in ("url", "stdin") for s in image_sources)):
        raise ConfigError("--slice, videos, streams, cameras, URLs and - run with the local engine only")
    if (args.track or args.save_video or args.vid_stride != 1) and not video_sources:
        raise ConfigError("--track, --save-video and --vid-stride apply to videos, streams and cameras; none was given")
    if args.max_pixels > DEFAULT_MAX_PIXELS:
        allow_pixels(args.max_pixels)
    out = Path(args.out) if args.out is not None else next_run_dir()
    args.out = str(out)
    prepare_output_dir(out)
    weights = args.weights or default_weights(args.model)
    if ray_options is not None and args.backend != "torch":
        raise ConfigError(f"--backend {args.backend} runs with the local engine only")
    backend = {} if args.backend == "torch" else {"backend": args.backend}  # torch: load_model's default
    detector = load_model(weights, args.device, args.model, **backend) if ray_options is None else None
    class_names = detector.class_names if detector is not None else weights_class_names(weights)
    classes = None if args.classes is None else resolve_classes([c for c in args.classes.split(",") if c.strip()], class_names)
    score = DEFAULT_SCORE_THRESHOLD if args.score_threshold is None else args.score_threshold
    args.score_threshold = score
    if not image_sources:
        return _predict_videos(args, detector, video_sources, classes, slicing)
    options = PredictOptions(
        sources=tuple(image_sources),
        out_dir=out,
        recursive=args.recursive,
        batch_size=args.batch_size,
        refinement=Refinement(score, args.iou_threshold, args.max_detections, classes),
        formats=formats,
        save_images=args.save_images,
        style=Style(args.line_width, args.hide_labels, args.hide_scores),
        resume=args.resume,
        workers=args.workers,
        proposal_workers=args.proposal_workers,
        model=f"{args.model}:{weights}:{args.backend}",
        max_pixels=args.max_pixels,
        slicing=slicing,
        url_policy=url_policy,
    )
    if ray_options is None:
        summary = run(options, detector, progress=sys.stderr)
    else:
        from detect.engines import ray as ray_engine

        model = ray_engine.ModelSource(weights, resolve_device(args.device), args.model)  # auto: as this machine
        summary = ray_engine.run(options, model, ray_options, progress=sys.stderr)
    video_status = _predict_videos(args, detector, video_sources, classes, slicing) if video_sources else EXIT_OK
    if summary.images + summary.failed + summary.skipped == 0 and not video_sources:
        print("error[no_inputs]: no image found in the given sources", file=sys.stderr)
        return EXIT_USAGE
    done = summary.images + summary.skipped
    print(f"saved {done} result{'s' if done != 1 else ''} to {out}", file=sys.stderr)
    return EXIT_PARTIAL if summary.failed or video_status != EXIT_OK else EXIT_OK


def _predict_videos(
    args: argparse.Namespace, detector: object, sources: list, classes: tuple[int, ...] | None, slicing: object
) -> int:
    """Each video, stream or camera in turn (:func:`detect.engines.video.predict_video`); one summary line each on
    stderr, and ``error[code]: message`` for one that stopped early (exit 1)."""
    from detect.engines.video import VideoOptions, predict_video

    options = VideoOptions(
        out_dir=Path(args.out).resolve(), stride=args.vid_stride, batch_size=args.batch_size,
        refinement=Refinement(args.score_threshold, args.iou_threshold, args.max_detections, classes),
        save_video=args.save_video, resume=args.resume, track=args.track, slicing=slicing,
    )
    failed = False
    for source in sources:
        summary = predict_video(source, detector, options, progress=sys.stderr)
        print(summary.line(), file=sys.stderr)
        if summary.error is not None:
            failed = True
            print(f"error[{summary.error.code}]: {summary.error.message}", file=sys.stderr)
    return EXIT_PARTIAL if failed else EXIT_OK


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

    from api.settings import ModelSpec

    settings = read_settings(Settings)
    update: dict[str, object] = {}
    if args.backend is not None:
        update["backend"] = args.backend
    if args.device is not None:
        update["device"] = args.device
    if args.weights is not None:  # one model, no DETECT_MODELS JSON needed
        name = args.model or weights_family(args.weights)
        update |= {"models": {name: ModelSpec(family=weights_family(args.weights), weights=args.weights)}, "default_model": name}
    elif args.model is not None:
        update["default_model"] = args.model
    settings = settings.model_copy(update=update)
    warning = exposure_warning(args.host, settings.api_key is not None, args.insecure)
    if warning is not None:
        logging.getLogger("detect.serve").warning("%s", warning)
    check_weights(settings)
    if args.engine == "ray":
        return _serve_on_ray(args, settings)
    if any(v is not None for v in (args.address, args.replicas, args.autoscale, args.ingress)):
        raise ConfigError("--address, --replicas, --autoscale and --ingress need --engine ray")
    app = create_app(settings)
    app.state.service.address = f"http://{_url_host(args.host)}:{args.port}"
    uvicorn.Server(server_config(app, settings, args.host, args.port, log_level=args.log_level)).run()
    return EXIT_OK


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def weights_family(weights: str) -> str:
    """The detector family of registered weights or a weights file (a torchvision checkpoint is Faster R-CNN);
    a :class:`WeightsError` (exit 2) when the weights are neither."""
    from detect import weights as registered_weights
    from detect.detectors import DETECTORS

    try:
        name = registered_weights.resolve(weights).architecture.get("builder")
    except registered_weights.WeightsError:
        if not Path(weights).is_file():
            raise
        try:
            name = registered_weights.saved_architecture(weights)[0]
        except (registered_weights.WeightsError, OSError, ValueError):
            name = None  # not ours: a torchvision checkpoint, which load_detector reads as Faster R-CNN
    return DETECTORS[name].family if name in DETECTORS else "faster_rcnn"


def exposure_warning(host: str, has_key: bool, insecure: bool) -> str | None:
    """The warning for a service reachable beyond this machine with no API key (``None`` when the host is
    loopback, a key is set, or ``--insecure`` says it is meant)."""
    if has_key or insecure or _is_loopback(host):
        return None
    return (f"serving on {host} without an API key: anyone who can reach this address can use the service; set "
            f"DETECT_API_KEY (clients send it in X-API-Key), or pass --insecure to serve openly on purpose")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


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
    """``detect serve --engine ray``: the same app as Ray Serve replicas behind HAProxy or Serve's HTTP proxy on
    ``--host:--port``, until interrupted (see :mod:`api.ray_serve`)."""
    from detect.engines.ray import RAY_MISSING, require_ray

    require_ray()
    try:
        from api import ray_serve
    except ImportError:  # ray without its serve extra
        raise ConfigError(RAY_MISSING) from None

    scaling = ray_serve.Scaling.parse(args.replicas, args.autoscale)
    ray_serve.serve_blocking(settings, scaling, host=args.host, port=args.port, address=args.address,
                             ingress=args.ingress or "auto")
    return EXIT_OK
