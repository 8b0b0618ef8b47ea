"""Drafters: which cached positions each layer attends to while drafting (streaming window or SpecAttn's critical set)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from specattn.kernels.reference import token_budget
from specattn.kernels.selection import select_critical_tokens_batched

from .attention import ScoreBatch, SparseKV
from .config import SpecConfig
from .kv_cache import PageTable, slot_of


@dataclass
class DraftState:
    """A request's draft context: the scored span [0, anchor] reduced to `selected`, plus all later positions."""

    anchor: int  # first query position of the step that renewed the selection (after prefill: the last prompt position)
    selected: torch.Tensor  # [layers, k] cache slots of the selected positions (≤ anchor)

    def attended(self, last_query_pos: int, page_table: PageTable, page_size: int) -> SparseKV:
        """What drafts up to last_query_pos attend: the selection and every position after the anchor."""
        recent = [slot_of(page_table, p, page_size) for p in range(self.anchor + 1, last_query_pos + 1)]
        return SparseKV(self.selected, self.anchor, recent)


@dataclass
class Selection:
    """New draft contexts for a batch of sequences: row j of `positions` holds sequence j's budgets[j] positions first."""

    positions: torch.Tensor  # [layers, S, max(budgets)]
    budgets: list[int]


class Drafter(ABC):
    name: str
    needs_scores: bool  # whether verification must extract attention scores for it

    def __init__(self, config: SpecConfig, num_layers: int):
        self.config = config
        self.num_layers = num_layers

    def budget(self, length: int) -> int:
        return token_budget(length, self.config.budget_ratio, self.config.min_budget)

    @abstractmethod
    def select(self, anchors: list[int], scores: ScoreBatch | None, device: torch.device) -> Selection:
        """The positions each sequence's drafts keep after a verification (or prefill) whose first scored row sits at its anchor."""


class StreamingDrafter(Drafter):
    """MagicDec / StreamingLLM: the first sink tokens plus the most recent window, same budget as SpecAttn."""

    name = "streaming"
    needs_scores = False

    def select(self, anchors: list[int], scores: ScoreBatch | None, device: torch.device) -> Selection:
        budgets = [self.budget(a + 1) for a in anchors]
        # row j: positions 0..sink-1, then the window ending at the anchor, then padding (built on the device: a
        # Python list of every position would be host work per verification, growing with the context)
        k = torch.tensor(budgets).to(device, non_blocking=True)[:, None]
        sink = k.clamp(max=self.config.sink_tokens)
        window_start = torch.tensor(anchors).to(device, non_blocking=True)[:, None] + 1 - (k - sink)
        rank = torch.arange(max(budgets), device=device)[None, :]
        positions = torch.where(rank < sink, rank, window_start + rank - sink).masked_fill(rank >= k, 0)
        return Selection(positions[None].expand(self.num_layers, -1, -1), budgets)


class SpecAttnDrafter(Drafter):
    """Verification-guided: per layer, the positions the last verification attended to most."""

    name = "specattn"
    needs_scores = True

    def select(self, anchors: list[int], scores: ScoreBatch | None, device: torch.device) -> Selection:
        assert scores is not None and scores.lengths == [a + 1 for a in anchors]
        budgets = [self.budget(n) for n in scores.lengths]
        return Selection(select_critical_tokens_batched(scores.scores, budgets), budgets)


def make_drafter(config: SpecConfig, num_layers: int) -> Drafter | None:
    """The configured drafter; None for plain decoding."""
    kinds = {"streaming": StreamingDrafter, "specattn": SpecAttnDrafter}
    return kinds[config.drafter](config, num_layers) if config.drafter in kinds else None
