"""Async scheduling: a plain decode step's successor is queued before its tokens are read (they stay on the device).
Outputs, finishes and freed pages must be exactly those of the engine that reads every step first."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import replace

import pytest

from specattn.engine.config import SpecConfig
from specattn.engine.sampling import SamplingParams
from tests.test_engine import GREEDY, PLAIN, PROMPTS


def _count_launches_ahead(engine) -> list[int]:
    """Spy: per step launched ahead, its number of drafts (the engine's own method does the work)."""
    launched = []
    original = engine._launch_ahead

    def spy(step):
        ahead = original(step)
        if ahead is not None:
            launched.append(ahead.gamma)
        return ahead

    engine._launch_ahead = spy
    return launched


def count_draft_chains_ahead(engine) -> list[int]:
    """Spy: per draft chain queued before the step before it was read, its γ (the engine's own method does the work)."""
    chains = []
    original = engine._draft_ahead

    def spy(step):
        ahead = original(step)
        if ahead is not None and ahead.gamma:
            chains.append(ahead.gamma)
        return ahead

    engine._draft_ahead = spy
    return chains


def _run(engine, requests: list[tuple[list[int], SamplingParams]], abort: tuple[int, str] | None = None):
    """Submit requests over the first steps (one every other step), run to the end; per request its tokens, text and
    finish reason. abort: (step, request id) to abort after that step."""
    out = {f"r{i}": ([], [], None) for i in range(len(requests))}
    pending, step = list(range(len(requests))), 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:
            i = pending.pop(0)
            engine.add_request(f"r{i}", *requests[i])
        outputs = engine.step()
        if abort is not None and step == abort[0]:
            assert engine._in_flight is not None, "the abort was meant to land while a step is in flight"
            outputs.append(engine.abort_request(abort[1]))
        for o in outputs:
            ids, text, _ = out[o.request_id]
            out[o.request_id] = (ids + o.new_token_ids, text + [o.new_text], o.finish_reason)
        step += 1
    return [(ids, "".join(text), reason) for ids, text, reason in out.values()]


@pytest.fixture(scope="module")
def requests(make_engine):
    """Greedy requests that end in every way while others decode: a stop id the model reaches, a stop string,
    max_tokens of different lengths, EOS after min_tokens."""
    tok = make_engine(spec=PLAIN).tokenizer
    ids = [tok.encode(p) for p in PROMPTS]
    sync = make_engine(spec=PLAIN, async_scheduling=False)
    free_run = sync.generate(ids[:3], GREEDY)
    return [
        (ids[0], replace(GREEDY, stop_token_ids=(free_run[0][6],))),
        (ids[1], replace(GREEDY, stop_token_ids=(free_run[1][3],), max_tokens=30)),
        (ids[2], replace(GREEDY, stop=(tok.decode(free_run[2][8:10]),))),
        (ids[3], replace(GREEDY, max_tokens=5)),
        (ids[4], replace(GREEDY, max_tokens=17)),
        (ids[5], replace(GREEDY, ignore_eos=False, min_tokens=3, max_tokens=40)),
        (ids[6], GREEDY),
    ]


@pytest.fixture(scope="module")
def sync_outputs(make_engine, requests):
    return _run(make_engine(spec=PLAIN, async_scheduling=False), requests)


def test_plain_decoding_launched_ahead_equals_reading_every_step(make_engine, requests, sync_outputs):
    engine = make_engine(spec=PLAIN)
    ahead = _count_launches_ahead(engine)
    assert _run(engine, requests) == sync_outputs
    assert len(ahead) > 10, "plain decode steps were meant to be launched ahead"
    reasons = {reason for _, _, reason in sync_outputs}
    assert {"stop", "length"} <= reasons, "requests were meant to stop in different ways"
    assert engine.kv_usage == 0


def test_abort_while_a_step_launched_ahead_is_in_flight(make_engine, requests, sync_outputs):
    engine = make_engine(spec=PLAIN)
    ahead = _count_launches_ahead(engine)
    got = _run(engine, requests, abort=(14, "r6"))
    assert ahead, "steps were meant to be launched ahead"
    for i, (mine, theirs) in enumerate(zip(got, sync_outputs)):
        if i == 6:
            assert mine[2] == "abort" and mine[0] == theirs[0][: len(mine[0])]
        else:
            assert mine == theirs
    assert engine.kv_usage == 0


def test_preemption_falls_back_to_reading_the_step(make_engine):
    """A pool too small for every request: the step after a plain one would need pages it cannot have without
    preempting, so it is planned after reading; output stays exact and every page comes back."""
    tok = make_engine(spec=PLAIN).tokenizer
    requests = [(tok.encode(p), GREEDY) for p in PROMPTS]
    expected = _run(make_engine(spec=PLAIN, async_scheduling=False), requests)
    engine = make_engine(num_pages=24, page_size=4, max_num_batched_tokens=64, spec=PLAIN)
    ahead = _count_launches_ahead(engine)
    assert _run(engine, requests) == expected
    assert engine.stats().num_preemptions > 0 and ahead
    assert engine.kv_usage == 0


def test_speculation_launched_ahead_after_plain_steps_stays_lossless(make_engine, requests, sync_outputs):
    """Adaptive γ alternating plain steps and speculation: a speculative step after a plain one is launched ahead,
    its first draft's input and its verification's first token taken from the device."""
    engine = make_engine(spec=SpecConfig(drafter="specattn", gamma=4, adaptive=True, budget_ratio=0.1, min_budget=6))
    script = iter([0, 0, 4, 0, 2, 3, 0, 0, 1] * 40)
    engine.gamma_controller.choose = lambda batch_size: next(script)  # a γ schedule that visits every case
    ahead = _count_launches_ahead(engine)
    assert _run(engine, requests) == sync_outputs
    assert any(ahead) and 0 in ahead, "both plain and speculative steps were meant to be launched ahead"
    assert engine.kv_usage == 0


def _per_request_acceptance(engine, requests) -> tuple[list, list[list[int]]]:
    """Run greedy requests together; their outputs, and per request how many drafts each verification accepted."""
    accepted = []
    original = engine.spec_stats.record
    engine.spec_stats.record = lambda gamma, n: (accepted.append(n), original(gamma, n))
    outputs = _run(engine, requests)
    return outputs, accepted


@pytest.mark.parametrize("drafter", ["streaming", "specattn"])
def test_drafts_queued_before_the_verification_is_read_are_the_drafts_read_after(make_engine, requests, sync_outputs, drafter):
    """After a speculative step the next draft chain is queued before the verification is read: where each chain
    starts and its first token are decided on the device. Outputs stay exact, and the drafts are the ones an engine
    that reads first makes (a chain at a wrong position or with a wrong first token would be rejected more or less
    often): the same count accepted at every verification, in the same order."""
    spec = SpecConfig(drafter=drafter, gamma=4, adaptive=False, budget_ratio=0.1, min_budget=6)
    engine = make_engine(spec=spec)
    chains = count_draft_chains_ahead(engine)
    got, accepted = _per_request_acceptance(engine, requests)
    expected, expected_accepted = _per_request_acceptance(make_engine(spec=spec, async_scheduling=False), requests)
    assert got == expected == sync_outputs
    assert accepted == expected_accepted and 0 < sum(accepted) < 4 * len(accepted)
    assert chains.count(4) > 10, "draft chains were meant to be queued ahead"
    assert engine.kv_usage == 0


def test_step_costs_tile_the_timeline_and_follow_the_work(make_engine):
    """Adaptive γ compares step kinds by their cost: from the device starting on a step to it starting on the next.
    Those spans must tile the timeline whichever steps follow which (plain launched ahead, speculation launched ahead,
    speculation after speculation, plain after speculation), and each must hold its own step's work: a step of four
    drafts and a five-token verification costs several plain steps, also when it was launched ahead (on the CPU a step
    runs as it is launched, so a clock that started a step launched ahead when the one before it was read gave it
    almost nothing and the step before it its whole cost)."""
    engine = make_engine(spec=SpecConfig(drafter="specattn", gamma=4, adaptive=True, budget_ratio=0.1, min_budget=6))
    tok = engine.tokenizer
    script = iter([0, 0, 4, 4, 0, 0, 2, 0, 3, 3, 0] * 40)
    engine.gamma_controller.choose = lambda batch_size: next(script)
    spans = []
    original = engine._time_step
    engine._time_step = lambda step, end: (spans.append((step.started, end, step.gamma)), original(step, end))
    engine.generate([tok.encode(p) for p in PROMPTS], replace(GREEDY, max_tokens=40))
    assert len(spans) > 20 and {g for *_, g in spans} >= {0, 2, 3, 4}
    for (_, end, _), (start, _, _) in itertools.pairwise(spans):
        assert end == start, "a step's span must end where the next one's begins"
    cost = {g: [end - start for start, end, gamma in spans if gamma == g] for g in (0, 4)}
    assert min(cost[4]) > 1.5 * statistics.median(cost[0]), cost


def test_a_request_the_budget_left_out_is_not_starved(make_engine):
    """A token budget that fits two decodes with their draft lookahead, not three: plain steps launched ahead must
    not keep running only the requests of the step before while a third waits for the budget (found in review:
    the third got its first token 33 steps late). Each request starts and ends at the step it does without them."""
    def run(async_scheduling: bool):
        engine = make_engine(max_num_seqs=8, max_num_batched_tokens=10, async_scheduling=async_scheduling,
                             spec=SpecConfig(drafter="streaming", gamma=4, adaptive=True, min_budget=6))
        engine.gamma_controller.choose = lambda batch_size: 0  # adaptive γ settled on plain decoding
        tok = engine.tokenizer
        for i, (prompt, n) in enumerate([(PROMPTS[0], 6), (PROMPTS[1], 40), (PROMPTS[2], 10)]):
            engine.add_request(f"r{i}", tok.encode(prompt)[: 2 + 9 * i], replace(GREEDY, max_tokens=n))
        first, done, step = {}, {}, 0
        while engine.has_unfinished_requests():
            for o in engine.step():
                first.setdefault(o.request_id, step)
                if o.finished:
                    done[o.request_id] = step
            step += 1
        return first, done

    assert run(True) == run(False)


@pytest.mark.parametrize("drafter", ["none", "specattn"])
def test_seeded_sampling_launched_ahead_equals_reading_every_step(make_engine, drafter):
    """Sampling requests (seeded, temperature/top-p/top-k) among greedy ones: a step launched ahead takes their
    sampled tokens from the device, and accepting the step before commits those very tokens. With adaptive γ
    forced through plain and speculative steps, the drafts of a sampled chain launched ahead start from them too."""
    tok = make_engine(spec=PLAIN).tokenizer
    requests = [
        (tok.encode(p), replace(GREEDY, temperature=0.0 if i % 3 == 0 else 0.8, top_p=0.95, top_k=40 * (i % 2), seed=7 + i))
        for i, p in enumerate(PROMPTS[:6])
    ]
    spec = PLAIN if drafter == "none" else SpecConfig(drafter="specattn", gamma=3, adaptive=True, budget_ratio=0.1, min_budget=6)

    def run(async_scheduling: bool):
        engine = make_engine(spec=spec, async_scheduling=async_scheduling)
        script = iter([0, 0, 3, 0, 2, 0, 0] * 40)
        if drafter != "none":
            engine.gamma_controller.choose = lambda batch_size: next(script)
        ahead = _count_launches_ahead(engine)
        return _run(engine, requests), ahead

    (got, ahead), (expected, _) = run(True), run(False)
    assert got == expected
    assert len(ahead) > 5 and (drafter == "none" or any(ahead))
