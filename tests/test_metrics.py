"""/metrics on a real uvicorn server: names and labels, counters equal to the engine's stats and to the
responses' usage, errors by status, aborts, and the windowed gauges (also on a fake clock)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specattn.engine.async_engine import AsyncEngine
from specattn.engine.config import CacheConfig, EngineConfig, SpecConfig
from specattn.engine.engine import LLMEngine
from specattn.server.app import build_app
from specattn.server.metrics import _Window

from .live_server import Live, start_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
GAMMA = 3
# fixed γ: adaptive γ on a CPU tends to choose plain decoding, and these tests need drafts
CONFIG = EngineConfig(device="cpu", cache=CacheConfig(num_pages=64),
                      spec=SpecConfig(drafter="specattn", gamma=GAMMA, adaptive=False))

# every metric DESIGN.md ("Metrics") names, as it appears on the wire
DESIGN_METRICS = {
    "specattn:num_requests_running": "gauge",
    "specattn:num_requests_waiting": "gauge",
    "specattn:kv_cache_usage_ratio": "gauge",
    "specattn:num_preemptions_total": "counter",
    "specattn:prompt_tokens_total": "counter",
    "specattn:generation_tokens_total": "counter",
    "specattn:request_success_total": "counter",
    "specattn:time_to_first_token_seconds": "histogram",
    "specattn:inter_token_latency_seconds": "histogram",
    "specattn:e2e_request_latency_seconds": "histogram",
    "specattn:spec_decode_num_drafts_total": "counter",
    "specattn:spec_decode_num_draft_tokens_total": "counter",
    "specattn:spec_decode_num_accepted_tokens_total": "counter",
    "specattn:spec_decode_num_accepted_tokens_per_pos_total": "counter",
    "specattn:spec_decode_acceptance_rate": "gauge",
    "specattn:generation_tokens_per_second": "gauge",
    "specattn:spec_decode_gamma": "gauge",
    "specattn:request_errors_total": "counter",
    "specattn:engine_info": "gauge",
}



def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Samples of /metrics as {(sample name, sorted labels): value}, checking the exposition parses."""
    r = httpx.get(f"{url}/metrics", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert found, f"no sample {name} {labels}"
    return sum(found)


def wait_idle(engine: LLMEngine, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.num_running or engine.num_waiting or engine.kv_usage > 0:
        assert time.monotonic() < deadline, "engine still busy"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def served(smollm_files) -> Iterator[tuple[Live, AsyncEngine]]:
    engine = AsyncEngine(LLMEngine(CONFIG, smollm_files))
    live = start_server(build_app(engine, metrics_window_s=2.0))
    yield live, engine
    live.stop()
    engine.shutdown()


def _stream_usage(url: str, path: str, body: dict) -> tuple[dict, dict, list[str]]:
    """A streamed request with include_usage: (usage, spec_decode of the usage chunk, finish reasons)."""
    usage, spec, finishes = None, None, []
    with httpx.stream("POST", f"{url}{path}", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage, spec = chunk["usage"], chunk.get("spec_decode")
            finishes += [c["finish_reason"] for c in chunk["choices"] if c.get("finish_reason")]
    assert usage is not None
    return usage, spec, finishes


def test_exposition_has_design_metrics_with_labels(served):
    live, _ = served
    r = httpx.post(f"{live.url}/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200
    text = httpx.get(f"{live.url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in DESIGN_METRICS.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        assert base in families, f"{name} missing from /metrics"
        assert families[base].type == kind, (name, families[base].type)
        assert families[base].samples, f"{name} has no samples"
        for sample in families[base].samples:
            assert sample.labels["model_name"] == MODEL and sample.labels["drafter"] == "specattn", sample
    per_pos = {s.labels["position"] for s in families["specattn:spec_decode_num_accepted_tokens_per_pos"].samples}
    assert per_pos == {str(i) for i in range(GAMMA)}
    info = families["specattn:engine_info"].samples[0].labels
    assert (info["max_gamma"], info["adaptive"], info["device"]) == (str(GAMMA), "false", "cpu")
    assert "# TYPE specattn:spec_decode_num_drafts_total counter" in text  # `_total` on the wire
    assert families["process_resident_memory_bytes"].samples[0].value > 0  # soak tests watch it


def test_counters_equal_engine_stats_and_usage(served):
    live, engine = served
    llm = engine.engine
    wait_idle(llm)
    before, stats0 = scrape(live.url), llm.stats()
    prompt = completion = choices = 0
    spec_sum = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0}
    reasons: dict[str, int] = {}
    # non-streamed completions with n=2, streamed chat and completion: every path that produces tokens
    r = httpx.post(f"{live.url}/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "n": 2, "temperature": 0.8, "seed": 1})
    body = r.json()
    # the usage counts a shared prompt once; the engine (and the counter) sees it once per choice
    prompt += body["usage"]["prompt_tokens"] * 2
    completion += body["usage"]["completion_tokens"]
    choices += 2
    for c in body["choices"]:
        reasons[c["finish_reason"]] = reasons.get(c["finish_reason"], 0) + 1
    for k in spec_sum:
        spec_sum[k] += body["spec_decode"][k]
    for path, extra in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name three colors."}]}),
                        ("/v1/completions", {"prompt": "1, 2, 3, 4,"})]:
        usage, spec, finishes = _stream_usage(live.url, path, {"model": MODEL, "max_tokens": 20, "temperature": 0, **extra})
        prompt += usage["prompt_tokens"]
        completion += usage["completion_tokens"]
        choices += 1
        for f in finishes:
            reasons[f] = reasons.get(f, 0) + 1
        for k in spec_sum:
            spec_sum[k] += spec[k]
    wait_idle(llm)
    after, stats = scrape(live.url), llm.stats()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # the engine's counters, exactly, and equal to what the responses reported per request
    assert value(after, "specattn:spec_decode_num_drafts_total") == stats.spec.num_drafts
    assert value(after, "specattn:spec_decode_num_draft_tokens_total") == stats.spec.num_draft_tokens
    assert value(after, "specattn:spec_decode_num_accepted_tokens_total") == stats.spec.num_accepted_tokens
    for pos, count in enumerate(stats.spec.accepted_per_position):
        assert value(after, "specattn:spec_decode_num_accepted_tokens_per_pos_total", position=str(pos)) == count
    for gamma, steps in stats.gamma_histogram.items():
        assert value(after, "specattn:spec_decode_gamma_steps_total", gamma=str(gamma)) == steps
    assert delta("specattn:spec_decode_num_drafts_total") == stats.spec.num_drafts - stats0.spec.num_drafts
    assert spec_sum["num_drafts"] == stats.spec.num_drafts - stats0.spec.num_drafts > 0
    assert spec_sum["num_draft_tokens"] == stats.spec.num_draft_tokens - stats0.spec.num_draft_tokens
    assert spec_sum["num_accepted_tokens"] == stats.spec.num_accepted_tokens - stats0.spec.num_accepted_tokens
    assert value(after, "specattn:spec_decode_gamma") == stats.last_gamma
    # tokens and requests, as the responses' usage counted them
    assert delta("specattn:prompt_tokens_total") == prompt
    assert delta("specattn:generation_tokens_total") == completion
    for reason in ("stop", "length", "abort"):
        assert delta("specattn:request_success_total", finished_reason=reason) == reasons.get(reason, 0)
    assert delta("specattn:time_to_first_token_seconds_count") == choices
    assert delta("specattn:e2e_request_latency_seconds_count") == choices
    # every token after a request's first (which the prefill produces alone) is one inter-token observation
    assert delta("specattn:inter_token_latency_seconds_count") == completion - choices
    assert delta("specattn:e2e_request_latency_seconds_sum") >= delta("specattn:time_to_first_token_seconds_sum") > 0
    assert value(after, "specattn:num_requests_running") == 0 == value(after, "specattn:kv_cache_usage_ratio")


def test_errors_counted_by_status(served, smollm_files):
    live, _ = served
    before = scrape(live.url)
    assert httpx.post(f"{live.url}/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1}).status_code == 400
    assert httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": [10**9]}).status_code == 400
    after = scrape(live.url)
    for status, count in [("404", 1), ("400", 2), ("401", 0), ("503", 0)]:
        got = value(after, "specattn:request_errors_total", status_code=status) - value(
            before, "specattn:request_errors_total", status_code=status)
        assert got == count, status
    # a wrong API key is refused before any route runs, and still counted; /metrics needs no key
    keyed = start_server(build_app(live.app.state.server.engine, api_key="sk-secret"))
    try:
        assert httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert value(scrape(keyed.url), "specattn:request_errors_total", status_code="401") == 1
    finally:
        keyed.stop()


def test_client_disconnect_counts_as_abort(served):
    live, engine = served
    before = scrape(live.url)
    with httpx.stream("POST", f"{live.url}/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "Write a long story.", "max_tokens": 200, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # hang up after the first chunk
    wait_idle(engine.engine)
    deadline = time.monotonic() + 10
    while True:
        after = scrape(live.url)
        aborted = value(after, "specattn:request_success_total", finished_reason="abort") - value(
            before, "specattn:request_success_total", finished_reason="abort")
        if aborted or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert aborted == 1
    assert value(after, "specattn:e2e_request_latency_seconds_count") - value(
        before, "specattn:e2e_request_latency_seconds_count") == 1


def test_window_gauges_follow_load_then_idle(served):
    live, engine = served
    httpx.post(f"{live.url}/v1/completions", timeout=60,
               json={"model": MODEL, "prompt": "The sky is", "max_tokens": 24, "temperature": 0})
    busy = scrape(live.url)
    assert value(busy, "specattn:generation_tokens_per_second") > 0
    assert 0 <= value(busy, "specattn:spec_decode_acceptance_rate") <= 1
    time.sleep(2.2)  # the app's window is 2 s
    scrape(live.url)  # a scrape leaves a snapshot: the next one sees a window with nothing drafted
    time.sleep(0.1)
    idle = scrape(live.url)
    assert value(idle, "specattn:generation_tokens_per_second") == 0
    assert not [k for k in idle if k[0] == "specattn:spec_decode_acceptance_rate"], "an idle server has no rate"


def test_loading_server_exposes_no_engine_metrics():
    live = start_server(build_app())  # no engine yet, as while `specattn serve` loads the model
    try:
        samples = scrape(live.url)
        assert not [k for k in samples if k[0].startswith("specattn:spec_decode")]
        assert httpx.get(f"{live.url}/health").status_code == 503  # a probe: not an API error
        assert not [k for k in scrape(live.url) if k[0] == "specattn:request_errors_total"]
        assert httpx.get(f"{live.url}/v1/models").status_code == 503
        assert value(scrape(live.url), "specattn:request_errors_total", status_code="503") == 1
    finally:
        live.stop()


# ---- the window on a fake clock ----

def test_window_tokens_per_second_and_acceptance_rate():
    w = _Window(10.0)
    assert w.acceptance_rate() is None and w.tokens_per_s(0.0) == 0
    w.snapshot(0.0, 0, 0)
    for t in range(1, 21):  # 1 s apart: 5 tokens, 4 drafted and 3 accepted per second
        w.add_tokens(float(t), 5)
        w.snapshot(float(t), 4 * t, 3 * t)
    assert w.tokens_per_s(20.0) == pytest.approx(50 / 10)  # 10 events in (10, 20]
    assert w.acceptance_rate() == pytest.approx(0.75)
    w.snapshot(21.0, 4 * 20 + 8, 3 * 20)  # 8 more drafted, none accepted
    assert w.acceptance_rate() == pytest.approx((3 * 9 + 0) / (4 * 9 + 8))  # baseline: t=11, the window's start
    w.snapshot(40.0, 88, 60)  # nothing new since
    assert w.acceptance_rate() is None
    assert w.tokens_per_s(40.0) == 0
