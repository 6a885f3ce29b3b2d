"""Fuzz the published OpenAPI spec (schemathesis: valid and invalid bodies, a bounded number
of examples per operation) against a real Serve instance: no request may produce a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from conftest import free_port, start_local_ray
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from memescale.testing.sample_index import build_sample_index, sample_corpus

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

MAX_EXAMPLES = 40


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    import ray

    from serve import app as serve_app

    tmp = tmp_path_factory.mktemp("serve-fuzz")
    x, md = sample_corpus(200, 64, seed=2)
    build_sample_index(tmp / "index", x, md)
    start_local_ray()
    try:
        # image_url: the fuzzer's URLs must not reach the network (the guard refuses private
        # addresses; the timeout bounds anything public it makes up).
        yield serve_app.start(tmp / "index", "configs/tiny.toml", "127.0.0.1", free_port(), overrides=[
            f'serve.telemetry_path="{tmp / "telemetry.jsonl"}"', "serve.image_url_timeout_s=2.0"])
    finally:
        serve_app.stop()
        ray.shutdown()


@pytest.fixture(scope="module")
def api_schema(base_url):
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


OPERATIONS = [("GET", "/api/health"), ("GET", "/api/info"), ("POST", "/api/search"),
              ("POST", "/api/telemetry"), ("GET", "/metrics")]


def test_every_operation_is_fuzzed(api_schema):
    published = {(r.ok().method.upper(), r.ok().path) for r in api_schema.get_all_operations()}
    assert published == set(OPERATIONS)


# One hypothesis run per operation and mode (not schemathesis' pytest loader, which does not
# work with the pytest version pinned here).
# Invalid inputs exist only for operations that take some (the POST bodies).
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"]


@pytest.mark.parametrize("method, path, mode", CASES, ids=lambda v: getattr(v, "value", v))
def test_no_server_errors(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        case.call_and_validate(checks=[not_a_server_error], timeout=30)

    run()
