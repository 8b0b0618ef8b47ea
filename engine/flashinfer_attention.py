"""The CUDA attention backend: FlashInfer paged kernels for decode, verification and prefill; drafts on a Triton kernel.

Same interface and results as `TorchAttentionBackend` (the reference its tests compare against), without
gathering K/V: FlashInfer reads the paged cache in place. A step is planned as one of:
- decode (every sequence one query) and verify (every sequence γ+1 queries, causal): FlashInfer's
  tensor-core decode kernel over 16-token pages; it also returns each row's log-sum-exp;
- prefill (any mix of query counts, causal): the fa2 prefill kernel, also with log-sum-exp;
- draft: a Triton kernel (`kernels.draft_attention`) reading K/V at the selected slots plus the recent
  ones. It needs no plan(): what each sequence reads sits in device tensors, and the next draft of a
  chain only counts one more recent slot (`next_draft`, on the device), so γ drafts replay one CUDA graph.
Steps whose sequences all have one query (decode, draft) or all the same few queries (verification, or a
prefill tail of that length), up to the largest batch bucket, run from fixed buffers per shape, padded
with sequences on the cache's scratch page, so the runner can capture and replay them as CUDA graphs.
Full-attention graph shapes (decode, verify) whose every batch gives our Triton kernel (`kernels.verify_attention`)
TRITON_PROGRAMS_PER_SM programs per SM run it instead of FlashInfer: there it reads the cache faster, and when
the step scores it keeps the two scored rows' weights per cache slot in the same pass over K (SpecAttn's scores
need only q·K of two rows per sequence), gathered into scores after the forward. Decode and verification use it
at the same batches. Other shapes (too few programs to fill the GPU without splitting the context, or enough for
a tail wave) and eager steps run FlashInfer, keep the scored rows' queries and log-sum-exps per layer, and one
Triton launch over all layers re-reads K for the scores.
Every host-to-device copy of a plan is non-blocking (a pageable source is staged at once, so it may be
freed): a blocking copy would make the host wait for all queued GPU work, e.g. for the draft chain
before it could plan the verification that follows it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from specattn.kernels.draft_attention import draft_splits, sparse_draft_attention
from specattn.kernels.scores import gather_slot_scores, verification_scores_paged
from specattn.kernels.verify_attention import SlotScores, serves_page_size, verify_attention

from .attention import GraphShape, ScoreBatch, SequenceAttention
from .kv_cache import KVCache, KVWrite, token_slots

_WORKSPACE_BYTES = 256 << 20  # split-k scratch, shared: wrappers run one at a time on one stream
GRAPH_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
# Full-attention graph shapes run our Triton kernel where its programs (one per sequence and KV head) number this
# many per SM: fewer leave SMs idle (it does not split the context), more run in an uneven second wave. On the H200
# (132 SMs, 3 KV heads) it beat FlashInfer at batches 96 and 128, for decode and for verification with scores, and
# lost to it for decode at ≤ 64 and ≥ 192 (docs/perf-notes.md entry 28); the engine uses it for the bucket of 128.
TRITON_PROGRAMS_PER_SM = (2.0, 3.0)


def runs_triton_attention(
    smallest: int, largest: int, kv_heads: int, num_sms: int, page_size: int,
    programs_per_sm: tuple[float, float] = TRITON_PROGRAMS_PER_SM,
) -> bool:
    """Whether a full-attention graph bucket holding batches smallest … largest runs our Triton kernel rather than
    FlashInfer: only if every batch it holds gives the kernel programs per SM inside the window (padding
    sequences cost nothing, so a bucket of 96 holding 65 sequences would run at 1.5 per SM), and the kernel's
    blocks are whole pages of the cache's page size."""
    low, high = programs_per_sm
    return serves_page_size(page_size) and low <= smallest * kv_heads / num_sms and largest * kv_heads / num_sms <= high


def _int32(values, device: torch.device | None = None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values, dtype=np.int32))
    return t if device is None else t.to(device, non_blocking=True)


class _PinnedStaging:
    """Hands int32 host arrays to the device without waiting for the stream, through one pinned host buffer that
    is reused: pinning a fresh tensor per step (`Tensor.pin_memory()`) cost up to 2.5 ms of host time in a
    128-request step at 8k, and a pageable copy of that size may wait for the work queued before it."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffer = torch.empty(0, dtype=torch.int32)
        self._copied: torch.cuda.Event | None = None  # the last copy out of the buffer

    def to_device(self, values: np.ndarray) -> torch.Tensor:
        if len(values) > len(self._buffer):
            self._buffer = torch.empty(max(len(values), 2 * len(self._buffer)), dtype=torch.int32, pin_memory=True)
        elif self._copied is not None:
            self._copied.synchronize()  # long done in practice: the engine read the step that used it
        staged = self._buffer[: len(values)]
        staged.numpy()[:] = values
        out = staged.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return out


@dataclass
class _Plan:
    """What a full-attention forward's per-layer calls read. Fixed buffers reused by every step of a graph shape, or one eager step's own."""

    wrapper: Any  # None where our kernel runs (`triton`)
    slot_mapping: torch.Tensor  # cache slot of each new token
    indices: torch.Tensor  # page indices the wrapper reads
    indptr: torch.Tensor  # [batch + 1] on the device: where each sequence's indices start
    rows: torch.Tensor | None = None  # [2 · sequences] token index of the two scored rows of each (scoring plans)
    q_rows: torch.Tensor | None = None  # [layers, sequences, 2, heads, d] written by the forward
    lse_rows: torch.Tensor | None = None  # [layers, sequences, 2, heads]
    triton: _TritonInputs | None = None  # set: our kernel runs instead of the wrapper (and keeps scores if it scores)


@dataclass
class _TritonInputs:
    """A graph shape's inputs to `verify_attention`, besides the plan's page indices and indptr."""

    query_len: int
    kv_lens: torch.Tensor  # [batch] int32 positions each sequence attends
    scores: SlotScores | None  # scoring shapes: rows and lengths per sequence (0: not scored); the shared per-slot buffers


@dataclass
class _DraftPlan:
    """What a draft forward's per-layer calls read, all on the device (fixed per graph shape, or one eager step's own)."""

    selected: torch.Tensor  # [layers, ≥ Σ k] int32: every sequence's selected slots, one after the other
    sel_indptr: torch.Tensor  # [batch + 1] int32: where each sequence's selected slots start
    recent: torch.Tensor  # [batch, width] int32: slots after each anchor, padded with the scratch slot
    counts: torch.Tensor  # [batch] int32: recent slots the current draft attends (the last is its own)
    slot_mapping: torch.Tensor  # [batch] int64: where the current draft writes its K/V (recent[counts − 1])
    splits: int  # programs that share each sequence's slots per KV head (`draft_splits`)

    def update_write_slots(self) -> None:
        self.slot_mapping.copy_(self.recent.gather(1, self.counts.long()[:, None] - 1)[:, 0])


def graph_batches(max_batch: int) -> list[int]:
    """The batch sizes whose decode-phase steps are captured as CUDA graphs, for running batches of up to max_batch."""
    return [b for b in GRAPH_BATCHES if b < max_batch] + [max_batch]


class FlashInferAttentionBackend:
    def __init__(
        self,
        cache: KVCache,
        scale: float,
        num_heads: int,
        max_batch: int,
        max_query_len: int,
        max_draft_selected: int,
        max_draft_recent: int,
        needs_scores: bool,
        graphs: bool,
        triton_programs_per_sm: tuple[float, float] | None = None,
    ):
        import flashinfer  # CUDA installs only (the `gpu` extra)

        self._flashinfer = flashinfer
        self.cache = cache
        self.scale = scale
        self.num_heads = num_heads
        self.num_layers, _, self.num_kv_heads, self.head_dim = cache.k.shape
        self.device = cache.k.device
        self._workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        # fa2 everywhere: its log-sum-exp is base 2, which the score kernel expects. Tensor cores for full
        # attention: 10-27 % faster than the CUDA-core decode kernel at batch ≥ 64 (docs/results/kernels-h200.md)
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD", use_tensor_cores=True, backend="fa2")
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD", backend="fa2")
        self.graph_batches = graph_batches(max_batch) if graphs else []
        self._max_query_len = min(max_query_len, cache.page_size)  # padding sequences fit on the scratch page
        # per sequence, for the fixed draft buffers: selected slots, and recent slots of a whole chain
        self._max_draft_selected = max_draft_selected
        self._max_draft_recent = max_draft_recent
        self._needs_scores = needs_scores  # whether graph shapes keep score rows (only SpecAttn uses them)
        self._triton_programs_per_sm = triton_programs_per_sm or TRITON_PROGRAMS_PER_SM
        self._num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._slot_buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # logits scratch, per-slot weights
        self._graph_plans: dict[GraphShape, _Plan | _DraftPlan] = {}
        self._shared_score_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        self._shared_draft_slots: tuple[torch.Tensor, torch.Tensor] | None = None
        self._staging = _PinnedStaging(self.device)
        self._planned: torch.cuda.Event | None = None  # after the last FlashInfer plan's copy out of its pinned buffer
        self._plan: _Plan | _DraftPlan | None = None
        self._scored: list[int] = []
        self._score_args: tuple[torch.Tensor, ...] = ()
        self._scored_index: torch.Tensor | None = None  # which of the plan's row-sequences are scored (None: the first len(scored))
        self._score_lengths: list[int] = []

    def _kernel_args(self) -> dict:
        dtype = self.cache.k.dtype
        return dict(sm_scale=self.scale, q_data_type=dtype, kv_data_type=dtype)

    @property
    def _scratch_slot(self) -> int:
        return self.cache.scratch_page * self.cache.page_size

    def _bucket(self, seqs: list[SequenceAttention]) -> int | None:
        """The padded batch a CUDA graph can run these sequences as, or None (eager)."""
        q = seqs[0].num_query
        if q > self._max_query_len or any(s.num_query != q or (s.sparse is None) != (seqs[0].sparse is None) for s in seqs):
            return None
        return next((b for b in self.graph_batches if b >= len(seqs)), None)

    def plan(self, seqs: list[SequenceAttention]) -> GraphShape | None:
        bucket = self._bucket(seqs)
        if seqs[0].sparse is not None:
            return self._plan_drafts(seqs, bucket)
        assert all(s.sparse is None for s in seqs), "a step is all drafts or all full attention"
        return self._plan_full(seqs, bucket)

    def _graph_plan(self, shape: GraphShape) -> _Plan:
        """The fixed buffers (and CUDA-graph-mode wrapper) of one full-attention shape, made on its first use."""
        plan = self._graph_plans.get(shape)
        if plan is not None:
            return plan
        dev, b, q = self.device, shape.batch, shape.query_len
        i32 = dict(dtype=torch.int32, device=dev)
        capacity = self.cache.allocator.num_pages + b
        indptr, indices, last_len = torch.zeros(b + 1, **i32), torch.zeros(capacity, **i32), torch.ones(b, **i32)
        slot_mapping = torch.full((b * q,), self._scratch_slot, dtype=torch.long, device=dev)
        scoring = self._needs_scores and shape.kind != "decode"
        smallest = 1 + max((g for g in self.graph_batches if g < b), default=0)
        if runs_triton_attention(smallest, b, self.num_kv_heads, self._num_sms, self.cache.page_size,
                                 self._triton_programs_per_sm):
            scores = None
            if scoring:
                logits, per_slot = self._slot_score_buffers()
                lse = torch.zeros(b, self.num_kv_heads, logits.shape[1], device=dev)
                scores = SlotScores(torch.zeros(b, 2, **i32), torch.zeros(b, **i32), logits, lse, per_slot)
            triton = _TritonInputs(q, torch.full((b,), q, **i32), scores)
            plan = _Plan(wrapper=None, slot_mapping=slot_mapping, indices=indices, indptr=indptr, triton=triton)
        else:
            wrapper = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._workspace, "NHD", use_cuda_graph=True, backend="fa2", use_tensor_cores=True,
                paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices, paged_kv_last_page_len_buffer=last_len,
            )
            q_rows, lse_rows = self._score_row_buffers() if scoring else (None, None)
            plan = _Plan(
                wrapper=wrapper,
                slot_mapping=slot_mapping,
                indices=indices,
                indptr=indptr,
                rows=torch.zeros(2 * b, dtype=torch.long, device=dev) if scoring else None,
                q_rows=q_rows[:, :b] if scoring else None,
                lse_rows=lse_rows[:, :b] if scoring else None,
            )
        self._graph_plans[shape] = plan
        return plan

    def _plan_full(self, seqs: list[SequenceAttention], bucket: int | None) -> GraphShape | None:
        ps = self.cache.page_size
        q = seqs[0].num_query
        pad = 0 if bucket is None else bucket - len(seqs)
        num_pages = [-(-s.end_pos // ps) for s in seqs] + [1] * pad
        indptr = np.zeros(len(num_pages) + 1, dtype=np.int32)
        np.cumsum(num_pages, out=indptr[1:])
        tables = [np.asarray(s.page_table)[:n] for s, n in zip(seqs, num_pages)]
        page_ids = np.concatenate(tables + [np.full(pad, self.cache.scratch_page)]).astype(np.int32, copy=False)
        assert len(page_ids) == indptr[-1], "a page table is shorter than its sequence"
        # padding sequences: q tokens from position 0 on the scratch page
        slot_mapping = torch.from_numpy(token_slots(page_ids, indptr, [s.start_pos for s in seqs] + [0] * pad,
                                                    [s.num_query for s in seqs] + [q] * pad, ps))
        last_len = _int32([s.end_pos - (n - 1) * ps for s, n in zip(seqs, num_pages)] + [q] * pad)
        dims = (self.num_heads, self.num_kv_heads, self.head_dim, ps)
        starts = np.cumsum([0] + [s.num_query for s in seqs])
        self._scored = [i for i, s in enumerate(seqs) if s.score_rows]
        assert self._needs_scores or not self._scored, "scores asked of a backend built without them"
        shape = None
        if bucket is not None:
            # plain decode steps never score; a decode that renews a stale selection has a graph of its own
            kind = "verify" if q > 1 else "scored_decode" if self._scored else "decode"
            shape = GraphShape(kind, bucket, q)
            plan = self._graph_plan(shape)
            plan.slot_mapping.copy_(slot_mapping, non_blocking=True)
            if plan.triton is not None:
                self._fill_triton(plan, seqs, pad, indptr, page_ids)
            elif plan.rows is not None:
                # every sequence's rows are gathered (the graph is fixed); unscored ones gather their last row twice
                rows = [s.scored_pair if s.score_rows else (q - 1, q - 1) for s in seqs] + [(0, 0)] * pad
                plan.rows.copy_(torch.tensor([i * q + r for i, pair in enumerate(rows) for r in pair]), non_blocking=True)
            if plan.wrapper is not None:
                # indices handed over on the device: FlashInfer copies host indices blocking (waiting for the draft chain)
                self._flashinfer_plan(plan.wrapper, torch.from_numpy(indptr), self._staging.to_device(page_ids), last_len,
                                      *dims, q_len_per_req=q, **self._kernel_args())
            self._scored_index = (None if self._scored == list(range(len(self._scored)))
                                  else torch.tensor(self._scored).to(self.device, non_blocking=True))
        else:
            kind = "decode" if q == 1 and all(s.num_query == 1 for s in seqs) and not self._scored else "prefill"
            dev_indices = self._staging.to_device(page_ids)
            plan = _Plan(self._decode if kind == "decode" else self._prefill,
                         slot_mapping.to(self.device, non_blocking=True),
                         dev_indices, _int32(indptr, self.device))
            if kind == "decode":
                self._flashinfer_plan(self._decode, torch.from_numpy(indptr), dev_indices, last_len, *dims, **self._kernel_args())
            else:
                qo_indptr = _int32(starts)
                self._flashinfer_plan(self._prefill, qo_indptr, torch.from_numpy(indptr), dev_indices, last_len, *dims,
                                      causal=True, **self._kernel_args())
            if self._scored:
                rows = [int(starts[i]) + r for i in self._scored for r in seqs[i].scored_pair]
                plan.rows = torch.tensor(rows).to(self.device, non_blocking=True)
                plan.q_rows = torch.empty(self.num_layers, len(self._scored), 2, self.num_heads, self.head_dim,
                                          dtype=self.cache.k.dtype, device=self.device)
                plan.lse_rows = torch.empty(self.num_layers, len(self._scored), 2, self.num_heads, device=self.device)
            self._scored_index = None
        self._plan = plan
        if self._scored:
            row_pos = [[seqs[i].start_pos + r for r in seqs[i].scored_pair] for i in self._scored]
            self._score_lengths = [seqs[i].score_len for i in self._scored]
            self._score_args = (
                _int32(row_pos, self.device),
                _int32(indptr[self._scored], self.device),
                plan.indices,
                _int32(self._score_lengths, self.device),
            )
        return shape

    def _flashinfer_plan(self, wrapper: Any, *args, **kwargs) -> None:
        """wrapper.plan(), once the plan before it has left its pinned host buffer: FlashInfer writes a plan there and
        copies it to the device asynchronously, so with a step launched ahead the next plan could overwrite it first."""
        if self._planned is not None:
            self._planned.synchronize()
        wrapper.plan(*args, **kwargs)
        self._planned = torch.cuda.Event()
        self._planned.record()

    def _fill_triton(self, plan: _Plan, seqs: list[SequenceAttention], pad: int, indptr: np.ndarray, page_ids: np.ndarray) -> None:
        """Our kernel's inputs for this step: pages, lengths, and which rows of which sequences are scored."""
        inputs, q = plan.triton, plan.triton.query_len
        plan.indptr.copy_(torch.from_numpy(indptr), non_blocking=True)
        plan.indices[: len(page_ids)].copy_(self._staging.to_device(page_ids))
        n = len(seqs)
        per_seq = np.full((n + pad, 4), (q, q - 1, q - 1, 0), dtype=np.int32)  # kv_len, scored rows, score_len
        per_seq[:n, 0] = [s.end_pos for s in seqs]
        if self._scored:
            per_seq[:n, 1:3] = [s.scored_pair if s.score_rows else (q - 1, q - 1) for s in seqs]
            per_seq[:n, 3] = [s.score_len if s.score_rows else 0 for s in seqs]
        per_seq_dev = torch.from_numpy(per_seq).to(self.device, non_blocking=True)
        inputs.kv_lens.copy_(per_seq_dev[:, 0])
        if inputs.scores is not None:
            inputs.scores.rows.copy_(per_seq_dev[:, 1:3])
            inputs.scores.lengths.copy_(per_seq_dev[:, 3])

    @staticmethod
    def score_bytes_per_slot(num_layers: int, num_heads: int, num_kv_heads: int) -> int:
        """What _slot_score_buffers takes per cache slot, for sizing the KV pool."""
        return 2 * num_heads * 2 + 4 * num_layers * num_kv_heads

    def _slot_score_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Our kernel's logits scratch [kv_heads, 2 · group, slots] (float16) and per-slot weights [layers, kv_heads,
        slots] (float32), shared by every scoring shape it runs (one forward is live at a time): score_bytes_per_slot.
        The logits are kept in float16: half the bytes the kernel stores and reads back (perf-notes 42)."""
        if self._slot_buffers is None:
            slots, group = self.cache.k.shape[1], self.num_heads // self.num_kv_heads
            self._slot_buffers = (
                torch.zeros(self.num_kv_heads, 2 * group, slots, device=self.device, dtype=torch.float16),
                torch.zeros(self.num_layers, self.num_kv_heads, slots, device=self.device),
            )
        return self._slot_buffers

    def _score_row_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scored rows' queries and LSEs at the largest bucket: one forward is live at a time, so every graph shape
        writes a prefix view of the same memory instead of holding its own."""
        if self._shared_score_rows is None:
            b = self.graph_batches[-1]
            self._shared_score_rows = (
                torch.zeros(self.num_layers, b, 2, self.num_heads, self.head_dim, dtype=self.cache.k.dtype, device=self.device),
                torch.zeros(self.num_layers, b, 2, self.num_heads, device=self.device),
            )
        return self._shared_score_rows

    def _draft_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected and recent slots at the largest bucket, shared by every draft graph shape (prefix views)."""
        if self._shared_draft_slots is None:
            b = self.graph_batches[-1]
            self._shared_draft_slots = (
                torch.zeros(self.num_layers, b * self._max_draft_selected, dtype=torch.int32, device=self.device),
                torch.full((b, self._max_draft_recent), self._scratch_slot, dtype=torch.int32, device=self.device),
            )
        return self._shared_draft_slots

    def _draft_plan(self, batch: int, selected: torch.Tensor, recent: torch.Tensor) -> _DraftPlan:
        i32 = dict(dtype=torch.int32, device=self.device)
        return _DraftPlan(
            selected=selected,
            sel_indptr=torch.zeros(batch + 1, **i32),
            recent=recent,
            counts=torch.ones(batch, **i32),
            slot_mapping=torch.full((batch,), self._scratch_slot, dtype=torch.long, device=self.device),
            splits=draft_splits(batch, self.num_kv_heads, self._num_sms),
        )

    def _plan_drafts(self, seqs: list[SequenceAttention], bucket: int | None) -> GraphShape | None:
        assert all(s.sparse is not None and s.num_query == 1 for s in seqs), "a step is all drafts or all full attention"
        self._scored = []
        selected = torch.cat([s.sparse.selected for s in seqs], dim=1)
        width = max(len(s.sparse.recent) for s in seqs)
        if bucket is not None and (width > self._max_draft_recent or selected.shape[1] > bucket * self._max_draft_selected):
            bucket = None  # more than the fixed buffers hold (e.g. many plain steps since the anchor): run eagerly
        if bucket is None:
            shape, batch = None, len(seqs)
            plan = self._draft_plan(batch, selected, torch.empty(batch, width, dtype=torch.int32, device=self.device))
        else:
            shape, batch = GraphShape("draft", bucket, 1), bucket
            if shape not in self._graph_plans:
                shared_selected, shared_recent = self._draft_buffers()
                self._graph_plans[shape] = self._draft_plan(
                    bucket, shared_selected[:, : bucket * self._max_draft_selected], shared_recent[:bucket])
            plan = self._graph_plans[shape]
        pad = batch - len(seqs)
        recent = np.full(tuple(plan.recent.shape), self._scratch_slot, dtype=np.int32)
        for row, s in zip(recent, seqs):
            row[: len(s.sparse.recent)] = s.sparse.recent
        if plan.selected is not selected:  # a graph shape's fixed buffer (an eager plan reads the batch's own)
            plan.selected[:, : selected.shape[1]].copy_(selected)
        plan.sel_indptr.copy_(_int32(np.cumsum([0] + [s.sparse.selected.shape[1] for s in seqs] + [0] * pad)), non_blocking=True)
        plan.recent.copy_(torch.from_numpy(recent), non_blocking=True)
        plan.counts.copy_(_int32([s.sparse.num_recent(s.start_pos) for s in seqs] + [1] * pad), non_blocking=True)
        plan.update_write_slots()
        self._plan = plan
        return shape

    def next_draft(self, by: torch.Tensor | None = None) -> None:
        plan = self._plan
        assert isinstance(plan, _DraftPlan), "next_draft() needs a planned draft step"
        if by is None:
            plan.counts += 1
        else:
            plan.counts[: len(by)] += by.to(torch.int32)
        plan.update_write_slots()

    def kv_write(self, layer: int) -> KVWrite:
        return KVWrite(self.cache.k[layer], self.cache.v[layer], self._plan.slot_mapping)

    def __call__(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        plan = self._plan
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        if isinstance(plan, _DraftPlan):
            return sparse_draft_attention(
                q, k_cache, v_cache, plan.selected[layer], plan.sel_indptr, plan.recent, plan.counts, self.scale,
                splits=plan.splits,
            )
        if plan.triton is not None:
            t = plan.triton
            scores = None if t.scores is None else replace(t.scores, out=t.scores.out[layer])
            return verify_attention(q, k_cache, v_cache, plan.indptr, plan.indices, t.kv_lens, t.query_len,
                                    self.cache.page_size, self.scale, scores=scores)
        q = q.contiguous()
        paged = (
            k_cache.view(-1, self.cache.page_size, self.num_kv_heads, self.head_dim),
            v_cache.view(-1, self.cache.page_size, self.num_kv_heads, self.head_dim),
        )
        if plan.rows is None:
            return plan.wrapper.run(q, paged)
        out, lse2 = plan.wrapper.run(q, paged, return_lse=True)
        plan.q_rows[layer].copy_(q[plan.rows].view(plan.q_rows.shape[1:]))
        plan.lse_rows[layer].copy_(lse2[plan.rows].view(plan.lse_rows.shape[1:]))
        return out

    def take_scores(self) -> ScoreBatch | None:
        """The scored sequences' attention scores of the last forward, all layers in one Triton launch: gathered from
        the per-slot weights our kernel kept, or computed from the rows' queries and LSEs FlashInfer's steps kept."""
        if not self._scored:
            return None
        plan = self._plan
        scores = torch.empty(self.num_layers, len(self._scored), max(self._score_lengths), device=self.device)
        if plan.triton is not None:
            _, page_start, indices, lengths = self._score_args
            gather_slot_scores(plan.triton.scores.out, page_start, indices, lengths, self.cache.page_size, self.num_heads, scores)
            return ScoreBatch(list(self._scored), scores, list(self._score_lengths))
        q_rows, lse_rows = plan.q_rows, plan.lse_rows
        if self._scored_index is not None:
            q_rows, lse_rows = q_rows.index_select(1, self._scored_index), lse_rows.index_select(1, self._scored_index)
        else:
            q_rows, lse_rows = q_rows[:, : len(self._scored)], lse_rows[:, : len(self._scored)]
        verification_scores_paged(q_rows, lse_rows, self.cache.k, *self._score_args, page_size=self.cache.page_size,
                                  scale=self.scale, out=scores)
        return ScoreBatch(list(self._scored), scores, list(self._score_lengths))

    def slots_of(self, seq_indices: list[int], positions: torch.Tensor) -> torch.Tensor:
        ps = self.cache.page_size
        plan = self._plan
        assert isinstance(plan, _Plan), "slots_of() maps positions of the last full-attention step"
        first_page = plan.indptr[torch.tensor(seq_indices).to(self.device, non_blocking=True)]
        page = (first_page[None, :, None] + positions // ps).clamp(max=plan.indices.shape[0] - 1)
        return (plan.indices[page] * ps + positions % ps).to(torch.int32)
