"""Runs a request's choices on the engine at once and merges their outputs into one stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from starlette.requests import Request

from specattn.engine.request import RequestOutput

from .params import Job
from .state import Reservation, ServerState

T = TypeVar("T")


async def _pump(state: ServerState, job: Job, request_id: str, reservation: Reservation,
                queue: asyncio.Queue[tuple[int, RequestOutput | Exception]]) -> None:
    assert state.engine is not None
    state.in_flight.add(request_id)
    recorder = state.metrics.request_started()
    started = False
    try:
        async for out in state.engine.generate(job.prompt_ids, job.params, request_id=request_id):
            if not started:
                started = True
                reservation.release()
            recorder.output(out)
            queue.put_nowait((job.index, out))
    except Exception as e:  # handed to the consumer, which decides how the client hears of it
        recorder.failed()
        queue.put_nowait((job.index, e))
    finally:
        recorder.close()  # a request cancelled before its last output counts as aborted
        if not started:
            reservation.release()
        state.in_flight.discard(request_id)


async def run_jobs(state: ServerState, jobs: list[Job], response_id: str,
                   reservation: Reservation) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) pairs as the engine produces them, until every choice has finished.

    Leaving early (an error, or the client going away and this generator being closed or cancelled)
    cancels every choice, which aborts its engine request and frees its KV pages.
    """
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(state, job, f"{response_id}-{job.index}", reservation, queue))
             for job in jobs]
    try:
        unfinished = len(jobs)
        while unfinished:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            unfinished -= item.finished
            yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        reservation.close()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, but cancel it (aborting its engine requests) if the client hangs up first; None then."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    return task.result() if not task.cancelled() else None
