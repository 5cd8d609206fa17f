"""The HTTP service: FastAPI routes over the step-level scheduler (`argen serve`).

    POST /v1/images          generate: model, labels (ids or names), n per label, seed, output, flat sampler fields
    POST /v1/images?stream=true   server-sent events: a preview after every step, then the images
    GET  /v1/models          what is loaded: order, classes, sampler defaults, limits
    GET  /healthz, /readyz   alive; ready to take work (not draining, queue not full)
    GET  /metrics            Prometheus text: queue depth, batch occupancy, images/s, latency histogram
    GET  /                   the web page (static/index.html)

A request names one of the models the server was started with, never a path. Every mistake a client can make is
a 4xx whose JSON names the field ({"error": ..., "field": ...}); a full queue is 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import io
import json
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from argen.data.images import grid, to_pil
from argen.models.interface import Condition
from argen.pipeline import ARPipeline
from argen.sampling.config import ConfigError, SamplerConfig
from argen.sampling.decode import check_guide
from argen.serve.scheduler import Draining, Event, QueueFull, Scheduler
from argen.serve.scheduler import Request as Work

STATIC = Path(__file__).parent / "static"


@dataclass
class Limits:
    max_images: int = 16  # images per request (labels x n)
    # what an image may cost, as a multiple of its model's default settings: network passes from start to done
    # (`DecodeState.passes`: a masked order's steps; MAR's AR steps plus its head's steps), one measure for every
    # order's unlike step counts, and a model shipped with costly defaults is served at them
    max_work: float = 8.0
    max_rows: int = 64  # decode-state rows running at once
    max_queue: int = 32  # requests waiting beyond them; more get 503
    timeout: float = 60.0  # seconds a request may take in all
    api_key: str | None = None  # when set, /v1/* and /metrics need "Authorization: Bearer KEY" or "X-API-Key: KEY"

    def __post_init__(self) -> None:
        if self.max_work < 1:
            raise ConfigError(f"max_work (--max-work) must be at least 1 (a model's defaults), got {self.max_work}")


class ImagesBody(BaseModel):
    """The JSON body of POST /v1/images. Fields not listed are flat sampler settings (cfg_scale, temperature,
    top_k, top_p, cfg_schedule, greedy, and the order's own options)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None  # None: the first model the server was started with
    labels: list[int | str] = Field(min_length=1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, le=2**62)
    output: str = Field("png", pattern="^(png|json)$")


class ClientError(Exception):
    """A request mistake: HTTP `status` with a message naming `field`."""

    def __init__(self, status: int, field: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers


def _passes(pipe: ARPipeline, config: SamplerConfig) -> int:
    """Network passes an image of `pipe` costs under `config` (its order's options; guidance's rows aside)."""
    options = config.options_for(pipe.generator.order)
    return pipe.generator.start(Condition.classes([0]).to(pipe.device), options).passes


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _grid_png(images: torch.Tensor, columns: int) -> bytes:
    rows = max(1, math.ceil(len(images) / columns))
    return _png(grid(images, rows=rows))


class Service:
    """The routes' state: the loaded pipelines, the scheduler and the limits."""

    def __init__(self, pipelines: dict[str, ARPipeline], limits: Limits, batching: bool = True):
        self.pipelines, self.limits = pipelines, limits
        self.scheduler = Scheduler(pipelines, limits.max_rows, limits.max_queue, batching)
        self.draining = False
        self.default_passes = {name: _passes(pipe, pipe.config()) for name, pipe in pipelines.items()}

    def models(self) -> dict[str, Any]:
        out = {}
        for name, pipe in self.pipelines.items():
            model, tokenizer = pipe.generator, pipe.tokenizer
            options = model.order.options_class
            out[name] = {
                "order": model.order.name,
                "classes": pipe.class_names,
                "defaults": pipe.sampler.flat(),
                "order_options": sorted(options.__dataclass_fields__),
                "image_size": getattr(tokenizer.config, "image_size", None),
                "previews": True,
                "passes": self.default_passes[name],
                "max_passes": self.max_passes(name),
            }
        return {"models": out, "max_images": self.limits.max_images, "max_work": self.limits.max_work}

    def max_passes(self, model: str) -> int:
        """The most network passes an image of `model` may cost."""
        return math.floor(self.limits.max_work * self.default_passes[model])

    def work(self, body: ImagesBody, previews: bool) -> Work:
        """Check a request against the loaded models and limits; every refusal names its field."""
        if body.model is None:
            body.model = next(iter(self.pipelines))
        if body.model not in self.pipelines:
            raise ClientError(
                404, "model", f"model {body.model!r} is not served; choose from {sorted(self.pipelines)}"
            )
        pipe = self.pipelines[body.model]
        total = len(body.labels) * body.n
        if total > self.limits.max_images:
            raise ClientError(
                422,
                "n",
                f"{len(body.labels)} label(s) x n={body.n} = {total} images; at most {self.limits.max_images}",
            )
        try:
            ids = pipe.label_ids([str(label) if isinstance(label, int) else label for label in body.labels])
        except ValueError as error:
            raise ClientError(422, "labels", str(error)) from None
        settings = dict(body.model_extra or {})
        _check_types(settings, pipe)
        try:
            config = pipe.config(**settings)
            # the order's own checks of its options (next-scale's prune_scales against its scales) run at start
            passes = _passes(pipe, config)
        except Exception as error:  # any setting a client gets wrong is its 4xx, never a 500
            named = sorted((n for n in settings if re.search(rf"\b{re.escape(n)}\b", str(error))), key=len)
            raise ClientError(422, named[-1] if named else "settings", f"{error}") from None
        if config.acceleration is not None:
            raise ClientError(
                422, config.acceleration.name, "the server runs the plain sampler: leave accelerations unset"
            )
        if config.guide_scale != 1.0:
            try:
                check_guide(pipe.generator, pipe.guide)
            except ConfigError as error:
                raise ClientError(422, "guide_scale", f"model {body.model!r}: {error}") from None
        if passes > self.max_passes(body.model):
            raise self.over_cap(body.model, settings, passes)
        seed = body.seed if body.seed is not None else int(torch.randint(0, 2**31, ()).item())
        return Work(body.model, ids.repeat_interleave(body.n).tolist(), seed, config, previews)

    def over_cap(self, model: str, settings: dict[str, Any], passes: int) -> ClientError:
        """The refusal of a request costing more than the cap, naming the option whose return to the model's
        default saves the most passes (the one the client most likely wants to lower)."""
        pipe = self.pipelines[model]
        given = [name for name in settings if name in pipe.generator.order.options_class.__dataclass_fields__]

        def saved(name: str) -> int:
            return passes - _passes(pipe, pipe.config(**{k: v for k, v in settings.items() if k != name}))

        field = max(given, key=saved) if given else "settings"
        return ClientError(
            422,
            field,
            f"{', '.join(f'{name}={settings[name]}' for name in given)}: {passes} network passes an image, over "
            f"the server's cap of {self.max_passes(model)} ({self.limits.max_work:g}x the "
            f"{self.default_passes[model]} of model {model!r} at its defaults): lower {field}",
        )

    def submit(self, work: Work, loop: asyncio.AbstractEventLoop) -> tuple[Any, asyncio.Queue]:
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            job = self.scheduler.submit(work, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except (QueueFull, Draining) as error:
            raise ClientError(503, "", str(error), {"Retry-After": str(self.retry_after())}) from None
        return job, events

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the recent mean latency, at least 1."""
        recent = list(self.scheduler.stats.latencies)[-50:]
        return max(1, math.ceil(sum(recent) / len(recent))) if recent else 1

    def metrics(self) -> str:
        s, sched = self.scheduler.stats, self.scheduler
        lines = [
            "# HELP argen_queue_depth Requests waiting for rows.",
            "# TYPE argen_queue_depth gauge",
            f"argen_queue_depth {len(sched.waiting)}",
            "# HELP argen_running_rows Rows in models now (an image: 2 under guidance, 3 under autoguidance).",
            "# TYPE argen_running_rows gauge",
            f"argen_running_rows {sched.running_rows}",
            "# HELP argen_batch_occupancy Running rows over the row limit.",
            "# TYPE argen_batch_occupancy gauge",
            f"argen_batch_occupancy {sched.running_rows / sched.max_rows:.4f}",
            "# HELP argen_rows_per_pass Mean rows served by one forward pass since start.",
            "# TYPE argen_rows_per_pass gauge",
            f"argen_rows_per_pass {s.rows_stepped / max(s.forward_passes, 1):.4f}",
            "# HELP argen_images_per_second Images finished per second over the last 60 s.",
            "# TYPE argen_images_per_second gauge",
            f"argen_images_per_second {s.images_per_second():.4f}",
            "# TYPE argen_forward_passes_total counter",
            f"argen_forward_passes_total {s.forward_passes}",
            "# HELP argen_mixed_step_passes_total Forward passes whose rows stood at different steps.",
            "# TYPE argen_mixed_step_passes_total counter",
            f"argen_mixed_step_passes_total {s.mixed_passes}",
            "# TYPE argen_images_total counter",
            f"argen_images_total {s.images}",
            "# HELP argen_requests_total Requests by outcome.",
            "# TYPE argen_requests_total counter",
            *(
                f'argen_requests_total{{outcome="{k}"}} {v}'
                for k, v in (("done", s.requests), ("failed", s.failed), ("cancelled", s.cancelled))
            ),
            f'argen_requests_total{{outcome="rejected"}} {s.rejected}',
            "# HELP argen_request_latency_seconds Submit to final images.",
            "# TYPE argen_request_latency_seconds histogram",
            *(
                f'argen_request_latency_seconds_bucket{{le="{b}"}} {c}'
                for b, c in zip(s.bounds, s.within, strict=True)
            ),
            f'argen_request_latency_seconds_bucket{{le="+Inf"}} {s.requests}',
            f"argen_request_latency_seconds_sum {s.latency_sum:.6f}",
            f"argen_request_latency_seconds_count {s.requests}",
        ]
        return "\n".join(lines) + "\n"


class Gate:
    """The API key, then the queue, checked on the raw ASGI request before FastAPI reads or parses anything.

    Under overload most requests are refused, so a refusal must cost next to nothing, or refusing eats the capacity
    it protects. Measured on this 2-core machine (server CPU per refused request): 1.98 ms when the refusal came
    from the route (an HTTP middleware, the body parsed by pydantic, the request checked against the model), 0.63 ms
    for a bare FastAPI route that only refuses; this gate sits below both.
    """

    def __init__(self, app, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, scope) -> JSONResponse | None:
        path, key = scope["path"], self.service.limits.api_key
        if key and (path.startswith("/v1/") or path == "/metrics"):
            headers = dict(scope["headers"])
            given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ")
            if not hmac.compare_digest(given, key.encode()):
                return _error(401, "api_key", "missing or wrong API key (header X-API-Key or Authorization: Bearer)")
        if path == "/v1/images" and scope["method"] == "POST":
            try:
                self.service.scheduler.check_room()
            except QueueFull as error:
                return _error(503, "", str(error), {"Retry-After": str(self.service.retry_after())})
        return None


def _check_types(settings: dict[str, Any], pipe: ARPipeline) -> None:
    """JSON values of the types the sampler's and the order's fields default to (an order's options class need
    not check types itself: `kv_budget="x"` would fail deep inside a step)."""
    defaults = {**pipe.sampler.flat(), **SamplerConfig().flat()}
    options = pipe.generator.order.options_class
    defaults.update({f.name: f.default for f in dataclasses.fields(options)})
    for name, value in settings.items():
        default = defaults.get(name)
        if default is None or isinstance(value, type(default)):
            ok = default is None or not (isinstance(value, bool) and not isinstance(default, bool))
        else:
            ok = isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            raise ClientError(422, name, f"{name} must be a {type(default).__name__}, got {value!r}")


def _error(status: int, field: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status, headers=headers)


def _images_json(work: Work, event: Event, columns: int) -> dict[str, Any]:
    return {
        "model": work.model,
        "seed": work.seed,
        "labels": work.labels,
        "width": int(event.images.shape[-1]),
        "height": int(event.images.shape[-2]),
        "images": [_b64(_png(image)) for image in to_pil(event.images)],
        "grid": _b64(_grid_png(event.images, columns)),
    }


def create_app(
    pipelines: dict[str, ARPipeline], limits: Limits | None = None, batching: bool = True, drain_seconds: float = 1.0
) -> FastAPI:
    """The app over `pipelines` (served name -> pipeline). The scheduler thread starts and stops with the app's
    lifespan; on shutdown requests in flight get `drain_seconds` more to finish (uvicorn's own graceful period
    comes first)."""
    service = Service(pipelines, limits or Limits(), batching)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.scheduler.start()
        yield
        service.draining = True
        await asyncio.to_thread(service.scheduler.stop, drain_seconds)

    app = FastAPI(title="argen", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    @app.exception_handler(ClientError)
    async def client_error(request: Request, error: ClientError) -> JSONResponse:
        return _error(error.status, error.field, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = [str(part) for part in first.get("loc", ()) if part not in ("body", "query")]
        field = where[0] if where else "body"
        return _error(422, field, f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, "", str(error.detail), getattr(error, "headers", None))

    app.add_middleware(Gate, service=service)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
        if name not in files:
            raise ClientError(404, "path", f"no static file {name!r}")
        return FileResponse(files[name])

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        sched = service.scheduler
        if service.draining:
            return _error(503, "", "draining: the server is shutting down")
        if len(sched.waiting) >= sched.max_queue:
            return _error(503, "", "the queue is full", {"Retry-After": str(service.retry_after())})
        return JSONResponse({"status": "ready", "models": sorted(service.pipelines)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return service.models()

    @app.post("/v1/images")
    async def images(body: ImagesBody, request: Request, stream: bool = False) -> Response:
        work = service.work(body, previews=stream)
        if service.draining:
            raise ClientError(503, "", "draining: the server is shutting down", {"Retry-After": "5"})
        job, events = service.submit(work, asyncio.get_running_loop())
        deadline = time.monotonic() + service.limits.timeout
        if stream:
            return StreamingResponse(
                _sse(job, events, work, deadline, body.n, request),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                event = await asyncio.wait_for(events.get(), timeout=remaining)
                if event.kind != "preview":
                    break
        except asyncio.TimeoutError:
            job.cancel()
            raise ClientError(
                504, "", f"the request took over the server's timeout of {service.limits.timeout:g} s"
            ) from None
        except asyncio.CancelledError:  # the client went away
            job.cancel()
            raise
        if event.kind == "error":
            return _error(500, "", event.message)
        headers = {"X-Seed": str(work.seed)}
        if body.output == "png":
            return Response(_grid_png(event.images, body.n), media_type="image/png", headers=headers)
        return JSONResponse(_images_json(work, event, body.n), headers=headers)

    return app


async def _sse(job, events: asyncio.Queue, work: Work, deadline: float, columns: int, request: Request):
    """Server-sent events: `preview` {step, num_steps, grid} after each step, then `done` (as the JSON output)
    or `error`. A client that disconnects (or the deadline) cancels the job at the next step boundary."""

    def message(kind: str, data: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    try:
        yield message("queued", {"seed": work.seed, "images": len(work.labels)})
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                yield message("error", {"error": "the request took over the server's timeout", "field": ""})
                return
            try:
                event = await asyncio.wait_for(events.get(), timeout=min(remaining, 1.0))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if event.kind == "preview":
                grid_png = _grid_png(event.images, columns)
                yield message("preview", {"step": event.step, "num_steps": event.num_steps, "grid": _b64(grid_png)})
            elif event.kind == "done":
                yield message("done", _images_json(work, event, columns))
                return
            else:
                yield message("error", {"error": event.message, "field": ""})
                return
    finally:
        job.cancel()  # no-op once done; a disconnect or timeout stops the work
