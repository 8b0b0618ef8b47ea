"""Turns an API request into engine work: the prompt token ids and one SamplingParams per choice."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from specattn.engine.engine import LLMEngine
from specattn.engine.sampling import SamplingParams

from .errors import APIError
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields


@dataclass(frozen=True)
class Job:
    """One choice: a prompt and how to sample its continuation. `index` is the choice's index in the response."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    params: SamplingParams
    echo: str | None = None  # the prompt's text, which the choice's text starts with (completions' echo)


def completion_prompts(req: CompletionRequest, engine: LLMEngine) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [engine.tokenizer.encode(p)]
    if all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    if all(isinstance(x, str) for x in p):
        return [engine.tokenizer.encode(x) for x in p]  # type: ignore[arg-type]
    return [list(x) for x in p]  # type: ignore[union-attr]


def _message_dict(m: ChatMessage) -> dict[str, str]:
    content = m.content if isinstance(m.content, str) or m.content is None else "\n".join(p.text for p in m.content)
    return {"role": m.role, "content": content or ""}


def chat_prompt(req: ChatCompletionRequest, engine: LLMEngine) -> list[int]:
    tok = engine.tokenizer
    try:
        text = tok.apply_chat_template([_message_dict(m) for m in req.messages], add_generation_prompt=True)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e
    # the template already wrote BOS and the other special tokens into the text
    return tok.encode(text, add_special_tokens=False)


def _max_tokens(requested: int | None, param: str, prompt_ids: list[int], engine: LLMEngine) -> int:
    context, prompt_len = engine.max_context, len(prompt_ids)
    if requested is not None:
        if prompt_len + requested > context:
            raise APIError(
                400,
                f"the model's context is {context} tokens, but the prompt has {prompt_len} and {param} asks "
                f"for {requested}; reduce {param} to at most {max(context - prompt_len, 0)}",
                param=param,
            )
        return requested
    return _default_max_tokens(prompt_ids, engine)


def _default_max_tokens(prompt_ids: list[int], engine: LLMEngine) -> int:
    """What is left of the context, or less where the KV pool could not hold that much at once."""
    left = engine.max_request_tokens - len(prompt_ids)
    if left < 1:
        raise APIError(400, f"the prompt has {len(prompt_ids)} tokens and leaves no room to generate", param="prompt")
    return left


# Fields of OpenAI's and vLLM's APIs this server does not implement, each with what counts as leaving it alone.
_UNSUPPORTED: dict[str, Callable[[Any, SamplingFields], bool]] = {
    "presence_penalty": lambda value, _: value == 0,
    "frequency_penalty": lambda value, _: value == 0,
    "repetition_penalty": lambda value, _: value == 1,
    "logit_bias": lambda value, _: not value,
    "response_format": lambda value, _: value in (None, {"type": "text"}),
    "best_of": lambda value, req: value in (None, req.n),
    "suffix": lambda value, _: not value,
    "tools": lambda value, _: not value,
}


def unsupported_field(req: SamplingFields) -> str | None:
    """The first field the request sets to something this server does not implement, if any."""
    fields = type(req).model_fields
    return next((name for name, left_alone in _UNSUPPORTED.items()
                 if name in fields and not left_alone(getattr(req, name), req)), None)


def build_jobs(
    req: SamplingFields, prompts: list[list[int]], max_tokens: int | None, max_tokens_param: str, engine: LLMEngine,
    logprobs: int | None = None, echo: bool = False,
) -> list[Job]:
    """One Job per (prompt, choice), checked against the engine now so bad input is a 400 before any streaming.
    logprobs: alternatives to report per output token (None: no logprobs); echo: the prompt comes first in each
    choice's text, and with logprobs its tokens' logprobs first in the choice's logprobs."""
    unsupported = unsupported_field(req)
    if unsupported is not None:
        raise APIError(400, f"{unsupported} is not supported by this server; leave it out or at its default",
                       param=unsupported, code="unsupported_parameter")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    jobs = []
    for p_idx, ids in enumerate(prompts):
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        limit = _max_tokens(max_tokens, max_tokens_param, ids, engine)
        for i in range(req.n):
            try:
                params = SamplingParams(
                    max_tokens=limit,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    top_k=req.top_k,
                    seed=None if req.seed is None else req.seed + i,  # distinct yet reproducible choices
                    stop=stop,
                    stop_token_ids=tuple(req.stop_token_ids or ()),
                    ignore_eos=req.ignore_eos,
                    min_tokens=req.min_tokens,
                    logprobs=logprobs,
                    prompt_logprobs=logprobs if echo else None,
                )
                engine.check_request(ids, params)
            except ValueError as e:
                raise APIError(400, str(e)) from e
            echoed = engine.tokenizer.decode(ids, skip_special_tokens=False) if echo else None
            jobs.append(Job(index=p_idx * req.n + i, prompt_index=p_idx, prompt_ids=ids, params=params, echo=echoed))
    return jobs
