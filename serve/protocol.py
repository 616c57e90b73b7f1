"""The HTTP protocol: pydantic models of the OpenAI-compatible requests and responses.

Requests reject unknown fields (``extra="forbid"``) and out-of-range values, so a typo in a
parameter is a 400 naming it rather than a silently ignored option. Limits that depend on the
served model or the configuration (context length, ``serve.max_tokens_limit``) are checked by
the engine, not here. ``null`` means "the default" for every optional sampling parameter, as
in OpenAI's API.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``POST /v1/rewards`` (texts in, reward-model scores of one criterion out) and ``GET /healthz``. Errors use
OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

MAX_N = 16
"""Most choices one request may ask for (``n``)."""
MAX_STOP = 4
"""Most stop strings per request (OpenAI's limit)."""
MAX_PROMPTS = 16
"""Most prompts in one completions request (``prompt`` given as a list)."""
MAX_REWARD_TEXTS = 128
"""Most texts in one /v1/rewards request."""


class _Request(BaseModel):
    """Base of every request body: unknown fields are an error."""

    model_config = ConfigDict(extra="forbid")


def _check_stop(stop: str | list[str] | None) -> list[str]:
    """Normalise ``stop`` to a list of 0..MAX_STOP non-empty strings."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
    if any(s == "" for s in stops):
        raise ValueError("stop sequences must not be empty strings")
    return stops


class StreamOptions(_Request):
    include_usage: StrictBool = False
    """Send a last chunk with token usage before ``[DONE]``."""


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: StrictInt | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None
    user: str | None = None
    ignore_eos: StrictBool = False
    """Keep writing past EOS until max_tokens (vLLM's extension; for benchmarks)."""

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return _check_stop(v)


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``: continue a prompt (a string, or a list of strings)."""

    prompt: str | list[str]
    max_tokens: StrictInt | None = Field(None, ge=1)
    """Tokens to generate per choice; default 16 (OpenAI's default)."""

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("prompt must not be an empty list")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
        if any(not p.strip() for p in prompts):
            raise ValueError("prompt must not be empty")
        return v


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``: answer a conversation, formatted with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    """Tokens to generate per choice; default: the configured limit, capped by the context."""
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    """OpenAI's newer name for ``max_tokens``; wins when both are given."""

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text().strip() for m in v):
            raise ValueError("messages must not all be empty")
        return v


class RewardRequest(_Request):
    """``POST /v1/rewards``: score texts with the served reward model."""

    texts: list[str] = Field(min_length=1, max_length=MAX_REWARD_TEXTS)
    prompts: list[str] | None = None
    """The prompt of each text, used when the reward model was trained with ``include_prompt``."""
    normalize: StrictBool = False
    """Standardise scores with the mean/std the criterion's head measured on its training data."""
    model: str | None = None
    criterion: str | None = Field(None, min_length=1)
    """The criterion to score (one of /healthz's ``reward_criteria``); default: the reward model's first."""

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str] | None, info) -> list[str] | None:
        texts = info.data.get("texts")
        if v is not None and texts is not None and len(v) != len(texts):
            raise ValueError(f"prompts must have one entry per text ({len(texts)}), got {len(v)}")
        return v


# ---- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """An OpenAI-style object id such as ``cmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Choice(BaseModel):
    """Fields of every choice: its index, why it ended (None while streaming), no log-probs."""

    index: int
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionChoice(_Choice):
    text: str


class _Response(BaseModel):
    """Fields every generation response and streamed chunk carries."""

    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage | None = None


class CompletionResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: AssistantMessage


class ChatCompletionResponse(_Response):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Choice):
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(_Response):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "alignray"
    dtype: str | None = None
    """The dtype the weights are served in (float32, bfloat16, int8): alignray's extension."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RewardResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    criterion: str
    """The criterion (reward-model head) the scores are of."""
    scores: list[float]


class BatchStats(BaseModel):
    """What the replica's generation loop has done so far."""

    mode: Literal["continuous", "static"]
    steps: int = 0
    """Decoding steps run."""
    requests: int = 0
    """Requests admitted to the batch."""
    sequences: int = 0
    """Sequences (prompts x n) admitted."""
    row_steps: int = 0
    """Sequences decoded, summed over steps."""
    max_rows: int = 0
    """Most sequences decoded together in one step."""
    step_seconds: float = 0.0
    """Time spent in decoding steps (model, sampling, handing the tokens over), summed over steps."""
    mean_rows: float = 0.0
    """Mean sequences per decoding step (batch occupancy x max_batch_size)."""
    running: int = 0
    """Sequences in the batch now."""
    waiting: int = 0
    """Sequences queued for a slot now."""
    cancelled: int = 0
    """Requests stopped before their end (client gone)."""
    rejected: int = 0
    """Requests refused with 429 (queue full)."""
    failed: int = 0
    """Requests failed by an error in a generation step."""


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    dtype: str
    max_batch_size: int
    batching: BatchStats
    rewards: bool
    """Whether a reward model is served at /v1/rewards."""
    reward_criteria: list[str] = []
    """The criteria /v1/rewards scores (the reward model's heads, the default first); empty without one."""


# ---- errors ----------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An error the API reports to the client with an HTTP status and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return ErrorResponse(
            error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        ).model_dump()


ERROR_STATUSES = {
    400: "Invalid request: malformed JSON, an unknown or out-of-range parameter, a prompt too long for the model.",
    401: "Missing or wrong API key (Authorization: Bearer <key>).",
    404: "Unknown model, or no reward model served here.",
    413: "Request body over serve.max_request_bytes.",
    429: "The replica's queue is full (serve.max_queue sequences wait); retry after the Retry-After header's seconds.",
    503: "The model failed its health check.",
}


def error_responses(*statuses: int) -> dict[int, dict]:
    """OpenAPI ``responses`` for a route: each status with its meaning and OpenAI's error body."""
    return {s: {"model": ErrorResponse, "description": ERROR_STATUSES[s]} for s in statuses}
