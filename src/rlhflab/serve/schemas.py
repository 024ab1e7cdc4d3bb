"""Request and response bodies of the server, as pydantic models.

They are what ``/openapi.json`` and ``/docs`` show (every field with its type, limit and
meaning) and what the handlers validate against and build their answers from, so the
documentation cannot drift from the behaviour. Request models are strict (``"n": "2"`` or
``"n": true`` are refused) and forbid unknown fields (usually typos). Limits that depend on
the server's command line (``--max-best-of``, ``--max-tokens``) are written into the schema
by :func:`rlhflab.serve.app.create_app`.

Validation errors are answered with status 400 and OpenAI's error body (:class:`ErrorResponse`),
never FastAPI's 422: OpenAI's clients expect 400 for a bad request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, WithJsonSchema

MAX_STOP_SEQUENCES = 4  # as OpenAI
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # what a 64-bit RNG seed can hold

# Validated by hand after pydantic (one readable message each); the schema says what passes.
_PROMPT = Annotated[Union[StrictStr, list[Any]], WithJsonSchema(
    {"anyOf": [{"type": "string", "minLength": 1},
               {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1}],
     "description": "the text the policy continues, sent as is (no special tokens added); or a list holding "
                    "exactly one such string (token-id prompts are not supported)"})]
_STOP = Annotated[Union[StrictStr, list[StrictStr], None], WithJsonSchema(
    {"anyOf": [{"type": "string", "minLength": 1},
               {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_SEQUENCES},
               {"type": "null"}],
     "description": f"up to {MAX_STOP_SEQUENCES} non-empty strings: the text is cut before the first occurrence "
                    "and finish_reason is 'stop'"})]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = Field(False, description="send a last chunk (empty choices) with the usage")


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[StrictStr] = Field(None, description="accepted and ignored: the server serves one policy")
    n: StrictInt = Field(1, ge=1, description="choices returned: the n best of the best_of candidates by reward")
    best_of: Optional[StrictInt] = Field(
        None, ge=1, description="rlhflab extension (also OpenAI's legacy completions field): candidates sampled "
                                "from the policy as one batch and reranked by the reward model (default: n)")
    temperature: StrictFloat = Field(1.0, ge=0, le=2, description="0 (or below 1e-5) is greedy decoding")
    top_p: StrictFloat = Field(1.0, gt=0, le=1, description="nucleus sampling")
    stop: _STOP = None
    seed: Optional[StrictInt] = Field(None, ge=SEED_MIN, le=SEED_MAX,
                                      description="reproducible sampling: same seed, same candidates, "
                                                  "whatever else is in the generation batch")
    user: Optional[StrictStr] = Field(None, description="accepted and ignored")
    stream: StrictBool = Field(False, description="server-sent events (text/event-stream) in OpenAI's chunk format; "
                                                  "with best_of > 1 the winners stream once the reward model chose them")
    stream_options: Optional[StreamOptions] = None
    # OpenAI fields accepted only at their defaults (400 otherwise).
    presence_penalty: StrictFloat = Field(0.0, description="only 0 is supported")
    frequency_penalty: StrictFloat = Field(0.0, description="only 0 is supported")
    logit_bias: Optional[dict] = Field(None, description="not supported (leave it out)")


class CompletionRequest(_Sampling):
    """Body of ``POST /v1/completions`` (OpenAI's legacy completions request)."""

    prompt: _PROMPT
    max_tokens: Optional[StrictInt] = Field(None, ge=1, description="tokens per candidate (default min(53, limit))")
    echo: StrictBool = Field(False, description="only false is supported")
    logprobs: Optional[StrictInt] = Field(None, description="not supported (leave it out)")
    suffix: Optional[StrictStr] = Field(None, description="not supported (leave it out)")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]] = Field(description="a string, or a list of text parts")
    name: Optional[StrictStr] = Field(None, description="accepted and ignored")


class ChatCompletionRequest(_Sampling):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, description=(
        "rendered with the policy tokenizer's chat template (add_generation_prompt); a tokenizer without one "
        "(tldr-synth's BPE, the byte tokenizer) gets the fallback: the messages' contents joined by a blank "
        "line, so one user message holding a TL;DR query is exactly that query"))
    max_tokens: Optional[StrictInt] = Field(None, ge=1, description="tokens per candidate (default min(53, limit))")
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1, description="OpenAI's newer name of max_tokens")
    logprobs: StrictBool = Field(False, description="only false is supported")
    top_logprobs: Optional[StrictInt] = Field(None, description="not supported (leave it out)")


class ScoreRequest(BaseModel):
    """Body of ``POST /v1/score``."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr
    responses: list[StrictStr] = Field(min_length=1, description="responses to score against prompt")
    model: Optional[StrictStr] = Field(None, description="accepted and ignored")


# --------------------------------------------------------------------------- responses
class ErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error or server_error")
    param: Optional[str] = Field(description="the request field at fault, when one is")
    code: Optional[str]


class ErrorResponse(BaseModel):
    """OpenAI's error shape."""

    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="tokens of all best_of candidates (they were all generated)")
    total_tokens: int


class CandidateInfo(BaseModel):
    index: int = Field(description="sampling order")
    text: str
    reward: float = Field(description="reward-model score (raw minus the RM's normalisation bias)")
    finish_reason: Literal["stop", "length"]
    completion_tokens: int


class BestOfInfo(BaseModel):
    """rlhflab extension: every candidate in sampling order, and which one is choices[0]."""

    candidates: list[CandidateInfo]
    picked_index: int = Field(description="index into candidates of choices[0]")
    reward_model: str


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"]
    reward: float = Field(description="rlhflab extension: reward-model score")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    best_of: BestOfInfo


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]
    reward: float = Field(description="rlhflab extension: reward-model score")


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    best_of: BestOfInfo


class ScoreResponse(BaseModel):
    object: Literal["score"] = "score"
    model: str
    scores: list[float] = Field(description="raw - bias")
    raw_scores: list[float]
    bias: float


class Limits(BaseModel):
    max_best_of: int
    max_tokens: int
    max_prompt_tokens: int
    max_body_bytes: int
    max_score_responses: int


class BatchingInfo(BaseModel):
    max_batch_rows: int
    max_wait_ms: float
    max_queue: int
    request_timeout_s: float


class HealthResponse(BaseModel):
    status: Literal["ok", "draining"]
    policy: str
    reward: str
    device: str
    dtype: str
    auth: bool
    chat_template: bool = Field(description="false: chat messages use the documented fallback rendering")
    limits: Limits
    batching: BatchingInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --------------------------------------------------------------------------- stream chunks
class CompletionChunkChoice(BaseModel):
    text: str = Field(description="the new text of this choice")
    index: int
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]] = None
    reward: Optional[float] = Field(None, description="rlhflab extension, on the chunk that finishes the choice")


class CompletionChunk(BaseModel):
    """One ``data:`` event of a streamed completion."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    best_of: Optional[BestOfInfo] = Field(None, description="on the last choice-finishing chunk")
    usage: Optional[Usage] = Field(None, description="last chunk (empty choices), with stream_options.include_usage")


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Optional[Literal["stop", "length"]] = None
    reward: Optional[float] = Field(None, description="rlhflab extension, on the chunk that finishes the choice")


class ChatCompletionChunk(BaseModel):
    """One ``data:`` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    best_of: Optional[BestOfInfo] = None
    usage: Optional[Usage] = None
