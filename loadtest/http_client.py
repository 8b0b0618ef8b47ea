"""One streaming request against the OpenAI-compatible API, timed chunk by chunk; and the loopback guard.

Every request is bounded: by a wall-clock timeout (the whole request, not only between bytes) and by a
maximum number of SSE events, so a misbehaving server can never keep the client in a loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

FINISH_REASONS = ("stop", "length", "abort")


class NotLoopbackError(ValueError):
    """The target URL is not a loopback address: this tool only sends traffic to the local machine."""


def check_loopback(url: str) -> str:
    """`url` without a trailing slash if its host is loopback (127.0.0.0/8, ::1 or `localhost`), else raise.

    Host names other than `localhost` are refused rather than resolved, so DNS can never redirect the load.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NotLoopbackError(f"not an http(s) URL: {url!r} (only loopback http targets)")
    host = parts.hostname
    if host != "localhost":
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise NotLoopbackError(f"refusing {host!r}: only loopback addresses (127.0.0.1, ::1, localhost)") from None
        if not ip.is_loopback:
            raise NotLoopbackError(f"refusing {host!r}: only loopback addresses (127.0.0.1, ::1, localhost)")
    return url.rstrip("/")


@dataclass
class RequestSpec:
    """What to send: a completion `prompt` (text or token ids) or chat `messages`, and how many tokens to ask for."""

    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int = 64
    prompt_len: int | None = None  # tokens, when the dataset knows it
    extra: dict = field(default_factory=dict)  # merged into the body (temperature, ignore_eos, ...)

    @property
    def endpoint(self) -> str:
        return "/v1/chat/completions" if self.messages is not None else "/v1/completions"

    def body(self, model: str) -> dict:
        body: dict[str, Any] = {"model": model, "max_tokens": self.max_tokens, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.messages is not None:
            body["messages"] = self.messages
        else:
            body["prompt"] = self.prompt
        body.update(self.extra)
        return body


@dataclass
class RequestResult:
    """How one request went. Times are seconds; `start` is relative to the run's start."""

    kind: str = "good"
    start: float = 0.0
    status: int | None = None  # HTTP status; None when no response came (transport error, disconnect)
    ok: bool = False  # 200, a valid finish_reason, [DONE], no error event
    error: str = ""
    error_code: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # arrival of each text chunk, relative to run start
    text: str = ""
    finish_reason: str | None = None
    done: bool = False  # saw data: [DONE]
    prompt_tokens: int | None = None
    output_tokens: int = 0
    max_tokens: int | None = None
    spec_decode: dict | None = None
    disconnected: bool = False  # the client closed the connection on purpose
    usage_seen: bool = False  # output_tokens from the usage chunk (else counted chunks)

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def as_dict(self, with_text: bool = False) -> dict:
        d = asdict(self)
        d["tpot"] = self.tpot
        if not with_text:
            d["text_chars"] = len(d.pop("text"))
        return d


def _chunk_text(event: dict) -> tuple[str, str | None]:
    """The text and finish_reason of one completion or chat chunk (one choice asked, so choice 0)."""
    choices = event.get("choices") or []
    if not choices:
        return "", None
    c = choices[0]
    if "delta" in c:
        text = (c.get("delta") or {}).get("content") or ""
    else:
        text = c.get("text") or ""
    return text, c.get("finish_reason")


async def stream_request(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    spec: RequestSpec,
    *,
    run_start: float,
    timeout_s: float = 300.0,
    disconnect_after_chunks: int | None = None,
    kind: str = "good",
    body_override: bytes | dict | None = None,
) -> RequestResult:
    """Send `spec` with `stream: true` and time it. `disconnect_after_chunks` closes the connection on purpose
    after that many text chunks (0: right after the headers). `body_override` sends that body instead (faults)."""
    result = RequestResult(kind=kind, max_tokens=spec.max_tokens, prompt_tokens=spec.prompt_len)
    t0 = time.perf_counter()
    result.start = t0 - run_start
    try:
        await asyncio.wait_for(
            _stream(client, base_url, model, spec, result, t0, run_start, disconnect_after_chunks, body_override),
            timeout_s,
        )
    except TimeoutError:
        result.error = result.error or f"timed out after {timeout_s:g} s"
    except httpx.HTTPError as e:
        result.error = result.error or f"{type(e).__name__}: {e}"
    result.ok = (
        result.status == 200 and not result.error and result.done and result.finish_reason in FINISH_REASONS
        and not result.disconnected
    )
    return result


async def _stream(client, base_url, model, spec, result, t0, run_start, disconnect_after, body_override) -> None:
    url = base_url + spec.endpoint
    if isinstance(body_override, bytes):
        kwargs: dict = {"content": body_override, "headers": {"content-type": "application/json"}}
    else:
        kwargs = {"json": body_override if body_override is not None else spec.body(model)}
    # each chunk carries at least one token, plus role, usage and [DONE] events: a generous hard bound
    max_events = 4 * (spec.max_tokens or 1) + 64
    async with client.stream("POST", url, **kwargs) as response:
        result.status = response.status_code
        if response.status_code != 200:
            raw = await response.aread()
            try:
                err = json.loads(raw)["error"]
                result.error, result.error_code = err.get("message", ""), err.get("code")
            except (ValueError, KeyError, TypeError):
                result.error = raw[:200].decode(errors="replace")
            result.e2e = time.perf_counter() - t0
            return
        if disconnect_after == 0:
            result.disconnected = True
            return
        last = None
        events = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            if events > max_events:
                result.error = f"more than {max_events} events for max_tokens={spec.max_tokens}"
                return
            now = time.perf_counter()
            payload = line[len("data: "):]
            if payload == "[DONE]":
                result.done = True
                break
            event = json.loads(payload)
            if "error" in event:
                result.error = (event["error"] or {}).get("message", "error event")
                result.error_code = (event["error"] or {}).get("code")
                continue
            if event.get("usage"):
                result.usage_seen = True
                result.prompt_tokens = event["usage"].get("prompt_tokens", result.prompt_tokens)
                result.output_tokens = event["usage"].get("completion_tokens", result.output_tokens)
            if event.get("spec_decode") and not event.get("choices"):
                result.spec_decode = event["spec_decode"]  # the usage chunk's sum over choices
            text, finish = _chunk_text(event)
            if finish:
                result.finish_reason = finish
            if text:
                if result.ttft is None:
                    result.ttft = now - t0
                else:
                    result.itls.append(now - last)
                last = now
                result.text += text
                result.chunk_times.append(now - run_start)
                if disconnect_after is not None and len(result.chunk_times) >= disconnect_after:
                    result.disconnected = True
                    return
        result.e2e = time.perf_counter() - t0
        if not result.usage_seen:  # a server without include_usage: count chunks (a lower bound on tokens)
            result.output_tokens = len(result.chunk_times)
