"""`specattn serve`: listen at once (503 on /health), load and warm up the model, serve, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket

import uvicorn

from specattn.engine.async_engine import AsyncEngine
from specattn.engine.config import EngineConfig
from specattn.engine.engine import LLMEngine
from specattn.engine.sampling import SamplingParams

from .app import build_app
from .state import ServerState

log = logging.getLogger("specattn.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn, but on shutdown the requests in flight get `grace_s` to finish before they are aborted."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float):
        super().__init__(config)
        self.state = state
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connections; kept-alive ones get 503 while draining
        await self.state.drain(self.grace_s)
        await super().shutdown(sockets)


def _load(config: EngineConfig) -> AsyncEngine:
    return AsyncEngine(LLMEngine(config))


async def _warm_up(engine: AsyncEngine) -> None:
    """One tiny generation, so the first client does not pay for lazy initialisation."""
    prompt = engine.engine.tokenizer.encode("Hello")
    async for _ in engine.generate(prompt, SamplingParams(max_tokens=2, temperature=0)):
        pass


async def serve(
    config: EngineConfig,
    *,
    host: str,
    port: int,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int,
    shutdown_grace_s: float,
    log_level: str = "info",
) -> None:
    app = build_app(api_key=api_key, max_queue=max_queue)
    state: ServerState = app.state.server
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level), state, shutdown_grace_s)
    # uvicorn re-raises the signal that stopped it once it is done; a no-op handler underneath makes a
    # drained SIGTERM end in exit status 0 instead of death by signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    serving = asyncio.create_task(server.serve())
    engine: AsyncEngine | None = None
    try:
        log.info("loading %s on %s", config.model or "the embedded SmolLM2-135M-Instruct", config.device)
        engine = await asyncio.to_thread(_load, config)
        await _warm_up(engine)
        # the start-up heap (torch, the tokenizer, the model, the CUDA graphs: ≈ 180k objects) out of the garbage
        # collector's full passes, as vLLM and SGLang do after warm-up: each pass would otherwise stall a decode step
        gc.collect()
        gc.freeze()
        name = served_model_name or engine.engine.model_name
        state.attach(engine, name)
        pool, sched = engine.engine.cache, engine.engine.config.scheduler
        log.info("KV cache: %d pages of %d tokens (%.2f GiB); up to %d requests a step, %d tokens of prefill",
                 pool.allocator.num_pages, pool.page_size, 2 * pool.k.nbytes / 2**30, sched.max_num_seqs,
                 sched.max_num_batched_tokens)
        log.info("serving %s on %s (drafter: %s, gamma: %d) at http://%s:%d",
                 name, config.device, config.spec.drafter, config.spec.gamma, host, port)
        await serving
    finally:
        if not serving.done():  # loading failed: stop listening before the error propagates
            server.should_exit = True
            await serving
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)
