"""The CUDA attention backend: FlashInfer paged kernels for decode, verification and prefill; drafts over a page-size-1 view.

Same interface and results as `TorchAttentionBackend` (the reference its tests compare against), without
gathering K/V: FlashInfer reads the paged cache in place. A step is one of three plans:
- plain decode (every sequence one query, nothing scored): the decode kernel over 16-token pages;
- verification and prefill chunks (any query counts, causal): the fa2 prefill kernel, which also returns
  each row's log-sum-exp, so SpecAttn's scores need only q·K of the two scored rows (a Triton kernel);
- drafts: the decode kernel over the same K/V memory viewed as 1-token pages, whose "page" indices are
  the selected slots plus the recent ones. Indices differ per layer but their counts do not, so one
  plan() serves all layers and each layer only copies its indices into the buffer the plan points at.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from specattn.kernels.scores import verification_scores_paged

from .attention import ScoreBatch, SequenceAttention
from .kv_cache import KVCache

_WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended split-k scratch per wrapper


def _int32(values, device: torch.device | None = None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values, dtype=np.int32))
    return t if device is None else t.to(device, non_blocking=True)


class FlashInferAttentionBackend:
    def __init__(self, cache: KVCache, scale: float, num_heads: int):
        import flashinfer  # CUDA installs only (the `gpu` extra)

        self.cache = cache
        self.scale = scale
        self.num_heads = num_heads
        _, _, self.num_kv_heads, self.head_dim = cache.k.shape
        self.device = cache.k.device

        def workspace() -> torch.Tensor:
            return torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)

        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD")
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(), "NHD", backend="fa2")
        self._draft = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), "NHD")
        self._mode = "decode"
        self._slot_mapping = torch.empty(0, dtype=torch.long, device=self.device)
        self._page_indptr = torch.empty(0, dtype=torch.int32, device=self.device)
        self._page_indices = torch.empty(0, dtype=torch.int32, device=self.device)
        self._draft_slots = torch.empty(0, 0, dtype=torch.int32, device=self.device)  # [layers, nnz]
        self._draft_indices = torch.empty(0, dtype=torch.int32, device=self.device)  # what the draft plan reads
        self._scored: list[int] = []
        self._score_lengths: list[int] = []
        self._score_args: tuple[torch.Tensor, ...] = ()
        self._scores = torch.empty(0, 0, 0, device=self.device)

    def _kernel_args(self) -> dict:
        dtype = self.cache.k.dtype
        return dict(sm_scale=self.scale, q_data_type=dtype, kv_data_type=dtype)

    def plan(self, seqs: list[SequenceAttention]) -> None:
        ps = self.cache.page_size
        slot_mapping = [
            s.page_table[p // ps] * ps + p % ps for s in seqs for p in range(s.start_pos, s.end_pos)
        ]
        self._slot_mapping = torch.tensor(slot_mapping, dtype=torch.long).to(self.device, non_blocking=True)
        self._scored = []
        if seqs[0].sparse is not None:
            self._plan_drafts(seqs)
            return
        assert all(s.sparse is None for s in seqs), "a step is all drafts or all full attention"
        pages = [-(-s.end_pos // ps) for s in seqs]
        indptr = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(pages, out=indptr[1:])
        indices = np.fromiter(
            itertools.chain.from_iterable(s.page_table[:n] for s, n in zip(seqs, pages)), np.int32, count=int(indptr[-1])
        )
        last_len = _int32([s.end_pos - (n - 1) * ps for s, n in zip(seqs, pages)])
        self._page_indptr = _int32(indptr, self.device)
        self._page_indices = _int32(indices, self.device)
        dims = (self.num_heads, self.num_kv_heads, self.head_dim, ps)
        if all(s.num_query == 1 and not s.score_rows for s in seqs):
            self._mode = "decode"
            self._decode.plan(torch.from_numpy(indptr), self._page_indices, last_len, *dims, **self._kernel_args())
            return
        self._mode = "prefill"
        qo_indptr = _int32(np.cumsum([0] + [s.num_query for s in seqs]))
        self._prefill.plan(
            qo_indptr, torch.from_numpy(indptr), self._page_indices, last_len, *dims, causal=True, **self._kernel_args()
        )
        self._plan_scores(seqs, qo_indptr, indptr)

    def _plan_scores(self, seqs: list[SequenceAttention], qo_indptr: torch.Tensor, page_indptr: np.ndarray) -> None:
        self._scored = [i for i, s in enumerate(seqs) if s.score_rows]
        if not self._scored:
            return
        rows, row_pos = [], []
        for i in self._scored:
            s = seqs[i]
            r = (s.score_rows * 2)[:2]  # one scored row is given twice
            rows.append([int(qo_indptr[i]) + x for x in r])
            row_pos.append([s.start_pos + x for x in r])
        self._score_lengths = [seqs[i].score_len for i in self._scored]
        self._score_args = (
            _int32(rows, self.device),
            _int32(row_pos, self.device),
            _int32(page_indptr[self._scored], self.device),
            self._page_indices,
            _int32(self._score_lengths, self.device),
        )
        layers = self.cache.k.shape[0]
        self._scores = torch.empty(layers, len(self._scored), max(self._score_lengths), device=self.device)

    def _plan_drafts(self, seqs: list[SequenceAttention]) -> None:
        assert all(s.sparse is not None and s.num_query == 1 for s in seqs), "a step is all drafts or all full attention"
        layers = self.cache.k.shape[0]
        recent = _int32([slot for s in seqs for slot in s.sparse.recent], self.device)
        parts = []
        for s, r in zip(seqs, recent.split([len(s.sparse.recent) for s in seqs])):
            parts += [s.sparse.selected, r.expand(layers, -1)]
        self._draft_slots = torch.cat(parts, dim=1)
        counts = [s.sparse.selected.shape[1] + len(s.sparse.recent) for s in seqs]
        self._draft_indices = torch.empty(self._draft_slots.shape[1], dtype=torch.int32, device=self.device)
        self._mode = "draft"
        self._draft.plan(
            _int32(np.cumsum([0] + counts)),
            self._draft_indices,  # refilled per layer; plan() keeps this tensor, not a copy
            _int32(np.ones(len(seqs))),
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            1,
            **self._kernel_args(),
        )

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        k_cache[self._slot_mapping] = k
        v_cache[self._slot_mapping] = v
        q = q.contiguous()
        if self._mode == "draft":
            self._draft_indices.copy_(self._draft_slots[layer])
            return self._draft.run(q, (k_cache.unsqueeze(1), v_cache.unsqueeze(1)))
        paged = (
            k_cache.view(-1, self.cache.page_size, self.num_kv_heads, self.head_dim),
            v_cache.view(-1, self.cache.page_size, self.num_kv_heads, self.head_dim),
        )
        if self._mode == "decode":
            return self._decode.run(q, paged)
        if not self._scored:
            return self._prefill.run(q, paged)
        out, lse2 = self._prefill.run(q, paged, return_lse=True)
        verification_scores_paged(
            q, k_cache, lse2, *self._score_args, page_size=self.cache.page_size, scale=self.scale, out=self._scores[layer]
        )
        return out

    def take_scores(self) -> ScoreBatch | None:
        if not self._scored:
            return None
        return ScoreBatch(list(self._scored), self._scores, list(self._score_lengths))

    def slots_of(self, seqs: list[int], positions: torch.Tensor) -> torch.Tensor:
        ps = self.cache.page_size
        first_page = self._page_indptr[torch.tensor(seqs, device=self.device)]
        page = (first_page[None, :, None] + positions // ps).clamp(max=self._page_indices.shape[0] - 1)
        return (self._page_indices[page] * ps + positions % ps).to(torch.int32)
