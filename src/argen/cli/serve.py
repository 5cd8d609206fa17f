"""`argen serve`: the HTTP service and its web page over models loaded once (needs the `argen[serve]` extra)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import webbrowser

from argen.cli.common import check_device, positive_int, shipped_models
from argen.errors import ConfigError

log = logging.getLogger(__name__)
DEFAULT_MODELS = ["raster", "next-scale", "masked", "random-order", "mar"]  # every shipped order (mar where packed)


def positive_float(text: str, minimum: float = 0.0) -> float:
    """argparse type: a finite number > 0 (at least `minimum` when given)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf") or value < minimum:
        raise argparse.ArgumentTypeError(f"expected a number {f'>= {minimum:g}' if minimum else '> 0'}, got {text!r}")
    return value


def work_multiple(text: str) -> float:
    """argparse type of --max-work: a multiple of a model's default cost, at least 1 (its own defaults)."""
    return positive_float(text, minimum=1.0)


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="HTTP service + web page with step-level batching (pip install argen[serve])")
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME[=PATH]",
        help=f"a model to serve: a shipped name ({', '.join(shipped_models())}), or NAME=PATH of a pipeline folder "
        f"(repeatable; default: {', '.join(DEFAULT_MODELS)}); requests can name only these",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback wants --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free one)")
    p.add_argument("--api-key", default=None, help="require this key (default: $ARGEN_API_KEY, else no key)")
    p.add_argument("--max-images", type=positive_int, default=16, help="images per request")
    p.add_argument(
        "--max-work",
        type=work_multiple,
        default=8.0,
        help="what an image may cost, as a multiple of its model's default (at least 1): network passes (steps, MAR's "
        "head steps)",
    )
    p.add_argument(
        "--max-rows",
        type=positive_int,
        default=64,
        help="rows running through a model at once (an image counts 2 under guidance, 3 under autoguidance)",
    )
    p.add_argument("--max-queue", type=positive_int, default=32, help="waiting requests; beyond them 503")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="seconds a request may take")
    p.add_argument("--no-batching", action="store_true", help="run one request at a time (a baseline)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--open", action="store_true", help="open the page in a browser")
    p.set_defaults(func=cmd_serve)


def parse_models(items: list[str] | None) -> dict[str, str]:
    """['raster', 'mine=runs/x/pipeline'] -> {served name: shipped name or folder}."""
    out = {}
    for item in items or [name for name in DEFAULT_MODELS if name in shipped_models()]:
        name, _, path = item.partition("=")
        if not name or (not path and "/" in name):
            raise ConfigError(f"--model {item!r}: give a shipped name or NAME=PATH")
        if name in out:
            raise ConfigError(f"--model {name!r} is given twice")
        out[name] = path or name
    return out


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from argen.serve.app import Limits, create_app
    except ImportError as error:
        raise ImportError(f"argen serve needs the serve extra: pip install 'argen[serve]' ({error})") from None
    from argen.pipeline import ARPipeline

    device = args.device or "cpu"
    check_device(device)
    api_key = args.api_key or os.environ.get("ARGEN_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("binding %s without an API key: anyone who reaches it can use it", args.host)
    pipelines = {
        name: ARPipeline.from_pretrained(path, device=device) for name, path in parse_models(args.model).items()
    }
    limits = Limits(args.max_images, args.max_work, args.max_rows, args.max_queue, args.timeout, api_key)
    app = create_app(pipelines, limits, batching=not args.no_batching)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    host, port = sock.getsockname()[:2]
    url = f"http://{host if family == socket.AF_INET else f'[{host}]'}:{port}/"
    print(f"serving {', '.join(pipelines)} on {url} (Ctrl-C or SIGTERM stops)", flush=True)
    if args.open:
        webbrowser.open(url)
    # SIGTERM: uvicorn stops accepting, gives requests in flight 3 s, then the scheduler drains for 1 s more.
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
