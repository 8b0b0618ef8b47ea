"""Speculative decoding is lossless: greedy and seeded sampled output equal plain decoding token for token,
and sampled output has the target distribution."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sysconfig
from collections import Counter

import pytest
import torch

from specattn.engine.acceptance import accept_drafts, accept_drafts_on_device
from specattn.engine.config import SpecConfig
from specattn.engine.runner import SequenceInput
from specattn.engine.sampling import SamplingParams, probabilities, sample_rows
from tests.test_async_scheduling import count_draft_chains_ahead
from tests.test_engine import GREEDY, PROMPTS, PLAIN, _run_staggered

# A tiny budget (k_min 6 of 10-25 prompt tokens) so drafts really miss context and get rejected sometimes.
SPARSE = dict(gamma=4, adaptive=False, budget_ratio=0.1, min_budget=6)


@pytest.fixture(scope="module")
def prompt_ids(smollm_files):
    return [smollm_files.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def plain_outputs(make_engine, prompt_ids):
    plain = make_engine(spec=PLAIN)
    return [plain.generate([ids], GREEDY)[0] for ids in prompt_ids]


def _check_acceptance_is_partial(engine):
    rate = engine.stats().spec.acceptance_rate
    assert 0 < rate < 1, f"acceptance {rate}: drafts must be sparse enough to be rejected sometimes"


@pytest.mark.parametrize("drafter", ["streaming", "specattn"])
def test_greedy_staggered_batch_equals_plain(make_engine, prompt_ids, plain_outputs, drafter):
    """Also: by default every verification renews its request's selection (as the paper does)."""
    engine = make_engine(spec=SpecConfig(drafter=drafter, **SPARSE))
    ages = _renewal_ages(engine)
    assert _run_staggered(engine, prompt_ids) == plain_outputs
    _check_acceptance_is_partial(engine)
    assert engine.kv_usage == 0
    _check_renewed_within_a_verification(ages, 1)


@pytest.mark.parametrize("drafter", ["streaming", "specattn"])
def test_greedy_with_preemption_equals_plain(make_engine, prompt_ids, plain_outputs, drafter):
    """A pool small enough to preempt, with draft chains queued before each verification is read (pages grown
    for any acceptance first): outputs exact, every page back."""
    engine = make_engine(num_pages=28, page_size=4, max_num_batched_tokens=64, spec=SpecConfig(drafter=drafter, **SPARSE))
    chains = count_draft_chains_ahead(engine)
    assert _run_staggered(engine, prompt_ids) == plain_outputs
    assert engine.stats().num_preemptions > 0
    assert len(chains) > 5, "draft chains were meant to be queued ahead"
    assert engine.kv_usage == 0


def _renewal_ages(engine) -> list[int]:
    """How old each selection the engine renews is (positions from its anchor to the new one), prefills left out;
    the engine's own method runs unchanged."""
    ages, renew = [], engine._new_draft_states

    def recording(refreshed, scores):
        ages.extend(anchor - req.draft.anchor for _, req, anchor in refreshed if req.draft is not None)
        return renew(refreshed, scores)

    engine._new_draft_states = recording
    return ages


def _check_renewed_within_a_verification(ages: list[int], reselect_after: int) -> None:
    """Selections were renewed no younger than reselect_after, and by the first verification that found them that
    old: a verification moves a request 1 … γ + 1 positions on."""
    assert ages and reselect_after <= min(ages) and max(ages) < reselect_after + SPARSE["gamma"] + 1, sorted(set(ages))


def test_selections_renewed_every_few_positions_stay_lossless(make_engine, prompt_ids, plain_outputs):
    """With reselect_after = 8 a verification keeps a selection younger than 8 positions (the positions since
    count as recent) and renews it at the first verification that finds it 8 or older: exact outputs.
    (Renewal after every verification, the default, is checked by test_greedy_staggered_batch_equals_plain.)"""
    engine = make_engine(spec=SpecConfig(drafter="specattn", reselect_after=8, **SPARSE))
    ages = _renewal_ages(engine)
    assert _run_staggered(engine, prompt_ids) == plain_outputs
    _check_acceptance_is_partial(engine)
    assert engine.kv_usage == 0
    _check_renewed_within_a_verification(ages, 8)
    assert max(ages) > SPARSE["gamma"] + 1  # selections outlived several verifications


def test_cancel_mid_run_leaves_others_exact(make_engine, prompt_ids, plain_outputs):
    engine = make_engine(spec=SpecConfig(drafter="specattn", **SPARSE))
    for i, ids in enumerate(prompt_ids):
        engine.add_request(f"r{i}", ids, GREEDY)
    results = {f"r{i}": [] for i in range(len(prompt_ids))}
    for step in range(200):
        if step == 3:
            assert engine.abort_request("r4").finish_reason == "abort"
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            results[out.request_id].extend(out.new_token_ids)
    for i in range(len(prompt_ids)):
        if i != 4:
            assert results[f"r{i}"] == plain_outputs[i]
    assert engine.kv_usage == 0


def test_adaptive_gamma_stays_lossless(make_engine, prompt_ids, plain_outputs):
    engine = make_engine(spec=SpecConfig(drafter="specattn", gamma=4, adaptive=True, budget_ratio=0.1, min_budget=6))
    assert engine.generate(prompt_ids, GREEDY) == plain_outputs


# --- sampling ------------------------------------------------------------------------------------


def _chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson–Hilferty); z = 3.09 is the standard normal's 0.999 quantile."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi_square(counts: Counter, probs: dict, n: int) -> tuple[float, int]:
    """Statistic and degrees of freedom, pooling outcomes expected fewer than 5 times."""
    stat, pooled_obs, pooled_exp, bins = 0.0, 0, 0.0, 0
    for outcome, p in probs.items():
        exp = p * n
        if exp >= 5:
            stat += (counts[outcome] - exp) ** 2 / exp
            bins += 1
        else:
            pooled_obs += counts[outcome]
            pooled_exp += exp
    pooled_obs += sum(c for o, c in counts.items() if o not in probs)
    if pooled_exp >= 5:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        bins += 1
    else:
        assert pooled_obs <= max(5, 3 * pooled_exp), "outcomes outside the target's support"
    return stat, bins - 1


def test_acceptance_on_the_device_is_the_hosts():
    """The next step's start and first token, decided on the device before the host reads the verification, are
    what the host's acceptance commits: every agreement pattern of γ = 4 drafts, and random ones."""
    gen = torch.Generator().manual_seed(0)
    drafts = torch.randint(0, 3, (400, 4), generator=gen)
    targets = torch.randint(0, 3, (400, 5), generator=gen)
    for n in range(5):  # exactly n drafts agree, then (where there is one) a disagreement
        drafts[n] = torch.arange(4)
        targets[n] = torch.tensor([0, 1, 2, 3, 9])
        targets[n, n] = 7 if n < 4 else 9
    accepted, first = accept_drafts_on_device(drafts, targets)
    for d, t, a, f in zip(drafts.tolist(), targets.tolist(), accepted.tolist(), first.tolist()):
        assert accept_drafts(d, t) == d[:a] + [f]
    assert accepted[:5].tolist() == [0, 1, 2, 3, 4]


def check_chain_moved_on_the_device(engine, prompts: list[list[int]], shifts: list[int], gamma: int = 4) -> None:
    """A draft chain planned at each sequence's earliest start and moved on by device counts (as the engine queues
    it before the verification that decides the counts is read) gives the tokens, and writes the K/V, of a chain
    planned at the moved starts."""
    from specattn.engine.attention import SparseKV
    from specattn.engine.kv_cache import slot_of

    cache, runner, ps = engine.cache, engine.runner, engine.cache.page_size
    dev = cache.k.device
    tables = []
    for ids in prompts:  # each sequence's context written by a plain forward
        pages: list[int] = []
        assert cache.allocator.grow(pages, len(ids) + max(shifts) + gamma + 1)
        runner.run([SequenceInput(ids, 0, pages, 1)])
        tables.append(pages)

    def chain_inputs(moved: bool) -> list[SequenceInput]:
        seqs = []
        for ids, pages, a in zip(prompts, tables, shifts):
            anchor = len(ids) - 1  # the selection: a few early positions; every later one is recent
            selected = torch.tensor([slot_of(pages, p, ps) for p in range(0, 12, 2)], dtype=torch.int32, device=dev)
            recent = [slot_of(pages, p, ps) for p in range(anchor + 1, anchor + 1 + max(shifts) + gamma)]
            sparse = SparseKV(selected.expand(engine.model_config.num_layers, -1), anchor, recent)
            seqs.append(SequenceInput([0], len(ids) + (a if moved else 0), pages, 1, sparse=sparse))
        return seqs

    first = torch.tensor([ids[-1] for ids in prompts], device=dev)
    before = (cache.k.clone(), cache.v.clone())
    moved = runner.run_drafts(chain_inputs(False), gamma, None, first, torch.tensor(shifts, device=dev))
    after_moved = (cache.k.clone(), cache.v.clone())
    cache.k.copy_(before[0])
    cache.v.copy_(before[1])
    planned = runner.run_drafts(chain_inputs(True), gamma, None, first)
    assert moved.tolist() == planned.tolist()
    assert torch.equal(after_moved[0], cache.k) and torch.equal(after_moved[1], cache.v)
    assert not torch.equal(before[0], cache.k), "the chains were meant to write K/V"
    for pages in tables:
        cache.allocator.release(pages)


def test_a_draft_chain_moved_on_the_device_equals_one_planned_there(make_engine, prompt_ids):
    engine = make_engine(spec=SpecConfig(drafter="specattn", **SPARSE))
    check_chain_moved_on_the_device(engine, prompt_ids[:3], [0, 3, 1])


def test_seeded_choice_is_an_exact_sample_of_the_target():
    """Synthetic: over many seeds, the token chosen at a position follows p (top-k/top-p applied), whatever
    the draft proposed; a rule that ignores the target (take the draft's choice) is caught by the same test."""
    g = torch.Generator().manual_seed(0)
    vocab, n = 8, 6000
    target_logits = torch.randn(1, vocab, generator=g) * 2
    draft_logits = torch.randn(1, vocab, generator=g) * 2
    params = SamplingParams(temperature=0.9, top_k=6, max_tokens=4)
    p = probabilities(target_logits, params)[0]
    committed, drafted = Counter(), Counter()
    for seed in range(n):
        draft = sample_rows(draft_logits, [params], [seed], [17]).tolist()
        target = sample_rows(target_logits, [params], [seed], [17]).tolist()
        committed[accept_drafts(draft, target + target)[0]] += 1
        drafted[draft[0]] += 1
    expected = {t: float(p[t]) for t in range(vocab) if p[t] > 0}
    stat, df = _chi_square(committed, expected, n)
    assert stat < _chi_square_critical(df), (stat, df)
    assert set(committed) <= set(expected)  # top-k: never a token outside the top 6
    total_variation = 0.5 * sum(abs(drafted[t] / n - float(p[t])) for t in range(vocab))
    assert total_variation > 0.1


def test_seeded_sampling_with_speculation_equals_plain_sampling(make_engine, prompt_ids):
    """Same seeds, sampled at temperature 0.8 / top-p 0.95: speculation commits exactly plain sampling's tokens,
    also when the requests are batched differently (so the seed, not the batch, decides), and with greedy requests
    in the same batch (drafts then choose per request: argmax for these, seeded noise for the others)."""
    params = [SamplingParams(max_tokens=24, temperature=0.0 if i % 3 == 0 else 0.8, top_p=0.95, seed=100 + i,
                             ignore_eos=True)
              for i in range(len(prompt_ids))]
    plain = make_engine(spec=PLAIN)
    alone = []
    for ids, prm in zip(prompt_ids, params):
        plain.add_request("a", ids, prm)
        out = []
        while plain.has_unfinished_requests():
            out += [t for o in plain.step() for t in o.new_token_ids]
        alone.append(out)
    spec = make_engine(spec=SpecConfig(drafter="specattn", **SPARSE))
    for i, (ids, prm) in enumerate(zip(prompt_ids, params)):
        spec.add_request(f"r{i}", ids, prm)
    together = {f"r{i}": [] for i in range(len(prompt_ids))}
    while spec.has_unfinished_requests():
        for o in spec.step():
            together[o.request_id] += o.new_token_ids
    assert [together[f"r{i}"] for i in range(len(prompt_ids))] == alone
    _check_acceptance_is_partial(spec)


@pytest.mark.slow
def test_sampled_generation_matches_plain_distribution(make_engine, smollm_files):
    """End to end on the embedded model: the distribution of 3 sampled tokens (top-k 3) under speculation
    equals the exact distribution plain sampling has, computed from the model's own logits (27 outcomes)."""
    tok = smollm_files.tokenizer
    prompt = tok.encode("My favourite colour is")
    params = dict(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)
    engine = make_engine(max_num_seqs=128, spec=SpecConfig(drafter="specattn", gamma=2, adaptive=False, min_budget=2, budget_ratio=0.1))

    exact: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(3):  # extend every prefix by the model's top-3 distribution
        nxt = {}
        for prefix, pr in exact.items():
            ids = prompt + list(prefix)
            pages: list[int] = []
            engine.cache.allocator.grow(pages, len(ids))
            logits = engine.runner.run([SequenceInput(ids, 0, pages, 1)]).logits[0][-1]
            engine.cache.allocator.release(pages)
            probs = probabilities(logits, SamplingParams(**params))
            for t in torch.nonzero(probs).flatten().tolist():
                nxt[prefix + (t,)] = pr * float(probs[t])
        exact = nxt

    n = 640
    for i in range(n):
        engine.add_request(f"s{i}", prompt, SamplingParams(seed=i, **params))
    seqs: dict[str, list[int]] = {f"s{i}": [] for i in range(n)}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seqs[out.request_id].extend(out.new_token_ids)
    counts = Counter(tuple(s) for s in seqs.values())
    stat, df = _chi_square(counts, exact, n)
    assert stat < _chi_square_critical(df), (stat, df)
    assert engine.stats().spec.num_draft_tokens > 0 and engine.stats().spec.acceptance_rate < 1


# --- the long-document comparison ------------------------------------------------------------------


@pytest.mark.slow
def test_specattn_accepts_at_least_as_much_as_streaming_on_a_long_document(make_engine, smollm_files):
    tok = smollm_files.tokenizer
    doc = open(os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt"), encoding="utf-8").read()
    prompt = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "Summarize this document.\n\n" + doc}]),
        add_special_tokens=False,
    )
    assert len(prompt) >= 2048
    rates, outputs = {}, {}
    for drafter in ("streaming", "specattn"):
        engine = make_engine(spec=SpecConfig(drafter=drafter, gamma=4, adaptive=False, budget_ratio=0.05, min_budget=256))
        outputs[drafter] = engine.generate([prompt], SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))[0]
        rates[drafter] = engine.stats().spec.acceptance_rate
    assert outputs["specattn"] == outputs["streaming"]
    assert rates["specattn"] >= rates["streaming"], rates


def test_cli_speculates_and_reports_stats():
    import json
    import subprocess
    import sys

    from tests.conftest import CAPITAL_QUESTION

    out = subprocess.run(
        [sys.executable, "-m", "specattn.server.cli", "generate", "--chat", "--prompt", CAPITAL_QUESTION, "--device", "cpu",
         "--drafter", "specattn", "--gamma", "3", "--no-adaptive", "--reselect-after", "2", "--stats"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "The capital of France is Paris."
    stats = json.loads(out.stderr.strip().splitlines()[-1])
    assert stats["drafter"] == "specattn" and stats["num_draft_tokens"] == 3 * stats["num_drafts"] > 0
    assert stats["num_accepted_tokens"] == sum(stats["accepted_per_position"])


def test_cli_refuses_a_selection_age_the_drafts_cannot_hold(capsys):
    from specattn.server.cli import main

    assert main(["generate", "--prompt", "hi", "--device", "cpu", "--reselect-after", "33"]) == 2
    assert "reselect_after must be in [1, 32], got 33" in capsys.readouterr().err


def test_speculation_at_the_end_of_the_context(smollm_files, tmp_path):
    """Drafts must never run past the model's context: a request that fills it ends with 'length', as plain does."""
    from specattn.engine.config import CacheConfig, EngineConfig
    from specattn.engine.engine import LLMEngine
    from specattn.engine.loader import load_model_files
    from tests.hf_dirs import write_tiny_random_dir

    files = load_model_files(str(write_tiny_random_dir(tmp_path / "tiny", "llama", smollm_files.tokenizer)))
    prompt = smollm_files.tokenizer.encode(PROMPTS[2] * 30)[:500]  # context is 512
    assert len(prompt) == 500
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    outputs = {}
    for drafter in ("none", "specattn"):
        engine = LLMEngine(EngineConfig(cache=CacheConfig(num_pages=64), spec=SpecConfig(drafter=drafter, gamma=4, adaptive=False, min_budget=4)), files)
        engine.add_request("r", prompt, params)
        tokens, reason = [], None
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens += out.new_token_ids
                reason = out.finish_reason
        outputs[drafter] = (tokens, reason)
    assert outputs["specattn"] == outputs["none"]
    assert len(outputs["none"][0]) == 12 and outputs["none"][1] == "length"


def test_sampled_rows_do_not_depend_on_the_batch():
    """Each row's choice is fixed by its logits, params, seed and position: the same alone, in any batch and order,
    on the CPU as the noise is a hash of (seed, position, token), not a generator's state. Greedy rows take the argmax."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.8),
              SamplingParams(temperature=1.3, top_k=3, top_p=0.5), SamplingParams(temperature=0), SamplingParams()]
    seeds, positions = [11, 12, 13, 14, 15, 11], [3, 3, 9, 1, 4, 3]
    together = sample_rows(logits, params, seeds, positions).tolist()
    alone = [sample_rows(logits[r : r + 1], [params[r]], [seeds[r]], [positions[r]]).item() for r in range(6)]
    order = [5, 2, 0, 4, 1, 3]
    shuffled = sample_rows(logits[order], [params[r] for r in order], [seeds[r] for r in order], [positions[r] for r in order])
    assert together == alone == [dict(zip(order, shuffled.tolist()))[r] for r in range(6)]
    assert together[0] == logits[0].argmax() and together[4] == logits[4].argmax()
    assert together[1] in logits[1].topk(5).indices.tolist()


def test_top_k_and_top_p_cut_the_distribution():
    logits = torch.tensor([[4.0, 3.0, 2.0, 2.0, -1.0]])
    top_k = probabilities(logits, SamplingParams(top_k=3))[0]
    assert (top_k[4] == 0) and (top_k[:4] > 0).all(), "ties with the k-th logit stay"
    top_p = probabilities(logits, SamplingParams(top_p=0.6))[0]
    assert top_p[0] == 1.0, "the top token alone holds 0.6 of the mass"
    assert torch.allclose(probabilities(logits, SamplingParams(temperature=2.0))[0], torch.softmax(logits[0] / 2, -1))


def test_top_p_keeps_or_drops_tied_tokens_together():
    """Tokens tied in probability at the top-p boundary stay or go together, so the order a sort gives ties (which
    may depend on the batch a row is sorted in) cannot change which tokens can be sampled."""
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]])
    probs = probabilities(logits, SamplingParams(top_p=0.5))[0]
    assert (probs[1:4] > 0).all() and probs[4] == 0 and torch.allclose(probs[1], probs[3])


def _logprob_run(engine, prompts_ids, params):
    """Requests arriving every other step, the first without logprobs (its rows must not shift the others'); per
    request its output ids and TokenLogprobs as the engine reported them, step by step."""
    ids, logprobs = {i: [] for i in range(len(prompts_ids))}, {i: [] for i in range(len(prompts_ids))}
    pending, step = list(enumerate(prompts_ids)), 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:
            i, prompt = pending.pop(0)
            engine.add_request(f"lp{i}", prompt, params if i else dataclasses.replace(params, logprobs=None))
        for out in engine.step():
            i = int(out.request_id[2:])
            if i == 0:
                assert out.logprobs is None
                continue
            assert len(out.logprobs) == len(out.new_token_ids)
            ids[i] += out.new_token_ids
            logprobs[i] += out.logprobs
        step += 1
    return [ids[i] for i in ids][1:], [logprobs[i] for i in logprobs][1:]


def test_logprobs_under_speculation_equal_plain_decoding(make_engine, prompt_ids):
    """Each output token's logprob and its three likeliest alternatives: from the verification's rows under SpecAttn,
    the same as plain decoding computes them one position at a time (float rounding apart), for greedy and seeded
    sampled requests arriving mid-run beside one without logprobs, prompts prefilled in chunks beside decodes; the
    alternatives likeliest first, the greedy choice the likeliest."""
    for params in (dataclasses.replace(GREEDY, logprobs=3),
                   SamplingParams(max_tokens=24, temperature=0.8, top_k=20, seed=5, ignore_eos=True, logprobs=3)):
        plain_ids, plain_lps = _logprob_run(make_engine(spec=PLAIN, max_num_batched_tokens=24), prompt_ids[:5], params)
        spec = make_engine(spec=SpecConfig(drafter="specattn", **SPARSE), max_num_batched_tokens=24)
        spec_ids, spec_lps = _logprob_run(spec, prompt_ids[:5], params)
        _check_acceptance_is_partial(spec)
        assert spec_ids == plain_ids
        for ids, plain, speculated in zip(plain_ids, plain_lps, spec_lps):
            assert [lp.token_id for lp in speculated] == ids
            for a, b in zip(plain, speculated):
                assert b.logprob == pytest.approx(a.logprob, abs=1e-3) and b.logprob <= 0
                assert [t for t, _ in b.top] == [t for t, _ in a.top] and len(b.top) == 3
                assert [v for _, v in b.top] == sorted((v for _, v in b.top), reverse=True)
                if params.greedy:  # the chosen token is the likeliest
                    assert b.top[0] == (b.token_id, pytest.approx(b.logprob))


def test_prompt_logprobs_equal_one_forward_over_the_prompt(make_engine, prompt_ids):
    """Prompt logprobs gathered chunk by chunk (8-token prefill chunks beside other requests' SpecAttn decodes) equal
    those of one forward over each whole prompt: token p's is row p - 1's log-softmax at it, the first token's is
    None; they come once, on the request's first output, and the output tokens are plain decoding's, also where a
    draft chain is queued right after a prefill that scored prompt tokens: its drafts are accepted exactly as without
    prompt logprobs (a chain started from the chunk's first row, not its last, would be rejected: outputs right,
    speed lost)."""
    params = dataclasses.replace(GREEDY, max_tokens=6, logprobs=1, prompt_logprobs=2)
    prompts = prompt_ids[2:4] + prompt_ids[7:8]  # 10 to 25 tokens: several chunks each

    def run(params):
        engine = make_engine(spec=SpecConfig(drafter="specattn", **SPARSE), max_num_batched_tokens=16)
        chains_after_prompt_rows, draft_ahead = [], engine._draft_ahead

        def spy(step):
            ahead = draft_ahead(step)
            if ahead is not None and ahead.gamma and step.logprobs is not None and step.logprobs.prompt:
                chains_after_prompt_rows.append(ahead.gamma)
            return ahead

        engine._draft_ahead = spy
        got, outputs = {}, {i: [] for i in range(len(prompts))}
        for step in itertools.count():
            if step < len(prompts):  # one more every step, so prefills run beside decodes
                engine.add_request(f"p{step}", prompts[step], params)
            elif not engine.has_unfinished_requests():
                break
            for out in engine.step():
                i = int(out.request_id[1:])
                outputs[i] += out.new_token_ids
                if out.prompt_logprobs is not None:
                    assert i not in got
                    got[i] = out.prompt_logprobs
        return got, outputs, engine.stats().spec, chains_after_prompt_rows

    got, outputs, spec, chains = run(params)
    assert chains, "a draft chain was meant to follow a prefill that scored prompt tokens"
    _, outputs_without, spec_without, _ = run(dataclasses.replace(params, prompt_logprobs=None))
    assert outputs == outputs_without and spec.accepted_per_position == spec_without.accepted_per_position
    plain = make_engine(spec=PLAIN)
    for i, ids in enumerate(prompts):
        assert outputs[i] == plain.generate([ids], dataclasses.replace(params, prompt_logprobs=None))[0]
        pages: list[int] = []
        assert plain.cache.allocator.grow(pages, len(ids))
        rows = torch.log_softmax(plain.runner.run([SequenceInput(ids, 0, pages, len(ids))]).logits[0].float(), -1)
        plain.cache.allocator.release(pages)
        assert [lp.token_id for lp in got[i]] == ids and got[i][0].logprob is None and got[i][0].top == ()
        for p in range(1, len(ids)):
            assert got[i][p].logprob == pytest.approx(float(rows[p - 1, ids[p]]), abs=1e-4)
            assert [t for t, _ in got[i][p].top] == rows[p - 1].topk(2).indices.tolist()
