"""Prometheus metrics at `/metrics`: what the server sees of each request, and the engine's own counters.

Two sources, one per-app `CollectorRegistry` (no global state, so several apps can live in one process):

- Request metrics are observed where outputs are streamed (`RequestRecorder`, driven by
  `streams._pump`): prompt and generation tokens, finished requests by `finished_reason`, time to
  first token, inter-token latency and end-to-end latency. HTTP error responses are counted by an
  ASGI middleware.
- Engine metrics are read from `engine.stats()` at scrape time by a custom collector, so the
  speculation counters on the wire are exactly the engine's own: drafts, draft tokens, accepted
  tokens, accepted tokens per draft position, decode steps per γ, the γ last chosen, requests
  running / waiting and KV-cache usage, plus two gauges over a recent window (`window_s`):
  acceptance rate and generation tokens per second.

Names carry the prefix `specattn:`; counters end in `_total` on the wire; every series has the labels
`model_name` and `drafter`. The standard `process_*` metrics (memory, CPU, open files) come along.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specattn.engine.request import RequestOutput

if TYPE_CHECKING:
    from .state import ServerState

log = logging.getLogger(__name__)

PREFIX = "specattn:"
LABELS = ("model_name", "drafter")
FINISH_REASONS = ("stop", "length", "abort")
# statuses the server answers with on purpose; created at zero so that error panels show 0, not "no data"
ERROR_STATUSES = ("400", "401", "404", "413", "499", "500", "503")
DEFAULT_WINDOW_S = 10.0

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class _Window:
    """Recent history for the windowed gauges.

    Generation tokens are kept as timestamped events (exact tokens/s over the window). Speculation
    counters are snapshots of `engine.stats()` taken at most every `window_s / 20` (on outputs and on
    scrapes); the acceptance rate compares the newest with the newest one at least `window_s` old.
    """

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._lock = threading.Lock()
        self._tokens: deque[tuple[float, int]] = deque()
        self._snapshots: deque[tuple[float, int, int]] = deque()  # (t, draft tokens, accepted tokens)

    def add_tokens(self, now: float, count: int) -> None:
        with self._lock:
            self._tokens.append((now, count))
            self._prune(now)

    def tokens_per_s(self, now: float) -> float:
        with self._lock:
            self._prune(now)
            return sum(n for _, n in self._tokens) / self.window_s

    def wants_snapshot(self, now: float) -> bool:
        return not self._snapshots or now - self._snapshots[-1][0] >= self.window_s / 20

    def snapshot(self, now: float, draft_tokens: int, accepted: int) -> None:
        with self._lock:
            self._snapshots.append((now, draft_tokens, accepted))
            self._prune(now)

    def acceptance_rate(self) -> float | None:
        """Accepted / drafted since the window began; None when nothing was drafted in it."""
        with self._lock:
            if not self._snapshots:
                return None
            _, drafted0, accepted0 = self._snapshots[0]
            _, drafted1, accepted1 = self._snapshots[-1]
        drafted = drafted1 - drafted0
        return (accepted1 - accepted0) / drafted if drafted > 0 else None

    def _prune(self, now: float) -> None:
        start = now - self.window_s
        while self._tokens and self._tokens[0][0] <= start:
            self._tokens.popleft()
        # keep exactly one snapshot at or before the window's start: the baseline
        while len(self._snapshots) >= 2 and self._snapshots[1][0] <= start:
            self._snapshots.popleft()


class ServerMetrics:
    """The app's registry and its metrics; `state` tells the model name and the engine once attached."""

    def __init__(self, state: ServerState, window_s: float = DEFAULT_WINDOW_S):
        self.state = state
        self.registry = CollectorRegistry(auto_describe=True)
        self.window = _Window(window_s)
        self._labels = ("", "")
        r = self.registry
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of the requests that started generating.",
                                     LABELS, registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Generated tokens streamed to clients.",
                                         LABELS, registry=r)
        self.request_success = Counter(f"{PREFIX}request_success",
                                       "Finished engine requests (one per choice), by finish reason.",
                                       (*LABELS, "finished_reason"), registry=r)
        self.request_errors = Counter(f"{PREFIX}request_errors", "HTTP responses with an error status, by status code.",
                                      (*LABELS, "status_code"), registry=r)
        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds",
                              "Time from a request's admission to its first generated token.", LABELS,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}inter_token_latency_seconds",
                             "Time between a request's consecutive outputs divided by the tokens the later one "
                             "carries, observed once per token.", LABELS, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}e2e_request_latency_seconds",
                             "Time from a request's admission to its last token.", LABELS, buckets=E2E_BUCKETS,
                             registry=r)
        r.register(_EngineCollector(self))
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends, unprefixed as usual

    def labels(self) -> tuple[str, str]:
        """(model_name, drafter) of the engine attached last; empty strings before that."""
        return self._labels

    def attached(self) -> None:
        """Note the labels and create the series that should read 0 rather than be absent once the model is served."""
        engine = self.state.engine
        try:
            drafter = engine.engine.config.spec.drafter if engine is not None else ""
        except Exception:  # attaching must not fail on metrics; a broken engine shows in its requests
            log.exception("cannot read the drafter of the attached engine")
            drafter = ""
        self._labels = lv = (self.state.model_name, drafter)
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e):
            metric.labels(*lv)
        for reason in FINISH_REASONS:
            self.request_success.labels(*lv, reason)
        for status in ERROR_STATUSES:
            self.request_errors.labels(*lv, status)

    def request_started(self) -> RequestRecorder:
        return RequestRecorder(self)

    def snapshot_engine(self, now: float, force: bool = False) -> None:
        engine = self.state.engine
        if engine is not None and (force or self.window.wants_snapshot(now)):
            spec = engine.engine.stats().spec
            self.window.snapshot(now, spec.num_draft_tokens, spec.num_accepted_tokens)


class RequestRecorder:
    """Observes one engine request's outputs as they are streamed."""

    def __init__(self, metrics: ServerMetrics):
        self.m = metrics
        self.labels = metrics.labels()
        self.start = time.monotonic()
        self.last_token: float | None = None
        self.done = False

    def output(self, out: RequestOutput) -> None:
        m, lv, now = self.m, self.labels, time.monotonic()
        n = len(out.new_token_ids)
        if n:
            if self.last_token is None:
                m.prompt_tokens.labels(*lv).inc(out.num_prompt_tokens)
                m.ttft.labels(*lv).observe(now - self.start)
            else:
                per_token = (now - self.last_token) / n
                itl = m.itl.labels(*lv)
                for _ in range(n):
                    itl.observe(per_token)
            self.last_token = now
            m.generation_tokens.labels(*lv).inc(n)
            m.window.add_tokens(now, n)
        if out.finished:
            self.finish(out.finish_reason.value if out.finish_reason else "stop", now)
        m.snapshot_engine(now)

    def failed(self) -> None:
        """The request was refused or the engine failed it: not a finished request (the HTTP status says it)."""
        self.done = True

    def close(self) -> None:
        """Called when the stream ends for any reason: one left unfinished was aborted (client gone, shutdown)."""
        if not self.done:
            self.finish("abort", time.monotonic())

    def finish(self, reason: str, now: float) -> None:
        self.done = True
        self.m.request_success.labels(*self.labels, reason).inc()
        self.m.e2e.labels(*self.labels).observe(now - self.start)


class _EngineCollector(Collector):
    """Reads `engine.stats()` at scrape time; nothing until a model is attached."""

    def __init__(self, metrics: ServerMetrics):
        self.m = metrics

    def describe(self) -> list[Metric]:
        return []  # dynamic: the registry must not call collect() at registration

    def collect(self) -> Iterator[Metric]:
        state = self.m.state
        if state.engine is None:
            return
        engine = state.engine.engine
        stats = engine.stats()
        now = time.monotonic()
        self.m.window.snapshot(now, stats.spec.num_draft_tokens, stats.spec.num_accepted_tokens)
        lv = [state.model_name, stats.drafter]
        spec = engine.config.spec

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=LABELS)
            g.add_metric(lv, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(PREFIX + name, doc, labels=LABELS)
            c.add_metric(lv, value)
            return c

        info = GaugeMetricFamily(f"{PREFIX}engine_info", "The served model and speculation settings (always 1).",
                                 labels=(*LABELS, "max_gamma", "adaptive", "device"))
        info.add_metric([*lv, str(spec.max_gamma), str(spec.adaptive).lower(), engine.config.device], 1)
        yield info
        yield gauge("num_requests_running", "Requests the engine is running (prefilling or decoding).", stats.num_running)
        yield gauge("num_requests_waiting", "Requests waiting in the engine's queue for KV pages or a batch slot.",
                    stats.num_waiting)
        yield gauge("kv_cache_usage_ratio", "Fraction of KV-cache pages in use (0 to 1).", stats.kv_usage)
        yield counter("num_preemptions", "Requests preempted for KV pages (recomputed on resume).",
                      stats.num_preemptions)
        s = stats.spec
        yield counter("spec_decode_num_drafts", "Verifications that checked at least one draft token.", s.num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Draft tokens proposed.", s.num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Draft tokens accepted by verification.", s.num_accepted_tokens)
        per_pos = CounterMetricFamily(f"{PREFIX}spec_decode_num_accepted_tokens_per_pos",
                                      "Drafts whose token at this position (0-based) was accepted.",
                                      labels=(*LABELS, "position"))
        for pos, count in enumerate(s.accepted_per_position):
            per_pos.add_metric([*lv, str(pos)], count)
        yield per_pos
        steps = CounterMetricFamily(f"{PREFIX}spec_decode_gamma_steps", "Decode steps that drafted this many tokens.",
                                    labels=(*LABELS, "gamma"))
        for gamma, count in sorted(stats.gamma_histogram.items()):
            steps.add_metric([*lv, str(gamma)], count)
        yield steps
        yield gauge("spec_decode_gamma", "Draft length (γ) chosen for the last decode step.", stats.last_gamma)
        yield gauge("spec_decode_max_gamma", "Configured draft length (the maximum when adaptive).", spec.max_gamma)
        rate = self.m.window.acceptance_rate()
        if rate is not None:  # absent, not 0, when nothing was drafted lately: an idle server has no rate
            yield gauge("spec_decode_acceptance_rate",
                        f"Accepted / drafted tokens over the last {self.m.window.window_s:g} s.", rate)
        yield gauge("generation_tokens_per_second",
                    f"Generated tokens per second over the last {self.m.window.window_s:g} s.",
                    self.m.window.tokens_per_s(now))


class MetricsMiddleware:
    """Counts API responses (under /v1/) whose status is 400 or more; outermost, so 401s and 413s are seen too.

    Probes and scrapes are left out: /health answers 503 by design while the model loads.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def send_counting(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.request_errors.labels(*self.metrics.labels(), str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_counting)
