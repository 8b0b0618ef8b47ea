"""On CUDA (skipped elsewhere): bf16 engine, speculation equals plain decoding token for token."""

from __future__ import annotations

import pytest
from specattn.engine.config import SpecConfig
from specattn.engine.sampling import SamplingParams
from tests.test_engine import GREEDY, PROMPTS

pytestmark = pytest.mark.gpu


def test_gpu_speculation_equals_plain_decoding(make_engine, smollm_files):
    ids = [smollm_files.tokenizer.encode(p) for p in PROMPTS]
    plain = make_engine(device="cuda", spec=SpecConfig(drafter="none")).generate(ids, GREEDY)
    for drafter in ("streaming", "specattn"):
        engine = make_engine(device="cuda", spec=SpecConfig(drafter=drafter, gamma=4, adaptive=False, budget_ratio=0.1, min_budget=6))
        assert engine.generate(ids, GREEDY) == plain
        assert 0 < engine.stats().spec.acceptance_rate < 1


def test_gpu_answers_the_capital_question(make_engine, smollm_files):
    from tests.conftest import CAPITAL_QUESTION

    tok = smollm_files.tokenizer
    engine = make_engine(device="cuda")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": CAPITAL_QUESTION}]), add_special_tokens=False)
    out = engine.generate([ids], SamplingParams(max_tokens=30, temperature=0))[0]
    assert tok.decode(out) == "The capital of France is Paris."
