"""Continuous batching: which requests run this step, with how many tokens each, and who gets preempted."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .config import SchedulerConfig
from .kv_cache import PageAllocator
from .request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    """Compute tokens [start, start + num_tokens) of the request's prompt + output this step (a prefill chunk or the next decode)."""

    request: Request
    start: int
    num_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """True when the chunk reaches the last known token, so its logits choose the next one."""
        return self.start + self.num_tokens == self.request.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: PageAllocator):
        assert config.max_num_seqs and config.max_num_batched_tokens, "limits filled in (SchedulerConfig.with_defaults)"
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request: Request) -> None:
        """Take a finished or aborted request out and give its pages back."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.allocator.release(request.page_table)

    def schedule(self, lookahead: int = 0) -> list[ScheduledChunk]:
        """Chunks for one step. Decoding requests reserve `lookahead` more slots (for speculative drafts)."""
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            extra = lookahead if req.num_computed + n == req.num_tokens else 0
            while not self.allocator.grow(req.page_table, req.num_computed + n + extra):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is req:
                    break
            if req.status is RequestStatus.RUNNING:
                chunks.append(ScheduledChunk(req, req.num_computed, n))
                budget -= n + extra
                i += 1
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed, budget)
            extra = lookahead if n == req.num_tokens - req.num_computed else 0
            if not self.allocator.grow(req.page_table, req.num_computed + n + extra):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chunks.append(ScheduledChunk(req, req.num_computed, n))
            budget -= n
        return chunks

    def _preempt(self, req: Request) -> None:
        """Free a request's pages; it waits at the front and recomputes its prompt and output on resume."""
        self.allocator.release(req.page_table)
        req.num_computed = 0
        req.draft = None
        req.status = RequestStatus.WAITING
        self.num_preemptions += 1
        self.waiting.appendleft(req)
