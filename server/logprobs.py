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
    next token's text starts (a stream's next chunk goes on from there). Each position's alternatives include the
    chosen token, as OpenAI's do (up to logprobs + 1 entries); alternatives whose texts coincide keep the likelier.
    Offsets count each token's own text, as vLLM's do: a character split over tokens or text cut at a stop string
    can put them off the choice's text."""
    tokens, offsets, top = [], [], []
    for lp in logprobs:
        tokens.append(tokenizer.token_text(lp.token_id))
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
        if lp.logprob is None:  # an echoed prompt's first token
            top.append(None)
            continue
        alternatives: dict[str, float] = {}
        for token_id, value in (*lp.top, (lp.token_id, lp.logprob)):
            alternatives.setdefault(tokenizer.token_text(token_id), value)
        top.append(alternatives)
    return CompletionLogprobs(tokens=tokens, token_logprobs=[lp.logprob for lp in logprobs], top_logprobs=top,
                              text_offset=offsets), text_offset


def chat_logprobs(logprobs: list[TokenLogprob], tokenizer: Tokenizer) -> ChatLogprobs:
    def top(token_id: int, value: float) -> TopLogprob:
        return TopLogprob(token=tokenizer.token_text(token_id), logprob=value, bytes=tokenizer.token_bytes(token_id))

    return ChatLogprobs(content=[
        ChatTokenLogprob(token=tokenizer.token_text(lp.token_id), logprob=lp.logprob,
                         bytes=tokenizer.token_bytes(lp.token_id), top_logprobs=[top(*t) for t in lp.top])
        for lp in logprobs
    ])
