"""The engine on the embedded model: the known answer, batching and preemption that never change greedy output."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from specattn.engine.config import CPU_NUM_PAGES, CacheConfig, EngineConfig, SchedulerConfig, SpecConfig
from specattn.engine.engine import LLMEngine
from specattn.engine.kv_cache import PageAllocator, PageTable, kv_bytes_per_slot, pages_that_fit, slot_of, token_slots
from specattn.engine.request import Request
from specattn.engine.sampling import SamplingParams
from specattn.engine.stopping import OutputTracker
from tests.conftest import CAPITAL_QUESTION

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a king who had three daughters. The youngest",
    "1, 2, 3, 4,",
    "Paris is the capital of",
    "The three primary colors are red, blue and",
    "import numpy as np\nx = np.arange(10)\nprint(",
    "In 1969, the first humans landed on the Moon. The mission was called Apollo 11 and its crew",
    "Q: What is 7 times 8?\nA:",
]


PLAIN = SpecConfig(drafter="none")


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(spec=PLAIN)


@pytest.fixture(scope="module")
def alone(engine):
    """Each prompt decoded on its own: the reference every batched run must reproduce."""
    tok = engine.tokenizer
    return [engine.generate([tok.encode(p)], GREEDY)[0] for p in PROMPTS]


def test_cli_answers_the_capital_question():
    out = subprocess.run(
        [sys.executable, "-m", "specattn.server.cli", "generate", "--chat", "--prompt", CAPITAL_QUESTION, "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "The capital of France is Paris."


def _run_staggered(engine, prompts_ids):
    """Submit prompts at different steps (two now, one more every other step) and collect outputs."""
    results = {i: [] for i in range(len(prompts_ids))}
    pending = list(range(len(prompts_ids)))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and (step < 1 or step % 2 == 0):
            for _ in range(2 if step == 0 else 1):
                if pending:
                    i = pending.pop(0)
                    engine.add_request(f"r{i}", prompts_ids[i], GREEDY)
        for out in engine.step():
            results[int(out.request_id[1:])].extend(out.new_token_ids)
        step += 1
    return [results[i] for i in range(len(prompts_ids))]


def test_batched_staggered_equals_alone(engine, alone):
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert _run_staggered(engine, ids) == alone
    assert engine.kv_usage == 0


def test_preemption_keeps_outputs_and_frees_pages(make_engine, alone):
    # 9 requests of ~10-25 prompt + 24 output tokens need ~40 pages of 4 at once; 24 pages force preemption.
    small = make_engine(num_pages=24, page_size=4, max_num_batched_tokens=64, spec=PLAIN)
    ids = [small.tokenizer.encode(p) for p in PROMPTS]
    assert _run_staggered(small, ids) == alone
    assert small.stats().num_preemptions > 0, "the pool was meant to be too small to hold every request at once"
    assert small.kv_usage == 0


def test_abort_frees_pages_and_leaves_others_unaffected(engine, alone):
    ids = [engine.tokenizer.encode(p) for p in PROMPTS[:3]]
    for i, p in enumerate(ids):
        engine.add_request(f"r{i}", p, GREEDY)
    results = {f"r{i}": [] for i in range(3)}
    for _ in range(5):
        for out in engine.step():
            results[out.request_id].extend(out.new_token_ids)
    assert engine._in_flight is not None, "the next step is queued (overlap schedule): the abort lands mid-step"
    final = engine.abort_request("r1")
    assert final.finished and final.finish_reason == "abort"
    got_before_abort = len(results["r1"])
    while engine.has_unfinished_requests():
        for out in engine.step():
            results[out.request_id].extend(out.new_token_ids)
    assert results["r0"] == alone[0] and results["r2"] == alone[2]
    assert len(results["r1"]) == got_before_abort, "the aborted request's tokens of the step in flight are dropped"
    assert engine.kv_usage == 0


def test_a_step_left_in_flight_by_aborts_does_not_time_the_idle_engine(make_engine):
    """With every request aborted, the engine idles with the next step still queued; when work returns, that
    step is accepted (all rows dropped) — the idle time must reach no step cost adaptive γ reads; nor the idle time
    of an engine that ran out of work."""
    engine = make_engine(spec=SpecConfig(drafter="streaming", gamma=2, adaptive=True, budget_ratio=0.1, min_budget=6))
    tok = engine.tokenizer
    recorded = []
    original = engine.gamma_controller.record_step_time
    engine.gamma_controller.record_step_time = lambda *a: (recorded.append(a), original(*a))
    engine.clock = clock = _CountingClock()  # a second per mark: any idle hour shows
    for i, prompt in enumerate(PROMPTS[:2]):
        engine.add_request(f"r{i}", tok.encode(prompt), GREEDY)
    for _ in range(4):
        engine.step()
    assert recorded, "pure decode steps were meant to be timed"
    for i in range(2):
        engine.abort_request(f"r{i}")
    assert not engine.has_unfinished_requests() and engine._in_flight is not None
    clock.now += 3600
    engine.add_request("r2", tok.encode(PROMPTS[2]), GREEDY)
    for _ in range(4):
        engine.step()  # accepts the aborted requests' step, then r2's prefill and decode steps
    assert len(recorded) > 2 and all(seconds < 3600 for *_, seconds in recorded), recorded
    assert engine.kv_usage > 0 and engine.has_unfinished_requests()
    # and an engine that ran out of work: its last step is followed by the next request's, an idle hour later
    while engine.has_unfinished_requests():
        engine.step()
    timed = len(recorded)
    clock.now += 3600
    engine.add_request("r3", tok.encode(PROMPTS[3]), GREEDY)
    for _ in range(4):
        engine.step()
    assert len(recorded) > timed and all(seconds < 3600 for *_, seconds in recorded), recorded


class _CountingClock:
    """A step clock whose marks are one second apart, plus whatever a test adds."""

    def __init__(self):
        self.now = 0.0

    def mark(self) -> float:
        self.now += 1
        return self.now

    def seconds(self, start: float, end: float) -> float:
        return end - start


def test_chunked_prefill_equals_one_shot(make_engine, alone):
    chunked = make_engine(max_num_batched_tokens=7, spec=PLAIN)  # prompts cross several steps
    tok = chunked.tokenizer
    assert chunked.generate([tok.encode(PROMPTS[2])], GREEDY)[0] == alone[2]


def test_stop_string_split_across_tokens_is_cut(engine):
    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": CAPITAL_QUESTION}]))
    engine.add_request("s", prompt, SamplingParams(max_tokens=30, temperature=0, stop=("of Fr",)))
    text, reason = "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.new_text
            reason = out.finish_reason
    assert text == "The capital " and reason == "stop"


def test_eos_min_tokens_and_max_tokens(engine):
    tok = engine.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": CAPITAL_QUESTION}]))
    natural = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0))[0]
    assert natural[-1] in tok.eos_token_ids and len(natural) < 30
    longer = engine.generate([prompt], SamplingParams(max_tokens=30, temperature=0, min_tokens=len(natural) + 3))[0]
    assert len(longer) >= len(natural) + 3 and longer[: len(natural) - 1] == natural[:-1]
    assert len(engine.generate([prompt], SamplingParams(max_tokens=3, temperature=0))[0]) == 3


def test_seeded_sampling_is_reproducible_and_independent_of_batch(engine):
    tok = engine.tokenizer
    p = tok.encode("Write a short poem about the sea.")
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    a = engine.generate([p], params)[0]
    b, _ = engine.generate([p, tok.encode("Another prompt entirely")], params)
    c = engine.generate([p], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True))[0]
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    "prompt_len, params, message",
    [
        (8192, GREEDY, "context"),
        (0, GREEDY, "empty"),
    ],
)
def test_requests_that_cannot_run_are_refused(engine, prompt_len, params, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", [5] * prompt_len, params)
    assert not engine.has_unfinished_requests() and engine.kv_usage == 0


def test_bad_sampling_params_are_refused():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_token_ids_outside_vocabulary_are_refused(engine):
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("bad", [1, 2, 49152], GREEDY)


def test_attention_backend_choice():
    """auto picks the torch reference off CUDA; asking for FlashInfer where it cannot run is a clear error, not an import crash."""
    assert EngineConfig(device="cpu").resolved_attention == "torch"
    assert EngineConfig(device="cuda", dtype=torch.float32).resolved_attention == "torch"
    for kw in (dict(device="cpu"), dict(device="cuda", dtype=torch.float32)):
        with pytest.raises(ValueError, match="flashinfer attention backend needs a CUDA device"):
            EngineConfig(attention="flashinfer", **kw)
    with pytest.raises(ValueError, match="unknown attention backend"):
        EngineConfig(attention="xformers")


def test_unset_limits_follow_the_device(smollm_files):
    """Left unset, the scheduler's limits are a GPU node's where the FlashInfer path serves (as vLLM and SGLang default
    there) and small ones elsewhere; set ones stay; an engine on the CPU gets the CPU's KV pool and limits, and its
    config says what it got."""
    assert SchedulerConfig().with_defaults(gpu=False) == SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=1024)
    assert SchedulerConfig().with_defaults(gpu=True) == SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192)
    assert SchedulerConfig(max_num_seqs=8).with_defaults(gpu=True) == SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8192)
    assert EngineConfig(device="cuda", dtype=torch.float32).resolved_scheduler.max_num_seqs == 64  # the torch reference
    engine = LLMEngine(EngineConfig(device="cpu"), smollm_files)
    assert engine.cache.allocator.num_pages == engine.config.cache.num_pages == CPU_NUM_PAGES
    assert engine.config.scheduler == engine.scheduler.config == SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=1024)


def test_kv_pool_sized_from_a_memory_budget(smollm_files):
    """A GPU's pool: the whole pages that fit in the budget, less the scratch page; none fitting is a clear error."""
    per_slot = 23_040  # the default model's K and V in bf16: 2 · 30 layers · 3 heads · 64 · 2 bytes
    assert kv_bytes_per_slot(smollm_files.config, torch.bfloat16) == per_slot
    assert pages_that_fit(10 * 2**30, per_slot, 16) == 10 * 2**30 // (per_slot * 16) - 1
    assert pages_that_fit(3 * per_slot * 16 - 1, per_slot, 16) == 1
    with pytest.raises(ValueError, match="--gpu-memory-utilization"):
        pages_that_fit(2 * per_slot * 16 - 1, per_slot, 16)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="positive"):
        CacheConfig(num_pages=0)


@pytest.mark.parametrize("page_size,gamma", [(16, 3), (4, 4)], ids=["gamma-3", "verification-longer-than-a-page"])
def test_graph_warm_up_steps_leave_requests_untouched(make_engine, alone, page_size, gamma):
    """The start-up capture runs every decode-phase step shape (each γ: scored decode, verification, draft chain) on
    padding sequences of the scratch page — eagerly here, on the CPU: it takes no KV pages, and requests decode as before.
    A verification longer than a page cannot be a graph and is left out rather than run past the scratch page."""
    engine = make_engine(page_size=page_size, num_pages=2048 // page_size * 4,
                         spec=SpecConfig(drafter="specattn", gamma=gamma, adaptive=True, budget_ratio=0.1, min_budget=6))
    engine.runner.backend.graph_batches = [1, 3]
    engine._capture_graphs()
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_pages
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert engine.generate(ids, GREEDY) == alone


def test_page_table_grows_past_its_array_and_gives_every_page_back():
    allocator = PageAllocator(num_pages=300, page_size=4)
    table = PageTable()
    assert allocator.grow(table, 10) and allocator.grow(table, 1000)  # 3 pages, then 250: the array grows twice
    assert len(table) == 250 and list(table) == list(range(250)) and table[-1] == 249
    assert np.asarray(table).dtype == np.int32 and np.asarray(table)[:3].tolist() == [0, 1, 2]
    assert not allocator.grow(table, 1300) and len(table) == 250  # 75 more pages than are free: no change
    allocator.release(table)
    assert len(table) == 0 and allocator.num_free == 300
    assert allocator.grow(PageTable(), 4 * 300)  # freed pages are handed out again


def test_token_slots_of_a_mixed_batch_equal_per_token_lookups():
    """The verification's write slots, computed for the whole batch at once (sequences of different lengths
    and starting positions, padding on one page), are each token's slot_of."""
    rng = np.random.default_rng(0)
    page_size, starts, lengths = 16, [0, 5, 37, 100, 0], [3, 1, 20, 5, 4]
    tables = [rng.permutation(1000)[: -(-(s + n) // page_size)].tolist() for s, n in zip(starts, lengths)]
    indptr = np.cumsum([0] + [len(t) for t in tables])
    got = token_slots(np.concatenate(tables).astype(np.int32), indptr, starts, lengths, page_size)
    want = [slot_of(t, p, page_size) for t, s, n in zip(tables, starts, lengths) for p in range(s, s + n)]
    assert got.dtype == np.int64 and got.tolist() == want


@pytest.mark.parametrize("stop_at", ["eos", "max_tokens", "none"])
def test_tokens_committed_together_equal_tokens_committed_one_by_one(engine, stop_at):
    """A speculative step commits several tokens at once; where it stops, and the text, are those of one at a time."""
    tok = engine.tokenizer
    ids = tok.encode("Grüße aus Köln — ein schöner Tag 🙂 und noch viel mehr Text")
    eos = next(iter(tok.eos_token_ids))
    tokens = ids[:7] + [eos] + ids[7:] if stop_at == "eos" else ids
    params = SamplingParams(max_tokens=9 if stop_at == "max_tokens" else 100, temperature=0)

    def tracker() -> OutputTracker:
        req = Request("r", [1, 2], params, arrival=0, max_total_tokens=1000)
        return OutputTracker(req, tok)

    together, one_by_one = tracker(), tracker()
    taken = 0
    for i in range(0, len(tokens), 5):  # as the engine commits: ids when accepted, text after the next launch
        if together.request.finish_reason is None:
            taken += together.commit_ids(tokens[i : i + 5])
            together.commit_text()
    for t in tokens:
        if one_by_one.request.finish_reason is None:
            one_by_one.commit_ids([t])
            one_by_one.commit_text()
    assert together.request.output_ids == one_by_one.request.output_ids and taken == len(together.request.output_ids)
    assert together.request.finish_reason == one_by_one.request.finish_reason
    assert together.text == one_by_one.text and together.text == tok.decode(together.request.output_ids)
    expected = {"eos": 8, "max_tokens": 9, "none": len(tokens)}[stop_at]
    assert taken == expected
