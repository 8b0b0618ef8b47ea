"""The torch attention backend over the paged KV cache: the reference every GPU kernel is tested against.

Like FlashInfer, it splits work into plan() (once per step: slots, gather indices, masks) and the
per-layer call (gather, attend; the model has written the step's K/V at `kv_write(layer)`). Full attention:
queries at known positions attend to every earlier position of their sequence, causally. Sparse drafts: one
query attends to exactly the cache slots it is given, per layer (all of them precede it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from specattn.kernels.reference import verification_scores

from .kv_cache import KVCache, KVWrite, PageTable

# Sequences with at most this many queries (decodes, verifications, drafts) are padded together;
# longer prefill chunks form their own group so decodes are not padded to a prefill's length.
_SHORT_QUERY = 16


@dataclass
class SparseKV:
    """What a draft query attends to: per layer its selection's cache slots, plus the slots of recent positions."""

    selected: torch.Tensor  # [layers, k] cache slots, on the cache's device
    anchor: int  # the selection covers positions ≤ anchor; every later position is recent
    # slots of positions anchor + 1, anchor + 2, ... up to at least the query (a chain of drafts: up to its last query)
    recent: list[int]

    def num_recent(self, query_pos: int) -> int:
        """How many recent slots a query at this position attends (the positions after the anchor, itself included)."""
        n = query_pos - self.anchor
        assert 1 <= n <= len(self.recent), f"a query at {query_pos} needs {n} recent slots, {len(self.recent)} given"
        return n

    def slots(self, query_pos: int) -> torch.Tensor:
        """[layers, k + recent] every slot each layer attends for a query at query_pos."""
        recent = self.recent[: self.num_recent(query_pos)]
        recent_t = torch.tensor(recent, dtype=self.selected.dtype, device=self.selected.device)
        return torch.cat([self.selected, recent_t.expand(self.selected.shape[0], -1)], dim=1)


@dataclass
class SequenceAttention:
    """One sequence's share of a step: num_query new tokens at positions start_pos.., then attention."""

    num_query: int
    start_pos: int
    page_table: PageTable | list[int]
    sparse: SparseKV | None = None  # a draft (one query); None = full causal attention
    # Score extraction (full attention only): these query rows' attention weights over positions [0, score_len).
    score_rows: tuple[int, ...] = ()
    score_len: int = 0

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_query

    @property
    def scored_pair(self) -> tuple[int, int]:
        """The two scored query rows (a single scored row counts twice, which leaves the mean unchanged)."""
        return (self.score_rows * 2)[:2]


@dataclass
class ScoreBatch:
    """Attention scores a verification extracted: per layer, per scored sequence, per position."""

    seqs: list[int]  # step-wide indices of the scored sequences, in step order
    scores: torch.Tensor  # [layers, len(seqs), N]; -1 past each sequence's length
    lengths: list[int]


@dataclass
class _Group:
    token_index: torch.Tensor  # [B, Q] flat token index of each (sequence, query) cell; padding -> 0
    valid_cells: torch.Tensor  # [n] indices into the flattened [B * Q] cells that are real queries
    valid_tokens: torch.Tensor  # [n] their flat token indices (integer indices: no device sync, unlike masks)
    kv_slots: torch.Tensor  # [1 or layers, B, K] cache slot of each attended entry
    mask: torch.Tensor  # [1 or layers, B, 1, Q, K] True = attend
    # whether SDPA needs `mask`: not where every entry is attended, or in a plain causal square (then `causal`);
    # SDPA's own paths are twice as fast on the CPU as reading a mask (score extraction still reads it)
    masked: bool
    causal: bool
    score_seqs: list[int]  # step-wide indices of the sequences whose scores this group extracts
    score_members: torch.Tensor  # [S] their rows in this group
    score_rows: torch.Tensor  # [S, 2] query index of the two scored rows (one row is given twice)


@dataclass(frozen=True)
class GraphShape:
    """A step shape one CUDA graph replays: `batch` sequences (real ones, then padding) of `query_len` tokens each."""

    kind: str  # decode | scored_decode | verify | draft
    batch: int
    query_len: int

    @property
    def num_tokens(self) -> int:
        return self.batch * self.query_len


class AttentionBackend(Protocol):
    """What the runner and model need from an attention implementation (torch reference or FlashInfer)."""

    graph_batches: list[int]  # the batch sizes whose steps it can run as CUDA graphs (none: always eager)

    def plan(self, seqs: list[SequenceAttention]) -> GraphShape | None:
        """Prepare one forward over these sequences (host work, once per step).

        Returns the CUDA-graph shape the forward may be replayed as (the token batch then padded to it),
        or None to run it eagerly.
        """

    def kv_write(self, layer: int) -> KVWrite:
        """Where this layer's new K/V go in the planned forward (the model writes them before calling attention)."""

    def __call__(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The attention output of this layer's queries over the cache, which holds the forward's new K/V."""

    def next_draft(self, by: torch.Tensor | None = None) -> None:
        """Move every sequence of a planned draft step one position on (or by[i] positions, a device tensor): the
        next draft of a chain attends one more recent slot and writes its K/V one slot further. Device work only: a
        chain replays one draft graph without planning again, and a chain can start at positions still on the device."""

    def take_scores(self) -> ScoreBatch | None:
        """Scores the last forward extracted, for the sequences that asked."""

    def slots_of(self, seq_indices: list[int], positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of positions [layers, len(seq_indices), k] of these sequences of the last plan (by step index)."""


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[slots] ([*slots.shape, kv_heads, d]) as an index_select of whole rows: on the CPU, 100x faster than
    advanced indexing of the 3-d cache (which made the gather over half of a decode step)."""
    rows = cache.view(cache.shape[0], -1).index_select(0, slots.reshape(-1))
    return rows.view(*slots.shape, *cache.shape[1:])


def _slots(page_tables: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Cache slot of each position (positions < 0 map to slot 0, callers mask them)."""
    pos = positions.clamp(min=0)
    pages = page_tables.gather(-1, pos // page_size)
    return pages * page_size + pos % page_size


class TorchAttentionBackend:
    def __init__(self, cache: KVCache, scale: float):
        self.cache = cache
        self.scale = scale
        self._slot_mapping = torch.empty(0, dtype=torch.long)
        self._tables = torch.empty(0, 0, dtype=torch.long)
        self._groups: list[_Group] = []
        self._scores: list[list[torch.Tensor]] = []  # per group, per layer: [S, K]
        self._score_lens: dict[int, int] = {}
        self._drafts: list[SequenceAttention] = []  # the planned step, if it is a draft step
        self.graph_batches: list[int] = []

    def plan(self, seqs: list[SequenceAttention]) -> GraphShape | None:
        dev = self.cache.k.device
        ps = self.cache.page_size
        starts = [0]
        for s in seqs:
            starts.append(starts[-1] + s.num_query)
        positions = torch.cat([torch.arange(s.start_pos, s.end_pos) for s in seqs])
        owner = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([s.num_query for s in seqs]))
        tables = self._page_tables(seqs)
        self._tables = tables.to(dev)
        self._slot_mapping = _slots(tables[owner], positions[:, None], ps)[:, 0].to(dev)

        buckets: dict[tuple[bool, bool], list[int]] = {}
        for i, s in enumerate(seqs):
            assert s.sparse is None or s.num_query == 1, "a sparse (draft) sequence has one query"
            buckets.setdefault((s.sparse is not None, s.num_query > _SHORT_QUERY), []).append(i)
        self._groups = []
        for (sparse, _), members in buckets.items():
            q_len = max(seqs[i].num_query for i in members)
            q_off = torch.arange(q_len)
            n_q = torch.tensor([seqs[i].num_query for i in members])
            query_valid = q_off[None, :] < n_q[:, None]
            token_index = torch.where(query_valid, torch.tensor([starts[i] for i in members])[:, None] + q_off, 0)
            if sparse:
                kv_slots, kv_valid = self._pad_stack([seqs[i].sparse.slots(seqs[i].start_pos).cpu() for i in members])  # [L, B, K]
                mask = kv_valid[:, :, None, :]
            else:
                q_pos = torch.tensor([seqs[i].start_pos for i in members])[:, None] + q_off  # [B, Q]
                k_len = max(seqs[i].end_pos for i in members)
                ends = torch.tensor([seqs[i].end_pos for i in members])
                ar = torch.arange(k_len)
                kv_pos = torch.where(ar[None, :] < ends[:, None], ar, -1)[None]  # [1, B, K]
                causal = kv_pos[:, :, None, :] <= q_pos[None, :, :, None]  # [1, B, Q, K]
                # Padded query rows attend to any valid entry so softmax never sees an all-masked row.
                mask = (kv_pos >= 0)[:, :, None, :] & (causal | ~query_valid[None, :, :, None])
                kv_slots = _slots(tables[members][None], kv_pos, ps)
            # every sequence's queries are its whole context from position 0, none padded: a causal square
            square = not sparse and all(seqs[i].start_pos == 0 and seqs[i].num_query == q_len for i in members)
            needs_mask = not square and not bool(mask.all())
            scored = [j for j, i in enumerate(members) if seqs[i].score_rows and not sparse]
            rows = [seqs[members[j]].scored_pair for j in scored]
            self._groups.append(
                _Group(
                    token_index=token_index.to(dev),
                    valid_cells=query_valid.flatten().nonzero().flatten().to(dev),
                    valid_tokens=token_index[query_valid].to(dev),
                    kv_slots=kv_slots.to(dev),
                    mask=mask[:, :, None].to(dev),
                    masked=needs_mask,
                    causal=square and q_len > 1,
                    score_seqs=[members[j] for j in scored],
                    score_members=torch.tensor(scored, dtype=torch.long, device=dev),
                    score_rows=torch.tensor(rows, dtype=torch.long, device=dev).reshape(len(scored), 2),
                )
            )
        self._scores = [[] for _ in self._groups]
        self._score_lens = {i: s.score_len for i, s in enumerate(seqs) if s.score_rows}
        self._drafts = seqs if all(s.sparse is not None for s in seqs) else []
        return None

    def next_draft(self, by: torch.Tensor | None = None) -> None:
        # the reference re-plans on the host (it never runs as a CUDA graph; reading `by` waits for the device)
        assert self._drafts, "next_draft() needs a planned draft step"
        steps = [1] * len(self._drafts) if by is None else by.tolist()
        self.plan([replace(s, start_pos=s.start_pos + n) for s, n in zip(self._drafts, steps)])

    @staticmethod
    def _page_tables(seqs: list[SequenceAttention]) -> torch.Tensor:
        tables = np.zeros((len(seqs), max(1, max(len(s.page_table) for s in seqs))), dtype=np.int64)
        for row, s in zip(tables, seqs):
            row[: len(s.page_table)] = np.asarray(s.page_table)
        return torch.from_numpy(tables)

    @staticmethod
    def _pad_stack(slots: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """[L, B, K] slots (0-padded) and which entries are real."""
        width = max(p.shape[1] for p in slots)
        valid = torch.arange(width)[None, :] < torch.tensor([p.shape[1] for p in slots])[:, None]
        stacked = torch.stack([F.pad(p.long(), (0, width - p.shape[1])) for p in slots], dim=1)
        return stacked, valid[None].expand(stacked.shape[0], -1, -1)

    def kv_write(self, layer: int) -> KVWrite:
        return KVWrite(self.cache.k[layer], self.cache.v[layer], self._slot_mapping)

    def __call__(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        out = torch.empty_like(q)
        for gi, g in enumerate(self._groups):
            li = layer if g.kv_slots.shape[0] > 1 else 0
            slots = g.kv_slots[li]
            qg = q[g.token_index].transpose(1, 2)  # [B, H, Q, d]
            kg = _gather(k_cache, slots).transpose(1, 2)  # [B, Hkv, K, d]
            vg = _gather(v_cache, slots).transpose(1, 2)
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask[li] if g.masked else None, is_causal=g.causal,
                                               scale=self.scale, enable_gqa=True)
            out[g.valid_tokens] = o.transpose(1, 2).flatten(0, 1)[g.valid_cells]
            if g.score_seqs:
                self._scores[gi].append(self._extract_scores(g, q, k_cache, slots, g.mask[li]))
        return out

    def _extract_scores(self, g: _Group, q, k_cache, slots, mask) -> torch.Tensor:
        m, r = g.score_members, g.score_rows
        rows_q = q[g.token_index[m[:, None], r]]  # [S, 2, H, d]
        rows_mask = mask[m, 0][torch.arange(len(m), device=m.device)[:, None], r]  # [S, 2, K]
        return verification_scores(rows_q, _gather(k_cache, slots[m]), rows_mask, self.scale)

    def take_scores(self) -> ScoreBatch | None:
        """Scores of the last forward, for the sequences that asked; None if none did."""
        per_seq: dict[int, torch.Tensor] = {}
        for g, per_layer in zip(self._groups, self._scores):
            if per_layer:
                stacked = torch.stack(per_layer)  # [L, S, K]
                for j, i in enumerate(g.score_seqs):
                    per_seq[i] = stacked[:, j, : self._score_lens[i]]
        if not per_seq:
            return None
        seqs = sorted(per_seq)
        lengths = [self._score_lens[i] for i in seqs]
        width = max(lengths)
        scores = torch.stack([F.pad(per_seq[i], (0, width - per_seq[i].shape[1]), value=-1.0) for i in seqs], dim=1)
        return ScoreBatch(seqs, scores, lengths)

    def slots_of(self, seq_indices: list[int], positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of positions [layers, len(seq_indices), k] of the last plan's sequences (positions past a table clamp)."""
        tables = self._tables[torch.tensor(seq_indices, device=self._tables.device)]
        ps = self.cache.page_size
        pos = positions.clamp(max=tables.shape[1] * ps - 1)
        return _slots(tables[None].expand(pos.shape[0], -1, -1), pos, ps)
