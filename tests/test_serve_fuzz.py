"""Fuzzing every endpoint of a live server from its own OpenAPI schema (schemathesis on
hypothesis): valid and invalid bodies, paths, headers; no generated input may get a 5xx,
and every error is JSON in OpenAI's shape. Bounded: a fixed number of examples per
operation, the server on 127.0.0.1, the tiny trained SFT checkpoint with a policy bundle
and an API key (sent with every case, so the routes behind it are reached)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("openai")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from serve_fixtures import serving  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "fuzz-key"
EXAMPLES = 30  # per operation and generation mode; the module takes ~20 s here (server start included)


@pytest.fixture(scope="module")
def live(runs, bundle, tmp_path_factory):
    keys = tmp_path_factory.mktemp("fuzz") / "keys"
    keys.write_text(KEY + "\n")
    with serving(runs["sft"], policy=bundle, api_key_file=str(keys), max_batch=8) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(live):
    raw = live.http.get("/openapi.json", headers={"authorization": f"Bearer {KEY}"}).json()
    schema = schemathesis.openapi.from_dict(raw)
    schema.config.update(base_url=live.url, headers={"authorization": f"Bearer {KEY}"}, request_timeout=60)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES)
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_generated_input_gets_a_server_error(case, live):
    resp = case.call_and_validate(checks=[not_a_server_error])
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err, resp.text[:500]


def test_the_schema_documents_the_request_bodies(api_schema, live):
    raw = api_schema.raw_schema
    for path in ("/v1/completions", "/v1/chat/completions"):
        body = raw["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["properties"]["model"]["enum"] == [live.model]
        assert body["additionalProperties"] is False and "jurisdiction" in body["properties"]
