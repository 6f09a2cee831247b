"""Property-based fuzzing of the live API against the OpenAPI schema it serves (schemathesis), bounded in time.

Every generated request, valid or not, must get an answer whose status code is documented, whose content
type and body match the schema, and that is never a 5xx: random bytes as an image are a 400, not a crash.

(schemathesis' lazy ``from_fixture`` loader reads a private pytest attribute that pytest 9 no longer has, so
each operation's hypothesis strategy is driven here with ``@given`` directly.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from inference_fixtures import detector  # noqa: F401 (fixture)
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serving_fixtures import LiveServer

from yolo_batch.serving.config import ServeConfig

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
EXAMPLES = 15


@pytest.fixture(scope="module")
def served_schema(detector):
    config = ServeConfig(model=str(detector), imgsz=64, device="cpu", backend="torch", precision="fp32", port=0,
                         token=TOKEN, max_body_bytes=1 << 20,
                         max_images=4, timeout_ms=30_000.0)
    with LiveServer(config) as server:
        server.wait_ready(AUTH)
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH)


@pytest.mark.parametrize("path, method, mode", [
    ("/v1/detect", "POST", GenerationMode.POSITIVE),
    ("/v1/detect", "POST", GenerationMode.NEGATIVE),
    ("/v1/info", "GET", GenerationMode.POSITIVE),
    ("/readyz", "GET", GenerationMode.POSITIVE),
    ("/healthz", "GET", GenerationMode.POSITIVE),
    ("/metrics", "GET", GenerationMode.POSITIVE),
])
def test_every_answer_matches_the_served_schema(served_schema, path, method, mode):
    operation = served_schema[path][method]
    calls = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        calls.append(case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=60).status_code)

    check()
    assert calls, "no request was generated"
    if path == "/v1/detect":
        assert set(calls) <= {200, 400, 401, 413, 415}, calls  # 401: a negative case may mangle the token
