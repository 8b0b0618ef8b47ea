"""The two generation endpoints: run the jobs, then answer in one JSON body or as SSE chunks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from specattn.engine.async_engine import EngineDeadError
from specattn.engine.logprobs import TokenLogprob
from specattn.engine.request import RequestOutput, SpecStats

from .errors import APIError
from .logprobs import chat_logprobs, completion_logprobs
from .params import Job
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    Usage,
)
from .state import Reservation, ServerState
from .streams import run_jobs, until_disconnected

T = TypeVar("T")


def sum_spec(stats: list[SpecStats]) -> dict | None:
    """One SpecStats dict for the whole request: counters added up over its choices."""
    if not stats:
        return None
    width = max(len(s.accepted_per_position) for s in stats)
    total = SpecStats(
        num_drafts=sum(s.num_drafts for s in stats),
        num_draft_tokens=sum(s.num_draft_tokens for s in stats),
        num_accepted_tokens=sum(s.num_accepted_tokens for s in stats),
        accepted_per_position=[sum(s.accepted_per_position[i] for s in stats if i < len(s.accepted_per_position))
                               for i in range(width)],
    )
    return total.as_dict()


@dataclass
class Tally:
    """What the response reports besides text: finish reasons, token counts, speculation stats."""

    jobs: list[Job]
    texts: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str] = field(default_factory=dict)
    completion_tokens: dict[int, int] = field(default_factory=dict)
    spec: list[SpecStats] = field(default_factory=list)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)  # choices that asked for them

    def add(self, index: int, out: RequestOutput) -> None:
        self.texts[index] = self.texts.get(index, "") + out.new_text
        if out.prompt_logprobs is not None:  # an echoed prompt's, on its first output: they come first
            self.logprobs[index] = out.prompt_logprobs + self.logprobs.get(index, [])
        if out.logprobs is not None:
            self.logprobs.setdefault(index, []).extend(out.logprobs)
        self.completion_tokens[index] = out.num_output_tokens
        if out.finished:
            self.finish[index] = out.finish_reason.value if out.finish_reason else "stop"
            if out.spec is not None:
                self.spec.append(out.spec)

    def usage(self) -> Usage:
        # a prompt is counted once however many choices continue it, as OpenAI does
        prompt = sum({j.prompt_index: len(j.prompt_ids) for j in self.jobs}.values())
        completion = sum(self.completion_tokens.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(chunk: BaseModel) -> str:
    data = chunk.model_dump(mode="json")
    for key in ("usage", "spec_decode"):  # extension and usage fields only where they carry something
        if data.get(key) is None:
            data.pop(key, None)
    for choice in data.get("choices", ()):  # a chat delta carries only what changed, as OpenAI's do
        if "delta" in choice:
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


_DONE = "data: [DONE]\n\n"


def _client_gone() -> Response:
    # nginx's "client closed request": only the access log sees it, the client has hung up
    return Response(status_code=499)


async def _collect(state: ServerState, jobs: list[Job], response_id: str, reservation: Reservation) -> Tally:
    tally = Tally(jobs)
    try:
        async for index, out in run_jobs(state, jobs, response_id, reservation):
            tally.add(index, out)
    except EngineDeadError as e:
        raise APIError(503, str(e), code="engine_unavailable") from e
    except ValueError as e:
        raise APIError(400, str(e)) from e
    return tally


def _error_event(e: Exception) -> str:
    # the 200 and its headers are gone already; an error event is the only way left to say what happened
    status_type = "server_error" if isinstance(e, EngineDeadError) else "invalid_request_error"
    return _sse(ErrorResponse(error=ErrorInfo(message=str(e), type=status_type)))


def _stream(events: AsyncIterator[str], reservation: Reservation) -> StreamingResponse:
    # the background task gives back wait-queue places even if the client left before the stream began
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(reservation.close))


async def _respond(request: Request, state: ServerState, jobs: list[Job], response_id: str, stream: bool,
                   events: Callable[[Reservation], AsyncIterator[str]], build: Callable[[Tally], T]) -> Response | T:
    """Admit the jobs, then either stream `events` or collect every choice and `build` one response."""
    reservation = state.admit(len(jobs))
    if stream:
        return _stream(events(reservation), reservation)
    try:
        tally = await until_disconnected(request, _collect(state, jobs, response_id, reservation))
    finally:
        reservation.close()
    return _client_gone() if tally is None else build(tally)


async def completion_response(request: Request, state: ServerState, jobs: list[Job], response_id: str,
                              stream: bool, include_usage: bool) -> Response | CompletionResponse:
    tokenizer = state.require_engine().engine.tokenizer
    return await _respond(
        request, state, jobs, response_id, stream,
        lambda reservation: _completion_events(state, jobs, response_id, reservation, include_usage),
        lambda tally: CompletionResponse(
            id=response_id,
            model=state.model_name,
            choices=[CompletionChoice(
                index=j.index, text=(j.echo or "") + tally.texts.get(j.index, ""), finish_reason=tally.finish[j.index],
                logprobs=completion_logprobs(tally.logprobs.get(j.index, []), tokenizer)[0] if j.params.logprobs is not None else None,
            ) for j in jobs],
            usage=tally.usage(),
            spec_decode=sum_spec(tally.spec),
        ),
    )


async def _completion_events(state: ServerState, jobs: list[Job], response_id: str, reservation: Reservation,
                             include_usage: bool) -> AsyncIterator[str]:
    tally = Tally(jobs)
    model = state.model_name
    tokenizer = state.require_engine().engine.tokenizer
    text_offset: dict[int, int] = {}  # per choice that asked for logprobs: where its next token's text starts
    echo = {j.index: j.echo for j in jobs if j.echo is not None}  # echoed prompts not yet sent, by choice
    try:
        async for index, out in run_jobs(state, jobs, response_id, reservation):
            tally.add(index, out)
            text, token_logprobs = out.new_text, (out.prompt_logprobs or []) + (out.logprobs or [])
            if index in echo and (out.new_text or out.new_token_ids or out.finished):
                text = echo.pop(index) + text  # with the first tokens, and the prompt logprobs they carry
            logprobs = None
            if token_logprobs:
                logprobs, text_offset[index] = completion_logprobs(token_logprobs, tokenizer, text_offset.get(index, 0))
            if text or out.finished or logprobs:
                yield _sse(CompletionChunk(
                    id=response_id, model=model,
                    choices=[CompletionChoice(index=index, text=text, finish_reason=tally.finish.get(index),
                                              logprobs=logprobs)],
                    spec_decode=out.spec.as_dict() if out.spec is not None else None,
                ))
        if include_usage:
            yield _sse(CompletionChunk(id=response_id, model=model, choices=[], usage=tally.usage(),
                                       spec_decode=sum_spec(tally.spec)))
    except (EngineDeadError, ValueError) as e:
        yield _error_event(e)
    yield _DONE


async def chat_response(request: Request, state: ServerState, jobs: list[Job], response_id: str,
                        stream: bool, include_usage: bool) -> Response | ChatCompletionResponse:
    tokenizer = state.require_engine().engine.tokenizer
    return await _respond(
        request, state, jobs, response_id, stream,
        lambda reservation: _chat_events(state, jobs, response_id, reservation, include_usage),
        lambda tally: ChatCompletionResponse(
            id=response_id,
            model=state.model_name,
            choices=[ChatChoice(
                index=j.index, message=AssistantMessage(content=tally.texts.get(j.index, "")),
                finish_reason=tally.finish[j.index],
                logprobs=chat_logprobs(tally.logprobs.get(j.index, []), tokenizer) if j.params.logprobs is not None else None,
            ) for j in jobs],
            usage=tally.usage(),
            spec_decode=sum_spec(tally.spec),
        ),
    )


async def _chat_events(state: ServerState, jobs: list[Job], response_id: str, reservation: Reservation,
                       include_usage: bool) -> AsyncIterator[str]:
    tally = Tally(jobs)
    model = state.model_name
    tokenizer = state.require_engine().engine.tokenizer

    def chunk(index: int, delta: DeltaMessage, finish: str | None = None, spec: dict | None = None,
              logprobs: list[TokenLogprob] | None = None) -> str:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish,
                                 logprobs=chat_logprobs(logprobs, tokenizer) if logprobs else None)
        return _sse(ChatCompletionChunk(id=response_id, model=model, spec_decode=spec, choices=[choice]))

    # OpenAI opens every choice with the assistant role and empty content
    for job in jobs:
        yield chunk(job.index, DeltaMessage(role="assistant", content=""))
    try:
        async for index, out in run_jobs(state, jobs, response_id, reservation):
            tally.add(index, out)
            if out.new_text or out.logprobs:
                yield chunk(index, DeltaMessage(content=out.new_text), logprobs=out.logprobs)
            if out.finished:
                yield chunk(index, DeltaMessage(), tally.finish[index], out.spec.as_dict() if out.spec else None)
        if include_usage:
            yield _sse(ChatCompletionChunk(id=response_id, model=model, choices=[], usage=tally.usage(),
                                           spec_decode=sum_spec(tally.spec)))
    except (EngineDeadError, ValueError) as e:
        yield _error_event(e)
    yield _DONE
