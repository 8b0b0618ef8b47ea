"""Sending a dataset at a server: Poisson / gamma arrivals or a fixed concurrency, with /metrics before and after.

The loop issues at most `len(specs)` requests and stops issuing after `max_duration_s`; each request is
bounded by `timeout_s`, so a run ends within max_duration_s + timeout_s whatever the server does.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from .http_client import RequestResult, RequestSpec, check_loopback, stream_request
from .server_metrics import Snapshot, scrape


def arrival_intervals(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Gaps between request starts: 0 for rate inf (all at once), else gamma(shape=burstiness,
    scale=1/(rate*burstiness)), mean 1/rate; burstiness 1 is a Poisson process, < 1 burstier, > 1 steadier."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(num)]


async def discover_model(client: httpx.AsyncClient, base_url: str) -> tuple[str, int | None]:
    """The served model's id and max_model_len from /v1/models."""
    r = await client.get(f"{base_url}/v1/models", timeout=30)
    r.raise_for_status()
    card = r.json()["data"][0]
    return card["id"], card.get("max_model_len")


async def wait_ready(client: httpx.AsyncClient, base_url: str, timeout_s: float = 120.0) -> None:
    """Poll /health until 200 (bounded by `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (await client.get(f"{base_url}/health", timeout=5)).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url}/health not ready after {timeout_s:g} s")
        await asyncio.sleep(0.2)


@dataclass
class RunResult:
    results: list[RequestResult]
    duration_s: float
    model: str
    max_model_len: int | None
    before: Snapshot
    after: Snapshot
    config: dict = field(default_factory=dict)


def make_client(max_connections: int, api_key: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # per-request bounds are enforced by stream_request's wait_for; the client timeout guards single reads
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), headers=headers,
                             limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections))


async def run_load(
    base_url: str,
    specs: list[RequestSpec],
    *,
    model: str | None = None,
    rate: float = math.inf,
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    seed: int = 0,
    timeout_s: float = 300.0,
    max_duration_s: float = 3600.0,
    api_key: str | None = None,
    progress: bool = True,
) -> RunResult:
    base_url = check_loopback(base_url)
    intervals = arrival_intervals(len(specs), rate, burstiness, seed)
    async with make_client(max(1, min(max_concurrency or len(specs), 1024)), api_key) as client:
        await wait_ready(client, base_url)
        served, max_len = await discover_model(client, base_url)
        model = model or served
        before = await scrape(client, base_url)
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(specs), desc="requests", unit="req", disable=not progress, leave=False)
        start = time.perf_counter()

        async def one(spec: RequestSpec) -> RequestResult:
            if sem is None:
                r = await stream_request(client, base_url, model, spec, run_start=start, timeout_s=timeout_s)
            else:
                async with sem:
                    r = await stream_request(client, base_url, model, spec, run_start=start, timeout_s=timeout_s)
            bar.update(1)
            return r

        tasks = []
        for spec, gap in zip(specs, intervals):
            if gap:
                await asyncio.sleep(gap)
            if time.perf_counter() - start > max_duration_s:
                break
            tasks.append(asyncio.create_task(one(spec)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        bar.close()
        after = await scrape(client, base_url)
    config = {"base_url": base_url, "model": model, "num_requests": len(specs), "issued": len(tasks),
              "rate": None if math.isinf(rate) else rate, "burstiness": burstiness, "max_concurrency": max_concurrency,
              "seed": seed, "timeout_s": timeout_s, "max_duration_s": max_duration_s}
    return RunResult(results, duration, model, max_len, before, after, config)
