"""The paged torch backend equals dense attention (SDPA over the gathered K/V) for every kind of step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specattn.engine.attention import SequenceAttention, TorchAttentionBackend
from specattn.engine.config import CacheConfig, ModelConfig
from specattn.engine.kv_cache import KVCache

LAYERS, HEADS, KV_HEADS, DIM = 2, 6, 2, 16


def _cache(page_size: int, num_pages: int = 256) -> KVCache:
    mc = ModelConfig("llama", 10, HEADS * DIM, 8, LAYERS, HEADS, KV_HEADS, DIM, 1e4, 1e-5, 4096, True)
    return KVCache(mc, CacheConfig(page_size=page_size, num_pages=num_pages), torch.float32, "cpu")


def _dense(q, k_all, v_all, q_pos, kv_pos):
    """Reference: every query attends to the given positions of its own dense K/V, causally by position."""
    mask = kv_pos[None, :] <= q_pos[:, None]
    return F.scaled_dot_product_attention(
        q.transpose(0, 1), k_all[kv_pos].transpose(0, 1), v_all[kv_pos].transpose(0, 1),
        attn_mask=mask, scale=DIM**-0.5, enable_gqa=True,
    ).transpose(0, 1)


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_matches_dense_for_prefill_decode_verify_and_sparse(page_size, seed):
    g = torch.Generator().manual_seed(seed)
    cache = _cache(page_size)
    backend = TorchAttentionBackend(cache, DIM**-0.5)
    # (cached prefix, new queries, sparse?): fresh prefill, continued prefill chunk, decode, verify, sparse draft
    kinds = [(0, 37), (29, 20), (50, 1), (17, 5), (40, 1, "sparse"), (33, 3, "sparse")]
    seqs, dense_k, dense_v, new_q, sparse_sets = [], [], [], [], []
    free_pages = torch.randperm(cache.allocator.num_pages, generator=g).tolist()  # scattered, not contiguous
    for kind in kinds:
        prefix, nq = kind[0], kind[1]
        total = prefix + nq
        pages = [free_pages.pop() for _ in range(-(-total // page_size))]
        k = torch.randn(LAYERS, total, KV_HEADS, DIM, generator=g)
        v = torch.randn(LAYERS, total, KV_HEADS, DIM, generator=g)
        for pos in range(prefix):  # the cached prefix was written by earlier steps
            slot = pages[pos // page_size] * page_size + pos % page_size
            cache.k[:, slot], cache.v[:, slot] = k[:, pos], v[:, pos]
        kv_positions = None
        if len(kind) == 3:  # each layer attends a different random subset of the prefix plus the new tokens
            kv_positions = torch.stack(
                [torch.cat([torch.randperm(prefix, generator=g)[: prefix // 3].sort().values, torch.arange(prefix, total)])
                 for _ in range(LAYERS)]
            )
        sparse_sets.append(kv_positions)
        seqs.append(SequenceAttention(nq, prefix, pages, kv_positions))
        dense_k.append(k)
        dense_v.append(v)
        new_q.append(torch.randn(LAYERS, nq, HEADS, DIM, generator=g))
    backend.plan(seqs)
    for layer in range(LAYERS):
        q = torch.cat([x[layer] for x in new_q])
        k = torch.cat([x[layer, s.start_pos :] for x, s in zip(dense_k, seqs)])
        v = torch.cat([x[layer, s.start_pos :] for x, s in zip(dense_v, seqs)])
        out = backend(layer, q, k, v).split([s.num_query for s in seqs])
        for i, s in enumerate(seqs):
            q_pos = torch.arange(s.start_pos, s.end_pos)
            kv_pos = torch.arange(s.end_pos) if sparse_sets[i] is None else sparse_sets[i][layer]
            ref = _dense(new_q[i][layer], dense_k[i][layer], dense_v[i][layer], q_pos, kv_pos)
            torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)
