"""specattn-loadtest: the pieces on their own, then the load generator and the soak mode against a real
`specattn serve` process on CPU, checking that each report is consistent with itself and with /metrics."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from specattn.loadtest import cli, datasets
from specattn.loadtest.http_client import NotLoopbackError, RequestResult, check_loopback
from specattn.loadtest.report import markdown, meets_slos, parse_slos, stats_ms, summarize
from specattn.loadtest.runner import RunResult, arrival_intervals
from specattn.loadtest.server_metrics import Snapshot, parse_metrics, spec_delta

MAX_QUEUE = 8


# ---------------------------------------------------------------- pieces, no server


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://192.168.1.2",
                                 "http://0.0.0.0:8000", "ftp://127.0.0.1", "http://[2001:db8::1]:80"])
def test_non_loopback_targets_are_refused(url, capsys):
    with pytest.raises(NotLoopbackError):
        check_loopback(url)
    assert cli.main(["bench", "--url", url, "--num-prompts", "1"]) == 2
    assert "loopback" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/", "http://localhost:1", "http://127.5.6.7", "http://[::1]:9"])
def test_loopback_targets_are_accepted(url):
    assert check_loopback(url) == url.rstrip("/")


def test_arrivals_poisson_gamma_and_all_at_once():
    assert arrival_intervals(5, math.inf) == [0.0] * 5
    for burstiness in (0.5, 1.0, 4.0):
        gaps = arrival_intervals(4000, rate=10.0, burstiness=burstiness, seed=1)
        mean = sum(gaps) / len(gaps)
        var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
        assert mean == pytest.approx(0.1, rel=0.1)
        # gamma(k, 1/(rate k)): variance 1/(k rate^2), so smaller k is burstier
        assert var == pytest.approx(1 / (burstiness * 100), rel=0.2)
    assert arrival_intervals(10, 3.0, seed=7) == arrival_intervals(10, 3.0, seed=7)


def test_datasets(tmp_path):
    specs = datasets.synthetic(50, input_len=100, output_len=20, range_ratio=0.5, seed=3)
    assert all(50 <= s.prompt_len == len(s.prompt) <= 150 and 10 <= s.max_tokens <= 30 for s in specs)
    assert specs[0].body("m")["stream"] and specs[0].body("m")["ignore_eos"]
    doc = tmp_path / "doc.txt"
    doc.write_text("word " * 5000)
    docs = datasets.documents(3, output_len=8, doc_chars=1000, paths=[str(doc)])
    assert len(docs) == 3 and docs[0].endpoint == "/v1/chat/completions"
    assert len(docs[0].messages[0]["content"]) > 1000
    f = tmp_path / "r.jsonl"
    f.write_text('{"prompt": "hi", "max_tokens": 3, "temperature": 0, "stream": false}\n\n'
                 '{"messages": [{"role": "user", "content": "yo"}]}\n')
    rows = datasets.jsonl(str(f), num=3)
    assert [r.endpoint for r in rows] == ["/v1/completions", "/v1/chat/completions", "/v1/completions"]
    assert rows[0].max_tokens == 3 and rows[0].extra == {"temperature": 0} and rows[0].body("m")["stream"] is True
    f.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError):
        datasets.jsonl(str(f))


def test_stats_slos_and_absent_metrics():
    s = stats_ms([0.3, 0.1, 0.2, 0.4])
    assert s["min"] <= s["median"] <= s["p90"] <= s["p99"] <= s["max"] and s["mean"] == pytest.approx(250)
    assert stats_ms([])["mean"] is None
    assert parse_slos(["ttft:500", "tpot:50"]) == {"ttft": 500, "tpot": 50}
    with pytest.raises(ValueError):
        parse_slos(["latency:5"])
    r = RequestResult(ok=True, ttft=0.2, e2e=1.2, output_tokens=11)  # tpot 100 ms
    assert meets_slos(r, {"ttft": 300, "tpot": 150}) and not meets_slos(r, {"tpot": 99})
    # a server without the speculation counters: reported unavailable, never as zeros
    empty = parse_metrics("# nothing here\n")
    delta = spec_delta(empty, empty)
    assert delta["available"] is False and delta["acceptance_rate"] is None
    assert "specattn:spec_decode_num_drafts_total" in delta["missing"]
    run = RunResult([r], 1.0, "m", 100, empty, Snapshot(error="boom"))
    summary = summarize(run)
    assert "unavailable (missing: specattn:spec_decode_num_drafts_total" in markdown(summary)
    assert summary["metrics_scrape_errors"] == ["boom"]
    counters = parse_metrics(
        'specattn:spec_decode_num_drafts_total{model_name="m",drafter="d"} 4\n'
        'specattn:spec_decode_num_draft_tokens_total{model_name="m",drafter="d"} 16\n'
        'specattn:spec_decode_num_accepted_tokens_total{model_name="m",drafter="d"} 12\n'
        'specattn:kv_cache_usage_ratio{model_name="m"} 0.25\n')
    d = spec_delta(empty, counters)
    assert d["available"] is False  # "before" lacks them
    d = spec_delta(counters, counters)
    assert d["available"] and d["num_drafts"] == 0 and d["acceptance_rate"] is None
    assert counters.kv_usage == 0.25


# ---------------------------------------------------------------- against a real server

@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def metrics(self) -> Snapshot:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).text)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """`specattn serve` on CPU with a small pool, batch and wait queue, so bursts overflow the queue."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "specattn.server.cli", "serve", "--port", str(port), "--device", "cpu",
         "--num-pages", "256", "--max-num-seqs", "8", "--max-queue", str(MAX_QUEUE), "--log-level", "warning"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield Server(url, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _ordered(stats: dict) -> None:
    if stats["count"]:
        assert stats["min"] <= stats["median"] <= stats["p90"] <= stats["p99"] <= stats["max"]
        assert stats["min"] <= stats["mean"] <= stats["max"]


def _spec_counters(snap: Snapshot) -> tuple:
    return tuple(snap.get(n) for n in ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
                                        "spec_decode_num_accepted_tokens_total"))


@pytest.mark.slow
def test_bench_report_is_consistent_with_itself_and_metrics(server, tmp_path):
    before = server.metrics()
    out = tmp_path / "bench"
    # at most MAX_QUEUE in flight: a burst arriving during the first prefill (seconds on two slow cores) must not
    # overflow the wait queue here, where every request has to complete (the soak test overflows it on purpose)
    rc = cli.main(["bench", "--url", server.url, "--num-prompts", "10", "--input-len", "48", "--output-len", "12",
                   "--range-ratio", "0.5", "--request-rate", "8", "--burstiness", "0.5", "--goodput", "ttft:60000",
                   "--max-concurrency", str(MAX_QUEUE), "--out", str(out), "--no-progress", "--seed", "5"])
    after = server.metrics()
    assert rc == 0
    data = json.loads((out / "result.json").read_text())
    s, reqs = data["summary"], data["requests"]
    specs = datasets.synthetic(10, 48, 12, 0.5, seed=5)

    # counts add up
    assert s["requests"]["issued"] == len(reqs) == 10
    assert s["requests"]["completed"] + s["requests"]["failed"] == 10
    assert sum(s["requests"]["by_status"].values()) == 10
    assert s["requests"]["completed"] == 10, s["errors"]
    assert s["requests"]["finish_reasons"] == {"length": 10}  # ignore_eos: every answer runs to max_tokens
    assert s["tokens"]["output"] == sum(sp.max_tokens for sp in specs) == sum(r["output_tokens"] for r in reqs)
    assert s["tokens"]["input"] == sum(sp.prompt_len for sp in specs)
    assert s["throughput"]["output_tokens_per_s"] == pytest.approx(s["tokens"]["output"] / s["duration_s"])
    assert s["goodput"]["good_requests"] == 10  # a one-minute TTFT SLO on a short run
    assert s["latency_ms"]["itl"]["count"] == sum(len(r["itls"]) for r in reqs)
    assert sum(s["timeline"]["output_tokens_per_s"]) * s["timeline"]["bucket_s"] == pytest.approx(s["tokens"]["output"])

    # percentiles ordered, and per-request figures agree with each other
    for stats in s["latency_ms"].values():
        _ordered(stats)
    for r in reqs:
        assert 0 < r["ttft"] <= r["e2e"]
        assert r["tpot"] == pytest.approx((r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1))
        assert len(r["chunk_times"]) == len(r["itls"]) + 1

    # acceptance matches /metrics (nothing else ran on the server meanwhile)
    sm, resp = s["speculation"]["server_metrics"], s["speculation"]["responses"]
    counters_before, counters_after = _spec_counters(before), _spec_counters(after)
    if None in counters_after:
        assert sm["available"] is False  # a server without the counters: said so, not zeros
    else:
        assert sm["available"]
        deltas = [a - b for a, b in zip(counters_after, counters_before)]
        assert [sm["num_drafts"], sm["num_draft_tokens"], sm["num_accepted_tokens"]] == deltas
        assert [resp["num_drafts"], resp["num_draft_tokens"], resp["num_accepted_tokens"]] == deltas
        assert sm["acceptance_rate"] == pytest.approx(deltas[2] / deltas[1])
        assert sm["mean_acceptance_length"] == pytest.approx(1 + deltas[2] / deltas[0])
        assert 0 <= sm["acceptance_rate"] <= 1
    gen = after.get("generation_tokens_total"), before.get("generation_tokens_total")
    if None not in gen:
        assert gen[0] - gen[1] == s["tokens"]["output"]

    md = (out / "report.md").read_text()
    assert "| ttft |" in md and "specattn-loadtest bench" in md
    for png in ("latency_cdf.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_fixed_concurrency_with_jsonl_chat_and_completions(server, tmp_path):
    f = tmp_path / "reqs.jsonl"
    f.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": True},
        {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0, "ignore_eos": True},
    ]) + "\n")
    out = tmp_path / "conc"
    rc = cli.main(["bench", "--url", server.url, "--dataset", "jsonl", "--jsonl", str(f), "--num-prompts", "6",
                   "--max-concurrency", "2", "--out", str(out), "--no-progress", "--no-plots"])
    assert rc == 0
    data = json.loads((out / "result.json").read_text())
    reqs = data["requests"]
    assert data["summary"]["requests"]["completed"] == 6
    assert all(r["output_tokens"] == 8 and r["text_chars"] > 0 for r in reqs)
    # never more than 2 in flight: at each request's start, count the others running
    spans = [(r["start"], r["start"] + r["e2e"]) for r in reqs]
    for s0, _ in spans:
        assert sum(1 for a, b in spans if a <= s0 < b) <= 2
    assert not (out / "latency_cdf.png").exists()


@pytest.mark.slow
def test_soak_with_faults_passes_and_reports_consistent_figures(server, tmp_path):
    exports_kv = server.metrics().kv_usage is not None
    out = tmp_path / "soak"
    rc = cli.main(["soak", "--url", server.url, "--duration", "8", "--concurrency", "3", "--max-tokens", "8",
                   "--burst-size", str(3 * MAX_QUEUE), "--burst-every", "4", "--server-pid", str(server.proc.pid),
                   "--out", str(out), "--no-progress", "--seed", "2"])
    data = json.loads((out / "result.json").read_text())
    soak, reqs = data["summary"]["soak"], data["requests"]
    assert rc == 0 and soak["passed"], json.dumps(soak["checks"], indent=1)
    checks, fig = soak["checks"], soak["figures"]

    # every kind of traffic happened, and the counts add up
    kinds = {k: sum(v.values()) for k, v in fig["by_kind_and_status"].items()}
    assert set(kinds) == {"good", "burst", "malformed", "too_long", "disconnect"}, kinds
    assert sum(kinds.values()) == fig["requests"] == len(reqs)
    assert fig["good"]["issued"] == kinds["good"] + kinds["burst"]
    assert fig["good"]["admitted"] == fig["good"]["complete"] > 0
    assert fig["good"]["admitted"] + fig["good"]["rejected_503"] == fig["good"]["issued"]
    assert sum(fig["faults_by_label"].values()) == kinds["malformed"] + kinds["too_long"]
    assert fig["bursts"]["queue_limit_reached"]  # a burst of 3x the queue gets some 503 queue_full
    assert set(fig["documented_503_by_code"]) == {"queue_full"}
    assert fig["disconnects"]["closed_by_client"] > 0
    assert all(r["status"] in (400, 404, 413) for r in reqs if r["kind"] in ("malformed", "too_long"))
    assert all(r["finish_reason"] == "length" and r["output_tokens"] == 8
               for r in reqs if r["kind"] in ("good", "burst") and r["status"] == 200)

    # the server came through: no undocumented 5xx, KV back to zero, memory from the pid
    assert checks["no_undocumented_5xx"]["ok"] and checks["good_requests_complete"]["ok"]
    assert checks["kv_usage_back_to_zero"]["ok"] is (True if exports_kv else None)
    assert fig["rss_source"] == "pid" and checks["memory_stable"]["ok"]
    assert checks["memory_stable"]["baseline_mib"] > 100  # a loaded model, so it really is the server's RSS
    if exports_kv:
        assert server.metrics().kv_usage == 0

    # the admitted good requests' summary agrees with the soak figures
    s = data["summary"]
    assert s["requests"]["completed"] == fig["good"]["admitted"]
    for stats in s["latency_ms"].values():
        _ordered(stats)
    md = (out / "report.md").read_text()
    assert "PASSED" in md and "specattn-loadtest soak" in md
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_offline_bench_compares_variants_side_by_side(tmp_path):
    """specattn-bench on the CPU: every variant's row, speculation equal to plain decoding, and the full-batch column."""
    from specattn.loadtest.offline import main

    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"Section {i}: the parser reads token {i * 7} and writes it to the table." for i in range(60)))
    out = tmp_path / "bench"
    assert main(["--device", "cpu", "--docs", str(doc), "--contexts", "160", "--batches", "2", "--max-tokens", "12",
                 "--variants", "none,specattn:g3:k8,adaptive:warm", "--repeats", "3", "--out", str(out)]) == 0
    results = {r["variant"]: r for r in json.loads(out.with_suffix(".json").read_text())["results"]}
    assert set(results) == {"none", "specattn:g3:k8", "adaptive:warm"}
    spec = results["specattn:g3:k8"]
    assert spec["identical_to_none"] == 2 and spec["output_tokens"] == 24 and spec["acceptance_rate"] > 0
    # a warm controller's row counts the timed run's choices only (12 tokens: at most 11 decode steps), not its warm run's
    assert results["adaptive:warm"]["identical_to_none"] == 2 and sum(results["adaptive:warm"]["gamma_histogram"].values()) <= 11
    assert all(r["full_batch_tokens_per_s"] and r["decode_tokens_per_s"] for r in results.values())
    # three timed runs each; the row is the median one
    for r in results.values():
        assert len(r["decode_runs"]) == 3 and r["decode_tokens_per_s"] == sorted(r["decode_runs"])[1]
    md = out.with_suffix(".md").read_text()
    assert "| full-batch tok/s | full × none |" in md
    low, high = min(spec["decode_runs"]), max(spec["decode_runs"])
    assert f"({low:.0f}–{high:.0f})" in md


def test_offline_bench_pools_the_runs_of_several_engine_builds(tmp_path, monkeypatch):
    """--builds: each variant's engine built that many times, the variants taking turns; a row's median and range are
    over every build's runs (a name given twice pools both engines' runs in its one row), and the outputs stay those
    of plain decoding."""
    from specattn.loadtest import offline

    built = []

    class RecordedEngine(offline.LLMEngine):  # the real engine; only which variant each build was for is noted
        def __init__(self, config, files):
            built.append(config.spec.drafter)
            super().__init__(config, files)

    monkeypatch.setattr(offline, "LLMEngine", RecordedEngine)
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"Row {i} holds the value {i * 3} and the next row's key." for i in range(60)))
    out = tmp_path / "bench"
    assert offline.main(["--device", "cpu", "--docs", str(doc), "--contexts", "128", "--batches", "1", "--max-tokens",
                         "8", "--variants", "none,specattn:g2,none", "--builds", "2", "--out", str(out)]) == 0
    assert built == ["none", "specattn", "none"] * 2
    rows = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [r["variant"] for r in rows] == ["none", "specattn:g2"]
    results = {r["variant"]: r for r in rows}
    assert len(results["none"]["decode_runs"]) == 4 and len(results["specattn:g2"]["decode_runs"]) == 2
    for r in results.values():
        assert r["decode_tokens_per_s"] == sorted(r["decode_runs"])[(len(r["decode_runs"]) - 1) // 2]
    assert results["specattn:g2"]["identical_to_none"] == 1


def test_an_interrupted_offline_bench_keeps_what_it_measured(tmp_path, monkeypatch):
    """`timeout -s INT` mid-sweep (here: as the second variant's engine runs): the first variant's row is kept."""
    from specattn.loadtest import offline

    real = offline._engine_runs

    def interrupted_after_the_first(*args, **kwargs):
        if args[-1] != "none":
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(offline, "_engine_runs", interrupted_after_the_first)
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"Row {i} holds the value {i * 3}." for i in range(60)))
    out = tmp_path / "bench"
    assert offline.main(["--device", "cpu", "--docs", str(doc), "--contexts", "128", "--batches", "1", "--max-tokens",
                         "4", "--variants", "none,specattn", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["results"]
    assert [r["variant"] for r in rows] == ["none"] and rows[0]["output_tokens"] == 4


@pytest.mark.parametrize("variant", ["hf:warm", "specattn:x4", "streaming:g"])
def test_offline_bench_refuses_a_bad_variant_before_running_anything(variant, capsys):
    from specattn.loadtest.offline import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", "--contexts", "160", "--variants", f"none,{variant}", "--docs", "/nonexistent"])
    assert exit_info.value.code == 2 and variant.split(":")[0] in capsys.readouterr().err
