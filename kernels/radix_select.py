"""Triton critical-token selection: every (layer, sequence) row's k highest scores, as positions in increasing order.

One launch for a whole step's rows, where torch needs a top-k (several launches) and a sort: each program finds its
row's k-th largest score by a binary search over the float's order-preserving bits (32 counting passes over the row,
held in registers up to 16k positions), then writes the positions above it, and the first of those equal to it, in
one ordered pass. The torch function of the same math is `kernels.selection.select_critical_tokens_torch`; tests
compare the two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _float_of_key(key):
    """The float32 whose order-preserving key (unsigned, in an int64) is `key`: negatives' bits were inverted,
    non-negatives' had the sign bit set. Keys beyond -inf's and +inf's (NaN bit patterns) read as that infinity, so
    the count of scores >= the threshold falls monotonically with the key, as the search needs."""
    key = tl.minimum(tl.maximum(key, 0x7FFFFF), 0xFF800000)
    bits = tl.where(key >= 2147483648, key - 2147483648, 4294967295 - key)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _count_in_chunks(scores, width, threshold, BLOCK: tl.constexpr, STRICT: tl.constexpr):
    """How many of the row's scores are >= threshold (> where STRICT), reading the row a block at a time."""
    offs = tl.arange(0, BLOCK)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, width, BLOCK):
        x = tl.load(scores + start + offs, mask=start + offs < width, other=float("nan"))
        count += ((x > threshold) if STRICT else (x >= threshold)).to(tl.int32)
    return tl.sum(count, axis=0)


# the row width and the batch change every step: no per-value specialization, so nothing recompiles mid-run
@triton.jit(do_not_specialize=["num_seqs", "width", "out_width"])
def _select_kernel(
    scores_ptr, budgets_ptr, out_ptr, num_seqs, width, out_width, BLOCK: tl.constexpr, ROW_IN_REGISTERS: tl.constexpr
):
    """Program (layer, sequence) row: out[row, :k] = its k best positions ascending (ties: lowest first), then width.
    ROW_IN_REGISTERS (width <= BLOCK): the search's 33 passes count over registers instead of re-reading the row."""
    row_index = tl.program_id(0).to(tl.int64)
    k = tl.load(budgets_ptr + row_index % num_seqs)
    scores = scores_ptr + row_index * width
    offs = tl.arange(0, BLOCK)
    if ROW_IN_REGISTERS:
        row = tl.load(scores + offs, mask=offs < width, other=float("nan"))
    # the largest key T with at least k scores >= float(T) is the k-th largest score's key; bit by bit from the top
    # (NaN never counts, so masked lanes load it)
    found = tl.zeros((), dtype=tl.int64)
    for bit in tl.static_range(31, -1, -1):
        candidate = found + (1 << bit)
        threshold = _float_of_key(candidate)
        if ROW_IN_REGISTERS:
            count = tl.sum((row >= threshold).to(tl.int32), axis=0)
        else:
            count = _count_in_chunks(scores, width, threshold, BLOCK, False)
        found = tl.where(count >= k, candidate, found)
    threshold = _float_of_key(found)
    if ROW_IN_REGISTERS:
        above = tl.sum((row > threshold).to(tl.int32), axis=0)
    else:
        above = _count_in_chunks(scores, width, threshold, BLOCK, True)
    ties_taken = k - above
    out = out_ptr + row_index * out_width
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
    # padding from what was written: a row with fewer than k non-NaN scores gets padding, not stale memory
    for start in range(written // BLOCK * BLOCK, out_width, BLOCK):
        pos = start + offs
        tl.store(out + pos, tl.full([BLOCK], width, tl.int64), mask=(pos >= written) & (pos < out_width))


# Rows up to this wide are held in registers (16 warps × 32 lanes × 32 scores); wider ones are read in chunks.
MAX_REGISTER_ROW = 16384
_CHUNK, _CHUNK_WARPS = 2048, 8  # the fastest chunked shape at 8k in scripts/select_kernel_probe.py


def launch_shape(width: int) -> tuple[int, bool, int]:
    """(BLOCK, ROW_IN_REGISTERS, num_warps) for rows of this width: a power of two from 1024 holding the row, at 4
    warps up to 4096 positions, then one warp per 1024 (the fastest at 4k and 8k in the probe), or chunks of the row
    where it is too wide for registers."""
    if width > MAX_REGISTER_ROW:
        return _CHUNK, False, _CHUNK_WARPS
    block = max(1024, triton.next_power_of_2(width))
    return block, True, min(16, max(4, block // 1024))


def select_critical_tokens_triton(
    scores: torch.Tensor, budgets: torch.Tensor, out_width: int, shape: tuple[int, bool, int] | None = None
) -> torch.Tensor:
    """Per layer and sequence, the budget's highest-scoring positions in increasing order, ties to the lowest.

    scores: [layers, S, N] float32; budgets: [S] int32 on the scores' device, each in [1, N]; out_width ≥ max(budgets);
    shape: the launch shape, `launch_shape(N)` by default. Returns [layers, S, out_width] int64: row s holds its
    budgets[s] positions first, then N as padding.
    """
    layers, num_seqs, width = scores.shape
    assert scores.dtype == torch.float32 and scores.is_contiguous() and budgets.shape == (num_seqs,)
    block, in_registers, num_warps = shape or launch_shape(width)
    out = torch.empty(layers, num_seqs, out_width, dtype=torch.int64, device=scores.device)
    if out.numel():
        _select_kernel[(layers * num_seqs,)](scores, budgets, out, num_seqs, width, out_width, BLOCK=block,
                                             ROW_IN_REGISTERS=in_registers, num_warps=num_warps)
    return out


def compile_for_widths(max_width: int, device: torch.device) -> None:
    """Compile every launch shape rows up to max_width use, so that no request waits for a compile mid-run."""
    shapes = {launch_shape(2**e) for e in range(10, max(10, (max_width - 1).bit_length()) + 1)}
    one = torch.ones(1, dtype=torch.int32, device=device)
    for block, in_registers, warps in shapes:
        width = block if in_registers else max_width
        select_critical_tokens_triton(torch.zeros(1, 1, width, device=device), one, 1, (block, in_registers, warps))
