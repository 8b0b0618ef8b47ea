"""Real servers on loopback for tests: uvicorn in a thread on a free port, and free ports for subprocesses."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI


@dataclass
class Live:
    url: str
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_server(app: FastAPI) -> Live:
    """uvicorn on a free loopback port, in a thread; returns once it accepts connections."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on so nothing can take it
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    return Live(f"http://127.0.0.1:{sock.getsockname()[1]}", app, server, thread)


def free_port() -> int:
    """A port free right now, for a server started as a subprocess."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
