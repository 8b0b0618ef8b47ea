"""The engine's per-token logprobs in the two shapes of OpenAI's API: the completions API's parallel lists and the
chat API's list of token objects."""

from __future__ import annotations

from specattn.engine.logprobs import TokenLogprob
from specattn.engine.tokenizer import Tokenizer

from .protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def completion_logprobs(
    logprobs: list[TokenLogprob], tokenizer: Tokenizer, text_offset: int = 0
) -> tuple[CompletionLogprobs, int]:
    """Logprobs of these tokens, the first one's text starting at text_offset of the choice's text, and where the
    next token's text starts (a stream's next chunk goes on from there). Alternatives whose texts coincide keep the
    likelier one."""
    tokens, offsets = [], []
    for lp in logprobs:
        tokens.append(tokenizer.token_text(lp.token_id))
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
    top = [{} for _ in logprobs]
    for alternatives, lp in zip(top, logprobs):
        for token_id, value in lp.top:
            alternatives.setdefault(tokenizer.token_text(token_id), value)
    return CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in logprobs], top_logprobs=top,
                              text_offset=offsets), text_offset


def chat_logprobs(logprobs: list[TokenLogprob], tokenizer: Tokenizer) -> ChatLogprobs:
    def entry(token_id: int, value: float) -> TopLogprob:
        return TopLogprob(token=tokenizer.token_text(token_id), logprob=value, bytes=tokenizer.token_bytes(token_id))

    return ChatLogprobs(content=[
        ChatTokenLogprob(**entry(lp.token_id, lp.logprob).model_dump(), top_logprobs=[entry(*t) for t in lp.top])
        for lp in logprobs
    ])
