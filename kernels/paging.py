"""Triton device helpers shared by the kernels that read a sequence's positions through its page list."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_slots(page_indices_ptr, page_start, positions, valid, PAGE_SIZE: tl.constexpr):
    """Cache slots (int64) of a sequence's positions, its pages listed from page_indices_ptr + page_start; 0 where not valid."""
    page = tl.load(page_indices_ptr + page_start + positions // PAGE_SIZE, mask=valid, other=0)
    return page.to(tl.int64) * PAGE_SIZE + positions % PAGE_SIZE


@triton.jit
def page_runs(slots, PAGE_SIZE: tl.constexpr):
    """Tell the compiler what paging guarantees of the slots of page-aligned positions: runs of PAGE_SIZE consecutive
    slots starting at multiples of PAGE_SIZE, so loads and stores along them can be vectors."""
    return tl.max_contiguous(tl.multiple_of(slots, PAGE_SIZE), PAGE_SIZE)
