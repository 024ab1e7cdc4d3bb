"""Schema-driven fuzz of the server with schemathesis: request bodies generated from
``/openapi.json`` (positive and negative cases), every response checked for no 5xx, a
documented status code, a documented content type and a body matching the documented schema.

Bounded: ``MAX_EXAMPLES`` cases per operation on tiny models with tight limits (best_of <= 3,
max_tokens <= 4), a few seconds on 2 cores.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")  # dev extra; the fuzz is skipped without it

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance, response_schema_conformance, status_code_conformance,
)

from rlhflab.serve.app import create_app, demo_models  # noqa: E402

MAX_EXAMPLES = 30
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _app():
    policy, tok, reward = demo_models(seed=0, hidden_size=16)
    return create_app(policy, reward, tokenizer=tok, max_best_of=3, max_tokens=4, max_prompt_tokens=64,
                      max_body_bytes=4096, max_score_responses=4, max_wait_ms=0)


APP = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def test_schema_documents_bodies_errors_and_limits():
    doc = APP.openapi()
    comps = doc["components"]["schemas"]
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/v1/score", "ScoreRequest")):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(model)
        assert {"200", "400", "413", "503"} <= set(op["responses"]), path
        assert "401" not in op["responses"], "no API key configured: 401 cannot happen"
        assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert "429" in doc["paths"][path]["post"]["responses"]
        assert "text/event-stream" in doc["paths"][path]["post"]["responses"]["200"]["content"]
    props = comps["ChatCompletionRequest"]["properties"]
    assert {"messages", "n", "best_of", "stream", "seed", "max_tokens", "temperature", "top_p", "stop"} <= set(props)
    assert [s.get("maximum") for s in props["best_of"]["anyOf"]] == [3, None]  # this server's --max-best-of
    assert comps["CompletionRequest"]["properties"]["n"]["maximum"] == 3
    assert comps["ScoreRequest"]["properties"]["responses"]["maxItems"] == 4
    assert "reward" in comps["ChatChoice"]["properties"] and "best_of" in comps["ChatCompletionResponse"]["properties"]
    with_auth = create_app(*[demo_models(hidden_size=16)[i] for i in (0, 2)], tokenizer=APP.state.models.tokenizer,
                           api_key="k").openapi()
    assert "401" in with_auth["paths"]["/v1/completions"]["post"]["responses"]


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_fuzz_no_5xx_and_no_schema_violation(case):
    case.call_and_validate(checks=CHECKS)
