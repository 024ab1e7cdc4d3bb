"""Best-of-N serving: an OpenAI-compatible API (completions, chat, streaming) reranked by the reward model.

Endpoints (request/response bodies are pydantic models, :mod:`rlhflab.serve.schemas`, so
``/openapi.json`` and ``/docs`` describe every field and limit; errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``, status 400 for any bad request):

* ``POST /v1/completions`` -- OpenAI's legacy completions request. ``best_of`` candidates
  (default: ``n``) are sampled from the policy, each is scored by the reward model through
  the RM's own tokenizer (``RewardModel.score_texts(prompt, text)``: raw score minus the RM's
  normalisation bias), and the ``n`` best are returned, highest reward first. (OpenAI ranks
  ``best_of`` by log-probability per token; here the RM ranks.) Extensions: each choice carries
  ``"reward"``, and the response ``"best_of": {"candidates": [...], "picked_index": i}``, every
  candidate in sampling order and the index of ``choices[0]``. ``usage.completion_tokens``
  counts the tokens of all ``best_of`` candidates (they were all generated).
* ``POST /v1/chat/completions`` -- OpenAI's chat request, same sampling fields and extensions.
  ``messages`` are rendered with the policy tokenizer's chat template (generation prompt
  added); a tokenizer without a template (tldr-synth's BPE, the byte tokenizer of the demo
  models) uses the fallback: the contents joined by a blank line, so a single user message is
  sent exactly as a completions prompt would be (a TL;DR query works unchanged).
* Streaming, both endpoints (``"stream": true``): server-sent events in OpenAI's chunk format,
  ending with ``data: [DONE]``. With ``best_of == 1`` the tokens stream as they are sampled
  (text that could be the start of a stop string is held back until it is decided); with
  ``best_of > 1`` nothing can be shown before the reward model has ranked every candidate, so
  the ``n`` winners stream once they are chosen, each in one content chunk. The chunk that
  finishes a choice carries its ``reward``; the last one also carries ``best_of``; with
  ``stream_options.include_usage`` a final chunk with empty ``choices`` carries ``usage``.
* ``POST /v1/score`` -- ``{"prompt", "responses": [...]}`` -> normalised and raw RM scores.
* ``GET /health`` (never needs an API key; 503 with ``"status": "draining"`` during shutdown),
  ``GET /metrics`` (Prometheus text format, :mod:`rlhflab.serve.metrics`), ``GET /v1/models``,
  ``GET /`` (the playground page, ``static/index.html``), ``GET /docs`` and ``/openapi.json``.

Batching. Generation goes through :class:`rlhflab.serve.engine.Batcher`: concurrent requests
are gathered into one batch (bounded wait ``max_wait_ms``, bounded size ``max_batch_rows``),
each row with its own sampling parameters and random generator, so a request's answer does not
depend on what it was batched with; more than ``max_queue`` waiting requests get 429.
Parsing, validation, /health and /metrics run on the event loop and never wait for a model;
generation and RM scoring run in worker threads.

Cancellation and timeouts. While a request waits or generates, a watcher polls
``request.is_disconnected()``; when the client goes away its rows in the batch are marked
finished at the next token (the other requests of the batch continue untouched), scoring is
skipped, it is logged (logger ``rlhflab.serve``) and counted, and recorded with status 499.
A request still unanswered after ``request_timeout_s`` is stopped the same way and answered
503 (code ``timeout``).

Shutdown. On SIGTERM (or Ctrl-C) :class:`DrainingServer` stops taking work -- new requests get
503 (code ``shutting_down``, header ``Retry-After``) -- lets the requests in flight finish (up to
``drain_timeout_s``), then exits. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhflab.serve import schemas as S
from rlhflab.serve.engine import (
    Batcher, Cancelled, Candidate, GenRequest, Models, QueueFull, ServeError, cut_at_stop,
)
from rlhflab.serve.metrics import CONTENT_TYPE_LATEST, Metrics

log = logging.getLogger("rlhflab.serve")

STATIC_DIR = Path(__file__).parent / "static"
HUANG_RESPONSE_LENGTH = 53  # Huang et al.: TL;DR responses are sampled for 53 tokens
MAX_STOP_SEQUENCES = S.MAX_STOP_SEQUENCES
PUBLIC_PATHS = ("/", "/health", "/favicon.ico", "/docs", "/openapi.json")  # reachable without the API key
DRAIN_OPEN_PATHS = ("/health", "/metrics")  # still answered while draining
KNOWN_ROUTES = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/score"),
                ("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/")}
STATUS_CLIENT_CLOSED = 499  # nginx's "client closed request": what a cancelled request is recorded as
CompletionRequest, ChatCompletionRequest, ScoreRequest = S.CompletionRequest, S.ChatCompletionRequest, S.ScoreRequest


# --------------------------------------------------------------------------- errors
class APIError(Exception):
    """A request error answered as OpenAI's ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type, self.headers)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                   type: str = "invalid_request_error", headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def busy_error() -> APIError:
    return APIError(429, "the server's request queue is full; retry shortly", code="queue_full",
                    type="rate_limit_error", headers={"Retry-After": "1"})


def timeout_error(seconds: float) -> APIError:
    return APIError(503, f"the request did not finish within the server's timeout of {seconds:g} s",
                    code="timeout", type="server_error", headers={"Retry-After": "1"})


def draining_error() -> APIError:
    return APIError(503, "the server is shutting down; retry on another replica or later", code="shutting_down",
                    type="server_error", headers={"Retry-After": "5"})


_OPENAI_UNSUPPORTED = "is not supported by rlhflab serve"
_UNION_FIELDS = {"prompt": "a string (or a list of one string)", "stop": "a string or a list of strings",
                 "content": "a string or a list of text parts"}


def _validation_error(e: ValidationError, payload: Any = None) -> APIError:
    """The first pydantic error as one readable sentence naming the field."""
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ())]
    field = loc[0] if loc else None
    where = ".".join(loc) or "body"
    union_key = next((k for k in reversed(loc) if k in _UNION_FIELDS), None)
    if err["type"] == "missing":
        msg = f"missing required field '{where}'"
    elif field in _UNION_FIELDS and isinstance(payload, dict):
        # pydantic reports each union member it tried; one sentence about the field reads better
        msg = f"'{field}' must be {_UNION_FIELDS[field]} (got {json.dumps(payload.get(field))[:80]})"
    elif union_key is not None and err["type"] != "extra_forbidden":
        msg = f"'{'.'.join(loc[:loc.index(union_key) + 1])}' must be {_UNION_FIELDS[union_key]}"
    elif err["type"] == "extra_forbidden":
        msg = f"unknown field '{where}'"
    else:
        got = err.get("input")
        shown = json.dumps(got)[:80] if not isinstance(got, dict) else "an object"
        msg = f"'{where}': {err['msg']} (got {shown})"
    code = {"missing": "missing_field", "extra_forbidden": "unknown_field"}.get(err["type"], "invalid_value")
    return APIError(400, msg, param=field, code=code)


# --------------------------------------------------------------------------- limits
@dataclass(frozen=True)
class ServeLimits:
    """Caps on what one request may ask for (each refused with a 4xx naming it)."""

    max_best_of: int = 16  # candidates sampled per request
    max_tokens: int = 128  # tokens per candidate
    max_prompt_tokens: int = 512  # prompt length in policy tokens (Huang: 512-token queries)
    max_body_bytes: int = 64 * 1024  # request body size (413 above)
    max_score_responses: int = 64  # responses per /v1/score request

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ServeError(f"serve limit {name} must be a positive integer, got {value!r}")


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list (numpy's default method)."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class _MetricsAndAuth:
    """Pure ASGI middleware (keeps ``request.is_disconnected`` working, unlike BaseHTTPMiddleware):
    records every HTTP request in ``metrics``; when ``api_key`` is set, answers 401 to any path
    outside ``PUBLIC_PATHS`` without ``Authorization: Bearer <api_key>``; while ``state.draining``,
    answers 503 to everything but /health and /metrics."""

    def __init__(self, app, metrics: Metrics, api_key: Optional[str], state):
        self.app, self.metrics, self.api_key, self.state = app, metrics, api_key, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        key = f"{method} {path}" if (method, path) in KNOWN_ROUTES else "other"
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        self.metrics.enter()
        try:
            if getattr(self.state, "draining", False) and path not in DRAIN_OPEN_PATHS:
                await draining_error().response()(scope, receive, send_wrapper)
            elif self.api_key is not None and path not in PUBLIC_PATHS and not self._authorised(scope):
                resp = error_response(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                                      code="invalid_api_key", type="authentication_error")
                await resp(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.leave()
            self.metrics.record(key, status["code"], time.perf_counter() - t0)

    def _authorised(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        got = headers.get(b"authorization", b"").decode("latin-1")
        return hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode())


# --------------------------------------------------------------------------- request reading
async def _read_json(request: Request, max_body_bytes: int) -> Any:
    """The JSON body, refusing bodies over ``max_body_bytes`` (413) from the Content-Length
    header before reading and from the bytes actually received (chunked or lying clients)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {max_body_bytes} bytes",
                           code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise APIError(413, f"request body exceeds the limit of {max_body_bytes} bytes", code="body_too_large")
    if not body:
        raise APIError(400, "empty request body: send a JSON object", code="invalid_json")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    try:  # lone surrogates ("\ud800") parse as JSON but are not text a tokenizer can take
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "request body holds a string that is not valid Unicode (a lone surrogate escape)",
                       code="invalid_json") from None
    return payload


def _parse(model: type[BaseModel], payload: Any) -> BaseModel:
    if not isinstance(payload, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(payload).__name__}", code="invalid_json")
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        raise _validation_error(e, payload) from None


@contextlib.asynccontextmanager
async def _watch_disconnect(request: Request, gen: GenRequest, interval_s: float = 0.05):
    """Cancels ``gen`` (its rows stop, its future fails with Cancelled) when the client
    disconnects while the body of the ``async with`` runs."""
    async def watch():
        while not gen.cancel.is_set():
            if await request.is_disconnected():
                gen.cancel.set()
                gen.resolve(error=Cancelled())
                return
            await anyio.sleep(interval_s)

    # A plain task, not an anyio task group: a group would wrap the body's exceptions
    # (APIError, Cancelled) in an ExceptionGroup.
    watcher = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


# --------------------------------------------------------------------------- checks
@dataclass
class _Job:
    """A validated generation request (completions or chat)."""

    prompt: str
    prompt_ids: list[int]
    n: int
    best_of: int
    max_tokens: int
    stop: list[str]
    req: S._Sampling


def _check_sampling(req: S._Sampling, limits: ServeLimits, max_tokens: Optional[int]) -> tuple[int, list[str]]:
    """Cross-field checks shared by completions and chat -> (best_of, stop strings)."""
    unsupported = {"logit_bias": bool(req.logit_bias), "presence_penalty": req.presence_penalty != 0,
                   "frequency_penalty": req.frequency_penalty != 0}
    for name, used in unsupported.items():
        if used:
            raise APIError(400, f"'{name}' {_OPENAI_UNSUPPORTED} (leave it out)", param=name, code="unsupported")
    best_of = req.best_of if req.best_of is not None else req.n
    if best_of > limits.max_best_of:
        param = "best_of" if req.best_of is not None else "n"
        raise APIError(400, f"'{param}' is {best_of}; the limit is {limits.max_best_of}", param=param, code="limit_exceeded")
    if req.n > best_of:
        raise APIError(400, f"'n' ({req.n}) must be <= 'best_of' ({best_of})", param="n", code="invalid_value")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise APIError(400, f"'max_tokens' is {max_tokens}; the limit is {limits.max_tokens}",
                       param="max_tokens", code="limit_exceeded")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"'stop' has {len(stop)} strings; at most {MAX_STOP_SEQUENCES} are allowed",
                       param="stop", code="invalid_value")
    if any(s == "" for s in stop):
        raise APIError(400, "'stop' strings must be non-empty", param="stop", code="invalid_value")
    return best_of, stop


def _check_completion(req: CompletionRequest, limits: ServeLimits) -> tuple[str, list[str]]:
    """Cross-field checks of a completions request -> (prompt, stop strings); APIError 400 otherwise."""
    unsupported = {"echo": req.echo, "logprobs": req.logprobs is not None, "suffix": bool(req.suffix)}
    for name, used in unsupported.items():
        if used:
            raise APIError(400, f"'{name}' {_OPENAI_UNSUPPORTED} (leave it out)", param=name, code="unsupported")
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise APIError(400, "'prompt' must be a string or a list of exactly one string "
                                f"(got a list of {len(prompt)} item(s); token-id prompts are not supported)",
                           param="prompt", code="invalid_value")
        prompt = prompt[0]
    if not prompt:
        raise APIError(400, "'prompt' is empty", param="prompt", code="invalid_value")
    _, stop = _check_sampling(req, limits, req.max_tokens)
    return prompt, stop


def _chat_prompt(req: ChatCompletionRequest, models: Models) -> str:
    unsupported = {"logprobs": req.logprobs, "top_logprobs": req.top_logprobs is not None}
    for name, used in unsupported.items():
        if used:
            raise APIError(400, f"'{name}' {_OPENAI_UNSUPPORTED} (leave it out)", param=name, code="unsupported")
    if req.max_tokens is not None and req.max_completion_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "'max_tokens' and 'max_completion_tokens' differ; send one of them",
                       param="max_completion_tokens", code="invalid_value")
    messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                for m in req.messages]
    try:
        prompt = models.render_chat(messages)
    except Exception as e:  # jinja TemplateError / the template's own raise_exception
        raise APIError(400, f"the policy's chat template refused these messages: {e}", param="messages",
                       code="invalid_value") from None
    if not prompt:
        raise APIError(400, "'messages' render to an empty prompt", param="messages", code="invalid_value")
    return prompt


def _job(req: S._Sampling, prompt: str, stop: list[str], max_tokens: Optional[int], models: Models,
         limits: ServeLimits) -> _Job:
    best_of = req.best_of if req.best_of is not None else req.n
    max_new = max_tokens if max_tokens is not None else min(HUANG_RESPONSE_LENGTH, limits.max_tokens)
    prompt_ids = models.encode_prompt(prompt)
    if not prompt_ids:
        raise APIError(400, "the prompt encodes to no tokens", param="prompt", code="invalid_value")
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise APIError(400, f"prompt is {len(prompt_ids)} tokens; the limit is {limits.max_prompt_tokens}",
                       param="prompt", code="prompt_too_long")
    if models.context_length and len(prompt_ids) + max_new > models.context_length:
        raise APIError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_new}) exceeds the policy's "
                            f"context of {models.context_length} tokens", param="max_tokens", code="context_length_exceeded")
    return _Job(prompt, prompt_ids, req.n, best_of, max_new, stop, req)


# --------------------------------------------------------------------------- streaming helpers
def _streamable_prefix(text: str, stop: Sequence[str]) -> str:
    """The part of a growing ``text`` that is final: before a stop string, minus any tail that
    could still become a stop string, minus an incomplete UTF-8 character ("\ufffd")."""
    cut = cut_at_stop(text, stop)
    if cut is not None:
        return cut
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    safe = text[: len(text) - hold]
    return safe.rstrip("\ufffd")


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# --------------------------------------------------------------------------- openapi
_ERROR_DOCS = {
    400: "bad request: invalid JSON, a field of the wrong type or out of range, an unknown field, a prompt over "
         "the limits (OpenAI's error body, 'param' names the field)",
    401: "missing or invalid API key (only when the server was started with --api-key-env)",
    413: "request body larger than --max-body-bytes",
    429: "the request queue is full (header Retry-After)",
    503: "the server is shutting down (code shutting_down) or the request timed out (code timeout); "
         "header Retry-After",
}


def _errors(auth: bool, *codes: int) -> dict:
    return {c: {"model": S.ErrorResponse, "description": _ERROR_DOCS[c]} for c in codes if c != 401 or auth}


def _body(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _sse_doc(chunk: type[BaseModel]) -> dict:
    """An SSE media type whose ``schema`` describes each event (OpenAPI < 3.2 convention): ``data``
    is a JSON chunk (or an error object after a mid-stream failure), or the final ``[DONE]``."""
    ref = lambda m: {"$ref": f"#/components/schemas/{m.__name__}"}  # noqa: E731
    return {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"event": {"type": "string"}, "id": {"type": "string"},
                       "data": {"anyOf": [{"const": "[DONE]"},
                                          {"type": "string", "contentMediaType": "application/json",
                                           "contentSchema": {"anyOf": [ref(chunk), ref(S.ErrorResponse)]}}]}},
        "description": "with stream: true, OpenAI-style chunks ending with data: [DONE]"}}}


def _install_openapi(app: FastAPI, limits: ServeLimits) -> None:
    """``/openapi.json``: FastAPI's schema plus the request bodies (parsed by hand, so FastAPI
    does not see them) and this server's limits written into the field maxima."""
    def patch_max(prop: dict, maximum: int) -> None:
        for sub in [prop, *prop.get("anyOf", [])]:
            if sub.get("type") == "integer":
                sub["maximum"] = maximum

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (CompletionRequest, ChatCompletionRequest, ScoreRequest, S.CompletionChunk,
                      S.ChatCompletionChunk):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(js.pop("$defs", {}))
            comps[model.__name__] = js
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            props = comps[name]["properties"]
            patch_max(props["n"], limits.max_best_of)
            patch_max(props["best_of"], limits.max_best_of)
            for key in ("max_tokens", "max_completion_tokens"):
                if key in props:
                    patch_max(props[key], limits.max_tokens)
        comps["ScoreRequest"]["properties"]["responses"]["maxItems"] = limits.max_score_responses
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


# --------------------------------------------------------------------------- app
def create_app(policy: Union[str, Path, Any], reward: Union[str, Path, Any], *, tokenizer=None,
               api_key: Optional[str] = None, max_best_of: int = 16, max_tokens: int = 128,
               max_prompt_tokens: int = 512, max_body_bytes: int = 64 * 1024, max_score_responses: int = 64,
               policy_name: Optional[str] = None, reward_name: Optional[str] = None,
               device: Optional[Union[str, torch.device]] = None, dtype: str = "auto",
               max_batch_rows: int = 32, max_wait_ms: float = 10.0, max_queue: int = 256,
               request_timeout_s: float = 120.0) -> FastAPI:
    """The FastAPI app serving ``policy`` reranked by ``reward``.

    Args:
        policy: an HF causal-LM directory (its tokenizer is loaded from it too) or a model
            object, then ``tokenizer`` is required.
        reward: a reward-model directory written by ``RewardModel.save`` or a ``RewardModel``.
        api_key: when set, every endpoint except ``GET /``, ``/health``, ``/docs`` and
            ``/openapi.json`` requires ``Authorization: Bearer <api_key>``.
        max_*: request limits (:class:`ServeLimits`).
        device: where the models run; default: CUDA when available for directories, else
            the device the given model objects are on.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
        max_batch_rows / max_wait_ms / max_queue: the batcher (:class:`rlhflab.serve.engine.Batcher`).
        request_timeout_s: a request unanswered after this long is stopped and answered 503.
    """
    from rlhflab.models.reward import RewardModel

    limits = ServeLimits(max_best_of, max_tokens, max_prompt_tokens, max_body_bytes, max_score_responses)
    if not (isinstance(request_timeout_s, (int, float)) and request_timeout_s > 0):
        raise ServeError(f"request_timeout_s must be > 0, got {request_timeout_s!r}")
    if isinstance(policy, (str, Path)):
        from rlhflab.models.policy import load_policy, load_tokenizer

        policy_name = policy_name or str(policy)
        if not (Path(policy) / "config.json").exists():
            raise ServeError(f"no policy at {policy} (expected an HF model directory with config.json, "
                             "e.g. runs/<name>/ppo/policy)")
        tokenizer = tokenizer or load_tokenizer(policy, padding_side="left")
        policy = load_policy(policy)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    elif tokenizer is None:
        raise ServeError("create_app: a policy model object needs its tokenizer (tokenizer=...)")
    if isinstance(reward, (str, Path)):
        reward_name = reward_name or str(reward)
        reward = RewardModel.from_pretrained(reward)
    models = Models(policy, tokenizer, reward, policy_name or type(policy).__name__,
                    reward_name or type(reward.model).__name__, device=device, dtype=dtype)
    metrics = Metrics()
    batcher = Batcher(models, max_batch_rows=max_batch_rows, max_wait_s=max_wait_ms / 1000.0, max_queue=max_queue,
                      metrics=metrics)
    auth = api_key is not None

    app = FastAPI(title="rlhflab best-of-N", version="2", docs_url="/docs", redoc_url=None,
                  description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    app.state.models, app.state.metrics, app.state.limits, app.state.batcher = models, metrics, limits, batcher
    app.state.draining = False
    app.add_middleware(_MetricsAndAuth, metrics=metrics, api_key=api_key, state=app.state)
    _install_openapi(app, limits)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):  # a bug, not bad input: log it whole
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}", type="server_error")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    def health_body() -> dict:
        return S.HealthResponse(
            status="draining" if app.state.draining else "ok", policy=models.policy_name, reward=models.reward_name,
            device=str(models.device), dtype=str(models.dtype).replace("torch.", ""), auth=auth,
            chat_template=models.has_chat_template, limits=S.Limits(**asdict(limits)),
            batching=S.BatchingInfo(max_batch_rows=max_batch_rows, max_wait_ms=max_wait_ms, max_queue=max_queue,
                                    request_timeout_s=request_timeout_s)).model_dump(mode="json")

    @app.get("/health", response_model=None, responses={
        200: {"model": S.HealthResponse, "description": "serving"},
        503: {"model": S.HealthResponse, "description": "draining after SIGTERM: finishing in-flight requests"}})
    async def health():
        """Status, model names, device and dtype, limits and batching settings (no API key needed)."""
        return JSONResponse(health_body(), status_code=503 if app.state.draining else 200)

    @app.get("/metrics", response_class=Response, responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}},
              "description": "Prometheus text exposition format (prometheus_client.generate_latest)"}, **_errors(auth, 401)})
    async def get_metrics():
        """Prometheus metrics (see rlhflab.serve.metrics for the names)."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=None, responses={200: {"model": S.ModelList}, **_errors(auth, 401, 503)})
    async def list_models():
        """OpenAI's model list: the policy."""
        return S.ModelList(data=[S.ModelCard(id=models.policy_name, created=int(metrics_started),
                                             owned_by="rlhflab")]).model_dump(mode="json")

    metrics_started = time.time()
    gen_errors = _errors(auth, 400, 401, 413, 429, 503)

    @app.post("/v1/completions", response_model=None, openapi_extra=_body(CompletionRequest), responses={
        200: {"model": S.CompletionResponse, "content": _sse_doc(S.CompletionChunk),
              "description": "the n best candidates by reward"}, **gen_errors})
    async def completions(request: Request):
        """Best-of-N completions (OpenAI's legacy completions API; RM reranking; streaming)."""
        req = _parse(CompletionRequest, await _read_json(request, limits.max_body_bytes))
        prompt, stop = _check_completion(req, limits)
        job = _job(req, prompt, stop, req.max_tokens, models, limits)
        return await _answer(request, job, "text_completion")

    @app.post("/v1/chat/completions", response_model=None, openapi_extra=_body(ChatCompletionRequest), responses={
        200: {"model": S.ChatCompletionResponse, "content": _sse_doc(S.ChatCompletionChunk),
              "description": "the n best candidates by reward"}, **gen_errors})
    async def chat_completions(request: Request):
        """Best-of-N chat completions (OpenAI's chat API; RM reranking; streaming)."""
        req = _parse(ChatCompletionRequest, await _read_json(request, limits.max_body_bytes))
        max_new = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        _, stop = _check_sampling(req, limits, max_new)
        prompt = _chat_prompt(req, models)
        job = _job(req, prompt, stop, max_new, models, limits)
        return await _answer(request, job, "chat.completion")

    @app.post("/v1/score", response_model=None, openapi_extra=_body(ScoreRequest), responses={
        200: {"model": S.ScoreResponse}, **_errors(auth, 400, 401, 413, 503)})
    async def score(request: Request):
        """Reward-model scores of responses to a prompt."""
        req = _parse(ScoreRequest, await _read_json(request, limits.max_body_bytes))
        if len(req.responses) > limits.max_score_responses:
            raise APIError(400, f"{len(req.responses)} responses; the limit is {limits.max_score_responses} per request",
                           param="responses", code="too_many_responses")
        try:
            scores, raw = await asyncio.wait_for(anyio.to_thread.run_sync(models.score, req.prompt, req.responses),
                                                 timeout=request_timeout_s)
        except asyncio.TimeoutError:
            metrics.timed_out.inc()
            raise timeout_error(request_timeout_s) from None
        return S.ScoreResponse(model=models.reward_name, scores=scores, raw_scores=raw,
                               bias=models.reward.bias).model_dump(mode="json")

    # ------------------------------------------------------------------ generation + ranking
    async def _generate(job: _Job, gen: GenRequest) -> tuple[list[Candidate], list[float]]:
        candidates = await batcher.submit(gen)
        metrics.generated(sum(c.completion_tokens for c in candidates), len(candidates))
        if gen.cancel.is_set():
            raise Cancelled()
        scores, _ = await anyio.to_thread.run_sync(models.score, job.prompt, [c.text for c in candidates])
        return candidates, scores

    async def _bounded(job: _Job, gen: GenRequest) -> tuple[list[Candidate], list[float]]:
        """_generate within the request timeout; QueueFull -> 429, timeout -> 503."""
        try:
            return await asyncio.wait_for(_generate(job, gen), timeout=request_timeout_s)
        except QueueFull:
            raise busy_error() from None
        except asyncio.TimeoutError:
            gen.cancel.set()  # its rows stop at the next token
            metrics.timed_out.inc()
            log.warning("request timed out after %g s (best_of=%d, max_tokens=%d)", request_timeout_s,
                        job.best_of, job.max_tokens)
            raise timeout_error(request_timeout_s) from None

    def _new_gen(job: _Job) -> GenRequest:
        r = job.req
        return GenRequest(job.prompt_ids, job.best_of, job.max_tokens, r.temperature, r.top_p, job.stop, r.seed)

    def _ranked(job: _Job, candidates: list[Candidate], scores: list[float]):
        order = sorted(range(len(candidates)), key=lambda i: -scores[i])  # stable: ties keep sampling order
        completion_tokens = sum(c.completion_tokens for c in candidates)
        usage = S.Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=completion_tokens,
                        total_tokens=len(job.prompt_ids) + completion_tokens)
        best = S.BestOfInfo(candidates=[S.CandidateInfo(index=i, text=c.text, reward=scores[i], finish_reason=c.finish_reason,
                                                        completion_tokens=c.completion_tokens)
                                        for i, c in enumerate(candidates)],
                            picked_index=order[0], reward_model=models.reward_name)
        return order[: job.n], usage, best

    def _cancelled(rid: str, job: _Job) -> JSONResponse:
        metrics.cancel()
        log.warning("%s cancelled: client disconnected (best_of=%d, max_tokens=%d)", rid, job.best_of, job.max_tokens)
        return error_response(STATUS_CLIENT_CLOSED, "client closed the request", code="cancelled")

    async def _answer(request: Request, job: _Job, kind: str):
        chat = kind == "chat.completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if job.req.stream:
            return StreamingResponse(_stream(request, job, rid, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        gen = _new_gen(job)
        try:
            async with _watch_disconnect(request, gen):
                candidates, scores = await _bounded(job, gen)
        except Cancelled:
            return _cancelled(rid, job)
        picked, usage, best = _ranked(job, candidates, scores)
        created = int(time.time())
        if chat:
            choices = [S.ChatChoice(index=k, message=S.AssistantMessage(content=candidates[i].text),
                                    finish_reason=candidates[i].finish_reason, reward=scores[i])
                       for k, i in enumerate(picked)]
            body = S.ChatCompletionResponse(id=rid, created=created, model=models.policy_name, choices=choices,
                                            usage=usage, best_of=best)
        else:
            choices = [S.CompletionChoice(text=candidates[i].text, index=k, finish_reason=candidates[i].finish_reason,
                                          reward=scores[i]) for k, i in enumerate(picked)]
            body = S.CompletionResponse(id=rid, created=created, model=models.policy_name, choices=choices,
                                        usage=usage, best_of=best)
        return JSONResponse(body.model_dump(mode="json"))

    async def _stream(request: Request, job: _Job, rid: str, chat: bool):
        """SSE chunks; see the module docstring for what streams when."""
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: Optional[str], finish: Optional[str] = None, role: bool = False, **extra) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": obj, "created": created, "model": models.policy_name, "choices": [choice]}
            if "reward" in extra:
                choice["reward"] = extra.pop("reward")
            body.update(extra)
            return body

        gen = _new_gen(job)
        live = job.best_of == 1
        texts: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        if live:
            gen.on_text = lambda text: loop.call_soon_threadsafe(texts.put_nowait, text)
        finished, task = False, None
        try:
            if chat:
                yield _sse(chunk(0, None, role=True))
            emitted = ""
            task = asyncio.ensure_future(_bounded(job, gen))
            try:
                while live and not task.done():
                    getter = asyncio.ensure_future(texts.get())
                    await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    safe = _streamable_prefix(getter.result(), job.stop)
                    if len(safe) > len(emitted) and safe.startswith(emitted):
                        yield _sse(chunk(0, safe[len(emitted):]))
                        emitted = safe
                candidates, scores = await task
            except Cancelled:
                metrics.cancel()
                finished = True
                return
            except APIError as e:
                yield _sse(e.body())
                finished = True
                return
            picked, usage, best = _ranked(job, candidates, scores)
            for k, i in enumerate(picked):
                text = candidates[i].text
                if live:
                    rest = text[len(emitted):] if text.startswith(emitted) else ""
                    if rest:
                        yield _sse(chunk(k, rest))
                else:
                    if chat and k > 0:
                        yield _sse(chunk(k, None, role=True))
                    yield _sse(chunk(k, text))
                extra = {"best_of": best.model_dump(mode="json")} if k == len(picked) - 1 else {}
                yield _sse(chunk(k, None if chat else "", finish=candidates[i].finish_reason, reward=scores[i], **extra))
            if job.req.stream_options is not None and job.req.stream_options.include_usage:
                yield _sse({"id": rid, "object": obj, "created": created, "model": models.policy_name, "choices": [],
                            "usage": usage.model_dump(mode="json")})
            yield SSE_DONE
            finished = True
        finally:
            if not finished:  # the client went away mid-stream (the response task was cancelled)
                gen.cancel.set()
                if task is not None:
                    task.cancel()
                metrics.cancel()
                log.warning("%s cancelled: client disconnected during the stream", rid)

    return app


# --------------------------------------------------------------------------- running
def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens, no merges, + ``<eos>`` 256 and ``<pad>`` 257):
    any text round-trips and its token count is its UTF-8 byte count. Built in-process."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def demo_models(seed: int = 0, hidden_size: int = 32, num_layers: int = 1, context: int = 256,
                reward_bias: float = 0.5):
    """Tiny random models for tests, benchmarks and trying the server without a trained run:
    ``(policy, tokenizer, reward)``: a random Llama on :func:`byte_tokenizer` and a decoder RM
    (same architecture, own seed) whose normalisation bias is ``reward_bias``."""
    from transformers import LlamaForSequenceClassification

    from rlhflab.config import ArchConfig
    from rlhflab.models.policy import build_policy, disable_dropout
    from rlhflab.models.reward import RewardModel, init_score_head

    tok = byte_tokenizer()
    arch = ArchConfig(hidden_size=hidden_size, num_layers=num_layers, num_heads=2, intermediate_size=2 * hidden_size,
                      max_position_embeddings=context)
    policy = build_policy(tok, arch=arch, seed=seed)
    rm_cfg = policy.config.__class__.from_dict({**policy.config.to_dict(), "num_labels": 1})
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        rm_model = LlamaForSequenceClassification(rm_cfg)
        init_score_head(rm_model.score, generator=torch.Generator().manual_seed(seed + 2))
    reward = RewardModel(disable_dropout(rm_model).eval(), tok, bias=reward_bias, max_length=context)
    return policy.eval(), tok, reward


def _draining_server(config, app: FastAPI, drain_timeout_s: float = 30.0):
    """uvicorn's ``Server`` whose first SIGTERM/SIGINT (``handle_exit``) sets ``app.state.draining``
    (new requests: 503), waits until no request is in flight (or ``drain_timeout_s``), then lets
    uvicorn exit; a second signal exits at once."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if app.state.draining:  # second signal: now
                self.force_exit = True
                return super().handle_exit(sig, frame)
            app.state.draining = True
            metrics: Metrics = app.state.metrics
            log.warning("signal %s: draining -- %d request(s) in flight, new requests get 503", sig, metrics.in_flight)

            def wait_then_exit():
                deadline = time.monotonic() + drain_timeout_s
                while metrics.in_flight > 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
                if metrics.in_flight > 0:
                    log.warning("drain timeout (%g s): %d request(s) still in flight", drain_timeout_s, metrics.in_flight)
                else:
                    log.warning("drained: exiting")
                self.should_exit = True

            threading.Thread(target=wait_then_exit, daemon=True).start()

    return _Server(config)


class BackgroundServer:
    """A uvicorn server for ``app`` in a daemon thread on ``host`` and a free port (tests,
    benchmarks, the browser test). ``with BackgroundServer(app) as srv: httpx.get(srv.url + "/health")``.
    ``srv.server.handle_exit(signal.SIGTERM, None)`` drains it as a real SIGTERM does."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 drain_timeout_s: float = 30.0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        # log_config=None: leave the process's logging alone (pytest's caplog keeps working).
        config = uvicorn.Config(app, log_level=log_level, log_config=None, lifespan="off")
        self.server = _draining_server(config, app, drain_timeout_s) if hasattr(app, "state") else uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise ServeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(policy: Union[str, Path], reward: Union[str, Path], host: str = "127.0.0.1", port: int = 8000,
          api_key_env: Optional[str] = None, max_best_of: int = 16, max_tokens: int = 128,
          max_prompt_tokens: int = 512, max_body_bytes: int = 64 * 1024, device: Optional[str] = None,
          dtype: str = "auto", max_batch_rows: int = 32, max_wait_ms: float = 10.0, max_queue: int = 256,
          request_timeout_s: float = 120.0, drain_timeout_s: float = 30.0) -> None:
    """``rlhflab serve``: load the policy and RM directories and serve them with uvicorn until
    SIGTERM/Ctrl-C (then drain: in-flight requests finish, new ones get 503).

    Raises:
        ServeError: ``api_key_env`` names an unset/empty variable (refusing to start without the
            auth the user asked for), a model directory is missing, or a bad device/dtype.
    """
    import uvicorn

    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ServeError(f"--api-key-env {api_key_env}: the environment variable {api_key_env} is not set "
                             "(set it to the key clients must send, or leave out --api-key-env)")
    for what, path in (("policy", policy), ("reward", reward)):
        if not Path(path).is_dir():
            raise ServeError(f"--{what} {path}: no such directory")
    if device is not None:
        try:
            torch.device(device)
        except RuntimeError:
            raise ServeError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"rlhflab serve: loading policy {policy} and reward model {reward} ...", flush=True)
    app = create_app(policy, reward, api_key=api_key, max_best_of=max_best_of, max_tokens=max_tokens,
                     max_prompt_tokens=max_prompt_tokens, max_body_bytes=max_body_bytes, device=device, dtype=dtype,
                     max_batch_rows=max_batch_rows, max_wait_ms=max_wait_ms, max_queue=max_queue,
                     request_timeout_s=request_timeout_s)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use it (see --api-key-env)", host)
    m = app.state.models
    print(f"rlhflab serve: models on {m.device} ({str(m.dtype).replace('torch.', '')}); playground at "
          f"http://{host}:{port}/ , API docs at http://{host}:{port}/docs "
          f"(API key {'required' if api_key else 'not required'})", flush=True)
    server = _draining_server(uvicorn.Config(app, host=host, port=port, log_level="info"), app, drain_timeout_s)
    server.run()
