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

    def commit(self, tokens: list[int]) -> int:
        """Append tokens one by one until the request finishes; returns how many were taken."""
        req, params = self.request, self.request.params
        if not params.stop:
            return self._commit_ids(tokens)
        for n, tok in enumerate(tokens, start=1):
            req.output_ids.append(tok)
            prev_len = len(self.text)
            self.text += self.detok.add([tok])
            enough = len(req.output_ids) >= params.min_tokens
            if enough and (tok in self.eos_ids or tok in params.stop_token_ids):
                req.finish_reason = FinishReason.STOP
            elif enough and params.stop and self._truncate_at_stop(prev_len):
                req.finish_reason = FinishReason.STOP
                return n
            elif len(req.output_ids) >= params.max_tokens or req.num_tokens >= req.max_total_tokens:
                req.finish_reason = FinishReason.LENGTH
            if req.finish_reason is not None:
                self.text += self.detok.flush()  # a character cut off by the last token still shows, as U+FFFD
                return n
        return len(tokens)

    def _commit_ids(self, tokens: list[int]) -> int:
        """commit() without stop strings: ids and lengths alone decide where to stop, so the taken tokens are
        detokenized together (once per step, not once per accepted draft)."""
        req, params = self.request, self.request.params
        taken = len(tokens)
        for n, tok in enumerate(tokens, start=1):
            length = len(req.output_ids) + n
            if length >= params.min_tokens and (tok in self.eos_ids or tok in params.stop_token_ids):
                req.finish_reason = FinishReason.STOP
            elif length >= params.max_tokens or req.num_tokens + n >= req.max_total_tokens:
                req.finish_reason = FinishReason.LENGTH
            if req.finish_reason is not None:
                taken = n
                break
        req.output_ids.extend(tokens[:taken])
        self.text += self.detok.add(tokens[:taken])
        if req.finish_reason is not None:
            self.text += self.detok.flush()
        return taken

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
