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
def whole_page_slots(page_indices_ptr, page_start, positions, num_pages, PAGE_SIZE: tl.constexpr):
    """`paged_slots` of page-aligned positions, valid by whole pages (those of the sequence's first num_pages pages,
    its last page's slots past its length included: they are its own), declared to the compiler as what paging
    makes them — runs of PAGE_SIZE consecutive slots starting at multiples of PAGE_SIZE — so that loads and stores
    along them, masked by whole pages, go out as vectors."""
    slots = paged_slots(page_indices_ptr, page_start, positions, positions // PAGE_SIZE < num_pages, PAGE_SIZE)
    return tl.max_contiguous(tl.multiple_of(slots, PAGE_SIZE), PAGE_SIZE)
