"""The paged KV cache: page memory for every layer and the allocator that hands pages to sequences."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .config import CacheConfig, ModelConfig


@dataclass
class KVWrite:
    """Where one layer's new K and V go in a forward: the layer's caches and the cache slot of each new token."""

    k_cache: torch.Tensor  # [slots, kv_heads, head_dim]
    v_cache: torch.Tensor
    slots: torch.Tensor  # [tokens] int64


def slot_of(page_table: PageTable | list[int], position: int, page_size: int) -> int:
    """The cache slot that holds a sequence's token at this position."""
    return page_table[position // page_size] * page_size + position % page_size


def token_slots(page_ids: np.ndarray, indptr: np.ndarray, starts: list[int], lengths: list[int], page_size: int) -> np.ndarray:
    """The cache slot of every token of a batch, as int64: sequence i's tokens are positions
    starts[i] + [0, lengths[i]) of the pages page_ids[indptr[i]:]. Vectorized: slot_of per token was ~0.5 ms
    of host time in a 128-request verification step."""
    counts = np.asarray(lengths)
    owner = np.repeat(np.arange(len(counts)), counts)
    pos = np.repeat(np.asarray(starts) - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
    return page_ids[indptr[owner] + pos // page_size].astype(np.int64) * page_size + pos % page_size


class PageTable:
    """A sequence's cache pages in order, twice: a Python list for single lookups (slot_of, per token) and an
    int32 array (grown by doubling) so that a step gathers the page ids of every sequence with one
    np.concatenate: iterating Python lists of 64k ids (128 sequences at 8k context) cost 1.6 ms of host time
    per step, while the GPU waited."""

    def __init__(self, pages: Iterable[int] = ()):
        self._list: list[int] = []
        self._pages = np.zeros(16, dtype=np.int32)  # its first len(self) entries are the pages
        self.extend(pages)

    @property
    def array(self) -> np.ndarray:
        """The pages as an int32 array (a view: valid until the table next grows)."""
        return self._pages[: len(self._list)]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        # a view unless asked for a copy: writing to it would part the array from the list
        return self.array.astype(dtype or self.array.dtype, copy=bool(copy))

    def __len__(self) -> int:
        return len(self._list)

    def __getitem__(self, index: int) -> int:
        return self._list[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self._list)

    def __reversed__(self) -> Iterator[int]:
        return reversed(self._list)

    def extend(self, pages: Iterable[int]) -> None:
        start = len(self._list)
        self._list.extend(pages)
        if len(self._list) > len(self._pages):
            grown = np.zeros(max(len(self._list), 2 * len(self._pages)), dtype=np.int32)
            grown[:start] = self._pages[:start]
            self._pages = grown
        self._pages[start : len(self._list)] = self._list[start:]

    def clear(self) -> None:
        self._list.clear()


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

    def pages_needed(self, pages: PageTable | list[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.page_size) - len(pages))

    def grow(self, pages: PageTable | list[int], num_tokens: int) -> bool:
        """Extend a page table in place to hold num_tokens; False (and no change) if pages are short."""
        need = self.pages_needed(pages, num_tokens)
        if need > len(self._free):
            return False
        pages.extend(self._free.pop() for _ in range(need))
        return True

    def release(self, pages: PageTable | list[int]) -> None:
        self._free.extend(reversed(pages))
        pages.clear()


def kv_bytes_per_slot(model: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one cached token's K and V take over all layers."""
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * torch.empty(0, dtype=dtype).element_size()


def pages_that_fit(budget_bytes: float, bytes_per_slot: int, page_size: int) -> int:
    """KV pages (the scratch page besides) whose slots, at bytes_per_slot each, fit in budget_bytes."""
    pages = int(budget_bytes // (bytes_per_slot * page_size)) - 1
    if pages < 1:
        raise ValueError(
            f"no GPU memory left for the KV cache ({budget_bytes / 2**30:.2f} GiB in the budget): raise "
            "--gpu-memory-utilization, free the GPU, or set --num-pages"
        )
    return pages


def gpu_kv_pages(cache: CacheConfig, bytes_per_slot: int, device: str, reserved_bytes: int = 0) -> int:
    """KV pages on a CUDA device: what cache.gpu_memory_utilization of its memory leaves beside what is in use now
    (the loaded weights, other processes) and reserved_bytes still to come, as vLLM's gpu_memory_utilization does."""
    torch.cuda.empty_cache()  # blocks cached while loading are free, not in use
    free, total = torch.cuda.mem_get_info(torch.device(device))
    budget = cache.gpu_memory_utilization * total - (total - free) - reserved_bytes
    return pages_that_fit(budget, bytes_per_slot, cache.page_size)


class KVCache:
    """K and V for all layers as [layers, pages * page_size, kv_heads, head_dim] (NHD; page p holds slots p*ps..).

    One page past the allocator's is scratch: padding rows of a CUDA-graph batch write and read there.
    """

    def __init__(self, model: ModelConfig, cache: CacheConfig, dtype: torch.dtype, device: str):
        assert cache.num_pages is not None, "the engine sizes an unset pool"
        self.scratch_page = cache.num_pages
        shape = (model.num_layers, (cache.num_pages + 1) * cache.page_size, model.num_kv_heads, model.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size = cache.page_size
        self.allocator = PageAllocator(cache.num_pages, cache.page_size)
