"""The HTTP service: routes, malformed input (4xx naming the field, never 500), the API key, streaming,
timeouts; and on a real socket: overload (503 + Retry-After), disconnect cancels, SIGTERM drains and stops."""

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="argen serve needs the serve extra: pip install -e '.[dev]'")
import httpx  # noqa: E402
import uvicorn  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from argen.data.images import to_uint8  # noqa: E402
from argen.pipeline import ARPipeline  # noqa: E402
from argen.serve.app import Limits, create_app  # noqa: E402


@pytest.fixture(scope="module")
def pipelines():
    return {name: ARPipeline.from_pretrained(name) for name in ("raster", "next-scale", "mar")}


@pytest.fixture(scope="module")
def client(pipelines):
    with TestClient(create_app(pipelines, Limits(max_images=8))) as c:
        yield c


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_models_health_and_metrics(client):
    body = client.get("/v1/models").json()
    assert body["models"]["next-scale"]["order"] == "next-scale"
    assert body["models"]["raster"]["classes"][3] == "3" and body["max_images"] == 8
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    client.post("/v1/images", json={"model": "raster", "labels": [1]})
    text = client.get("/metrics").text
    for name in (
        "argen_queue_depth",
        "argen_batch_occupancy",
        "argen_images_per_second",
        "argen_mixed_step_passes_total",
    ):
        assert re.search(rf"^{name} [0-9.]+$", text, re.M), name
    assert re.search(r'^argen_request_latency_seconds_bucket\{le="\+Inf"\} [1-9]', text, re.M)


@pytest.mark.parametrize("name", ["raster", "next-scale", "mar"])
def test_images_are_the_pipelines_for_the_same_seed(client, pipelines, name):
    response = client.post("/v1/images", json={"model": name, "labels": [3, "7"], "n": 2, "seed": 4, "output": "json"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"], body["seed"]) == (28, 28, 4)
    reference = to_uint8(pipelines[name]([3, 3, 7, 7], seed=4, output_type="pt").images)[..., 0]
    got = np.stack([png(base64.b64decode(b)) for b in body["images"]])
    assert np.array_equal(got, reference)
    grid = client.post("/v1/images", json={"model": name, "labels": [3, 7], "n": 2, "seed": 4})
    assert grid.headers["content-type"] == "image/png" and grid.headers["x-seed"] == "4"
    assert png(grid.content).shape == (2 * 30 + 2, 2 * 30 + 2)  # a row per label, 2 px gaps


BAD = [
    ({"model": "raster", "labels": []}, 422, "labels"),
    ({"model": "raster"}, 422, "labels"),
    ({"model": "raster", "labels": ["seven"]}, 422, "labels"),
    ({"model": "raster", "labels": [10]}, 422, "labels"),
    ({"model": "raster", "labels": [-1]}, 422, "labels"),
    ({"model": "raster", "labels": [[1]]}, 422, "labels"),
    ({"model": "raster", "labels": [1], "n": 0}, 422, "n"),
    ({"model": "raster", "labels": [1, 2], "n": 5}, 422, "n"),
    ({"model": "raster", "labels": [1], "n": 10**30}, 422, "n"),
    ({"model": "raster", "labels": [1], "seed": -3}, 422, "seed"),
    ({"model": "raster", "labels": [1], "seed": "x"}, 422, "seed"),
    ({"model": "raster", "labels": [1], "output": "gif"}, 422, "output"),
    ({"model": "../../etc", "labels": [1]}, 404, "model"),
    ({"model": "src/argen/assets/raster-mnist", "labels": [1]}, 404, "model"),
    ({"model": "raster", "labels": [1], "cfg_scale": -1}, 422, "cfg_scale"),
    ({"model": "raster", "labels": [1], "cfg_scale": "high"}, 422, "cfg_scale"),
    ({"model": "raster", "labels": [1], "temperature": None}, 422, "temperature"),
    ({"model": "raster", "labels": [1], "top_p": 0}, 422, "top_p"),
    ({"model": "raster", "labels": [1], "top_k": 1.5}, 422, "top_k"),
    ({"model": "raster", "labels": [1], "cfg_schedule": "wild"}, 422, "cfg_schedule"),
    ({"model": "raster", "labels": [1], "temprature": 1}, 422, "temprature"),
    ({"model": "raster", "labels": [1], "speculative": "sjd"}, 422, "speculative"),
    ({"model": "raster", "labels": [1], "guide_scale": 2}, 422, "guide_scale"),  # raster ships no guide model
    ({"model": "raster", "labels": [1], "guide_scale": -1}, 422, "guide_scale"),
    ({"model": "next-scale", "labels": [1], "prune": 2}, 422, "prune"),
    ({"model": "next-scale", "labels": [1], "prune": 0.5, "prune_scales": 99}, 422, "prune_scales"),
    ({"model": "next-scale", "labels": [1], "kv_budget": "x"}, 422, "kv_budget"),
    ({"model": "mar", "labels": [1], "head_steps": 1000}, 422, "head_steps"),  # over --max-work
    ({"model": "mar", "labels": [1], "steps": 5000}, 422, "steps"),
    ({"model": "mar", "labels": [1], "head_annealing": "wild"}, 422, "head_annealing"),
    ({"model": "mar", "labels": [1], "prune": 0.5}, 422, "prune"),  # another order's option
]


def test_the_work_cap_is_a_multiple_of_each_models_own_default(pipelines):
    mar = pipelines["mar"]
    # MAR's default: 16 AR steps + DiSA's head steps falling linearly from 100 to 10, 16 x 55 = 896 passes an image
    with TestClient(create_app({"mar": mar}, Limits(max_work=2))) as c:
        info = c.get("/v1/models").json()["models"]["mar"]
        assert (info["passes"], info["max_passes"]) == (896, 1792)
        ok = c.post("/v1/images", json={"model": "mar", "labels": [1], "steps": 4, "head_steps": 20, "output": "json"})
        assert ok.status_code == 200, ok.text
        # 4 + 4 x 448 = 1796: few AR steps do not buy a head's steps past the budget they share; the refusal names
        # the option whose default saves the most (head_clip costs nothing, head_steps_last=0 and steps=4 save less)
        body = {"model": "mar", "labels": [1], "head_clip": 2, "steps": 4, "head_steps": 448, "head_steps_last": 0}
        refused = c.post("/v1/images", json=body)
        assert refused.status_code == 422 and refused.json()["field"] == "head_steps", refused.text
        assert "1796 network passes" in refused.json()["error"] and "cap of 1792" in refused.json()["error"]
    # a model shipped with costlier defaults is served at them: its cap is measured from its own default
    costly = ARPipeline(mar.tokenizer, mar.generator, sampler=mar.config(head_steps=300, head_steps_last=0))
    with TestClient(create_app({"mar": costly}, Limits(max_work=1))) as c:
        assert c.get("/v1/models").json()["models"]["mar"]["passes"] == 16 + 16 * 300
        cheap = {"model": "mar", "labels": [1], "steps": 2, "head_steps": 1}
        assert c.post("/v1/images", json=cheap).status_code == 200
        assert c.post("/v1/images", json={"model": "mar", "labels": [1], "steps": 17}).status_code == 422


def test_a_work_cap_under_the_defaults_is_refused():
    with pytest.raises(ValueError, match=r"max_work \(--max-work\) must be at least 1"):
        Limits(max_work=0.5)


@pytest.mark.parametrize(("body", "status", "field"), BAD)
def test_malformed_input_is_a_4xx_naming_the_field(client, body, status, field):
    response = client.post("/v1/images", json=body)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field, response.text


def test_unparsable_bodies_are_4xx(client):
    for content, kind in ((b"{not json", "application/json"), (b"[1, 2]", "application/json"), (b"x", "text/plain")):
        response = client.post("/v1/images", content=content, headers={"content-type": kind})
        assert 400 <= response.status_code < 500 and "error" in response.json()
    assert client.post("/v1/images?stream=maybe", json={"labels": [1]}).json()["field"] == "stream"


def test_stream_sends_a_preview_per_step_then_the_images(client):
    with client.stream("POST", "/v1/images?stream=true", json={"model": "next-scale", "labels": [5], "seed": 1}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [
            (m.group(1), json.loads(m.group(2))) for m in re.finditer(r"event: (\w+)\ndata: (.*)\n", r.read().decode())
        ]
    kinds = [k for k, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and kinds.count("preview") == 6  # 7 scales
    steps = [d["step"] for k, d in events if k == "preview"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert png(base64.b64decode(events[1][1]["grid"])).shape == (32, 32)


def test_api_key_and_timeout(pipelines):
    with TestClient(create_app(pipelines, Limits(api_key="s3cret", timeout=0.001))) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200
        slow = c.post("/v1/images", json={"labels": [1, 2, 3]}, headers={"X-API-Key": "s3cret"})
        assert slow.status_code == 504 and "timeout" in slow.json()["error"]


class Server:
    """uvicorn on a real 127.0.0.1 socket in a thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def test_overload_gets_503_with_retry_after_on_a_real_socket(pipelines):
    # a request fills the rows (two images, unguided): one runs and two wait, so a burst of 12 overflows the queue
    # even where the machine is slow to deliver it (one image a request once let them all be served in turn)
    with Server(create_app(pipelines, Limits(max_rows=2, max_queue=2))) as s:

        async def burst():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                body = {"model": "raster", "labels": [1, 2], "cfg_scale": 1.0}
                return await asyncio.gather(*(c.post("/v1/images", json=body) for _ in range(12)))

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 503} and codes.count(200) >= 3
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) >= 1 and "queue" in r.json()["error"]
        assert httpx.get(s.url + "/readyz").status_code == 200  # all served: ready again


def test_a_full_queue_refuses_before_reading_the_request(pipelines):
    """Under overload a refusal must cost next to nothing: the gate answers 503 before the body is parsed (a
    malformed one too), after the API key and only for generation."""
    with TestClient(create_app(pipelines, Limits(max_queue=0, api_key="k"))) as c:
        key = {"X-API-Key": "k", "content-type": "application/json"}
        r = c.post("/v1/images", content=b"{not json", headers=key)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "queue" in r.json()["error"]
        assert c.post("/v1/images", json={"labels": [1]}).status_code == 401  # no key: refused as before
        assert c.get("/v1/models", headers=key).status_code == 200  # only generation waits for the queue
        assert c.app.state.service.scheduler.stats.rejected == 1


def test_a_client_that_disconnects_cancels_its_work(pipelines):
    app = create_app(pipelines)
    with Server(app) as s:
        body = {"model": "raster", "labels": [1, 2, 3, 4], "seed": 0}
        with httpx.stream("POST", s.url + "/v1/images?stream=true", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("event: preview"):
                    break  # and hang up mid-way
        scheduler = app.state.service.scheduler
        deadline = time.monotonic() + 10
        while scheduler.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not scheduler.busy and scheduler.stats.cancelled == 1 and scheduler.stats.requests == 0


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_stops_within_5_s(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "argen.cli", "serve", "--port", "0", "--model", "raster"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = re.search(r"(http://\S+/)", proc.stdout.readline()).group(1)
        assert httpx.get(url + "healthz", timeout=30).status_code == 200  # serving, signal handlers in place
        result = {}

        def request():
            result["response"] = httpx.post(url + "v1/images", json={"labels": [1, 2, 3, 4], "seed": 0}, timeout=30)

        worker = threading.Thread(target=request)
        worker.start()
        time.sleep(0.3)  # the request is in flight
        begin = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        stopped = time.monotonic() - begin
        worker.join(10)
    finally:
        proc.kill()
    assert stopped < 5, stopped
    # uvicorn re-raises the SIGTERM it caught once it has shut down gracefully
    assert proc.returncode in (0, -signal.SIGTERM), proc.returncode
    assert "Traceback" not in proc.stderr.read()
    assert result["response"].status_code == 200  # drained, not dropped
    assert result["response"].headers["content-type"] == "image/png"


def test_the_default_models_are_every_shipped_order():
    from argen.cli.serve import parse_models
    from argen.pipeline import ARPipeline

    served = parse_models(None)
    orders = {ARPipeline.from_pretrained(path).generator.order.name for path in served.values()}
    assert orders == {"raster", "next-scale", "masked", "random-order", "mar"}
