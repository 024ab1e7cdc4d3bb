"""Best-of-N serving (rlhflab.serve.app): OpenAI shape, RM reranking, limits, auth, concurrency, cancellation.

Models are tiny random Llamas on a byte-level tokenizer (``demo_models``), so a prompt's token
count is its UTF-8 byte count and every expected ``prompt_tokens`` below is counted by hand.
The policy/RM directories are written and served the way ``rlhflab serve`` loads them.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from rlhflab.models.reward import RewardModel
from rlhflab.serve.app import BackgroundServer, ServeError, _quantile, create_app, cut_at_stop, demo_models, serve

PROMPT = "SUBREDDIT: r/cats\n\nTITLE: my cat\n\nPOST: she naps\n\nTL;DR:"  # 17+2+13+2+14+2+6 = 56 ASCII bytes = 56 tokens
LIMITS = dict(max_best_of=8, max_tokens=32, max_prompt_tokens=64, max_body_bytes=2048, max_score_responses=8)
BIAS = 0.5


@pytest.fixture(scope="module")
def models():
    return demo_models(seed=0, reward_bias=BIAS)


@pytest.fixture(scope="module")
def dirs(models, tmp_path_factory):
    policy, tok, reward = models
    root = tmp_path_factory.mktemp("serve")
    policy.save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    reward.save(root / "reward")
    return root / "policy", root / "reward"


@pytest.fixture(scope="module")
def client(dirs):
    # Served from directories, as `rlhflab serve --policy ... --reward ...` does.
    app = create_app(*dirs, device="cpu", **LIMITS)
    with TestClient(app) as c:
        yield c


def fresh_app(models, **kw):
    policy, tok, reward = models
    return create_app(policy, reward, tokenizer=tok, **{**LIMITS, **kw})


def complete(client, **body):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, **body})
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------ completions
def test_prompt_tokens_are_bytes(models):
    assert len(PROMPT.encode()) == 56
    assert models[1](PROMPT, add_special_tokens=False)["input_ids"].__len__() == 56


def test_completion_has_openai_shape_and_usage(client):
    data = complete(client, n=2, best_of=3, max_tokens=8, seed=1)
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    assert isinstance(data["created"], int) and data["model"].endswith("policy")
    assert [c["index"] for c in data["choices"]] == [0, 1]
    for c in data["choices"]:
        assert set(c) == {"text", "index", "logprobs", "finish_reason", "reward"}
        assert c["logprobs"] is None and c["finish_reason"] in ("stop", "length")
    cands = data["best_of"]["candidates"]
    assert len(cands) == 3 and [c["index"] for c in cands] == [0, 1, 2]
    for c in cands:
        # 8 tokens unless EOS came first ("stop" counts through the EOS).
        assert (c["finish_reason"] == "length") == (c["completion_tokens"] == 8)
        assert 1 <= c["completion_tokens"] <= 8
    used = sum(c["completion_tokens"] for c in cands)
    assert data["usage"] == {"prompt_tokens": 56, "completion_tokens": used, "total_tokens": 56 + used}


def test_best_of_returns_highest_rm_scored_candidates(client):
    data = complete(client, n=3, best_of=6, seed=3)
    cands = data["best_of"]["candidates"]
    texts = [c["text"] for c in cands]
    assert len(set(texts)) == 6  # sampled, not six copies
    scored = client.post("/v1/score", json={"prompt": PROMPT, "responses": texts}).json()["scores"]
    assert [c["reward"] for c in cands] == pytest.approx(scored, abs=1e-5)
    ranked = sorted(range(6), key=lambda i: -scored[i])
    assert data["best_of"]["picked_index"] == ranked[0]
    assert [c["text"] for c in data["choices"]] == [texts[i] for i in ranked[:3]]
    assert [c["reward"] for c in data["choices"]] == pytest.approx([scored[i] for i in ranked[:3]], abs=1e-5)
    assert data["choices"][0]["reward"] > data["choices"][1]["reward"] > data["choices"][2]["reward"]


def test_n_without_best_of_returns_n_ranked(client):
    data = complete(client, n=4, seed=5)
    assert len(data["choices"]) == 4 and len(data["best_of"]["candidates"]) == 4
    rewards = [c["reward"] for c in data["choices"]]
    assert rewards == sorted(rewards, reverse=True)


def test_seed_reproduces_and_differs(client):
    a = complete(client, best_of=2, seed=11)["best_of"]["candidates"]
    b = complete(client, best_of=2, seed=11)["best_of"]["candidates"]
    c = complete(client, best_of=2, seed=12)["best_of"]["candidates"]
    assert [x["text"] for x in a] == [x["text"] for x in b]
    assert [x["text"] for x in a] != [x["text"] for x in c]


def test_greedy_candidates_are_identical(client):
    cands = complete(client, best_of=3, temperature=0)["best_of"]["candidates"]
    assert len({c["text"] for c in cands}) == 1


def test_stop_string_cuts_text_and_finishes_with_stop(client):
    full = complete(client, best_of=1, max_tokens=24, seed=21)["best_of"]["candidates"][0]
    assert full["finish_reason"] == "length", "seed 21 should not hit EOS within 24 tokens"
    text = full["text"]
    stop = next(ch for ch in text[2:] if ch.isascii() and ch.isprintable())
    expected = text[: text.index(stop)]
    cut = complete(client, best_of=1, max_tokens=24, seed=21, stop=[stop, "never-there"])
    cand = cut["best_of"]["candidates"][0]
    assert cand["text"] == expected and cand["finish_reason"] == "stop"
    assert cand["completion_tokens"] < 24  # generation itself stopped early, not only the text
    assert cut["choices"][0]["text"] == expected


def test_prompt_list_of_one_string(client):
    data = client.post("/v1/completions", json={"prompt": ["abc"], "max_tokens": 2, "seed": 0}).json()
    assert data["usage"]["prompt_tokens"] == 3


def test_prompt_limit_boundary(client):
    ok = client.post("/v1/completions", json={"prompt": "a" * 64, "max_tokens": 1})
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] == 64
    bad = client.post("/v1/completions", json={"prompt": "é" * 33, "max_tokens": 1})  # 66 bytes = 66 tokens
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "prompt is 66 tokens; the limit is 64"


def test_context_length_is_checked(models):
    client = TestClient(fresh_app(models, max_prompt_tokens=300, max_tokens=32))  # policy context: 256
    r = client.post("/v1/completions", json={"prompt": "a" * 250, "max_tokens": 7})
    assert r.status_code == 400
    assert "prompt (250 tokens) + max_tokens (7) exceeds the policy's context of 256 tokens" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": "a" * 250, "max_tokens": 6}).status_code == 200


# ------------------------------------------------------------------ /v1/score
def test_score_is_raw_minus_bias(client, models):
    r = client.post("/v1/score", json={"prompt": PROMPT, "responses": [" she sleeps", " a cat", " zzz"]}).json()
    assert r["bias"] == BIAS and r["object"] == "score"
    assert r["scores"] == pytest.approx([x - BIAS for x in r["raw_scores"]], abs=1e-6)
    direct = models[2].score_texts([PROMPT] * 3, [" she sleeps", " a cat", " zzz"], normalize=False)
    assert r["raw_scores"] == pytest.approx(direct.tolist(), abs=1e-5)


# ------------------------------------------------------------------ bad input -> 4xx, OpenAI error shape
BAD_COMPLETIONS = [
    ({"prompt": PROMPT, "n": "2"}, 400, "n", "'n': Input should be a valid integer"),
    ({"prompt": PROMPT, "n": True}, 400, "n", "'n': Input should be a valid integer"),
    ({"prompt": PROMPT, "n": 0}, 400, "n", "greater than or equal to 1"),
    ({}, 400, "prompt", "missing required field 'prompt'"),
    ({"prompt": 5}, 400, "prompt", "'prompt' must be a string (or a list of one string) (got 5)"),
    ({"prompt": ""}, 400, "prompt", "'prompt' is empty"),
    ({"prompt": ["a", "b"]}, 400, "prompt", "a list of exactly one string (got a list of 2 item(s)"),
    ({"prompt": [1, 2, 3]}, 400, "prompt", "token-id prompts are not supported"),
    ({"prompt": PROMPT, "best_of": 9}, 400, "best_of", "'best_of' is 9; the limit is 8"),
    ({"prompt": PROMPT, "n": 9}, 400, "n", "'n' is 9; the limit is 8"),
    ({"prompt": PROMPT, "n": 3, "best_of": 2}, 400, "n", "'n' (3) must be <= 'best_of' (2)"),
    ({"prompt": PROMPT, "max_tokens": 33}, 400, "max_tokens", "'max_tokens' is 33; the limit is 32"),
    ({"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"prompt": PROMPT, "temperature": -0.1}, 400, "temperature", "greater than or equal to 0"),
    ({"prompt": PROMPT, "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    ({"prompt": PROMPT, "temperature": "hot"}, 400, "temperature", "'temperature': Input should be a valid number (got \"hot\")"),
    ({"prompt": PROMPT, "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"prompt": PROMPT, "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "'stop' has 5 strings; at most 4"),
    ({"prompt": PROMPT, "stop": ""}, 400, "stop", "'stop' strings must be non-empty"),
    ({"prompt": PROMPT, "stop": 3}, 400, "stop", "'stop' must be a string or a list of strings (got 3)"),
    ({"prompt": PROMPT, "stop": ["a", 1]}, 400, "stop", "'stop' must be a string or a list of strings (got [\"a\", 1])"),
    ({"prompt": PROMPT, "echo": True}, 400, "echo", "'echo' is not supported"),
    ({"prompt": PROMPT, "seed": 2**64}, 400, "seed", "less than or equal to 9223372036854775807"),
    ({"prompt": PROMPT, "stream": "yes"}, 400, "stream", "'stream': Input should be a valid boolean"),
    ({"prompt": PROMPT, "logprobs": 2}, 400, "logprobs", "'logprobs' is not supported"),
    ({"prompt": PROMPT, "best_off": 2}, 400, "best_off", "unknown field 'best_off'"),
]


def assert_error(r, status, param=None, fragment=""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert fragment in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize("body,status,param,fragment", BAD_COMPLETIONS)
def test_bad_completion_requests(client, body, status, param, fragment):
    assert_error(client.post("/v1/completions", json=body), status, param, fragment)


@pytest.mark.parametrize("body,param,fragment", [
    ({"responses": ["a"]}, "prompt", "missing required field 'prompt'"),
    ({"prompt": "p", "responses": []}, "responses", "at least 1 item"),
    ({"prompt": "p", "responses": "a"}, "responses", "valid list"),
    ({"prompt": "p", "responses": ["a", 1]}, "responses", "'responses.1': Input should be a valid string"),
    ({"prompt": "p", "responses": ["a"] * 9}, "responses", "9 responses; the limit is 8 per request"),
])
def test_bad_score_requests(client, body, param, fragment):
    assert_error(client.post("/v1/score", json=body), 400, param, fragment)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/score"])
def test_malformed_bodies(client, path):
    assert_error(client.post(path, content=b"{not json", headers={"content-type": "application/json"}),
                 400, fragment="request body is not valid JSON")
    assert_error(client.post(path, content=b""), 400, fragment="empty request body")
    assert_error(client.post(path, json=[1, 2]), 400, fragment="must be a JSON object, got list")
    assert_error(client.post(path, content=b"\xff\xfe"), 400, fragment="not valid JSON")


def test_body_size_limit(client):
    big = {"prompt": "a" * 3000}  # > 2048 bytes
    assert_error(client.post("/v1/completions", json=big), 413, fragment="exceeds the limit of 2048 bytes")
    # Without Content-Length (chunked): refused from the bytes actually read.
    chunks = iter([b'{"prompt": "', b"a" * 1500, b"a" * 1500, b'"}'])
    r = client.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert_error(r, 413, fragment="request body exceeds the limit of 2048 bytes")


def test_unknown_path_and_method_are_json(client):
    assert_error(client.get("/v2/nothing"), 404, fragment="no such endpoint: GET /v2/nothing")
    assert_error(client.get("/v1/completions"), 405, fragment="method GET not allowed on /v1/completions")


# ------------------------------------------------------------------ auth, health, metrics, page
def test_api_key(models):
    client = TestClient(fresh_app(models, api_key="s3cret"))
    body = {"prompt": "abc", "max_tokens": 2}
    assert_error(client.post("/v1/completions", json=body), 401, fragment="missing or invalid API key")
    assert_error(client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(client.post("/v1/score", json={"prompt": "a", "responses": ["b"]}), 401)
    assert_error(client.get("/metrics"), 401)
    ok = {"Authorization": "Bearer s3cret"}
    assert client.post("/v1/completions", json=body, headers=ok).status_code == 200
    assert client.get("/metrics", headers=ok).status_code == 200
    assert client.get("/health").json()["auth"] is True  # public
    assert client.get("/").status_code == 200  # public


def test_health_and_page(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["device"] == "cpu"
    assert h["policy"].endswith("policy") and h["reward"].endswith("reward")
    assert h["limits"]["max_best_of"] == 8 and h["auth"] is False
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html")
    assert "best-of-N" in page.text and "http://" not in page.text and "https://" not in page.text  # no CDN
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == h["policy"]


def prometheus(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} of a Prometheus text exposition, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(smp.name, frozenset(smp.labels.items())): smp.value
            for fam in text_string_to_metric_families(text) for smp in fam.samples}


def test_metrics_are_prometheus_text(models):
    client = TestClient(fresh_app(models))
    a = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3, "best_of": 2, "seed": 0}).json()
    b = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "abc"}], "max_tokens": 4,
                                                  "seed": 1}).json()
    client.post("/v1/completions", json={"prompt": ""})
    client.post("/v1/score", json={"prompt": "a", "responses": ["b"]})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    m = prometheus(r.text)
    req = lambda ep, st: m[("rlhflab_requests_total", frozenset({"endpoint": ep, "status": st}.items()))]
    assert req("POST /v1/completions", "200") == 1 and req("POST /v1/completions", "400") == 1
    assert req("POST /v1/chat/completions", "200") == 1 and req("POST /v1/score", "200") == 1
    tokens = a["usage"]["completion_tokens"] + b["usage"]["completion_tokens"]
    assert m[("rlhflab_generated_tokens_total", frozenset())] == tokens
    assert m[("rlhflab_generated_candidates_total", frozenset())] == 3
    assert m[("rlhflab_batch_rows_count", frozenset())] == 2  # two generation batches (sequential requests)
    assert m[("rlhflab_batch_rows_sum", frozenset())] == 3  # of 2 + 1 rows
    assert m[("rlhflab_queue_depth", frozenset())] == 0
    assert m[("rlhflab_requests_cancelled_total", frozenset())] == 0
    lat = frozenset({"endpoint": "POST /v1/completions"}.items())
    assert m[("rlhflab_request_duration_seconds_count", lat)] == 2
    assert 0 < m[("rlhflab_request_duration_seconds_sum", lat)] < 60
    assert m[("rlhflab_request_duration_seconds_bucket", lat | {("le", "+Inf")})] == 2


def test_quantile_and_stop_helpers():
    assert _quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert _quantile([1.0, 2.0, 3.0, 4.0], 0.95) == pytest.approx(3.85)
    assert _quantile([7.0], 0.95) == 7.0
    assert cut_at_stop("abc\n\nxyz.", ["\n\n", "."]) == "abc"
    assert cut_at_stop("abc", ["z"]) is None


def test_serve_refuses_unset_api_key_env(dirs, monkeypatch):
    monkeypatch.delenv("RLHFLAB_TEST_KEY", raising=False)
    with pytest.raises(ServeError, match="environment variable RLHFLAB_TEST_KEY is not set"):
        serve(*dirs, api_key_env="RLHFLAB_TEST_KEY")
    with pytest.raises(ServeError, match="--policy /nonexistent: no such directory"):
        serve("/nonexistent", dirs[1])


def test_create_app_refuses_bad_arguments(models, tmp_path):
    policy, tok, reward = models
    with pytest.raises(ServeError, match="needs its tokenizer"):
        create_app(policy, reward)
    with pytest.raises(ServeError, match="no policy at"):
        create_app(tmp_path, reward)
    with pytest.raises(ServeError, match="max_best_of must be a positive integer"):
        create_app(policy, reward, tokenizer=tok, max_best_of=0)


def test_openai_client_completions(models):
    import openai

    with BackgroundServer(fresh_app(models)) as srv:
        oc = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
        r = oc.completions.create(model="x", prompt="abc", n=2, best_of=3, max_tokens=4, temperature=0.7)
        assert len(r.choices) == 2 and r.usage.prompt_tokens == 3
        best = r.model_extra["best_of"]  # the extension survives the client's parsing
        assert r.choices[0].text == best["candidates"][best["picked_index"]]["text"]
        assert r.choices[0].model_extra["reward"] >= r.choices[1].model_extra["reward"]
        with pytest.raises(openai.BadRequestError, match="must be <= 'best_of'"):
            oc.completions.create(model="x", prompt="abc", n=3, best_of=2, max_tokens=4)


# ------------------------------------------------------------------ concurrency and cancellation
def test_health_and_scoring_answer_during_slow_generation(models, monkeypatch):
    app = fresh_app(models)
    real_generate = app.state.models.generate_batch
    started = threading.Event()

    def slow_generate(*args, **kwargs):
        started.set()
        time.sleep(1.5)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(app.state.models, "generate_batch", slow_generate)
    with BackgroundServer(app) as srv:
        result = {}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(
            srv.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 2}, timeout=30)))
        t.start()
        assert started.wait(10)
        t0 = time.perf_counter()
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
        # The RM has its own lock: scoring is not serialised behind the policy's generation.
        assert httpx.post(srv.url + "/v1/score", json={"prompt": "a", "responses": ["b"]}, timeout=5).status_code == 200
        elapsed = time.perf_counter() - t0
        assert t.is_alive(), "the completion should still be generating"
        assert elapsed < 1.0, f"/health + /v1/score took {elapsed:.2f}s while a generation was running"
        t.join(30)
        assert result["r"].status_code == 200


def test_client_disconnect_cancels_generation(models, caplog):
    app = fresh_app(models, max_tokens=200)
    policy = app.state.models.policy
    forwards = []

    def slow_forward(module, args, kwargs):  # every generated token costs >= 20 ms
        forwards.append(time.perf_counter())
        time.sleep(0.02)

    handle = policy.register_forward_pre_hook(slow_forward, with_kwargs=True)
    caplog.set_level(logging.WARNING, logger="rlhflab.serve")
    try:
        with BackgroundServer(app) as srv:
            with pytest.raises(httpx.TimeoutException):
                httpx.post(srv.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 200, "best_of": 2},
                           timeout=0.3)
            deadline = time.time() + 5
            while app.state.metrics.cancelled == 0 and time.time() < deadline:
                time.sleep(0.05)
            m = prometheus(httpx.get(srv.url + "/metrics").text)
            assert m[("rlhflab_requests_cancelled_total", frozenset())] == 1
            assert m[("rlhflab_requests_total", frozenset({"endpoint": "POST /v1/completions", "status": "499"}.items()))] == 1
            # Stopped within a few tokens of the disconnect, far from the 200 it was asked for.
            assert len(forwards) < 60, f"{len(forwards)} forwards: generation was not cancelled"
            n = len(forwards)
            time.sleep(0.2)
            assert len(forwards) == n, "generation kept running after the cancel"
            assert httpx.get(srv.url + "/health").json()["status"] == "ok"
            handle.remove()
            ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 3}, timeout=30)
            assert ok.status_code == 200
    finally:
        handle.remove()
    messages = [r.getMessage() for r in caplog.records if r.name == "rlhflab.serve"]
    assert any("generation stopped after" in msg for msg in messages), messages
    assert any("cancelled: client disconnected" in msg for msg in messages), messages


def test_reward_model_directory_roundtrip(dirs, models):
    rm = RewardModel.from_pretrained(dirs[1])
    assert rm.bias == BIAS
    a = rm.score_texts(["q"], [" r"])
    b = models[2].score_texts(["q"], [" r"])
    assert torch.allclose(a, b, atol=1e-5)
