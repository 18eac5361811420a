"""`python -m lightning_project.serve`: the real server over real HTTP (key, predictions, batching,
every refused request), the app's 503 in-process, the micro-batcher alone, and a bad setting.

A checkpoint of the session's sweep (ResNet-18 at 32 px); one server subprocess serves it for
the whole module, with small limits so the refusals are cheap to provoke.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
import torch
from conftest import compose_train
from PIL import Image

from lightning_project.data.images import load_image
from lightning_project.errors import UserError
from lightning_project.inference import Predictor, checkpoint_paths, find_runs
from lightning_project.serving import Busy, MicroBatcher, create_app

pytestmark = pytest.mark.slow

KEY = "secret"
AUTH = {"X-API-Key": KEY}


# ---- fixtures: one checkpoint, its predictor in-process, one server ----------------------------------
@pytest.fixture(scope="module")
def trained(sweep, photo_folder) -> tuple[Path, list[Path]]:
    """(a best checkpoint of the session's sweep, its image files: 3 colour classes)."""
    return find_runs(sweep)[0].best_checkpoint, sorted(photo_folder.rglob("*.png"))


@pytest.fixture(scope="module")
def predictor(trained) -> Predictor:
    return Predictor.load(checkpoint_paths(ckpt_path=str(trained[0])), "none", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(NamedTuple):
    url: str
    run_dir: Path


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory, env) -> Server:
    """`python -m lightning_project.serve` on the checkpoint: key `secret`, 1 MB uploads, 24 requests in
    progress at most, and a 200 ms batching window so concurrent requests surely meet."""
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_project.serve", f"ckpt_path={trained[0]}", f"serve.port={port}",
         f"serve.api_key={KEY}", "serve.batch_timeout_ms=200", "serve.max_upload_mb=1", "serve.max_queue=24",
         "device=cpu", f"hydra.run.dir={tmp / 'run'}"],
        cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the server did not come up (exit {proc.poll()}):\n{log.read()[-4000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield Server(url, tmp / "run")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def expected(predictor: Predictor, paths: list[Path]) -> torch.Tensor:
    """Probabilities computed in this process, the way predict does: file -> RGB -> pipelines -> model."""
    items = [predictor.preprocess(load_image(p)) for p in paths]
    return predictor.probabilities(tuple(torch.stack(views) for views in zip(*items)))


def as_probabilities(answer: dict, classes: list[str]) -> list[float]:
    by_class = {t["class"]: t["probability"] for t in answer["top"]}
    return [by_class[c] for c in classes]


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    """A refusal: the status, JSON {"error": one line} naming what is wrong, no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and "Traceback" not in body["error"], body
    for word in words:
        assert word in body["error"], body


# ---- the real server -------------------------------------------------------------------------------
def test_health_needs_no_key(server):
    response = httpx.get(f"{server.url}/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}],
                         ids=["no key", "wrong X-API-Key", "wrong bearer"])
def test_key_required_everywhere_but_health(server, trained, headers):
    image = trained[1][0].read_bytes()
    assert_error(httpx.post(f"{server.url}/predict", files={"file": ("a.png", image)}, headers=headers), 401, "API key")
    assert_error(httpx.get(f"{server.url}/metadata", headers=headers), 401, "X-API-Key")
    assert_error(httpx.get(f"{server.url}/no-such-route", headers=headers), 401)  # routes are not revealed either


def test_multipart_predict_matches_in_process(server, trained, predictor):
    path = trained[1][0]
    response = httpx.post(f"{server.url}/predict", files={"file": (path.name, path.read_bytes(), "image/png")},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert set(answer) == {"class", "confidence", "top"}
    assert answer["class"] in predictor.classes and answer["class"] == answer["top"][0]["class"]
    assert answer["confidence"] == answer["top"][0]["probability"]
    assert [t["probability"] for t in answer["top"]] == sorted((t["probability"] for t in answer["top"]), reverse=True)
    # 3 classes, top_classes 3: the answer carries every probability
    want = expected(predictor, [path])[0].tolist()
    assert as_probabilities(answer, predictor.classes) == pytest.approx(want, abs=1e-5)


def test_base64_json_predict(server, trained, predictor):
    path = trained[1][-1]
    encoded = base64.b64encode(path.read_bytes()).decode()
    response = httpx.post(f"{server.url}/predict", json={"image": encoded}, headers=AUTH)
    assert response.status_code == 200, response.text
    want = expected(predictor, [path])[0].tolist()
    assert as_probabilities(response.json(), predictor.classes) == pytest.approx(want, abs=1e-5)


def test_concurrent_requests_share_forward_passes(server, trained, predictor):
    paths = trained[1][:16]
    with httpx.Client(headers=AUTH, timeout=60) as client:
        before = client.get(f"{server.url}/metadata").json()["counters"]

        def post(path: Path) -> httpx.Response:
            return client.post(f"{server.url}/predict", files={"file": (path.name, path.read_bytes())})

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(post, paths))
        meta = client.get(f"{server.url}/metadata").json()
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses if r.status_code != 200]
    # each caller got its own image's answer back
    want = expected(predictor, paths)
    for response, row in zip(responses, want.tolist()):
        assert as_probabilities(response.json(), predictor.classes) == pytest.approx(row, abs=1e-5)
    counters = meta["counters"]
    assert counters["requests"] - before["requests"] == 16
    assert counters["batches"] - before["batches"] < 16 and counters["largest_batch"] > 1, counters
    assert meta["classes"] == predictor.classes and meta["model_name"] == "resnet18"
    assert meta["limits"]["max_upload_mb"] == 1 and meta["limits"]["api_key_required"] is True
    assert meta["models"][0]["checkpoint"] == trained[0].name  # the file name, not the server's path


def test_two_hundred_concurrent_requests_get_answers_or_503(server, trained, predictor):
    """Under load the server answers every request, correctly or with 503 + Retry-After past serve.max_queue
    (24 here, against 100 concurrent clients), and keeps serving afterwards."""
    paths = [trained[1][i % len(trained[1])] for i in range(200)]
    with httpx.Client(headers=AUTH, timeout=120, limits=httpx.Limits(max_connections=100)) as client:
        before = client.get(f"{server.url}/metadata").json()["counters"]

        def post(path: Path) -> httpx.Response:
            return client.post(f"{server.url}/predict", files={"file": (path.name, path.read_bytes())})

        with ThreadPoolExecutor(100) as pool:
            responses = list(pool.map(post, paths))
        after = client.get(f"{server.url}/metadata").json()["counters"]
        assert client.get(f"{server.url}/health").status_code == 200
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and codes.count(503) > 0, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and "busy" in r.json()["error"]
    want = expected(predictor, sorted(set(paths)))
    rows = dict(zip(sorted(set(paths)), want.tolist()))
    for path, r in zip(paths, responses):
        if r.status_code == 200:
            assert as_probabilities(r.json(), predictor.classes) == pytest.approx(rows[path], abs=1e-5)
    assert after["requests"] - before["requests"] == codes.count(200)
    assert after["rejected_busy"] - before["rejected_busy"] == codes.count(503)
    assert after["in_progress"] == 0


def big_png(width: int, height: int) -> bytes:
    """A flat grey PNG: tiny on disk, `width x height` pixels once decoded."""
    out = io.BytesIO()
    Image.new("L", (width, height), 128).save(out, "PNG")
    return out.getvalue()


def chunks():
    yield b'{"image": '
    yield b'"AAAA"}'


# case: (the request's keyword arguments, made when the test runs; status; words the error must hold)
BAD_REQUESTS = {
    "missing field": (lambda: dict(files={"photo": ("a.png", b"x")}), 400, ["`file`"]),
    "text field": (lambda: dict(files={"file": (None, "hello")}), 400, ["`file`", "not a file"]),
    "not an image": (lambda: dict(files={"file": ("a.png", b"hello, not an image")}), 400, ["not an image"]),
    "bad base64": (lambda: dict(json={"image": "this is not base64!"}), 400, ["base64"]),
    "missing json field": (lambda: dict(json={"picture": "AAAA"}), 400, ['"image"']),
    "bad json": (lambda: dict(content=b"{nope", headers={"Content-Type": "application/json"}), 400, ["JSON"]),
    "wrong content type": (lambda: dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415,
                           ["text/plain", "`file`"]),
    "no content length": (lambda: dict(content=chunks(), headers={"Content-Type": "application/json"}), 411,
                          ["Content-Length"]),
    "too large upload": (lambda: dict(files={"file": ("a.png", os.urandom(3 << 19))}), 413,  # 1.5 MB
                         ["1.5 MB", "limit of 1 MB"]),
    "too many pixels": (lambda: dict(files={"file": ("a.png", big_png(6000, 5000))}), 413,
                        ["6000x5000", "25,000,000"]),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_one_json_line(server, case):
    make, status, words = BAD_REQUESTS[case]
    kwargs = make()
    headers = {**AUTH, **kwargs.pop("headers", {})}
    assert_error(httpx.post(f"{server.url}/predict", headers=headers, timeout=30, **kwargs), status, *words)


def test_api_key_is_not_written_to_the_run_dir(server):
    files = [p for p in server.run_dir.rglob("*") if p.is_file()]
    assert not (server.run_dir / ".hydra").exists() and [p.name for p in files] == ["serve.log"]
    log = files[0].read_text()
    assert "serving resnet18" in log and "API key required" in log and KEY not in log


def test_unknown_route_and_method_are_json(server):
    assert_error(httpx.get(f"{server.url}/no-such-route", headers=AUTH), 404, "/no-such-route", "POST /predict")
    assert_error(httpx.get(f"{server.url}/predict", headers=AUTH), 405, "POST")


# ---- the app in-process: a full queue is 503 --------------------------------------------------------
def test_full_queue_is_503_with_retry_after(predictor, trained):
    """max_queue=1: while one request holds the place (waiting 1.5 s for company), the next is refused
    from its headers alone; the first still gets its answer."""
    image = trained[1][0].read_bytes()
    app = create_app(predictor, max_queue=1, batch_timeout_ms=1500)

    async def scenario():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
            first = asyncio.ensure_future(client.post("/predict", files={"file": ("a.png", image)}))
            for _ in range(500):
                if (await client.get("/metadata")).json()["counters"]["in_progress"] == 1:
                    break
                await asyncio.sleep(0.01)
            refused = await client.post("/predict", files={"file": ("b.png", image)})
            return refused, await first, (await client.get("/metadata")).json()["counters"]

    refused, first, counters = asyncio.run(scenario())
    assert_error(refused, 503, "busy")
    assert refused.headers["retry-after"] == "1"
    assert first.status_code == 200 and counters["rejected_busy"] == 1 and counters["requests"] == 1


# ---- the batcher alone -----------------------------------------------------------------------------
def test_batcher_answers_each_caller_and_refuses_when_full():
    async def scenario():
        release, calls = threading.Event(), []

        def times_ten(items: list[int]) -> list[int]:
            calls.append(list(items))
            release.wait(10)  # the worker holds the first batch until the queue has been filled
            return [x * 10 for x in items]

        batcher = MicroBatcher(times_ten, max_batch_size=2, timeout_s=0.05, max_queue=3)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(1))
        while not calls:  # the first batch is in the worker
            await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(batcher.submit(x)) for x in (2, 3, 4)]
        await asyncio.sleep(0)  # they take the queue's three places
        with pytest.raises(Busy):
            await batcher.submit(5)
        release.set()
        assert await first == 10
        assert await asyncio.gather(*queued) == [20, 30, 40]
        assert calls == [[1], [2, 3], [4]]  # max_batch_size 2
        stats = batcher.stats()
        await batcher.stop()
        return stats

    stats = asyncio.run(scenario())
    assert stats == {"requests": 4, "batches": 3, "largest_batch": 2, "rejected": 1, "waiting": 0}


def test_batcher_error_reaches_the_batch_and_serving_goes_on():
    async def scenario():
        def fails_on_three(items: list[int]) -> list[int]:
            if 3 in items:
                raise ValueError("three")
            return [-x for x in items]

        batcher = MicroBatcher(fails_on_three, max_batch_size=8, timeout_s=0.05, max_queue=8)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(x) for x in (1, 2, 3)), return_exceptions=True)
        after = await batcher.submit(4)
        await batcher.stop()
        return results, after

    results, after = asyncio.run(scenario())
    assert all(isinstance(r, ValueError) for r in results) and after == -4


# ---- the command's settings --------------------------------------------------------------------------
def test_bad_setting_is_one_line_before_loading(tmp_path):
    """In-process (the command's exit 2 with one line is runtime.user_errors, tested through other commands):
    the setting is named before the checkpoint, which does not exist, is read."""
    from lightning_project.serve import serve

    cfg = compose_train(["ckpt_path=never-read.ckpt", "serve.port=70000"], tmp_path, name="serve")
    with pytest.raises(UserError, match=r"^serve.port=70000: give a port number from 1 to 65535"):
        serve(cfg)
