"""On CUDA (skipped elsewhere): speculation gives plain decoding's tokens on both GPU attention paths."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from specattn.engine.config import SpecConfig
from specattn.engine.engine import LLMEngine
from specattn.engine.runner import SequenceInput
from specattn.engine.sampling import SamplingParams

from tests.test_async_scheduling import count_draft_chains_ahead
from tests.conftest import CAPITAL_QUESTION
from tests.test_engine import GREEDY, PROMPTS

pytestmark = pytest.mark.gpu

SPEC = dict(gamma=4, adaptive=False)
# a near-tie: the top two float32 logits closer than bf16 rounding of activations can be trusted to order
NEAR_TIE = 0.5


def _long_prompts(tokenizer, lengths: list[int]) -> list[list[int]]:
    """Prompts of the repo's own documentation, long enough that the draft budget is a small part of the context."""
    text = "\n\n".join(p.read_text() for p in sorted(Path(__file__).parent.parent.joinpath("docs").glob("*.md")))
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [ids[i * 97 : i * 97 + n] for i, n in enumerate(lengths)]


def _top2_gap(engine, ids: list[int]) -> float:
    """Gap between the two highest float32 logits of the token after ids."""
    pages: list[int] = []
    assert engine.cache.allocator.grow(pages, len(ids))
    logits = engine.runner.run([SequenceInput(ids, 0, pages, 1)]).logits[0][-1]
    engine.cache.allocator.release(pages)
    top = logits.topk(2).values
    return float(top[0] - top[1])


def test_gpu_reference_path_is_lossless_in_float32(make_engine, smollm_files):
    """The torch backend in float32: every drafter, greedy and seeded sampling, equals plain decoding exactly."""
    ids = [smollm_files.tokenizer.encode(p) for p in PROMPTS]
    seeded = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=123, ignore_eos=True)
    kw = dict(device="cuda", dtype=torch.float32, attention="torch")
    plain = make_engine(spec=SpecConfig(drafter="none"), **kw)
    expect_greedy, expect_sampled = plain.generate(ids, GREEDY), plain.generate(ids, seeded)
    for drafter in ("streaming", "specattn"):
        engine = make_engine(spec=SpecConfig(drafter=drafter, budget_ratio=0.1, min_budget=6, **SPEC), **kw)
        assert engine.generate(ids, GREEDY) == expect_greedy
        assert engine.generate(ids, seeded) == expect_sampled
        assert 0 < engine.stats().spec.acceptance_rate < 1


def _same_or_near_tie(reference, prompts, expected, got, label: str) -> int:
    """How many requests match exactly; any other must first differ where float32 logits nearly tie."""
    identical = 0
    for prompt, a, b in zip(prompts, expected, got):
        if a == b:
            identical += 1
            continue
        t = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        gap = _top2_gap(reference, prompt + a[:t])
        assert gap < NEAR_TIE, f"{label}: diverged at token {t} of a {len(prompt)}-token prompt where the top-2 gap is {gap:.3f}"
    print(f"{label}: {identical}/{len(prompts)} requests identical")
    return identical


@dataclass
class _Documents:
    """The chat prompts and four long documentation prompts, greedy, with what the tests compare against."""

    prompts: list[list[int]]
    params: SamplingParams
    reference: LLMEngine  # float32 on torch attention: judges near-ties
    plain: list  # eager plain decoding's outputs on FlashInfer


FLASHINFER = dict(device="cuda", num_pages=2048, attention="flashinfer")


@pytest.fixture(scope="module")
def documents(make_engine, smollm_files) -> _Documents:
    tok = smollm_files.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS] + _long_prompts(tok, [3000, 1500, 6000, 800])
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    reference = make_engine(device="cuda", num_pages=2048, dtype=torch.float32, attention="torch")
    plain = make_engine(spec=SpecConfig(drafter="none"), enforce_eager=True, **FLASHINFER).generate(prompts, params)
    return _Documents(prompts, params, reference, plain)


def test_gpu_flashinfer_speculation_matches_plain_decoding(make_engine, documents):
    """bf16 on FlashInfer with CUDA graphs: each request equals plain decoding (eager and graphed), or first differs at a near-tie."""
    prompts, params, reference, plain, kw = documents.prompts, documents.params, documents.reference, documents.plain, FLASHINFER
    graphed = make_engine(spec=SpecConfig(drafter="none"), **kw)
    _same_or_near_tie(reference, prompts, plain, graphed.generate(prompts, params), "none, CUDA graphs vs eager")
    assert {s.kind for s in graphed.runner.graph_shapes} == {"decode"}
    for drafter in ("streaming", "specattn"):
        engine = make_engine(spec=SpecConfig(drafter=drafter, **SPEC), **kw)
        _same_or_near_tie(reference, prompts, plain, engine.generate(prompts, params), f"{drafter} vs plain")
        assert {"draft", "verify"} <= {s.kind for s in engine.runner.graph_shapes}
        assert 0.3 < engine.stats().spec.acceptance_rate < 1
    # graphed drafts are the eager ones: a draft the host read wrong is rejected (outputs stay right, speed is lost)
    eager = make_engine(spec=SpecConfig(drafter="specattn", **SPEC), enforce_eager=True, **kw)
    for n in (13, 5, 2):  # batch buckets 16, 8 and 2
        rates = []
        for e in (engine, eager):
            e.reset_stats()
            e.generate(prompts[:n], params)
            rates.append(e.stats().spec.acceptance_rate)
        assert abs(rates[0] - rates[1]) < 0.05, f"batch {n}: graphed drafts accepted at {rates[0]:.2f}, eager at {rates[1]:.2f}"
    adaptive = make_engine(spec=SpecConfig(drafter="specattn"), **kw)
    _same_or_near_tie(reference, prompts, plain, adaptive.generate(prompts, params), "adaptive specattn vs plain")


def test_gpu_drafts_queued_before_the_read_are_the_drafts_read_after(make_engine, documents):
    """The draft chain after a verification is queued before the verification is read, each chain's start moved on
    the device (a graph's positions, the draft plan's recent counts): graphed and eager, its outputs are plain
    decoding's and its drafts are accepted as often as those of an engine that reads every step first."""
    prompts, params, reference, plain = documents.prompts, documents.params, documents.reference, documents.plain
    rates = {}
    for label, kw in {"ahead": {}, "ahead eager": dict(enforce_eager=True), "read first": dict(async_scheduling=False)}.items():
        engine = make_engine(spec=SpecConfig(drafter="specattn", **SPEC), **kw, **FLASHINFER)
        chains = count_draft_chains_ahead(engine)
        _same_or_near_tie(reference, prompts, plain, engine.generate(prompts, params), f"specattn, drafts {label}")
        rates[label] = engine.stats().spec.acceptance_rate
        assert (len(chains) > 20) == (label != "read first"), label
    print(rates)
    assert abs(rates["ahead"] - rates["read first"]) < 0.02 and abs(rates["ahead eager"] - rates["read first"]) < 0.02, rates


@pytest.mark.parametrize("eager", [False, True])
def test_gpu_a_draft_chain_moved_on_the_device_equals_one_planned_there(make_engine, smollm_files, eager):
    """On FlashInfer, graphed (3 sequences padded to the bucket of 4) and eager: the draft plan's recent counts and
    write slots and the graph's positions moved by device counts give the chain planned at the moved starts."""
    from tests.test_speculation import check_chain_moved_on_the_device

    engine = make_engine(spec=SpecConfig(drafter="specattn", **SPEC), enforce_eager=eager, **FLASHINFER)
    prompts = [smollm_files.tokenizer.encode(p) for p in PROMPTS[:3]]
    check_chain_moved_on_the_device(engine, prompts, [0, 3, 1])


def test_gpu_triton_attention_matches_plain_decoding(make_engine, documents, monkeypatch):
    """Our Triton attention kernel (forced at every batch size) for plain decoding and for SpecAttn's verification,
    which keeps the scores in its pass: plain decoding's tokens, and the acceptance of FlashInfer + the separate
    score kernel (the same scores select the same tokens)."""
    from specattn.engine import flashinfer_attention

    prompts, params, reference, plain, kw = documents.prompts, documents.params, documents.reference, documents.plain, FLASHINFER
    separate = make_engine(spec=SpecConfig(drafter="specattn", **SPEC), **kw)
    separate.generate(prompts, params)
    monkeypatch.setattr(flashinfer_attention, "TRITON_PROGRAMS_PER_SM", (0, math.inf))
    plain_triton_engine = make_engine(spec=SpecConfig(drafter="none"), **kw)
    plain_triton = plain_triton_engine.generate(prompts, params)
    _same_or_near_tie(reference, prompts, plain, plain_triton, "none on our kernel vs on FlashInfer")
    assert all(p.triton is not None for p in plain_triton_engine.runner.backend._graph_plans.values())  # decode shapes only
    spec = make_engine(spec=SpecConfig(drafter="specattn", **SPEC), **kw)
    _same_or_near_tie(reference, prompts, plain_triton, spec.generate(prompts, params), "specattn vs none, both on our kernel")
    assert any(getattr(p, "triton", None) is not None and p.triton.scores is not None
               for p in spec.runner.backend._graph_plans.values())
    rates = [e.stats().spec.acceptance_rate for e in (separate, spec)]
    assert abs(rates[0] - rates[1]) < 0.05, f"acceptance with the separate score kernel {rates[0]:.2f}, on our kernel {rates[1]:.2f}"


def _capital_question(tok) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": CAPITAL_QUESTION}]), add_special_tokens=False)


def test_gpu_answers_the_capital_question(make_engine, smollm_files):
    tok = smollm_files.tokenizer
    engine = make_engine(device="cuda", attention="flashinfer")
    ids = _capital_question(tok)
    out = engine.generate([ids], SamplingParams(max_tokens=30, temperature=0))[0]
    assert tok.decode(out) == "The capital of France is Paris."


def test_gpu_default_pool_takes_the_memory_budget_and_serves(smollm_files):
    """Unset, the KV pool is sized so that the engine (weights, KV pool and its score buffers, the CUDA graphs up to
    256 sequences and their outputs) holds what --gpu-memory-utilization allows, to within its fixed workspaces; the
    engine at the GPU limits answers as the small-pool engines do."""
    import gc

    from specattn.engine.config import CacheConfig, EngineConfig

    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    allocated = torch.cuda.memory_allocated()
    budget = 0.5 * total - (total - free)
    engine = LLMEngine(EngineConfig(device="cuda", cache=CacheConfig(gpu_memory_utilization=0.5)), smollm_files)
    sched = engine.scheduler.config
    assert (sched.max_num_seqs, sched.max_num_batched_tokens) == (256, 8192)
    tok = smollm_files.tokenizer
    out = engine.generate([_capital_question(tok)] * 3, SamplingParams(max_tokens=30, temperature=0))
    assert [tok.decode(o) for o in out] == ["The capital of France is Paris."] * 3
    held = torch.cuda.memory_allocated() - allocated
    # over the budget by what the sizing leaves to the remaining share: on the H200 1.13 GiB (FlashInfer's split-k and
    # per-wrapper workspaces, each graph's page-index buffer); under it by the page rounding and what loading leaves
    # outside torch's allocator. Unaccounted graph outputs would put it ≈ 4 GB over.
    assert budget - 2**30 <= held <= budget + 1.5 * 2**30, (held / 2**30, budget / 2**30)
    del engine
    gc.collect()
    torch.cuda.empty_cache()


def test_gpu_logprobs_of_speculation_equal_plain_decoding_in_float32(make_engine, smollm_files):
    """On CUDA (the pinned copies and their event): greedy and seeded sampled logprobs under SpecAttn, from the
    verification rows, equal plain decoding's on the same float32 torch path, with the same alternatives."""
    ids = [smollm_files.tokenizer.encode(p) for p in PROMPTS[:4]]
    kw = dict(device="cuda", dtype=torch.float32, attention="torch")
    for params in (SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2),
                   SamplingParams(max_tokens=16, temperature=0.8, seed=9, ignore_eos=True, logprobs=2)):
        runs = []
        for spec in (SpecConfig(drafter="none"), SpecConfig(drafter="specattn", budget_ratio=0.1, min_budget=6, **SPEC)):
            engine = make_engine(spec=spec, **kw)
            for i, prompt in enumerate(ids):
                engine.add_request(f"g{i}", prompt, params)
            got: dict[str, list] = {f"g{i}": [] for i in range(len(ids))}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    got[out.request_id] += out.logprobs
            runs.append([got[f"g{i}"] for i in range(len(ids))])
        for plain, speculated in zip(*runs):
            assert [lp.token_id for lp in speculated] == [lp.token_id for lp in plain]
            assert [lp.logprob for lp in speculated] == pytest.approx([lp.logprob for lp in plain], abs=1e-3)
            assert [[t for t, _ in lp.top] for lp in speculated] == [[t for t, _ in lp.top] for lp in plain]
