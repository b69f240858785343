"""Fuzzing the chat route of a live *multimodal* server from its OpenAPI schema: generated
content parts (image_url / input_audio / video with arbitrary strings) must get a 400 in
OpenAI's shape, never a 5xx (undecodable media, non-data URLs, too many media)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("openai")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from serve_fixtures import serving  # noqa: E402
from test_serve_multimodal import _make_run  # noqa: E402

pytestmark = pytest.mark.slow
EXAMPLES = 40


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with serving(_make_run(tmp_path_factory.mktemp("mmfuzz"), cross=False)) as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(live):
    schema = schemathesis.openapi.from_dict(live.http.get("/openapi.json").json())
    schema.config.update(base_url=live.url, request_timeout=60)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES)
    return schema.include(path="/v1/chat/completions")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_generated_chat_body_gets_a_server_error(case, live):
    resp = case.call_and_validate(checks=[not_a_server_error])
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err, resp.text[:500]


def test_the_schema_documents_media_parts(api_schema):
    body = api_schema.raw_schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    content = body["application/json"]["schema"]["properties"]["messages"]["items"]["properties"]["content"]
    parts = content["anyOf"][1]["items"]["anyOf"]
    kinds = {p["properties"]["type"].get("const") or p["properties"]["type"]["enum"][0] for p in parts}
    assert kinds == {"text", "image_url", "input_audio", "video"}
