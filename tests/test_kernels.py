"""Score extraction and critical-token selection equal brute force over full attention weights."""

from __future__ import annotations

import pytest
import torch

from specattn.engine.attention import SequenceAttention, TorchAttentionBackend
from specattn.engine.config import CacheConfig, ModelConfig
from specattn.engine.kv_cache import KVCache
from specattn.kernels.reference import select_critical_tokens, token_budget, verification_scores


def _brute_force_scores(q_rows, k, row_pos, scale):
    """Loop over rows and heads: softmax over each row's causal span, averaged, kept as a per-position list."""
    n_heads, group = q_rows.shape[1], q_rows.shape[1] // k.shape[1]
    total = [0.0] * k.shape[0]
    for r, pos in enumerate(row_pos):
        for h in range(n_heads):
            logits = [float(q_rows[r, h] @ k[j, h // group]) * scale for j in range(pos + 1)]
            m = max(logits)
            z = sum(torch.tensor(x - m).exp().item() for x in logits)
            for j in range(pos + 1):
                total[j] += torch.tensor(logits[j] - m).exp().item() / z / (n_heads * len(row_pos))
    return torch.tensor(total)


def test_budget_is_clamped():
    assert token_budget(100, 0.05, 256) == 100
    assert token_budget(4000, 0.05, 256) == 256
    assert token_budget(8000, 0.05, 256) == 400


@pytest.mark.parametrize("seed", [0, 1])
def test_selection_equals_brute_force_topk(seed):
    g = torch.Generator().manual_seed(seed)
    layers, n, heads, kv_heads, d = 3, 50, 6, 2, 8
    scale = d**-0.5
    c, gamma = 40, 4  # scored rows: the first (c) and last (c + gamma) verification queries, scored over [0, c]
    selected, brute = [], []
    for _ in range(layers):
        q_rows = torch.randn(2, heads, d, generator=g)
        k = torch.randn(n, kv_heads, d, generator=g)
        row_pos = [c, c + gamma]
        mask = torch.arange(n)[None, :] <= torch.tensor(row_pos)[:, None]
        scores = verification_scores(q_rows[None], k[None], mask[None], scale)[0]
        ref = _brute_force_scores(q_rows, k, row_pos, scale)
        torch.testing.assert_close(scores, ref.float(), atol=1e-6, rtol=1e-5)
        selected.append(scores[: c + 1])
        brute.append(sorted(sorted(range(c + 1), key=lambda j: -float(ref[j]))[:10]))
    picked = select_critical_tokens(torch.stack(selected), 10)
    assert picked.tolist() == brute


def test_backend_extracts_scores_while_verifying():
    """The paged backend's scores for a verification equal the reference over the same K, for mixed batches."""
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, d, ps = 4, 2, 8, 4
    mc = ModelConfig("llama", 10, heads * d, 8, 1, heads, kv_heads, d, 1e4, 1e-5, 512, True)
    cache = KVCache(mc, CacheConfig(page_size=ps, num_pages=64), torch.float32, "cpu")
    backend = TorchAttentionBackend(cache, d**-0.5)
    # a verification of 5 tokens after 30 cached ones, and a final prefill chunk scoring its last row
    seqs = [
        SequenceAttention(5, 30, list(range(0, 9)), score_rows=(0, 4), score_len=31),
        SequenceAttention(20, 0, list(range(20, 25)), score_rows=(19,), score_len=20),
    ]
    dense_k = [torch.randn(35, kv_heads, d, generator=g), torch.randn(20, kv_heads, d, generator=g)]
    for pos in range(30):
        cache.k[0, seqs[0].page_table[pos // ps] * ps + pos % ps] = dense_k[0][pos]
    backend.plan(seqs)
    q = torch.randn(25, heads, d, generator=g)
    k_new = torch.cat([dense_k[0][30:], dense_k[1]])
    backend(0, q, k_new, torch.randn_like(k_new))
    scores = backend.take_scores()
    ref0 = _brute_force_scores(q[[0, 4]], dense_k[0], [30, 34], d**-0.5)[:31]
    ref1 = _brute_force_scores(q[[24]], dense_k[1], [19], d**-0.5)[:20]
    torch.testing.assert_close(scores[0][0], ref0.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores[1][0], ref1.float(), atol=1e-6, rtol=1e-5)
