"""The FastAPI application factory: routes of the OpenAI-compatible API over one AsyncEngine."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from specattn.engine.async_engine import AsyncEngine

from .completions import chat_response, completion_response
from .errors import APIError, error_response, install_error_handlers
from .metrics import DEFAULT_WINDOW_S, MetricsMiddleware
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware
from .params import build_jobs, chat_prompt, completion_prompts
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    new_id,
)
from .state import ServerState

DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [(400, "invalid request"), (401, "missing or wrong API key"), (404, "unknown model"),
                         (413, "request body too large"), (503, "overloaded, loading or shutting down")]
}
_GENERATION_RESPONSES = {**_ERRORS, 200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream"}}


def build_app(
    async_engine: AsyncEngine | None = None,
    served_model_name: str | None = None,
    *,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics_window_s: float = DEFAULT_WINDOW_S,
) -> FastAPI:
    """The app. Without an engine it answers 503 until `app.state.server.attach(engine, name)` (model loading)."""
    state = ServerState(max_queue, metrics_window_s)
    if async_engine is not None:
        state.attach(async_engine, served_model_name or async_engine.engine.model_name)
    app = FastAPI(title="specattn", summary="OpenAI-compatible inference server", version="0.1.0")
    app.state.server = state
    install_error_handlers(app)
    # added last runs first: the key is checked before a byte of the body is read
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)  # outermost: counts the 401s and 413s too

    @app.get("/health", responses={503: _ERRORS[503]})
    async def health() -> Response:
        if not state.ready:
            return error_response(503, "shutting down" if state.draining else "loading the model", code="not_ready")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models() -> ModelList:
        engine = state.require_engine()
        return ModelList(data=[ModelCard(id=state.model_name, max_model_len=engine.engine.max_context)])

    @app.post("/v1/completions", response_model=CompletionResponse, response_model_exclude_none=True,
              responses=_GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response | CompletionResponse:
        engine = state.require_engine().engine
        state.check_model(body.model)
        jobs = build_jobs(body, completion_prompts(body, engine), body.max_tokens, "max_tokens", engine, body.logprobs,
                          body.echo)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await completion_response(request, state, jobs, new_id("cmpl"), body.stream, include_usage)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, response_model_exclude_none=True,
              responses=_GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response | ChatCompletionResponse:
        engine = state.require_engine().engine
        state.check_model(body.model)
        if body.max_completion_tokens is not None:
            max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, param = body.max_tokens, "max_tokens"
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        # what the engine takes: how many alternatives per token, None for no logprobs
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        jobs = build_jobs(body, [chat_prompt(body, engine)], max_tokens, param, engine, logprobs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await chat_response(request, state, jobs, new_id("chatcmpl"), body.stream, include_usage)

    return app
