"""Commits sampled tokens to a request: detokenizes them and decides when it stops (EOS, stop ids, stop strings, length)."""

from __future__ import annotations

from .request import FinishReason, Request
from .tokenizer import IncrementalDetokenizer, Tokenizer


class OutputTracker:
    """One request's output text. Text that could still turn out to begin a stop string is held back."""

    def __init__(self, request: Request, tokenizer: Tokenizer):
        self.request = request
        self.eos_ids = frozenset() if request.params.ignore_eos else tokenizer.eos_token_ids
        self.detok = IncrementalDetokenizer(tokenizer, request.prompt_ids, request.params.skip_special_tokens)
        self.text = ""
        self.emitted = 0
        self.hold_back = max((len(s) for s in request.params.stop), default=1) - 1
        self._pending: list[int] = []  # taken by commit_ids, text not made yet

    def commit_ids(self, tokens: list[int]) -> int:
        """Append tokens until the request finishes; returns how many were taken. Without stop strings, ids and
        lengths alone decide where it stops and the text waits for commit_text (made for all taken tokens at once,
        while the device runs the next step); with them the text is made now, token by token, as a stop string can
        end inside any token's text."""
        req = self.request
        if not req.params.stop:
            taken = next((n for n, tok in enumerate(tokens, start=1) if self._ends_with(tok, n)), len(tokens))
            req.output_ids.extend(tokens[:taken])
            self._pending.extend(tokens[:taken])
            return taken
        taken = 0
        for tok in tokens:
            taken += 1
            req.output_ids.append(tok)
            prev_len = len(self.text)
            self.text += self.detok.add([tok])
            reason = self._ends_with(tok, 0)
            # a stop string outranks the length limits (and ends without a flush: the text is cut before it)
            enough = len(req.output_ids) >= req.params.min_tokens
            if reason is not FinishReason.STOP and enough and self._truncate_at_stop(prev_len):
                req.finish_reason = FinishReason.STOP
                return taken
            if reason is not None:
                break
        if req.finish_reason is not None:
            self.text += self.detok.flush()
        return taken

    def commit_text(self) -> None:
        """The text of the tokens commit_ids took without making it."""
        if not self._pending:
            return
        self.text += self.detok.add(self._pending)
        self._pending = []
        if self.request.finish_reason is not None:
            self.text += self.detok.flush()  # a character cut off by the last token still shows, as U+FFFD

    def _ends_with(self, tok: int, ahead: int) -> FinishReason | None:
        """Whether the request finishes with `tok` as output token len(output_ids) + ahead (EOS or a stop id
        once min_tokens are out, else the length limits); sets finish_reason if so."""
        req, params = self.request, self.request.params
        length = len(req.output_ids) + ahead
        if length >= params.min_tokens and (tok in self.eos_ids or tok in params.stop_token_ids):
            req.finish_reason = FinishReason.STOP
        elif length >= params.max_tokens or req.num_tokens + ahead >= req.max_total_tokens:
            req.finish_reason = FinishReason.LENGTH
        return req.finish_reason

    def _truncate_at_stop(self, prev_len: int) -> bool:
        start = max(0, prev_len - self.hold_back)
        hits = [i for i in (self.text.find(s, start) for s in self.request.params.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def take_new_text(self) -> str:
        """Text not yet handed out; while running, keeps back what might be the start of a stop string."""
        end = len(self.text) if self.request.finish_reason is not None else max(self.emitted, len(self.text) - self.hold_back)
        new = self.text[self.emitted : end]
        self.emitted = end
        return new
