"""Triton verification attention with the SpecAttn scores taken in the same pass over K.

Each sequence's last `q_len` tokens attend causally to its paged cache (a verification of γ drafts, or
a decode when q_len is 1). When a sequence is scored, the same program also keeps its two scored rows'
logits per cache slot while it streams K for the attention, and at the end their log-sum-exps; a second,
small kernel then turns them into weights, summed over the rows and the query heads of each KV head, per
cache slot. That replaces the separate score kernel's second read of K (384 bytes per position and layer)
with a write and a read of six float16 logits per KV head (2 rows × 3 query heads for the default model). The
weights are a kernel of their own because inside the attention program the read-back ran after its pass
over K, serially, at one program per (sequence, KV head); on its own it spreads over the positions too.
One attention program per (sequence, KV head) and no split of the context: it needs two to three programs
per SM, where it reads the cache faster than FlashInfer (on the H200, 88 % of copy bandwidth at 128 × 8k
against 78–81 %); with fewer the GPU is not full, with more the second wave runs uneven, and the engine
runs FlashInfer there (`engine/flashinfer_attention.py`).

The torch functions of the same math are `kernels.reference.verification_attention` and
`kernels.reference.verification_scores`; tests compare them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from specattn.kernels.paging import whole_page_slots

# tl.dot needs tiles of at least 16 rows
_MIN_ROW_TILE = 16
# positions per block of the attention's pass over K (the default block_n); the kernels store and load a block's
# slots as runs of whole pages, so a page size must divide it
BLOCK_N = 128


def serves_page_size(page_size: int) -> bool:
    """Whether the kernels' default blocks are whole pages of this size (page sizes 1, 2, 4, …, 128)."""
    return BLOCK_N % page_size == 0


@dataclass
class SlotScores:
    """Where `verify_attention` keeps scored rows' weights: per cache slot, so a graph's buffers fit every context.

    rows: [S, 2] int32 query index (0 … q_len − 1) of each sequence's two scored rows;
    lengths: [S] int32 scored positions [0, length) (0: the sequence is not scored);
    logits: [kv_heads, 2 · group, slots] float32 or float16 scratch (the engine's is float16: a base-2 logit of
    magnitude L keeps up to L · 2⁻¹¹ of absolute error, its weight up to ln 2 times that relative error, 1 % at
    L ≈ 30 (q·k/√d ≈ 20), which the selection's ranking tolerates);
    lse: [S, kv_heads, 2 · group] float32 scratch (each stored row's base-2 log-sum-exp);
    out: [kv_heads, slots] float32, the sum of the scored rows' weights over the query heads of each KV head, written
    at the scored positions' slots.
    """

    rows: torch.Tensor
    lengths: torch.Tensor
    logits: torch.Tensor
    lse: torch.Tensor
    out: torch.Tensor


@triton.jit(do_not_specialize=["num_slots"])
def _verify_attention_kernel(
    q_ptr,  # [S · Q_LEN, heads, head_dim]: sequence s's queries are tokens s · Q_LEN …
    k_ptr,  # [slots, kv_heads, head_dim]
    v_ptr,
    out_ptr,  # [S · Q_LEN, heads, head_dim] contiguous
    page_indptr_ptr,  # [S + 1] where each sequence's pages start in page_indices
    page_indices_ptr,  # pages of every sequence, each in position order
    kv_lens_ptr,  # [S] positions [0, kv_len) attended; the queries sit at the last Q_LEN of them
    score_rows_ptr,  # [S, 2] int32 (SCORING)
    score_lens_ptr,  # [S] int32 (SCORING)
    logits_ptr,  # [kv_heads, 2 · GROUP, num_slots] float32 or float16 (SCORING)
    lse_ptr,  # [S, kv_heads, 2 · GROUP] float32 (SCORING)
    num_slots,
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    scale_log2,
    Q_LEN: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROW_TILE: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STORE_SPLITS: tl.constexpr,
    SCORING: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    kv_len = tl.load(kv_lens_ptr + seq)
    kv_pages = tl.cdiv(kv_len, PAGE_SIZE)
    page_start = tl.load(page_indptr_ptr + seq)
    offs_d = tl.arange(0, HEAD_DIM)
    # whole pages: a row of the scratch starts page-aligned. Said as a hint, which Triton may drop for an argument
    # it does not specialize; said as arithmetic (num_slots // PAGE_SIZE * PAGE_SIZE) the compiler vectorizes the
    # float16 stores, and that measured slower on the H200 (285 against 266 µs a layer at 128 × 8k)
    num_slots = tl.multiple_of(num_slots, PAGE_SIZE)

    # tile row r: query q_idx of slot r // GROUP, head kv_head · GROUP + r % GROUP; the slots hold the queries in
    # order, but when scoring the scored ones come first (below)
    offs_r = tl.arange(0, ROW_TILE)
    r_valid = offs_r < Q_LEN * GROUP
    q_idx = offs_r // GROUP
    score_len = 0
    if SCORING:
        # query `first` takes slot 0 and `second` slot 1 (unless it is `first`), by two swaps: `first` with slot 0,
        # then slot 1 with the slot `second` is at after that (`second_at`). Their rows, tile rows 0 … 2 · GROUP − 1,
        # are then scratch rows 0 … 2 · GROUP − 1 (a row scored twice is stored once, as `first`): the tile's top rows
        score_len = tl.load(score_lens_ptr + seq)
        score_pages = tl.cdiv(score_len, PAGE_SIZE)
        first = tl.load(score_rows_ptr + seq * 2)
        second = tl.load(score_rows_ptr + seq * 2 + 1)
        second_at = tl.where(second == first, 1, tl.where(second == 0, first, second))
        q_idx = tl.where(q_idx == 1, second_at, tl.where(q_idx == second_at, 1, q_idx))
        q_idx = tl.where(q_idx == 0, first, tl.where(q_idx == first, 0, q_idx))
        stored_rows = tl.where(second == first, GROUP, 2 * GROUP)
        offs_w = tl.arange(0, ROW_TILE >> STORE_SPLITS)
        scratch_rows = logits_ptr + (kv_head * 2 * GROUP + offs_w).to(tl.int64) * num_slots
    heads = kv_head * GROUP + offs_r % GROUP
    tokens = seq.to(tl.int64) * Q_LEN + q_idx
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=r_valid[:, None], other=0.0)
    row_pos = kv_len - Q_LEN + q_idx
    m = tl.full([ROW_TILE], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([ROW_TILE], dtype=tl.float32)
    acc = tl.zeros([ROW_TILE, HEAD_DIM], dtype=tl.float32)

    for start in range(0, kv_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_len
        slot = whole_page_slots(page_indices_ptr, page_start, offs_n, kv_pages, PAGE_SIZE)
        k = tl.load(k_ptr + slot[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :],
                    mask=n_valid[:, None], other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        # every row attends position 0, so no row's running max stays -inf
        logits = tl.where(offs_n[None, :] <= row_pos[:, None], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        p = tl.exp2(logits - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + slot[:, None] * stride_vs + kv_head * stride_vh + offs_d[None, :],
                    mask=n_valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
        if SCORING:
            # the tile's top rows, halved off it STORE_SPLITS times: the store then handles only those, not the whole
            # tile with most rows masked off (266 against 271 µs a layer at 128 × 8k on the H200)
            top = logits
            for _ in tl.static_range(STORE_SPLITS):
                top = tl.split(tl.permute(tl.reshape(top, [2, top.shape[0] // 2, BLOCK_N]), [1, 2, 0]))[0]
            # no branch on score_len here: control flow in the loop costs the software pipelining of the K/V loads.
            # Whole pages are stored (the scored span's last page past its end too, never read): a mask constant over
            # each page measured faster than one cut at the span's end (perf-notes 41)
            tl.store(scratch_rows[:, None] + slot[None, :], top.to(logits_ptr.dtype.element_ty),
                     mask=(offs_w < stored_rows)[:, None] & (offs_n // PAGE_SIZE < score_pages)[None, :])

    out = acc / denom[:, None]
    tl.store(out_ptr + (tokens[:, None] * tl.num_programs(1) * GROUP + heads[:, None]) * HEAD_DIM + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=r_valid[:, None])

    if SCORING:
        # each stored row's log-sum-exp: the stored rows are the tile's top rows
        tl.store(lse_ptr + (seq.to(tl.int64) * tl.num_programs(1) + kv_head) * 2 * GROUP + offs_r, m + tl.log2(denom),
                 mask=offs_r < stored_rows)


@triton.jit(do_not_specialize=["num_slots"])
def _slot_weights_kernel(
    page_indptr_ptr,
    page_indices_ptr,
    score_rows_ptr,  # [S, 2] int32
    score_lens_ptr,  # [S] int32
    logits_ptr,  # [kv_heads, 2 · GROUP, num_slots] float32 or float16, as the attention kernel stored them
    lse_ptr,  # [S, kv_heads, 2 · GROUP] float32
    slot_scores_ptr,  # [kv_heads, num_slots] float32
    num_slots,
    GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    WEIGHT_ROWS: tl.constexpr,
    WEIGHT_BLOCK: tl.constexpr,
):
    """Program (sequence, KV head, chunk) sums the stored rows' weights over blocks chunk, chunk + chunks, … of the scored span."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    chunk = tl.program_id(2)
    score_len = tl.load(score_lens_ptr + seq)
    score_pages = tl.cdiv(score_len, PAGE_SIZE)
    page_start = tl.load(page_indptr_ptr + seq)
    num_slots = tl.multiple_of(num_slots, PAGE_SIZE)  # as in the attention kernel
    first = tl.load(score_rows_ptr + seq * 2)
    second = tl.load(score_rows_ptr + seq * 2 + 1)
    offs_w = tl.arange(0, WEIGHT_ROWS)
    # a row scored twice was stored once (the first query's rows, and their log-sum-exps): read those twice, as its
    # weights count twice
    w_valid = offs_w < 2 * GROUP
    w_row = tl.where((offs_w >= GROUP) & (first != second), GROUP, 0) + offs_w % GROUP
    weight_rows = logits_ptr + (kv_head * 2 * GROUP + w_row).to(tl.int64) * num_slots
    w_lse = tl.load(lse_ptr + (seq.to(tl.int64) * tl.num_programs(1) + kv_head) * 2 * GROUP + w_row,
                    mask=w_valid, other=0.0)
    for start in range(chunk * WEIGHT_BLOCK, score_len, tl.num_programs(2) * WEIGHT_BLOCK):
        offs_n = start + tl.arange(0, WEIGHT_BLOCK)
        # whole pages, as the attention kernel stored them: the weights past the scored
        # span in its last page land in the sequence's own slots, which nothing reads
        n_valid = offs_n // PAGE_SIZE < score_pages
        slot = whole_page_slots(page_indices_ptr, page_start, offs_n, score_pages, PAGE_SIZE)
        # past a row's own position the stored logit is the attention tile's -inf: no causal mask needed here
        s_logits = tl.load(weight_rows[:, None] + slot[None, :], mask=w_valid[:, None] & n_valid[None, :],
                           other=float("-inf")).to(tl.float32)
        weights = tl.sum(tl.exp2(s_logits - w_lse[:, None]), axis=0)
        tl.store(slot_scores_ptr + kv_head.to(tl.int64) * num_slots + slot, weights, mask=n_valid)


def verify_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_indptr: torch.Tensor,
    page_indices: torch.Tensor,
    kv_lens: torch.Tensor,
    q_len: int,
    page_size: int,
    scale: float,
    scores: SlotScores | None = None,
    block_n: int = BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 2,
    weight_block: int = 512,
    weight_chunks: int = 8,
) -> torch.Tensor:
    """Causal attention of each sequence's last q_len positions over positions [0, kv_lens[s]) of its pages.

    q: [S · q_len, heads, d] (sequence s's queries at rows s · q_len …); k_cache, v_cache: [slots, kv_heads, d];
    page_indptr: [S + 1], page_indices: int32 pages in position order; kv_lens: [S] int32 (≥ q_len).
    scores: where the scored rows' weights go (see SlotScores); weight_chunks: programs per (sequence, KV head)
    that turn them into weights. Returns [S · q_len, heads, d] in q's dtype.
    """
    tokens, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    num_seqs = tokens // q_len
    assert tokens == num_seqs * q_len and heads == group * kv_heads, "q_len queries per sequence, GQA groups"
    assert head_dim == triton.next_power_of_2(head_dim) and q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    assert block_n % page_size == 0 and weight_block % page_size == 0 and k_cache.shape[0] % page_size == 0, "whole pages"
    out = torch.empty(tokens, heads, head_dim, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    row_tile = max(_MIN_ROW_TILE, triton.next_power_of_2(q_len * group))
    weight_rows = triton.next_power_of_2(2 * group)
    # the in-loop store of the scored rows takes the tile's top rows, halving the tile while a half is rows that
    # each thread holds: tl.dot's accumulator keeps rows r, r + 8, r + 16, … in one thread in tiles of up to 32
    # rows (mma.sync, 4 warps), while rows r … r + 7 are lanes, and from 64 rows (Hopper's wgmma) rows 16 apart
    # are warps: a split across those moves the float32 tile through shared memory, costlier than the whole
    # tile's store
    store_rows = min(max(8, weight_rows), row_tile) if row_tile <= 32 else row_tile
    if scores is not None:
        assert scores.logits.shape[:2] == (kv_heads, 2 * group) and scores.out.shape[0] == kv_heads
        assert scores.logits.shape[2] == scores.out.shape[1] == k_cache.shape[0] and scores.out.is_contiguous()
        assert scores.logits.is_contiguous() and scores.rows.is_contiguous() and scores.lse.is_contiguous()
        assert scores.logits.dtype in (torch.float32, torch.float16), "float16 keeps the logits' range; bfloat16 not their precision"
        assert scores.lse.shape[0] >= num_seqs and scores.lse.shape[1:] == (kv_heads, 2 * group)
        args = (scores.rows, scores.lengths, scores.logits, scores.lse)
    else:
        args = (kv_lens, kv_lens, out, out)  # never read: SCORING is off
    _verify_attention_kernel[(num_seqs, kv_heads)](
        q, k_cache, v_cache, out, page_indptr, page_indices, kv_lens, *args, k_cache.shape[0],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        scale * math.log2(math.e),
        Q_LEN=q_len, GROUP=group, HEAD_DIM=head_dim,
        ROW_TILE=row_tile, PAGE_SIZE=page_size, BLOCK_N=block_n, SCORING=scores is not None,
        STORE_SPLITS=(row_tile // store_rows).bit_length() - 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if scores is not None:
        _slot_weights_kernel[(num_seqs, kv_heads, weight_chunks)](
            page_indptr, page_indices, scores.rows, scores.lengths, scores.logits, scores.lse, scores.out, k_cache.shape[0],
            GROUP=group, PAGE_SIZE=page_size, WEIGHT_ROWS=weight_rows, WEIGHT_BLOCK=weight_block,
        )
    return out
