"""Candidate critical-token selection kernel (perf-notes 59; not the engine's yet: built and checked on the CPU, to be
timed on the H200 against kernels/radix_select.py with `python3 scripts/select_kernel_probe.py --other
scripts/radix_select_digits.py`). The same function as `kernels.radix_select`, with the k-th largest score found by a
radix select over the float's order-preserving 32-bit key, five bits at a time (seven histograms of the row's
candidates, held in registers up to 16k positions), where the engine's kernel runs a 33-pass bitwise search, each
pass ending in a reduction across the program. Then the same ordered pass writes the positions above the k-th score
and the first of those equal to it. tests/test_kernels.py checks it against the torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _key_of_float(x):
    """The float32's order-preserving key, unsigned in an int64: negatives' bits inverted, non-negatives' sign bit set."""
    bits = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return tl.where(bits >= 2147483648, 4294967295 - bits, bits + 2147483648)


@triton.jit
def _float_of_key(key):
    """The float32 whose order-preserving key is `key`; keys beyond -inf's and +inf's (NaN bit patterns) read as that
    infinity (the search lands below -inf's key only where a row has fewer than k scores: then it takes them all)."""
    key = tl.minimum(tl.maximum(key, 0x7FFFFF), 0xFF800000)
    bits = tl.where(key >= 2147483648, key - 2147483648, 4294967295 - key)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _digit_histogram(x, prefix, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """Counts of the next digit (key bits SHIFT..SHIFT+BITS-1) over the scores whose higher key bits equal prefix;
    NaNs (what masked lanes load) never count."""
    key = _key_of_float(x)
    candidate = (x == x) & ((key >> (SHIFT + BITS)) == prefix)
    digit = ((key >> SHIFT) & ((1 << BITS) - 1)).to(tl.int32)
    return tl.histogram(digit, 32, mask=candidate)


@triton.jit
def _next_digit(histogram, prefix, above, k, BITS: tl.constexpr):
    """Extend the k-th largest key's prefix by one digit: the largest digit with at least k scores at or above it
    (`above`: those above the prefix); `above` then counts those above the longer prefix."""
    digits = tl.arange(0, 32)
    at_or_above = tl.sum(histogram, axis=0) - tl.cumsum(histogram, axis=0) + histogram
    digit = tl.maximum(tl.sum((above + at_or_above >= k).to(tl.int32), axis=0) - 1, 0)
    above += tl.sum(tl.where(digits > digit, histogram, 0), axis=0)
    return prefix * (1 << BITS) + digit, above


@triton.jit
def _search_pass(scores, row, width, prefix, above, k, SHIFT: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr,
                 ROW_IN_REGISTERS: tl.constexpr):
    if ROW_IN_REGISTERS:
        histogram = _digit_histogram(row, prefix, SHIFT, BITS)
    else:
        offs = tl.arange(0, BLOCK)
        histogram = tl.zeros([32], dtype=tl.int32)
        for start in range(0, width, BLOCK):
            x = tl.load(scores + start + offs, mask=start + offs < width, other=float("nan"))
            histogram += _digit_histogram(x, prefix, SHIFT, BITS)
    return _next_digit(histogram, prefix, above, k, BITS)


# the row width and the batch change every step: no per-value specialization, so nothing recompiles mid-run
@triton.jit(do_not_specialize=["num_seqs", "width", "out_width"])
def _select_kernel(
    scores_ptr, budgets_ptr, out_ptr, num_seqs, width, out_width, BLOCK: tl.constexpr, ROW_IN_REGISTERS: tl.constexpr
):
    """Program (layer, sequence) row: out[row, :k] = its k best positions ascending (ties: lowest first), then width.
    ROW_IN_REGISTERS (width <= BLOCK): the search's passes read registers instead of the row."""
    row_index = tl.program_id(0).to(tl.int64)
    k = tl.load(budgets_ptr + row_index % num_seqs)
    scores = scores_ptr + row_index * width
    offs = tl.arange(0, BLOCK)
    if ROW_IN_REGISTERS:
        row = tl.load(scores + offs, mask=offs < width, other=float("nan"))
    else:
        row = 0.0  # not read: each pass loads the row
    # the k-th largest key, five bits at a time from the top (32 = 6 × 5 + 2)
    prefix = tl.zeros((), dtype=tl.int64)
    above = tl.zeros((), dtype=tl.int32)
    for shift in tl.static_range(27, 1, -5):
        prefix, above = _search_pass(scores, row, width, prefix, above, k, shift, 5, BLOCK, ROW_IN_REGISTERS)
    prefix, above = _search_pass(scores, row, width, prefix, above, k, 0, 2, BLOCK, ROW_IN_REGISTERS)
    threshold = _float_of_key(prefix)
    # what the final pass takes by value: above the threshold, then ties (equal floats: -0.0 ties 0.0) in order
    if ROW_IN_REGISTERS:
        above = tl.sum((row > threshold).to(tl.int32), axis=0)
    else:
        above = tl.zeros((), dtype=tl.int32)
        for start in range(0, width, BLOCK):
            x = tl.load(scores + start + offs, mask=start + offs < width, other=float("nan"))
            above += tl.sum((x > threshold).to(tl.int32), axis=0)
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
