"""Request and response bodies of the OpenAI-compatible API (pydantic v2); they also make up /openapi.json."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, StrictStr

from specattn.engine.logprobs import MAX_LOGPROBS

# Bounds that keep one request from asking for unbounded work; generous next to what clients send.
MAX_CHOICES = 16  # n
MAX_PROMPTS = 64  # prompts in one completions batch
MAX_STOP = 16  # stop strings, and stop token ids
MAX_SEED = 2**63 - 1  # seed + i (i < n) must fit torch's unsigned 64-bit seed

TokenId = Annotated[StrictInt, Field(ge=0)]
Prompt = (
    StrictStr
    | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_PROMPTS)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
)
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOP)] | None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored, as OpenAI clients send extras freely."""

    model: StrictStr
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0  # OpenAI's default; 0 is greedy
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1)] = 0  # 0 or -1: off
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    stop: Stop = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0
    user: str | None = None  # accepted for compatibility; not used
    # OpenAI and vLLM fields this server does not implement: named so that setting one is a 400 that says so
    # (server/params.py), where an unknown field is ignored and the client would get unpenalized or free-form output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None


NumLogprobs = Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    logprobs: NumLogprobs | None = Field(
        default=None, description="each output token's logprob and this many likeliest alternatives"
    )
    echo: bool = Field(default=False, description="the prompt before each choice's text (and its tokens' logprobs)")
    best_of: int | None = None  # not implemented beyond best_of = n
    suffix: str | None = None  # not implemented
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="default: what is left of the context after the prompt"
    )


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="default: what is left of the context after the prompt"
    )
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="deprecated alias of max_completion_tokens"
    )
    logprobs: StrictBool | None = False
    top_logprobs: NumLogprobs | None = Field(default=None, description="alternatives per token; needs logprobs")
    tools: list[Any] | None = None  # not implemented (a 400 where any are given)


# ---- responses ----

FinishReasonName = Literal["stop", "length", "abort"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=now)
    model: str
    # our extension: the request's speculation counters (SpecStats.as_dict), summed over its choices
    spec_decode: dict[str, Any] | None = None


class CompletionLogprobs(BaseModel):
    """The completions API's logprobs: lists in step, one entry per output token (text_offset: where its text starts
    in the choice's text)."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None: an echoed prompt's first token, which nothing predicts
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReasonName | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's own UTF-8 bytes: a character split over tokens shows whole only joined


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReasonName | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReasonName | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "specattn"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
