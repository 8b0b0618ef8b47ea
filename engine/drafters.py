"""Drafters: which cached positions each layer attends to while drafting (streaming window or SpecAttn's critical set)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from specattn.kernels.reference import select_critical_tokens, token_budget

from .config import SpecConfig


@dataclass
class DraftState:
    """A request's draft context: the scored span [0, anchor] reduced to `selected`, plus all later positions."""

    anchor: int  # first query position of the last verification (after prefill: the last prompt position)
    selected: torch.Tensor  # [layers, k] positions ≤ anchor

    def attended_positions(self, query_pos: int) -> torch.Tensor:
        """[layers, k + recent] positions a draft query at query_pos attends: the selection and every recent one."""
        recent = torch.arange(self.anchor + 1, query_pos + 1)
        return torch.cat([self.selected, recent.expand(self.selected.shape[0], -1)], dim=1)


class Drafter(ABC):
    name: str
    needs_scores: bool  # whether verification must extract attention scores for it

    def __init__(self, config: SpecConfig, num_layers: int):
        self.config = config
        self.num_layers = num_layers

    def budget(self, length: int) -> int:
        return token_budget(length, self.config.budget_ratio, self.config.min_budget)

    @abstractmethod
    def select(self, anchor: int, scores: torch.Tensor | None) -> DraftState:
        """The draft state after a verification (or prefill) whose first scored row sits at `anchor`."""


class StreamingDrafter(Drafter):
    """MagicDec / StreamingLLM: the first sink tokens plus the most recent window, same budget as SpecAttn."""

    name = "streaming"
    needs_scores = False

    def select(self, anchor: int, scores: torch.Tensor | None) -> DraftState:
        length = anchor + 1
        k = self.budget(length)
        sink = min(self.config.sink_tokens, k)
        positions = torch.cat([torch.arange(sink), torch.arange(length - (k - sink), length)])
        return DraftState(anchor, positions.expand(self.num_layers, -1))


class SpecAttnDrafter(Drafter):
    """Verification-guided: per layer, the positions the last verification attended to most."""

    name = "specattn"
    needs_scores = True

    def select(self, anchor: int, scores: torch.Tensor | None) -> DraftState:
        assert scores is not None and scores.shape[1] == anchor + 1
        return DraftState(anchor, select_critical_tokens(scores.cpu(), self.budget(anchor + 1)))


def make_drafter(config: SpecConfig, num_layers: int) -> Drafter | None:
    """The configured drafter; None for plain decoding."""
    kinds = {"streaming": StreamingDrafter, "specattn": SpecAttnDrafter}
    return kinds[config.drafter](config, num_layers) if config.drafter in kinds else None
