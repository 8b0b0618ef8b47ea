"""Triton critical-token selection: every (layer, sequence) row's k highest scores, as positions in increasing order.

One launch for a whole step's rows, where torch needs a top-k (several launches) and a sort: each program finds its
row's k-th largest score by a binary search over the float's order-preserving bits (32 counting passes over the
row, which stays in L1), then writes the positions above it, and the first of those equal to it, in one ordered
pass. The torch function of the same math is `kernels.selection.select_critical_tokens_torch`; tests compare the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _float_of_key(key):
    """The float32 whose order-preserving key (unsigned, in an int64) is `key`: negatives' bits were inverted,
    non-negatives' had the sign bit set."""
    bits = tl.where(key >= 2147483648, key - 2147483648, 4294967295 - key)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


# the row width and the batch change every step: no per-value specialization, so nothing recompiles mid-run
@triton.jit(do_not_specialize=["num_seqs", "width", "out_width"])
def _select_kernel(scores_ptr, budgets_ptr, out_ptr, num_seqs, width, out_width, BLOCK: tl.constexpr):
    """Program (layer, sequence) row: out[row, :k] = its k best positions ascending (ties: lowest first), then width."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.load(budgets_ptr + row % num_seqs)
    scores = scores_ptr + row * width
    offs = tl.arange(0, BLOCK)
    # the largest key T with at least k scores >= float(T) is the k-th largest score's key; bit by bit from the top
    # (NaN never counts: masked lanes load it, and a candidate in a NaN range is rejected, as no search needs one)
    found = tl.zeros((), dtype=tl.int64)
    for bit in tl.static_range(31, -1, -1):
        candidate = found + (1 << bit)
        threshold = _float_of_key(candidate)
        count = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, width, BLOCK):
            x = tl.load(scores + start + offs, mask=start + offs < width, other=float("nan"))
            count += (x >= threshold).to(tl.int32)
        found = tl.where(tl.sum(count, axis=0) >= k, candidate, found)
    threshold = _float_of_key(found)
    above = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, width, BLOCK):
        x = tl.load(scores + start + offs, mask=start + offs < width, other=float("nan"))
        above += (x > threshold).to(tl.int32)
    ties_taken = k - tl.sum(above, axis=0)
    out = out_ptr + row * out_width
    written = tl.zeros((), dtype=tl.int32)
    ties = tl.zeros((), dtype=tl.int32)
    for start in range(0, width, BLOCK):
        pos = start + offs
        x = tl.load(scores + pos, mask=pos < width, other=float("nan"))
        tie = x == threshold
        take = (x > threshold) | (tie & (ties + tl.cumsum(tie.to(tl.int32), axis=0) <= ties_taken))
        tl.store(out + written + tl.cumsum(take.to(tl.int32), axis=0) - 1, pos.to(tl.int64), mask=take)
        written += tl.sum(take.to(tl.int32), axis=0)
        ties += tl.sum(tie.to(tl.int32), axis=0)
    for start in range(k // BLOCK * BLOCK, out_width, BLOCK):
        pos = start + offs
        tl.store(out + pos, tl.full([BLOCK], width, tl.int64), mask=(pos >= k) & (pos < out_width))


def select_critical_tokens_triton(
    scores: torch.Tensor, budgets: torch.Tensor, out_width: int, block: int = 1024, num_warps: int = 4
) -> torch.Tensor:
    """Per layer and sequence, the budget's highest-scoring positions in increasing order, ties to the lowest.

    scores: [layers, S, N] float32; budgets: [S] int32 on the scores' device, each in [1, N]; out_width ≥ max(budgets).
    Returns [layers, S, out_width] int64: row s holds its budgets[s] positions first, then N as padding.
    """
    layers, num_seqs, width = scores.shape
    assert scores.dtype == torch.float32 and scores.is_contiguous() and budgets.shape == (num_seqs,)
    out = torch.empty(layers, num_seqs, out_width, dtype=torch.int64, device=scores.device)
    if out.numel():
        _select_kernel[(layers * num_seqs,)](scores, budgets, out, num_seqs, width, out_width, BLOCK=block,
                                             num_warps=num_warps)
    return out
