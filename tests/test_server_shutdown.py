"""`specattn serve` as a process: 503 while loading, then on SIGTERM it drains, aborts what outlasts the grace period, exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from .live_server import free_port

pytestmark = pytest.mark.slow

GRACE_S = 3.0


def _stream(url: str, body: dict, first_chunk: threading.Event, result: dict) -> None:
    """Runs one streaming completion; records its text, last finish_reason and whether [DONE] came."""
    text, finish, done = "", None, False
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            first_chunk.set()
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line[len("data: "):])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    result.update(text=text, finish=finish, done=done)


def test_sigterm_drains_then_aborts_and_exits_zero(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "specattn.server.cli", "serve", "--port", str(port), "--device", "cpu",
         "--num-pages", "256", "--shutdown-grace", str(GRACE_S)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        statuses = []
        deadline = time.monotonic() + 120
        while not statuses or statuses[-1] != 200:
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                statuses.append(httpx.get(f"{url}/health", timeout=2).status_code)
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        assert 503 in statuses  # listening while the model loaded, and saying it is not ready

        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        short_started, long_started = threading.Event(), threading.Event()
        short, long_ = {}, {}
        threads = [
            threading.Thread(target=_stream, args=(url, {"model": model, "prompt": "Hi", "max_tokens": 12,
                                                         "ignore_eos": True}, short_started, short)),
            threading.Thread(target=_stream, args=(url, {"model": model, "prompt": "Count:", "max_tokens": 4000,
                                                         "ignore_eos": True}, long_started, long_)),
        ]
        for t in threads:
            t.start()
        assert short_started.wait(30) and long_started.wait(30)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)

        assert proc.wait(timeout=GRACE_S + 30) == 0
        took = time.monotonic() - sent
        for t in threads:
            t.join(timeout=10)
        assert short == {"text": short["text"], "finish": "length", "done": True}  # finished within the grace period
        assert long_["finish"] == "abort" and long_["done"]  # outlasted it: ended cleanly, marked aborted
        assert GRACE_S <= took < GRACE_S + 15
        out = (tmp_path / "serve.log").read_text()
        assert "serving" in out and "Traceback" not in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
