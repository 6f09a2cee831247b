"""Load, faults and authentication over real HTTP on 127.0.0.1, with a fake backend whose batches the test
holds and releases: 429 with Retry-After, 504, 503 while starting and while shutting down, 401, and the
JSON error shape. Never a hang: every wait has a deadline."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_fixtures import FakeBackend, LiveServer, fake_config, until

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def on_device(pool, client, backend, name):
    """POST image ``name`` and wait until the (held) backend is running it."""
    future = pool.submit(client.post, f"/v1/detect?name={name}", content=name.encode())
    assert backend.entered.acquire(timeout=30)
    return future


def one_running_one_queued(pool, client, server, backend):
    """Image a on the held device and image b queued behind it."""
    running = on_device(pool, client, backend, "a")
    queued = pool.submit(client.post, "/v1/detect?name=b", content=b"b")
    until(lambda: server.state.batcher.depth == 1, what="b queued")
    return running, queued


def test_queue_full_is_429_with_retry_after_and_the_others_are_answered():
    backend = FakeBackend(fake_config(), max_batch=1, hold=True)
    with LiveServer(fake_config(queue_size=2), lambda c: backend) as server:
        server.wait_ready()
        with ThreadPoolExecutor(2) as pool, server.client() as client:
            first = on_device(pool, client, backend, "a")
            second = pool.submit(client.post, "/v1/detect?name=b", content=b"b")
            until(lambda: server.state.admitted == 2, what="two images in flight")
            refused = client.post("/v1/detect?name=c", content=b"c")
            assert refused.status_code == 429
            assert refused.json()["error"] == "queue-full" and int(refused.headers["Retry-After"]) >= 1
            backend.release.set()
            assert [f.result(30).status_code for f in (first, second)] == [200, 200]
            assert second.result().json()["results"][0]["path"] == "b"
        assert backend.batches == [["a"], ["b"]]
        assert server.metrics()['yolo_batch_errors_total{kind="queue-full"}'] == 1


def test_a_request_past_its_timeout_is_504_and_its_image_is_never_run():
    backend = FakeBackend(fake_config(), max_batch=1, hold=True)
    with LiveServer(fake_config(timeout_ms=300), lambda c: backend) as server:
        server.wait_ready()
        with ThreadPoolExecutor(1) as pool, server.client() as client:
            blocker = on_device(pool, client, backend, "slow")
            late = client.post("/v1/detect?name=late", content=b"y")  # queued behind the held batch
            assert late.status_code == 504 and late.json()["error"] == "timeout"
            assert blocker.result(30).status_code == 504  # its own 300 ms passed too
            backend.release.set()
            until(lambda: server.state.batcher.depth == 0, what="queue emptied")
            assert client.post("/v1/detect?name=fresh", content=b"z").status_code == 200
        assert ["late"] not in backend.batches  # cancelled while queued: never processed


def test_not_ready_while_warming_up_is_503_and_healthz_is_200():
    backend = FakeBackend(fake_config(), hold_warmup=True)
    with LiveServer(fake_config(), lambda c: backend) as server, server.client() as client:
        assert client.get("/healthz").json() == {"status": "alive"}
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["error"] == "not-ready"
        refused = client.post("/v1/detect", content=b"x")
        assert refused.status_code == 503 and refused.json()["error"] == "not-ready"
        backend.warmup_release.set()
        server.wait_ready()
        assert client.post("/v1/detect", content=b"x").status_code == 200
    assert backend.closed


def test_shutting_down_is_503_and_queued_work_still_finishes():
    backend = FakeBackend(fake_config(), max_batch=1, hold=True)
    with LiveServer(fake_config(grace_s=30), lambda c: backend) as server:
        server.wait_ready()
        with ThreadPoolExecutor(2) as pool, server.client() as client:
            running, queued = one_running_one_queued(pool, client, server, backend)
            server.state.begin_shutdown()  # what SIGTERM does first
            refused = client.post("/v1/detect?name=c", content=b"c")
            assert refused.status_code == 503 and refused.json()["error"] == "shutting-down"
            assert client.get("/readyz").status_code == 503
            backend.release.set()
            assert running.result(30).status_code == 200 and queued.result(30).status_code == 200
        assert backend.batches == [["a"], ["b"]]


def test_queued_work_past_the_grace_period_is_503():
    backend = FakeBackend(fake_config(), max_batch=1, hold=True)
    with LiveServer(fake_config(grace_s=0), lambda c: backend) as server:
        server.wait_ready()
        with ThreadPoolExecutor(2) as pool, server.client() as client:
            running, queued = one_running_one_queued(pool, client, server, backend)
            server.state.begin_shutdown()
            until(lambda: not server.state.batcher.accepting, what="intake closed")
            backend.release.set()
            assert running.result(30).status_code == 200
            late = queued.result(30)
            assert late.status_code == 503 and late.json()["error"] == "shutting-down"


def test_a_bad_image_fails_its_request_only():
    backend = FakeBackend(fake_config(), max_batch=4, hold=True)
    with LiveServer(fake_config(max_delay_ms=60_000), lambda c: backend) as server:
        server.wait_ready()
        with ThreadPoolExecutor(4) as pool, server.client() as client:
            good = [pool.submit(client.post, f"/v1/detect?name=g{i}", content=b"ok") for i in range(3)]
            bad = client.post("/v1/detect?name=broken", content=b"bad")
            assert bad.status_code == 400
            assert bad.json() == {"error": "corrupt", "detail": {"image": 0, "name": "broken",
                                                                  "reason": "corrupt JPEG: fake"}}
            until(lambda: server.state.batcher.depth == 3, what="three good images queued")
            last = pool.submit(client.post, "/v1/detect?name=g3", content=b"ok")  # fills the batch of 4
            backend.release.set()
            assert [f.result(30).status_code for f in [*good, last]] == [200] * 4
        assert [sorted(b) for b in backend.batches] == [["g0", "g1", "g2", "g3"]]


ROUTES = [("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/info"), ("GET", "/openapi.json"),
          ("POST", "/v1/detect")]


@pytest.fixture(scope="module")
def guarded():
    config = fake_config(token=TOKEN)
    with LiveServer(config, lambda c: FakeBackend(c)) as server:
        server.wait_ready(AUTH)
        yield server


@pytest.mark.parametrize("method, path", ROUTES)
@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic dXNlcjpwYXNz", f"bearer{TOKEN}", f"Bearer {TOKEN}x"])
def test_every_route_but_healthz_needs_the_token(guarded, method, path, header):
    headers = {"Authorization": header} if header else {}
    with guarded.client(headers) as client:
        response = client.request(method, path, content=b"x" if method == "POST" else None)
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "unauthorized" and response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("method, path", ROUTES)
def test_the_right_token_opens_every_route(guarded, method, path):
    with guarded.client(AUTH) as client:
        response = client.request(method, path, content=b"x" if method == "POST" else None)
    assert response.status_code == 200, response.text


def test_healthz_needs_no_token(guarded):
    with guarded.client() as client:
        assert client.get("/healthz").status_code == 200


def test_unknown_routes_and_methods_get_json_errors(guarded):
    with guarded.client(AUTH) as client:
        missing = client.get("/nope")
        wrong = client.get("/v1/detect")
    assert missing.status_code == 404 and missing.json()["error"] == "not-found"
    assert wrong.status_code == 405 and wrong.json()["error"] == "method-not-allowed"


def test_many_clients_at_once_never_hang():
    """A burst far over the queue: every request gets an answer (200 or 429), none waits past its timeout."""
    backend = FakeBackend(fake_config(), max_batch=8, streams=2)
    with LiveServer(fake_config(queue_size=8, timeout_ms=5000), lambda c: backend) as server:
        server.wait_ready()
        barrier = threading.Barrier(32)

        def one(i: int) -> int:
            with server.client() as client:
                barrier.wait(30)
                return client.post(f"/v1/detect?name=r{i}", content=b"x").status_code

        with ThreadPoolExecutor(32) as pool:
            codes = list(pool.map(one, range(32), timeout=60))
        assert set(codes) <= {200, 429} and codes.count(200) >= 8
