"""The HTTP server against real uvicorn servers on loopback, driven by the openai client, httpx and schemathesis.

Three servers share one engine: `open_server` (defaults), `strict_server` (API key, tiny body limit and
wait queue) and `loading_server` (starts without an engine, as `specattn serve` does while loading).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings

from specattn.engine.async_engine import AsyncEngine
from specattn.engine.config import CacheConfig, EngineConfig
from specattn.engine.engine import LLMEngine
from specattn.engine.sampling import SamplingParams
from specattn.server.app import build_app

from .conftest import CAPITAL_QUESTION
from .live_server import Live, start_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
API_KEY = "sk-test-0123456789"
CONFIG = EngineConfig(device="cpu", cache=CacheConfig(num_pages=256))


@pytest.fixture(scope="module")
def async_engine(smollm_files) -> Iterator[AsyncEngine]:
    engine = AsyncEngine(LLMEngine(CONFIG, smollm_files))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reference(smollm_files) -> LLMEngine:
    """A second engine over the same weights, run directly: what the server's answers must equal."""
    return LLMEngine(CONFIG, smollm_files)


@pytest.fixture(scope="module")
def open_server(async_engine) -> Iterator[Live]:
    live = start_server(build_app(async_engine))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def strict_server(async_engine) -> Iterator[Live]:
    live = start_server(build_app(async_engine, "strict-model", api_key=API_KEY, max_queue=2, max_body_bytes=4096))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(open_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{open_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy_text(ref: LLMEngine, prompt_ids: list[int], max_tokens: int, **kw) -> str:
    [ids] = ref.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0, **kw))
    return ref.tokenizer.decode(ids)


def chat_ids(ref: LLMEngine, content: str) -> list[int]:
    text = ref.tokenizer.apply_chat_template([{"role": "user", "content": content}])
    return ref.tokenizer.encode(text, add_special_tokens=False)


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, checking the framing on the way."""
    raw = response.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


def assert_good_request(url: str, headers: dict | None = None, model: str = MODEL) -> None:
    r = httpx.post(f"{url}/v1/completions", headers=headers, timeout=30,
                   json={"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def wait_idle(engine: LLMEngine, timeout_s: float) -> float:
    """Seconds until the engine holds no request and no KV page; fails if that takes over `timeout_s`."""
    start = time.monotonic()
    while engine.kv_usage > 0 or engine.num_running or engine.num_waiting:
        assert time.monotonic() - start < timeout_s, f"still busy: kv_usage={engine.kv_usage}"
        time.sleep(0.02)
    return time.monotonic() - start


# ---- the official openai client ----

def test_completion_greedy_equals_engine(client, reference):
    prompt = "The three primary colors are"
    want = greedy_text(reference, reference.tokenizer.encode(prompt), 12)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.model_extra["spec_decode"]["mean_acceptance_length"] >= 1


def test_completion_stream_equals_engine(client, reference):
    prompt = "Once upon a time"
    want = greedy_text(reference, reference.tokenizer.encode(prompt), 10)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.object == "text_completion" for c in chunks)


def test_chat_answers_capital(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": CAPITAL_QUESTION}],
                                       temperature=0)  # no max_tokens: the default is what the context leaves
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion"


def test_chat_stream_answers_capital(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "You are a helpful assistant."},
                               {"role": "user", "content": [{"type": "text", "text": CAPITAL_QUESTION}]}],
        temperature=0, max_completion_tokens=40, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The capital of France is Paris."
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_stop_string_spanning_tokens_streamed(client):
    # " France" and " is" are separate tokens; the stop string straddles them and is cut out
    messages = [{"role": "user", "content": CAPITAL_QUESTION}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, stop=["ance is"])
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, stop="ance is",
                                                 stream=True))
    assert whole.choices[0].message.content == "The capital of Fr"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "The capital of Fr"
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs_whole_and_streamed(client):
    """logprobs=2: one entry per output token, the greedy token the likeliest of its alternatives, token texts that
    make up the text at their offsets; a stream's chunks add up to the same lists (offsets running on)."""
    kw = dict(model=MODEL, prompt="The three primary colors are", max_tokens=8, temperature=0, logprobs=2)
    whole = client.completions.create(**kw).choices[0]
    lp = whole.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == whole.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and value <= 0
        assert max(top.values()) == pytest.approx(value) and top[token] == pytest.approx(value)
    streamed = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True) if c.choices[0].logprobs]
    assert sum((c.tokens for c in streamed), []) == lp.tokens
    assert sum((c.text_offset for c in streamed), []) == lp.text_offset
    assert sum((c.token_logprobs for c in streamed), []) == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert client.completions.create(**{**kw, "logprobs": None}).choices[0].logprobs is None


def test_echo_with_logprobs_scores_the_prompt(client, reference):
    """echo with logprobs, as lm-evaluation-harness asks to score a continuation: the text is prompt + completion, the
    lists start with the prompt's tokens (the first with no logprob), offsets run over both; streamed the same;
    echo alone only prefixes the text."""
    prompt = "The capital of France is Paris. The capital of Italy is"
    ids = reference.tokenizer.encode(prompt)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1)
    choice = client.completions.create(**kw).choices[0]
    lp = choice.logprobs
    assert choice.text == prompt + greedy_text(reference, ids, 3)
    assert len(lp.tokens) == len(ids) + 3 and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True)]
    assert "".join(c.text for c in chunks) == choice.text
    streamed = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    plain = client.completions.create(**{**kw, "logprobs": None}).choices[0]
    assert plain.text == choice.text and plain.logprobs is None


def test_logprobs_zero_reports_the_chosen_token_alone(client):
    """logprobs=0 on a sampled completion: each position's top_logprobs holds the sampled token (OpenAI lists up to
    logprobs + 1, the chosen one among them) with its logprob; chat's top_logprobs=0 gives empty lists."""
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=3,
                                  logprobs=0)
    lp = r.choices[0].logprobs
    assert [list(top) for top in lp.top_logprobs] == [[token] for token in lp.tokens]
    assert [top[token] for top, token in zip(lp.top_logprobs, lp.tokens)] == pytest.approx(lp.token_logprobs)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=0)
    assert [t.top_logprobs for t in chat.choices[0].logprobs.content] == [[]] * 4


def test_chat_logprobs_whole_and_streamed(client):
    """logprobs with top_logprobs=3: a token object per output token whose texts and bytes make up the answer, each
    with its three likeliest alternatives (the greedy token first); streamed, the same objects across the chunks."""
    kw = dict(model=MODEL, messages=[{"role": "user", "content": CAPITAL_QUESTION}], temperature=0, logprobs=True,
              top_logprobs=3)
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert whole.choices[0].message.content == "The capital of France is Paris."
    assert len(content) == whole.usage.completion_tokens
    assert "".join(t.token for t in content[:-1]) == whole.choices[0].message.content  # the last: <|im_end|>
    assert bytes(sum((t.bytes for t in content[:-1]), [])).decode() == whole.choices[0].message.content
    for t in content:
        assert [a.token for a in t.top_logprobs][0] == t.token and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob) and t.logprob <= 0
    streamed = [t for c in client.chat.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [(t.token, t.bytes) for t in streamed] == [(t.token, t.bytes) for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)
    plain = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_prompt_forms_give_one_choice_each(client, reference):
    prompts = ["The sky is", "My favourite food is"]
    ids = [reference.tokenizer.encode(p) for p in prompts]
    want = [greedy_text(reference, i, 5) for i in ids]
    by_text = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    one_ids = client.completions.create(model=MODEL, prompt=ids[1], max_tokens=5, temperature=0)
    assert [c.text for c in sorted(by_text.choices, key=lambda c: c.index)] == want
    assert [c.text for c in sorted(by_ids.choices, key=lambda c: c.index)] == want
    assert one_ids.choices[0].text == want[1]
    assert by_text.usage.prompt_tokens == sum(map(len, ids))


def test_n_choices_with_seed_are_reproducible(client):
    # the server speculates (adaptive SpecAttn); a seed still fixes the tokens, whatever else runs
    kw = dict(model=MODEL, prompt="Write a word:", max_tokens=8, temperature=1.0)
    a = client.completions.create(n=3, seed=1234, **kw)
    b = client.completions.create(n=3, seed=1234, **kw)
    third = client.completions.create(n=1, seed=1236, **kw)  # choice i samples with seed + i
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert texts[2] == third.choices[0].text
    assert len(set(texts)) > 1
    assert a.usage.prompt_tokens == b.usage.prompt_tokens == third.usage.prompt_tokens  # counted once for n


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_health_and_metrics(open_server):
    assert httpx.get(f"{open_server.url}/health").json() == {"status": "ok"}
    r = httpx.get(f"{open_server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


# ---- errors: OpenAI's body, the right status, and the server keeps serving ----

BAD_REQUESTS = [
    ("completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "x"}, "model"),
    ("completions", {"model": MODEL}, "prompt"),
    ("completions", {"model": MODEL, "prompt": ""}, None),
    ("completions", {"model": MODEL, "prompt": []}, "prompt"),
    ("completions", {"model": MODEL, "prompt": [1, 99999999]}, None),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": [1] * 8192}, None),
    ("completions", {"model": MODEL, "prompt": "x", "n": 0}, "n"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ("completions", {"model": MODEL, "prompt": "x", "stop": [""]}, None),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "min_tokens": 5}, None),
    ("completions", {"model": MODEL, "prompt": "x", "seed": 2**64}, "seed"),
    ("completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs"),
    ("completions", {"model": MODEL, "prompt": "x", "logprobs": -1}, "logprobs"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     "top_logprobs"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 0},
     "top_logprobs"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"},
     "logprobs"),
    ("completions", {"model": MODEL, "prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
    ("completions", {"model": MODEL, "prompt": "x", "repetition_penalty": 1.2}, "repetition_penalty"),
    ("completions", {"model": MODEL, "prompt": "x", "logit_bias": {"50": -100}}, "logit_bias"),
    ("completions", {"model": MODEL, "prompt": "x", "best_of": 3}, "best_of"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1},
     "presence_penalty"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "response_format": {"type": "json_object"}}, "response_format"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, None),
    ("chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}, None),
]


@pytest.mark.parametrize("route, body, param", BAD_REQUESTS, ids=[json.dumps(b)[:60] for _, b, _ in BAD_REQUESTS])
def test_bad_input_is_400(open_server, route, body, param):
    r = httpx.post(f"{open_server.url}/v1/{route}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param and param in err["message"]
    assert_good_request(open_server.url)


def test_unimplemented_fields_at_their_defaults_are_accepted(client):
    """What OpenAI clients send by default (penalties 0, text format, no tools, best_of = n) is not refused."""
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": CAPITAL_QUESTION}],
                                       temperature=0, presence_penalty=0, frequency_penalty=0, tools=[],
                                       response_format={"type": "text"}, logit_bias={})
    assert r.choices[0].message.content == "The capital of France is Paris."
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, best_of=1)
    assert r.usage.completion_tokens == 2
    r = httpx.post(f"{client.base_url}chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": None})
    assert r.status_code == 200 and r.json()["choices"][0].get("logprobs") is None


def test_malformed_json_is_400(open_server):
    r = httpx.post(f"{open_server.url}/v1/completions", content=b'{"model": ', timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert_good_request(open_server.url)


def test_unknown_model_is_404(open_server):
    r = httpx.post(f"{open_server.url}/v1/chat/completions", timeout=10,
                   json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and MODEL in r.json()["error"]["message"]
    assert httpx.get(f"{open_server.url}/v1/nope").json()["error"]["message"] == "Not Found"
    assert_good_request(open_server.url)


def test_api_key_is_required_on_v1(strict_server):
    url = f"{strict_server.url}/v1/completions"
    body = {"model": "strict-model", "prompt": "Hello", "max_tokens": 2}
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                    {"Authorization": f"Bearer {API_KEY}x"}]:
        r = httpx.post(url, json=body, headers=headers, timeout=10)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert_good_request(strict_server.url, {"Authorization": f"Bearer {API_KEY}"}, "strict-model")
    assert httpx.get(f"{strict_server.url}/health").status_code == 200  # probes need no key
    keyed = openai.OpenAI(base_url=f"{strict_server.url}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in keyed.models.list().data] == ["strict-model"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{strict_server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_oversized_body_is_413(strict_server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = json.dumps({"model": "strict-model", "prompt": "x" * 5000}).encode()
    r = httpx.post(f"{strict_server.url}/v1/completions", content=body, headers=auth, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunked():  # no Content-Length: the limit must hold while reading
        yield body[:3000]
        yield body[3000:]

    r = httpx.post(f"{strict_server.url}/v1/completions", content=chunked(), headers=auth, timeout=10)
    assert r.status_code == 413
    assert_good_request(strict_server.url, auth, "strict-model")


def test_full_wait_queue_is_503(strict_server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    # three choices need three wait-queue places; this server has two
    r = httpx.post(f"{strict_server.url}/v1/completions", headers=auth, timeout=10,
                   json={"model": "strict-model", "prompt": "Hello", "n": 3, "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
    with pytest.raises(openai.InternalServerError):  # what openai clients see (and retry) on 503
        openai.OpenAI(base_url=f"{strict_server.url}/v1", api_key=API_KEY, max_retries=0).completions.create(
            model="strict-model", prompt="Hello", n=3, max_tokens=2)
    r = httpx.post(f"{strict_server.url}/v1/completions", headers=auth, timeout=30,
                   json={"model": "strict-model", "prompt": "Hello", "n": 2, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


class _BrokenEngine:
    """Stands in for an engine whose internals fail, to see what a 500 tells the client."""

    @property
    def engine(self):
        raise RuntimeError("secret-internal-detail at /srv/specattn/engine.py")


def test_loading_503_then_500_without_traceback_then_ready(async_engine):
    live = start_server(build_app())  # no engine yet, as while `specattn serve` loads the model
    try:
        assert httpx.get(f"{live.url}/health").status_code == 503
        r = httpx.post(f"{live.url}/v1/completions", json={"model": MODEL, "prompt": "Hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        live.app.state.server.attach(_BrokenEngine(), MODEL)
        r = httpx.get(f"{live.url}/v1/models")
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "internal server error", "type": "server_error", "param": None,
                                      "code": "internal_error"}}
        live.app.state.server.attach(async_engine, MODEL)
        assert httpx.get(f"{live.url}/health").status_code == 200
        assert_good_request(live.url)
    finally:
        live.stop()


# ---- cancellation and load ----

def test_stream_disconnect_aborts_and_frees_pages(open_server, async_engine):
    engine = async_engine.engine
    body = {"model": MODEL, "prompt": "Count forever:", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{open_server.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few tokens in: the request is running and holds pages
        assert any(line.startswith("data: ") for line in got)
        assert engine.kv_usage > 0
    # 3000 tokens would take far longer on CPU than this; only an abort explains an idle engine
    assert wait_idle(engine, timeout_s=3) < 3
    assert open_server.app.state.server.in_flight == set()
    assert_good_request(open_server.url)


def test_non_stream_disconnect_aborts_and_frees_pages(open_server, async_engine):
    body = {"model": MODEL, "prompt": "Count forever:", "max_tokens": 3000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{open_server.url}/v1/completions", json=body, timeout=1.0)
    wait_idle(async_engine.engine, timeout_s=3)
    assert_good_request(open_server.url)


def test_32_concurrent_streams(open_server, reference):
    prompts = [f"Question {i}: what is {i} plus {i + 1}? Answer:" for i in range(32)]
    ids = [reference.tokenizer.encode(p) for p in prompts]
    want = [reference.tokenizer.decode(o) for o in reference.generate(ids, SamplingParams(max_tokens=8, temperature=0))]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True)
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main() -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(base_url=f"{open_server.url}/v1", api_key="x", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    results = asyncio.run(main())
    assert [t for t, _ in results] == want
    assert all(f in ("length", "stop") for _, f in results)


# ---- schema fuzzing ----

def _bounded(body: object) -> object:
    """Keep generated work small (a fuzzed max_tokens of thousands would take minutes on a CPU) and reachable."""
    if isinstance(body, dict):
        if isinstance(body.get("model"), str):
            body["model"] = MODEL  # else nearly every case stops at 404; unknown models have their own test
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int):
                body[key] = min(body[key], 3)
        if "messages" in body and not isinstance(body.get("max_completion_tokens"), int):
            body["max_completion_tokens"] = 2
        elif "messages" not in body and not isinstance(body.get("max_tokens"), int):
            body["max_tokens"] = 2
        if isinstance(body.get("n"), int):
            body["n"] = min(body["n"], 2)
        if isinstance(body.get("prompt"), list):
            body["prompt"] = body["prompt"][:4]
    return body


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_no_server_errors(open_server, mode):
    import schemathesis
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_url(f"{open_server.url}/openapi.json")
    strategy = schema.as_strategy(GenerationMode(mode))
    seen: dict[tuple[str, int], int] = {}  # (path, status) -> count

    # derandomized: the same cases every run (a random draw once sent 57 completions all rejected, e.g. `n: 6.0`, which
    # JSON Schema counts as an integer and the server, as OpenAI's API does, does not, so none reached generation)
    @settings(max_examples=100 if mode == "positive" else 60, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case) -> None:
        case.body = _bounded(case.body)
        response = case.call(base_url=open_server.url, timeout=30)
        key = (case.path, response.status_code)
        seen[key] = seen.get(key, 0) + 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    start = time.monotonic()
    check()
    assert time.monotonic() - start < 120
    print(mode, sorted(seen.items()))
    assert sum(seen.values()) >= 50
    if mode == "positive":  # the fuzzer reached generation, not only the trivial routes
        assert seen.get(("/v1/completions", 200), 0) > 0 and seen.get(("/v1/chat/completions", 200), 0) > 0
    wait_idle(open_server.app.state.server.engine.engine, timeout_s=10)
