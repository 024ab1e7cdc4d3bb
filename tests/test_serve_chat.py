"""Chat completions and streaming, through the real ``openai`` client and raw SSE.

Tiny random models on the byte tokenizer (no chat template: the documented fallback joins the
messages' contents by a blank line, so one user message is exactly a completions prompt).
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from rlhflab.serve.app import BackgroundServer, _streamable_prefix, create_app, demo_models

PROMPT = "SUBREDDIT: r/cats\n\nTITLE: my cat\n\nPOST: she naps\n\nTL;DR:"


@pytest.fixture(scope="module")
def models():
    return demo_models(seed=0)


@pytest.fixture(scope="module")
def server(models):
    policy, tok, reward = models
    app = create_app(policy, reward, tokenizer=tok, max_best_of=8, max_tokens=32, max_wait_ms=1)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def oc(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def user(text):
    return [{"role": "user", "content": text}]


def sse_events(raw: str) -> list:
    """The ``data:`` payloads of an SSE body (JSON decoded; ``[DONE]`` kept as a string)."""
    out = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_chat_with_openai_client(oc, server):
    r = oc.chat.completions.create(model="x", messages=user(PROMPT), n=2, max_tokens=6, temperature=0.8, seed=4,
                                   extra_body={"best_of": 3})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert len(r.choices) == 2 and [c.index for c in r.choices] == [0, 1]
    assert all(c.message.role == "assistant" and c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.prompt_tokens == len(PROMPT.encode())  # fallback rendering: the message itself
    best = r.model_extra["best_of"]
    assert len(best["candidates"]) == 3
    assert r.choices[0].message.content == best["candidates"][best["picked_index"]]["text"]
    # The same request on the legacy endpoint (same rendered prompt, same seed) samples the same candidates.
    legacy = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "n": 2, "best_of": 3, "max_tokens": 6,
                                                              "temperature": 0.8, "seed": 4}, timeout=60).json()
    assert [c["text"] for c in legacy["best_of"]["candidates"]] == [c["text"] for c in best["candidates"]]
    with pytest.raises(openai.BadRequestError, match="must be <= 'best_of'"):
        oc.chat.completions.create(model="x", messages=user("hi"), n=3, extra_body={"best_of": 2})
    with pytest.raises(openai.BadRequestError, match="unknown field 'tools'"):
        oc.chat.completions.create(model="x", messages=user("hi"),
                                   tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_best_of_through_chat_picks_highest_reward(oc, server):
    r = oc.chat.completions.create(model="x", messages=user(PROMPT), n=1, max_tokens=8, temperature=1.0, seed=9,
                                   extra_body={"best_of": 6})
    cands = r.model_extra["best_of"]["candidates"]
    texts = [c["text"] for c in cands]
    assert len(set(texts)) == 6
    scores = httpx.post(server.url + "/v1/score", json={"prompt": PROMPT, "responses": texts}, timeout=60).json()["scores"]
    top = max(range(6), key=lambda i: scores[i])
    assert r.choices[0].message.content == texts[top]
    assert r.choices[0].model_extra["reward"] == pytest.approx(scores[top], abs=1e-5)
    assert r.choices[0].model_extra["reward"] > sorted(scores)[-2]  # strictly the best, not a tie


def test_streaming_chat_with_openai_client(oc):
    kw = dict(model="x", messages=user(PROMPT), max_tokens=12, temperature=0.9, seed=3)
    whole = oc.chat.completions.create(**kw)
    chunks = list(oc.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2, "best_of 1 streams token by token"
    assert "".join(pieces) == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert finals[0].choices[0].model_extra["reward"] == pytest.approx(whole.choices[0].model_extra["reward"], abs=1e-5)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_completions_with_openai_client_best_of(oc):
    kw = dict(model="x", prompt=PROMPT, n=2, best_of=4, max_tokens=8, temperature=0.9, seed=5)
    whole = oc.completions.create(**kw)
    chunks = list(oc.completions.create(stream=True, **kw))
    by_index = {}
    for c in chunks:
        for ch in c.choices:
            by_index[ch.index] = by_index.get(ch.index, "") + ch.text
    assert by_index == {i: c.text for i, c in enumerate(whole.choices)}  # the winners, once chosen
    finals = [ch for c in chunks for ch in c.choices if ch.finish_reason]
    assert [f.model_extra["reward"] for f in finals] == pytest.approx([c.model_extra["reward"] for c in whole.choices])
    assert chunks[-1].model_extra["best_of"]["picked_index"] == whole.model_extra["best_of"]["picked_index"]


def test_raw_sse_format_and_stop_strings(server):
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0.9, "seed": 21}
    full = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    stop = next(ch for ch in full[3:] if ch.isascii() and ch.isprintable())
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True, "stop": stop},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and raw.endswith("data: [DONE]\n\n")
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert text == full[: full.index(stop)] and stop not in text  # held back, never streamed then retracted
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_bad_stream_request_is_a_json_400(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [], "stream": True}, timeout=10)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert "at least 1 item" in r.json()["error"]["message"]


@pytest.mark.parametrize("body,fragment", [
    ({"messages": [{"role": "tool", "content": "x"}]}, "'messages.0.role'"),
    ({"messages": [{"role": "user"}]}, "missing required field 'messages.0.content'"),
    ({"messages": [{"role": "user", "content": 3}]}, "'messages.0.content' must be a string or a list of text parts"),
    ({"messages": user("hi"), "logprobs": True}, "'logprobs' is not supported"),
    ({"messages": user("hi"), "max_tokens": 4, "max_completion_tokens": 5}, "differ"),
    ({"messages": user("hi"), "max_completion_tokens": 33}, "'max_tokens' is 33; the limit is 32"),
    ({"messages": user("")}, "render to an empty prompt"),
    ({"messages": user("\ud800")}, "not valid Unicode"),
])
def test_bad_chat_requests(models, body, fragment):
    policy, tok, reward = models
    client = TestClient(create_app(policy, reward, tokenizer=tok, max_tokens=32))
    raw = json.dumps(body).encode()  # json.dumps keeps "\ud800" as an escape, as a client would send it
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]


def test_text_parts_and_chat_template(models):
    policy, tok, reward = models
    client = TestClient(create_app(policy, reward, tokenizer=tok))
    parts = {"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "ab"}, {"type": "text", "text": "c"}]}],
             "max_tokens": 2, "seed": 0}
    assert client.post("/v1/chat/completions", json=parts).json()["usage"]["prompt_tokens"] == len("be brief\n\nabc")
    # A tokenizer with a chat template renders through it (generation prompt added).
    tok2 = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>", pad_token="<pad>")
    tok2.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    client2 = TestClient(create_app(policy, reward, tokenizer=tok2))
    r = client2.post("/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2, "seed": 0}).json()
    assert r["usage"]["prompt_tokens"] == len("<user>hi<assistant>")
    assert client2.get("/health").json()["chat_template"] is True


def test_streamable_prefix_holds_back_possible_stops():
    assert _streamable_prefix("hello wor", ["world"]) == "hello "
    assert _streamable_prefix("hello world!", ["world"]) == "hello "
    assert _streamable_prefix("abc", []) == "abc"
    assert _streamable_prefix("ab\ufffd", []) == "ab"
