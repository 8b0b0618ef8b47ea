"""AsyncEngine: runs the engine loop on a background thread and gives each request an async stream of outputs."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .engine import LLMEngine
from .request import RequestOutput
from .sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; requests in flight at that moment are ended with this error."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput items, or an exception to raise in the consumer

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    """Thread-safe front of an LLMEngine. The model runs on one thread; HTTP handlers await their own streams."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._streams: dict[str, _Stream] = {}
        self._adds: list[tuple[str, list[int], SamplingParams]] = []
        self._aborts: list[str] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="specattn-engine", daemon=True)
        self._thread.start()

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they are produced. Closing the iterator early aborts the request."""
        self.engine.check_request(prompt_ids, params)  # raise bad input here, in the caller, not on the engine thread
        request_id = request_id or uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._wake:
            if self._stopping:
                raise EngineDeadError("the engine is shutting down")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._adds.append((request_id, list(prompt_ids), params))
            self._wake.notify()
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.append(request_id)
            self._wake.notify()

    def shutdown(self) -> None:
        """Abort everything in flight and stop the engine thread."""
        with self._wake:
            self._stopping = True
            self._aborts.extend(self._streams)
            self._wake.notify()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._adds or self._aborts or self._stopping or self.engine.has_unfinished_requests()):
                    self._wake.wait()
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            for rid, prompt, params in adds:
                try:
                    self.engine.add_request(rid, prompt, params)
                except ValueError as e:
                    self._deliver_error(rid, e)
            for rid in aborts:
                out = self.engine.abort_request(rid)
                if out is not None:
                    self._deliver(out)
            if stopping and not self.engine.has_unfinished_requests():
                return
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug must not wedge every client: fail the requests in flight, keep serving
                log.exception("engine step failed; aborting the requests in flight")
                for rid in list(self._streams):
                    self.engine.abort_request(rid)
                    self._deliver_error(rid, EngineDeadError(f"engine step failed: {e}"))
                continue
            for out in outputs:
                self._deliver(out)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id) if not out.finished else self._streams.pop(out.request_id, None)
        if stream is not None:
            stream.put(out)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.put(error)
