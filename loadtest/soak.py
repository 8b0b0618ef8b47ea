"""Soak-and-fault mode: for a bounded time, good requests mixed with malformed ones, client disconnects, prompts
longer than the context and bursts beyond the wait queue; then checks that the server came through intact.

Checks afterwards:
- no 5xx except the documented 503s (`queue_full`, `not_ready`, `shutting_down`);
- every faulty request got the documented 4xx (400, 404, 413);
- every good request that was admitted (200) completed: [DONE], no error event, finish_reason `length` (they
  ask for `ignore_eos`), exactly `max_tokens` tokens in usage and non-empty text;
- KV usage, running and waiting requests back to zero (from /metrics; "unavailable" if the server lacks them);
- the server's resident memory stable: RSS at the end minus RSS a quarter into the run within a limit
  (RSS of `server_pid` from /proc, else `process_resident_memory_bytes` from /metrics, else unavailable).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

from .http_client import RequestResult, RequestSpec, check_loopback, stream_request
from .runner import RunResult, discover_model, make_client, wait_ready
from .server_metrics import Snapshot, process_rss_bytes, scrape

DOCUMENTED_503 = {"queue_full", "not_ready", "shutting_down"}
FAULT_STATUSES = {"malformed": {400, 404, 413}, "too_long": {400}}
GOOD_PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "List three colours:",
                "In 1969, the first", "The quick brown fox", "Dear friend,", "Here is a recipe for bread:"]


@dataclass
class SoakConfig:
    duration_s: float = 30.0
    concurrency: int = 4  # workers issuing the mixed traffic
    max_tokens: int = 16
    mix: dict = field(default_factory=lambda: {"good": 0.55, "malformed": 0.2, "disconnect": 0.15, "too_long": 0.1})
    burst_size: int = 32  # simultaneous good requests per burst; above --max-queue to provoke 503 queue_full
    burst_every_s: float = 10.0
    seed: int = 0
    timeout_s: float = 120.0  # per request
    settle_timeout_s: float = 30.0  # how long to wait for KV usage and queues to drain afterwards
    server_pid: int | None = None
    rss_growth_limit_mib: float = 256.0
    max_requests: int = 100_000  # hard bound on requests issued, whatever the duration


def malformed_bodies(model: str) -> list[tuple[str, bytes | dict]]:
    """Requests the server must reject with a 4xx: (label, body)."""
    return [
        ("bad_json", b'{"model": "x", "prompt": '),
        ("temperature_out_of_range", {"model": model, "prompt": "hi", "temperature": 5, "stream": True}),
        ("unknown_model", {"model": "no-such-model", "prompt": "hi", "stream": True}),
        ("empty_prompt", {"model": model, "prompt": "", "stream": True}),
        ("token_outside_vocab", {"model": model, "prompt": [10 ** 9], "stream": True}),
        ("negative_max_tokens", {"model": model, "prompt": "hi", "max_tokens": -1, "stream": True}),
        ("wrong_type", {"model": model, "prompt": {"not": "a prompt"}, "n": "many", "stream": True}),
        ("too_large_body", {"model": model, "prompt": "x" * (5 * 1024 * 1024), "stream": True}),
    ]


@dataclass
class SoakResult:
    results: list[RequestResult]
    duration_s: float
    model: str
    max_model_len: int | None
    before: Snapshot
    after: Snapshot
    settled: Snapshot
    settle_s: float
    rss: list[tuple[float, float]]  # (seconds since start, bytes)
    rss_source: str
    labels: list[str]  # the fault label of each result ("" for good ones)
    config: SoakConfig

    def as_run(self, kinds: tuple[str, ...] = ("good", "burst")) -> RunResult:
        """The admitted good requests as a RunResult, for the usual latency summary."""
        good = [r for r in self.results if r.kind in kinds and r.status == 200]
        return RunResult(good, self.duration_s, self.model, self.max_model_len, self.before, self.after,
                         {"mode": "soak", "rate": None, "burstiness": None, "max_concurrency": self.config.concurrency})


async def run_soak(base_url: str, cfg: SoakConfig, *, api_key: str | None = None, progress: bool = True) -> SoakResult:
    base_url = check_loopback(base_url)
    rng = random.Random(cfg.seed)
    results: list[RequestResult] = []
    labels: list[str] = []
    rss: list[tuple[float, float]] = []
    async with make_client(cfg.concurrency + cfg.burst_size + 8, api_key) as client:
        await wait_ready(client, base_url)
        model, max_len = await discover_model(client, base_url)
        bad = malformed_bodies(model)
        before = await scrape(client, base_url)
        rss_source = ("pid" if cfg.server_pid and process_rss_bytes(cfg.server_pid) is not None
                      else "metrics" if before.rss_bytes is not None else "unavailable")
        start = time.perf_counter()
        deadline = start + cfg.duration_s
        issued = 0
        bar = tqdm(total=None, desc="soak", unit="req", disable=not progress, leave=False)

        def good_spec(i: int) -> RequestSpec:
            return RequestSpec(prompt=GOOD_PROMPTS[i % len(GOOD_PROMPTS)], max_tokens=cfg.max_tokens,
                               extra={"temperature": 0, "ignore_eos": True})

        async def send(kind: str, label: str = "", **kw) -> None:
            nonlocal issued
            issued += 1
            r = await stream_request(client, base_url, model, kw.pop("spec", good_spec(issued)), run_start=start,
                                     timeout_s=cfg.timeout_s, kind=kind, **kw)
            results.append(r)
            labels.append(label)
            bar.update(1)
            if r.status == 503:  # back off as the docs tell clients to, instead of hammering a full queue
                await asyncio.sleep(0.1 + 0.2 * rng.random())

        def budget_left() -> bool:
            return time.perf_counter() < deadline and issued < cfg.max_requests

        async def worker(w: int) -> None:
            kinds, weights = zip(*cfg.mix.items())
            n_bad = 0
            while budget_left():
                kind = rng.choices(kinds, weights)[0]
                if kind == "good":
                    await send("good")
                elif kind == "malformed":
                    label, body = bad[(w + n_bad) % len(bad)]
                    n_bad += 1
                    await send("malformed", label, body_override=body)
                elif kind == "disconnect":
                    await send("disconnect", spec=RequestSpec(prompt=GOOD_PROMPTS[w], max_tokens=max(64, cfg.max_tokens * 4),
                                                              extra={"ignore_eos": True}),
                               disconnect_after_chunks=rng.randint(0, 3))
                elif kind == "too_long":
                    n = (max_len or 8192) + rng.randint(1, 64)
                    await send("too_long", "prompt_beyond_context",
                               spec=RequestSpec(prompt=[rng.randrange(1000, 10000) for _ in range(n)], max_tokens=4))

        async def bursts() -> None:
            while budget_left():
                await asyncio.gather(*(send("burst") for _ in range(min(cfg.burst_size, cfg.max_requests - issued))))
                pause_until = min(deadline, time.perf_counter() + cfg.burst_every_s)
                while time.perf_counter() < pause_until:
                    await asyncio.sleep(min(0.2, max(0.0, pause_until - time.perf_counter())))

        async def sample_rss() -> None:
            while time.perf_counter() < deadline + cfg.timeout_s:  # ends when cancelled, bounded regardless
                value = await _rss(client, base_url, cfg.server_pid, rss_source)
                if value is not None:
                    rss.append((time.perf_counter() - start, value))
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample_rss())
        await asyncio.gather(bursts(), *(worker(w) for w in range(cfg.concurrency)))
        duration = time.perf_counter() - start
        bar.close()
        sampler.cancel()
        settled, settle_s = await _settle(client, base_url, cfg.settle_timeout_s)
        final = await _rss(client, base_url, cfg.server_pid, rss_source)
        if final is not None:
            rss.append((time.perf_counter() - start, final))
        after = await scrape(client, base_url)
    return SoakResult(results, duration, model, max_len, before, after, settled, settle_s, rss, rss_source, labels, cfg)


async def _rss(client: httpx.AsyncClient, base_url: str, pid: int | None, source: str) -> float | None:
    if source == "pid" and pid:
        return process_rss_bytes(pid)
    if source == "metrics":
        return (await scrape(client, base_url)).rss_bytes
    return None


async def _settle(client: httpx.AsyncClient, base_url: str, timeout_s: float) -> tuple[Snapshot, float]:
    """Poll /metrics until KV usage, running and waiting are all zero (those present), at most `timeout_s`."""
    t0 = time.perf_counter()
    while True:
        snap = await scrape(client, base_url)
        gauges = [g for g in (snap.kv_usage, snap.running, snap.waiting) if g is not None]
        if (all(g == 0 for g in gauges) and snap.error is None) or time.perf_counter() - t0 > timeout_s:
            return snap, time.perf_counter() - t0
        await asyncio.sleep(0.25)


def _good_complete(r: RequestResult) -> bool:
    return (r.ok and r.finish_reason == "length" and r.output_tokens == r.max_tokens and bool(r.text))


def check(res: SoakResult) -> dict:
    """The soak's figures and verdicts. `ok` per check: True, False, or None when it could not be measured."""
    rs = res.results
    counts: dict[str, dict[str, int]] = {}
    for r in rs:
        key = str(r.status) if r.status is not None else ("disconnected" if r.disconnected else "no_response")
        counts.setdefault(r.kind, {})
        counts[r.kind][key] = counts[r.kind].get(key, 0) + 1
    five = [r for r in rs if r.status is not None and r.status >= 500]
    undocumented_5xx = [r for r in five if not (r.status == 503 and r.error_code in DOCUMENTED_503)]
    codes_503 = {}
    for r in five:
        if r.status == 503:
            codes_503[str(r.error_code)] = codes_503.get(str(r.error_code), 0) + 1

    faults = [(r, lab) for r, lab in zip(rs, res.labels) if r.kind in FAULT_STATUSES]
    wrong_faults = [f"{lab}: {r.status}" for r, lab in faults if r.status not in FAULT_STATUSES[r.kind]]
    good = [r for r in rs if r.kind in ("good", "burst")]
    admitted = [r for r in good if r.status == 200]
    incomplete = [r for r in admitted if not _good_complete(r)]
    good_other = [r for r in good if r.status != 200 and not (r.status == 503 and r.error_code in DOCUMENTED_503)]
    disconnects = [r for r in rs if r.kind == "disconnect"]
    s = res.settled
    kv_ok = None if s.kv_usage is None else s.kv_usage == 0
    queues_ok = None if s.running is None and s.waiting is None else (s.running or 0) == 0 and (s.waiting or 0) == 0
    rss_check = _rss_check(res)
    checks = {
        "no_undocumented_5xx": {"ok": not undocumented_5xx,
                                "detail": f"{len(five)} 5xx, of them documented 503s by code {codes_503}; "
                                          f"undocumented: {[(r.status, r.error[:80]) for r in undocumented_5xx[:5]]}"},
        "faults_rejected_with_documented_4xx": {"ok": not wrong_faults,
                                                "detail": f"{len(faults)} faulty requests; wrong statuses: {wrong_faults[:10]}"},
        "good_requests_complete": {"ok": not incomplete and not good_other,
                                   "detail": f"{len(admitted)} admitted of {len(good)} good (others 503 queue_full); "
                                             f"incomplete: {[(r.finish_reason, r.output_tokens, r.max_tokens, r.error[:80]) for r in incomplete[:5]]}; "
                                             f"failed otherwise: {[(r.status, r.error[:80]) for r in good_other[:5]]}"},
        "kv_usage_back_to_zero": {"ok": kv_ok,
                                  "detail": "unavailable: the server exports no KV usage metric" if s.kv_usage is None
                                  else f"KV usage {s.kv_usage:g} after {res.settle_s:.1f} s"},
        "queues_empty": {"ok": queues_ok,
                         "detail": "unavailable: no running/waiting gauges" if queues_ok is None
                         else f"running {s.running}, waiting {s.waiting}"},
        "memory_stable": rss_check,
    }
    burst = [r for r in rs if r.kind == "burst"]
    figures = {
        "duration_s": res.duration_s,
        "requests": len(rs),
        "by_kind_and_status": counts,
        "good": {"issued": len(good), "admitted": len(admitted), "complete": len(admitted) - len(incomplete),
                 "rejected_503": sum(1 for r in good if r.status == 503)},
        "bursts": {"requests": len(burst), "rejected_503": sum(1 for r in burst if r.status == 503),
                   "queue_limit_reached": any(r.status == 503 for r in burst)},
        "disconnects": {"issued": len(disconnects), "closed_by_client": sum(1 for r in disconnects if r.disconnected)},
        "faults_by_label": _count(lab for _, lab in faults),
        "documented_503_by_code": codes_503,
        "rss_source": res.rss_source,
        "rss_mib": [(round(t, 2), round(b / 2 ** 20, 1)) for t, b in res.rss],
    }
    verdicts = [c["ok"] for c in checks.values()]
    return {"passed": all(v is not False for v in verdicts), "checks": checks, "figures": figures}


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _rss_check(res: SoakResult) -> dict:
    if not res.rss:
        return {"ok": None, "detail": "unavailable: no --server-pid and no process_resident_memory_bytes in /metrics"}
    quarter = res.duration_s / 4
    baseline_t, baseline = next(((t, b) for t, b in res.rss if t >= quarter), res.rss[0])
    end_t, end = res.rss[-1]
    growth = (end - baseline) / 2 ** 20
    peak = max(b for _, b in res.rss) / 2 ** 20
    return {"ok": growth <= res.config.rss_growth_limit_mib,
            "detail": f"RSS ({res.rss_source}) {baseline / 2 ** 20:.0f} MiB at {baseline_t:.1f} s, {end / 2 ** 20:.0f} MiB "
                      f"at the end ({end_t:.1f} s): {growth:+.0f} MiB (limit {res.config.rss_growth_limit_mib:g}); "
                      f"first {res.rss[0][1] / 2 ** 20:.0f} MiB, peak {peak:.0f} MiB",
            "baseline_mib": baseline / 2 ** 20, "end_mib": end / 2 ** 20, "growth_mib": growth, "peak_mib": peak}


def markdown(verdict: dict) -> str:
    fig = verdict["figures"]
    lines = ["## Soak and fault checks", "", f"**{'PASSED' if verdict['passed'] else 'FAILED'}**", "",
             "| check | result | figures |", "|---|---|---|"]
    for name, c in verdict["checks"].items():
        mark = {True: "pass", False: "FAIL", None: "unavailable"}[c["ok"]]
        lines.append(f"| {name} | {mark} | {c['detail']} |")
    lines += ["", "| traffic | count |", "|---|---|",
              f"| requests | {fig['requests']} in {fig['duration_s']:.1f} s |",
              f"| good (incl. bursts): issued / admitted / complete / 503 | {fig['good']['issued']} / {fig['good']['admitted']} / "
              f"{fig['good']['complete']} / {fig['good']['rejected_503']} |",
              f"| bursts: requests / 503 queue_full | {fig['bursts']['requests']} / {fig['bursts']['rejected_503']} |",
              f"| client disconnects: issued / closed early | {fig['disconnects']['issued']} / {fig['disconnects']['closed_by_client']} |",
              f"| faults by label | {json.dumps(fig['faults_by_label'])} |",
              f"| statuses by kind | {json.dumps(fig['by_kind_and_status'])} |"]
    return "\n".join(lines) + "\n"
