"""A real Prometheus (the Debian package) scrapes a real server under load: every PromQL expression of the
Grafana dashboard returns data, and the scraped counters equal the engine's stats and the responses' usage."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from specattn.engine.async_engine import AsyncEngine
from specattn.engine.engine import LLMEngine
from specattn.server.app import build_app

from .test_metrics import CONFIG, MODEL, Live, start_server, wait_idle
from .live_server import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "specattn.json"
SCRAPE_INTERVAL_S = 1
RATE_INTERVAL = "10s"  # what $__rate_interval stands for here: several 1 s scrapes


def find_prometheus() -> str:
    """The `prometheus` binary; installed from Debian's package when missing and apt can (root)."""
    path = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)
    if path:
        return path
    reason = None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        reason = "prometheus is not installed and apt-get (as root) is not available to install it"
    else:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True)
            result = subprocess.run(install, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                reason = f"apt-get install prometheus failed: {result.stderr[-500:]}"
    path = shutil.which("prometheus")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(reason or "prometheus not found after installing it")
    pytest.skip(reason or "prometheus not found after installing it")


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        assert body["data"]["resultType"] == "vector", expr
        return body["data"]["result"]

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    def last_scrape(self) -> float:
        """Unix time of the newest scrape of the server."""
        return self.scalar('timestamp(up{job="specattn"})')


@pytest.fixture(scope="module")
def served(smollm_files) -> Iterator[tuple[Live, AsyncEngine]]:
    engine = AsyncEngine(LLMEngine(CONFIG, smollm_files))
    live = start_server(build_app(engine))
    yield live, engine
    live.stop()
    engine.shutdown()


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory) -> Iterator[Prometheus]:
    binary = find_prometheus()
    live, _ = served
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    # the compose stack's scrape config, pointed at the test server and scraping every second
    compose_config = (ROOT / "docker" / "prometheus" / "prometheus.yml").read_text()
    assert "specattn:8000" in compose_config
    config.write_text(compose_config.replace("specattn:8000", live.url.removeprefix("http://"))
                      .replace("scrape_interval: 5s", f"scrape_interval: {SCRAPE_INTERVAL_S}s"))
    port = free_port()
    log = tmp / "prometheus.log"
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{prom.url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready: " + log.read_text()
            time.sleep(0.1)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


class Load:
    """Clients in threads sending completions and chats, streamed or not, and some bad requests, until stopped.
    Tallies what the responses report (usage), which the scraped counters must equal."""

    PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "1, 2, 3, 4, 5,",
               "Explain speculative decoding in one sentence.", "Once upon a time"]

    def __init__(self, url: str, clients: int = 2):
        self.url = url
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.prompt_tokens = self.completion_tokens = self.requests = self.errors = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def _run(self, seed: int) -> None:
        i = seed
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                i += 1
                try:
                    self._one(client, i)
                except Exception as e:  # reported by the test, not lost in a thread
                    self.failures.append(repr(e))
                    return

    def _one(self, client: httpx.Client, i: int) -> None:
        prompt = self.PROMPTS[i % len(self.PROMPTS)]
        if i % 7 == 0:  # an unknown model: 404, counted as an error
            assert client.post("/v1/completions", json={"model": "nope", "prompt": prompt}).status_code == 404
            with self.lock:
                self.errors += 1
            return
        chat = i % 2 == 0
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {"model": MODEL, "max_tokens": 12 + 4 * (i % 3), "temperature": 0 if i % 3 else 0.7, "seed": i,
                **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}
        usage = None
        if i % 4 < 2:
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
        else:
            body.update(stream=True, stream_options={"include_usage": True})
            with client.stream("POST", path, json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage") or usage
        assert usage is not None
        with self.lock:
            self.prompt_tokens += usage["prompt_tokens"]
            self.completion_tokens += usage["completion_tokens"]
            self.requests += 1


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the dashboard, Grafana's variables filled in as "All" would."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    # the variables' queries: label_values(<selector>, label) evaluates <selector>
    for var in dash["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
        assert m, var["query"]
        exprs.append((f"variable {var['name']}", m.group(1)))
    subs = {"$__rate_interval": RATE_INTERVAL, "$model_name": ".*", "$drafter": ".*"}
    out = []
    for title, expr in exprs:
        for k, v in subs.items():
            expr = expr.replace(k, v)
        assert "$" not in expr, f"{title}: unknown variable in {expr}"
        out.append((title, expr))
    return out


def test_dashboard_queries_return_data_and_counters_equal_engine(served, prometheus):
    live, engine = served
    llm = engine.engine
    with Load(live.url) as load:
        # enough load for several scrapes with drafts in every rate window
        deadline = time.monotonic() + 90
        while True:
            assert not load.failures, load.failures
            assert time.monotonic() < deadline, "no drafts scraped: " + prometheus.log.read_text()
            drafts = prometheus.query('specattn:spec_decode_num_drafts_total{job="specattn"}')
            if drafts and float(drafts[0]["value"][1]) > 0 and prometheus.scalar(
                    f'count_over_time(specattn:spec_decode_num_drafts_total[{RATE_INTERVAL}])') >= 8 and load.errors:
                break
            time.sleep(0.5)
        empty = []
        for title, expr in dashboard_expressions():  # while the load goes on
            result = prometheus.query(expr)
            values = [float(s["value"][1]) for s in result]
            if not result or not all(math.isfinite(v) for v in values):
                empty.append(f"{title}: {expr} -> {result}")
        assert not empty, "dashboard expressions without data:\n" + "\n".join(empty)
    assert not load.failures, load.failures
    assert load.requests > 0

    wait_idle(llm)
    stats = llm.stats()
    done = time.time()
    deadline = time.monotonic() + 20
    while prometheus.last_scrape() < done + 0.1:  # a scrape that began after the load ended
        assert time.monotonic() < deadline, "no scrape after the load"
        time.sleep(0.2)

    def scraped(expr: str) -> float:
        return prometheus.scalar(f"sum({expr})")

    assert scraped("specattn:spec_decode_num_drafts_total") == stats.spec.num_drafts > 0
    assert scraped("specattn:spec_decode_num_draft_tokens_total") == stats.spec.num_draft_tokens
    assert scraped("specattn:spec_decode_num_accepted_tokens_total") == stats.spec.num_accepted_tokens
    for pos, count in enumerate(stats.spec.accepted_per_position):
        assert scraped(f'specattn:spec_decode_num_accepted_tokens_per_pos_total{{position="{pos}"}}') == count
    assert scraped("specattn:prompt_tokens_total") == load.prompt_tokens
    assert scraped("specattn:generation_tokens_total") == load.completion_tokens
    assert scraped("specattn:request_success_total") == load.requests
    assert scraped("specattn:time_to_first_token_seconds_count") == load.requests
    assert scraped('specattn:request_errors_total{status_code="404"}') == load.errors
    assert scraped("specattn:num_requests_running") == 0
    # the dashboard's headline numbers, over the whole run, from the engine's own stats
    accepted_over_drafts = prometheus.scalar(
        "sum(specattn:spec_decode_num_accepted_tokens_total) / sum(specattn:spec_decode_num_draft_tokens_total)")
    assert accepted_over_drafts == pytest.approx(stats.spec.acceptance_rate)
