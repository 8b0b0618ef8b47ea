"""The paged KV cache: page memory for every layer and the allocator that hands pages to sequences."""

from __future__ import annotations

import torch

from .config import CacheConfig, ModelConfig


def slot_of(page_table: list[int], position: int, page_size: int) -> int:
    """The cache slot that holds a sequence's token at this position."""
    return page_table[position // page_size] * page_size + position % page_size


class PageAllocator:
    """Fixed-size pages from a free list; every page is either free or owned by exactly one sequence."""

    def __init__(self, num_pages: int, page_size: int):
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low page ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_pages

    def pages_needed(self, pages: list[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.page_size) - len(pages))

    def grow(self, pages: list[int], num_tokens: int) -> bool:
        """Extend a page table in place to hold num_tokens; False (and no change) if pages are short."""
        need = self.pages_needed(pages, num_tokens)
        if need > len(self._free):
            return False
        pages.extend(self._free.pop() for _ in range(need))
        return True

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
        pages.clear()


class KVCache:
    """K and V for all layers as [layers, pages * page_size, kv_heads, head_dim] (NHD; page p holds slots p*ps..).

    One page past the allocator's is scratch: padding rows of a CUDA-graph batch write and read there.
    """

    def __init__(self, model: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: str):
        self.scratch_page = cache.num_pages
        shape = (model.num_layers, (cache.num_pages + 1) * cache.page_size, model.num_kv_heads, model.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size = cache.page_size
        self.allocator = PageAllocator(cache.num_pages, cache.page_size)
