"""What the routes share: the engine once it is ready, admission to the wait queue, and the requests in flight."""

from __future__ import annotations

import asyncio
import logging

from specattn.engine.async_engine import AsyncEngine

from .errors import APIError
from .metrics import DEFAULT_WINDOW_S, ServerMetrics

log = logging.getLogger(__name__)


class Reservation:
    """Places a request holds in the wait queue: one per choice, given back as each choice starts producing."""

    def __init__(self, state: ServerState, count: int):
        self._state = state
        self._left = count

    def release(self, count: int = 1) -> None:
        count = min(count, self._left)
        self._left -= count
        self._state.waiting -= count

    def close(self) -> None:
        """Give back whatever is still held; safe to call more than once."""
        self.release(self._left)


class ServerState:
    def __init__(self, max_queue: int, metrics_window_s: float = DEFAULT_WINDOW_S):
        self.max_queue = max_queue
        self.engine: AsyncEngine | None = None
        self.model_name = ""
        self.waiting = 0  # choices admitted to the engine that have not produced a token yet
        self.in_flight: set[str] = set()  # engine request ids, so a shutdown can abort them
        self.draining = False
        self.metrics = ServerMetrics(self, metrics_window_s)

    def attach(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics.attached()

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def require_engine(self) -> AsyncEngine:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.engine is None:
            raise APIError(503, "the model is still loading; retry shortly", code="not_ready")
        return self.engine

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def admit(self, count: int) -> Reservation:
        """Hold `count` wait-queue places, or 503 so that clients back off instead of piling up latency."""
        if self.waiting + count > self.max_queue:
            raise APIError(503, f"the server is overloaded ({self.waiting} requests waiting); retry later",
                           code="queue_full")
        self.waiting += count
        return Reservation(self, count)

    async def drain(self, grace_s: float) -> None:
        """Stop admitting, let requests in flight finish for up to `grace_s`, then abort the rest (finish_reason abort)."""
        self.draining = True
        await self._wait_idle(grace_s)
        if self.in_flight and self.engine is not None:
            log.warning("grace period over; aborting %d requests in flight", len(self.in_flight))
            for rid in list(self.in_flight):
                self.engine.abort(rid)
            await self._wait_idle(5.0)  # the aborted requests' final responses still go out

    async def _wait_idle(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
