"""The paged attention backends equal dense attention (SDPA over the gathered K/V) for every kind of step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from specattn.engine.attention import SequenceAttention, SparseKV, TorchAttentionBackend
from specattn.engine.config import CacheConfig, ModelConfig
from specattn.engine.kv_cache import KVCache
from specattn.kernels.reference import write_kv

LAYERS, HEADS, KV_HEADS, DIM = 2, 6, 2, 16


def make_cache(page_size: int, dtype=torch.float32, device="cpu", num_pages: int = 1024, heads=HEADS, kv_heads=KV_HEADS, dim=DIM) -> KVCache:
    mc = ModelConfig("llama", 10, heads * dim, 8, LAYERS, heads, kv_heads, dim, 1e4, 1e-5, 4096, True)
    return KVCache(mc, CacheConfig(page_size=page_size, num_pages=num_pages), dtype, device)


def _dense(q, k_all, v_all, q_pos, kv_pos):
    """Reference: every query attends to the given positions of its own dense K/V, causally by position."""
    mask = kv_pos[None, :] <= q_pos[:, None]
    return F.scaled_dot_product_attention(
        q.transpose(0, 1), k_all[kv_pos].transpose(0, 1), v_all[kv_pos].transpose(0, 1),
        attn_mask=mask, scale=q.shape[-1] ** -0.5, enable_gqa=True,
    ).transpose(0, 1)


@dataclass
class Scenario:
    seqs: list[SequenceAttention]
    dense_k: list[torch.Tensor]  # per sequence [layers, total, kv_heads, d]
    dense_v: list[torch.Tensor]
    new_q: list[torch.Tensor]  # per sequence [layers, num_query, heads, d]
    kv_positions: list[torch.Tensor | None]  # sparse sequences: [layers, k] positions each layer attends


def build_scenario(cache: KVCache, kinds, g: torch.Generator, heads: int = HEADS) -> Scenario:
    """Sequences of the given kinds, (cached prefix, new queries[, "sparse"]), their prefixes written to scattered pages."""
    ps = cache.page_size
    layers, _, kv_heads, d = cache.k.shape
    sc = Scenario([], [], [], [], [])
    free_pages = torch.randperm(cache.allocator.num_pages, generator=g).tolist()  # scattered, not contiguous
    for kind in kinds:
        prefix, nq = kind[0], kind[1]
        total = prefix + nq
        pages = [free_pages.pop() for _ in range(-(-total // ps))]

        def slot(p: int) -> int:
            return pages[p // ps] * ps + p % ps

        k = torch.randn(layers, total, kv_heads, d, generator=g).to(cache.k.dtype)
        v = torch.randn(layers, total, kv_heads, d, generator=g).to(cache.k.dtype)
        slots = torch.tensor([slot(p) for p in range(prefix)], dtype=torch.long)
        cache.k[:, slots.to(cache.k.device)] = k[:, :prefix].to(cache.k.device)  # written by earlier steps
        cache.v[:, slots.to(cache.k.device)] = v[:, :prefix].to(cache.k.device)
        positions, sparse = None, None
        if len(kind) == 3:  # a chain of nq drafts, each layer attending a random subset of the prefix, plus the new tokens
            chosen = torch.stack([torch.randperm(prefix, generator=g)[: prefix // 3] for _ in range(layers)])
            positions = torch.cat([chosen, torch.arange(prefix, total).expand(layers, -1)], dim=1)
            selected = chosen.clone().apply_(slot).to(device=cache.k.device, dtype=torch.int32)
            sparse = SparseKV(selected, prefix - 1, [slot(p) for p in range(prefix, total)])
        sc.kv_positions.append(positions)
        sc.seqs.append(SequenceAttention(1 if sparse else nq, prefix, pages, sparse))
        sc.dense_k.append(k)
        sc.dense_v.append(v)
        sc.new_q.append(torch.randn(layers, nq, heads, d, generator=g).to(cache.k.dtype))
    return sc


def run_chain_and_compare(backend, sc: Scenario, steps: int, atol: float, rtol: float) -> None:
    """A chain of drafts: after next_draft(), every sequence's query sits one position on and attends one more recent slot."""
    dev = backend.cache.k.device
    shape = backend.plan(sc.seqs)
    pad = 0 if shape is None else shape.num_tokens - len(sc.seqs)
    for j in range(steps):
        if j:
            backend.next_draft()
        def padded(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x, torch.randn(pad, *x.shape[1:], dtype=x.dtype)]).to(dev)

        for layer in range(backend.cache.k.shape[0]):
            q = padded(torch.stack([x[layer, j] for x in sc.new_q]))
            k = padded(torch.stack([x[layer, s.start_pos + j] for x, s in zip(sc.dense_k, sc.seqs)]))
            v = padded(torch.stack([x[layer, s.start_pos + j] for x, s in zip(sc.dense_v, sc.seqs)]))
            dest = backend.kv_write(layer)
            write_kv(k, v, dest.k_cache, dest.v_cache, dest.slots)
            out = backend(layer, q)
            for i, s in enumerate(sc.seqs):
                pos = s.start_pos + j
                kv_pos = sc.kv_positions[i][layer]
                kv_pos = kv_pos[kv_pos <= pos]
                ref = _dense(sc.new_q[i][layer, j : j + 1].float(), sc.dense_k[i][layer].float(),
                             sc.dense_v[i][layer].float(), torch.tensor([pos]), kv_pos)
                torch.testing.assert_close(out[i : i + 1].float().cpu(), ref, atol=atol, rtol=rtol)


def run_and_compare(backend, sc: Scenario, atol: float, rtol: float) -> None:
    """Plan, run every layer, and compare each sequence's output with dense attention in float32."""
    dev = backend.cache.k.device
    shape = backend.plan(sc.seqs)
    real = sum(s.num_query for s in sc.seqs)
    pad = 0 if shape is None else shape.num_tokens - real  # a CUDA-graph plan: padding rows, as the runner adds

    def padded(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.randn(pad, *x.shape[1:], dtype=x.dtype)]).to(dev)

    for layer in range(backend.cache.k.shape[0]):
        q = padded(torch.cat([x[layer] for x in sc.new_q]))
        k = padded(torch.cat([x[layer, s.start_pos :] for x, s in zip(sc.dense_k, sc.seqs)]))
        v = padded(torch.cat([x[layer, s.start_pos :] for x, s in zip(sc.dense_v, sc.seqs)]))
        dest = backend.kv_write(layer)
        write_kv(k, v, dest.k_cache, dest.v_cache, dest.slots)
        out = backend(layer, q)[:real].float().cpu().split([s.num_query for s in sc.seqs])
        for i, s in enumerate(sc.seqs):
            q_pos = torch.arange(s.start_pos, s.end_pos)
            kv_pos = torch.arange(s.end_pos) if sc.kv_positions[i] is None else sc.kv_positions[i][layer]
            ref = _dense(sc.new_q[i][layer].float(), sc.dense_k[i][layer].float(), sc.dense_v[i][layer].float(), q_pos, kv_pos)
            torch.testing.assert_close(out[i], ref, atol=atol, rtol=rtol)


FULL_KINDS = [(0, 37), (29, 20), (50, 1), (17, 5)]  # fresh prefill, continued prefill chunk, decode, verify
SPARSE_KINDS = [(40, 1, "sparse"), (33, 1, "sparse"), (300, 1, "sparse")]


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_matches_dense_for_prefill_decode_verify_and_sparse(page_size, seed):
    g = torch.Generator().manual_seed(seed)
    cache = make_cache(page_size)
    sc = build_scenario(cache, FULL_KINDS + SPARSE_KINDS, g)
    run_and_compare(TorchAttentionBackend(cache, DIM**-0.5), sc, atol=1e-5, rtol=1e-5)


CHAIN_KINDS = [(40, 4, "sparse"), (33, 4, "sparse"), (300, 4, "sparse"), (5, 4, "sparse")]


@pytest.mark.parametrize("page_size", [1, 16])
def test_draft_chain_matches_dense(page_size):
    """Four chained drafts per sequence: each attends its selection and every position since the anchor, itself included."""
    cache = make_cache(page_size)
    sc = build_scenario(cache, CHAIN_KINDS, torch.Generator().manual_seed(3))
    run_chain_and_compare(TorchAttentionBackend(cache, DIM**-0.5), sc, 4, atol=1e-5, rtol=1e-5)


def _gpu_cache(page_size: int = 16) -> KVCache:
    """The default model's attention shape (9 query heads, 3 KV heads, head_dim 64) in bf16 on CUDA."""
    return make_cache(page_size, torch.bfloat16, "cuda", num_pages=4096, heads=9, kv_heads=3, dim=64)


def _flashinfer(cache: KVCache, graphs: bool, triton_programs_per_sm: tuple[float, float] | None = None):
    from specattn.engine.flashinfer_attention import FlashInferAttentionBackend

    return FlashInferAttentionBackend(
        cache, 64**-0.5, 9, max_batch=8, max_query_len=5, max_draft_selected=1000, max_draft_recent=40,
        needs_scores=True, graphs=graphs, triton_programs_per_sm=triton_programs_per_sm,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-buffers"])
@pytest.mark.parametrize(
    "kinds",
    [FULL_KINDS, [(3000, 5), (40, 5), (600, 5)], [(50, 1), (3000, 1), (7, 1), (1, 1), (900, 1)],
     [(40, 1, "sparse"), (2000, 1, "sparse"), (700, 1, "sparse")]],
    ids=["prefill-mixed", "verify", "decode", "drafts"],
)
def test_gpu_flashinfer_matches_dense(kinds, graphs):
    """Every plan kind, eager and through the fixed buffers of a CUDA-graph shape (padded with scratch sequences)."""
    cache = _gpu_cache()
    sc = build_scenario(cache, kinds, torch.Generator().manual_seed(11), heads=9)
    backend = _flashinfer(cache, graphs)
    run_and_compare(backend, sc, atol=3e-2, rtol=3e-2)
    assert (backend.plan(sc.seqs) is not None) == (graphs and kinds is not FULL_KINDS)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kinds,scored,triton_everywhere",
    [([(3000, 5), (40, 1), (600, 3), (0, 50)], {0: (0, 4), 2: (0, 2), 3: (49,)}, False),  # eager prefill path
     ([(3000, 5), (40, 5), (600, 5), (77, 5)], {0: (0, 4), 1: (0, 4), 3: (0, 4)}, False),  # a verify graph shape
     ([(3000, 5), (40, 5), (600, 5)], {0: (0, 4), 1: (3, 3)}, True),  # ... on our kernel (one padding sequence)
     ([(3000, 1), (40, 1), (600, 1)], {0: (0,), 2: (0,)}, True)],  # a scored decode on our kernel
    ids=["mixed", "verify", "verify-triton", "scored-decode-triton"],
)
def test_gpu_flashinfer_scores_and_slots_equal_torch_backend(kinds, scored, triton_everywhere):
    """Verification through FlashInfer + the score kernel, or through our kernel that keeps them in its pass, extracts the torch backend's
    scores, and maps positions to the same slots."""
    cache = _gpu_cache()
    sc = build_scenario(cache, kinds, torch.Generator().manual_seed(12), heads=9)
    for i, rows in scored.items():  # a verification scores its first and last row; a prefill's last chunk one row
        s = sc.seqs[i]
        s.score_rows, s.score_len = rows, s.start_pos + rows[0] + 1
    positions = torch.randint(0, 40, (LAYERS, len(scored), 20), device="cuda")
    results = []
    flashinfer = _flashinfer(cache, graphs=True, triton_programs_per_sm=(0, math.inf) if triton_everywhere else None)
    for backend in (TorchAttentionBackend(cache, 64**-0.5), flashinfer):
        run_and_compare(backend, sc, atol=3e-2, rtol=3e-2)
        scores = backend.take_scores()
        results.append((scores, backend.slots_of(scores.seqs, positions).long()))
    (ref, ref_slots), (got, got_slots) = results
    assert got.seqs == ref.seqs == sorted(scored) and got.lengths == ref.lengths
    torch.testing.assert_close(got.scores, ref.scores.float(), atol=2e-4, rtol=3e-2)
    assert torch.equal(got_slots, ref_slots)
    assert (flashinfer._plan.triton is not None) == triton_everywhere


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-buffers"])
def test_gpu_draft_chain_matches_dense(graphs):
    """The Triton draft kernel over the FlashInfer backend's draft buffers, advanced on the device by next_draft()."""
    cache = _gpu_cache()
    sc = build_scenario(cache, [(2000, 4, "sparse"), (40, 4, "sparse"), (700, 4, "sparse")], torch.Generator().manual_seed(13), heads=9)
    run_chain_and_compare(_flashinfer(cache, graphs), sc, 4, atol=3e-2, rtol=3e-2)


def test_our_attention_kernel_runs_where_it_has_two_to_three_programs_per_sm():
    """The graph buckets on our Triton kernel: those whose every batch gives it 2-3 programs per SM. On the H200
    (132 SMs) with the default model's 3 KV heads, the bucket of 128 (batches 97-128: it measured faster than
    FlashInfer at 96 and 128, docs/perf-notes.md entry 28), not 96 (it holds 65-96: at 64 it was slower)."""
    pytest.importorskip("triton")
    from specattn.engine.flashinfer_attention import GRAPH_BATCHES, runs_triton_attention

    def chosen(kv_heads: int, window=None, page_size: int = 16) -> list[int]:
        kw = {} if window is None else dict(programs_per_sm=window)
        return [b for prev, b in zip((0, *GRAPH_BATCHES), GRAPH_BATCHES)
                if runs_triton_attention(prev + 1, b, kv_heads, 132, page_size, **kw)]

    assert chosen(3) == [128]
    assert chosen(3, page_size=24) == chosen(3, page_size=256) == []  # its blocks would not be whole pages
    assert chosen(8) == [48]  # batches 33-48
    assert chosen(3, (0, -1)) == []  # the A/B script's "off"
    assert chosen(3, (0, math.inf)) == list(GRAPH_BATCHES)  # the tests' "everywhere"
