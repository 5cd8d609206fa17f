"""Load bench of `argen serve` on loopback (127.0.0.1 only), bounded in time: it stops by itself.

    python bench/serve_load.py [--model raster|next-scale|masked|random-order|mar] [--seconds 5]

Closed-loop clients (each sends its next request when the last one returns) at 1, 4 and 16 concurrent clients,
with step-level batching and one request at a time; then an open-loop overload at 4x the measured capacity
against a bounded queue: goodput, 503 + Retry-After, resident memory before and after. One image per request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

import httpx
import torch
import uvicorn

from argen.cli.serve import DEFAULT_MODELS
from argen.pipeline import SHIPPED, ARPipeline
from argen.serve.app import Limits, create_app


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


class Server:
    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def body(model: str, i: int) -> dict:
    return {"model": model, "labels": [i % 10], "seed": i}


async def closed_loop(url: str, model: str, clients: int, seconds: float) -> dict:
    latencies, errors = [], 0
    stop = time.monotonic() + seconds

    async def client(k: int, c: httpx.AsyncClient) -> None:
        nonlocal errors
        i = k
        while time.monotonic() < stop:
            t0 = time.monotonic()
            r = await c.post("/v1/images", json=body(model, i))
            if r.status_code == 200:
                latencies.append(time.monotonic() - t0)
            else:
                errors += 1
            i += clients

    begin = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        await asyncio.gather(*(client(k, c) for k in range(clients)))
    wall = time.monotonic() - begin
    return {"images_per_s": len(latencies) / wall, **percentiles(latencies), "errors": errors}


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50": float("nan"), "p99": float("nan")}
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"p50": q[49], "p99": q[98], "n": len(latencies)}


async def open_loop(url: str, model: str, rate: float, seconds: float) -> dict:
    """Requests arrive at `rate`/s whatever happens to them; count what is served and what is refused."""
    ok, refused, retry_after, other, latencies = 0, 0, 0, 0, []

    async def one(i: int, c: httpx.AsyncClient) -> None:
        nonlocal ok, refused, retry_after, other
        t0 = time.monotonic()
        r = await c.post("/v1/images", json=body(model, i))
        if r.status_code == 200:
            ok += 1
            latencies.append(time.monotonic() - t0)
        elif r.status_code == 503:
            refused += 1
            retry_after += "retry-after" in r.headers
        else:
            other += 1

    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    begin, tasks = time.monotonic(), []
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        i = 0
        while time.monotonic() - begin < seconds:
            tasks.append(asyncio.create_task(one(i, c)))
            i += 1
            await asyncio.sleep(max(0.0, begin + i / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    wall = time.monotonic() - begin
    return {
        "offered": i,
        "served": ok,
        "refused_503": refused,
        "with_retry_after": retry_after,
        "other": other,
        "goodput": ok / wall,
        **percentiles(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    orders = [name for name in DEFAULT_MODELS if name in SHIPPED]  # every shipped order, as `argen serve` serves
    parser.add_argument("--model", default="raster", choices=orders)
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement (at most 60)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    seconds = min(args.seconds, 60.0)
    torch.set_num_threads(args.threads)
    pipelines = {args.model: ARPipeline.from_pretrained(args.model)}
    results = {}
    for batching in (False, True):
        app = create_app(pipelines, Limits(max_queue=64), batching=batching)
        with Server(app) as url:
            for clients in (1, 4, 16):
                stats = app.state.service.scheduler.stats
                passes, rows = stats.forward_passes, stats.rows_stepped
                r = asyncio.run(closed_loop(url, args.model, clients, seconds))
                results[(batching, clients)] = r
                mode = "step-level batching" if batching else "one at a time"
                print(
                    f"{mode:20s} {clients:2d} clients: {r['images_per_s']:6.2f} images/s  "
                    f"p50 {r['p50']:.3f} s  p99 {r['p99']:.3f} s  ({r.get('n', 0)} requests, {r['errors']} errors; "
                    f"{(stats.rows_stepped - rows) / max(stats.forward_passes - passes, 1):.1f} rows/pass)",
                    flush=True,
                )
    speedup = results[(True, 16)]["images_per_s"] / results[(False, 16)]["images_per_s"]
    print(f"batching / one-at-a-time at 16 clients: {speedup:.2f}x", flush=True)

    capacity = results[(True, 16)]["images_per_s"]
    app = create_app(pipelines, Limits(max_queue=16, timeout=30))
    with Server(app) as url:
        before = rss_mib()
        r = asyncio.run(open_loop(url, args.model, 4 * capacity, seconds))
        after = rss_mib()
        passes = app.state.service.scheduler.stats
    print(
        f"overload at 4x capacity ({4 * capacity:.1f} requests/s for {seconds:g} s): offered {r['offered']}, served "
        f"{r['served']}, 503 {r['refused_503']} (Retry-After on {r['with_retry_after']}), other {r['other']}; "
        f"goodput {r['goodput']:.2f} images/s = {r['goodput'] / capacity:.0%} of capacity; p50 {r['p50']:.3f} s "
        f"p99 {r['p99']:.3f} s; rows/pass {passes.rows_stepped / max(passes.forward_passes, 1):.1f} "
        f"({passes.mixed_passes} of {passes.forward_passes} passes held rows at different steps); "
        f"RSS {before:.0f} -> {after:.0f} MiB",
        flush=True,
    )


if __name__ == "__main__":
    main()
