"""Critical-token selection for a whole batch at once, on the scores' device: one top-k and one sort per step.

`kernels.reference.select_critical_tokens` is the per-sequence reference; tests compare the two.
"""

from __future__ import annotations

import torch


def select_critical_tokens_batched(scores: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """Per layer and sequence, the budget's highest-scoring positions in increasing order.

    scores: [layers, S, N] (entries past a sequence's length hold -1, below every real weight);
    budgets: [S] k of each sequence. Returns [layers, S, max(budgets)]: row s holds its k_s positions
    first, then N as padding.
    """
    width = scores.shape[-1]
    top = torch.topk(scores, max(budgets), dim=-1, sorted=True).indices
    rank = torch.arange(top.shape[-1], device=scores.device)
    beyond = rank[None, :] >= torch.tensor(budgets).to(scores.device, non_blocking=True)[:, None]
    return top.masked_fill(beyond[None], width).sort(dim=-1).values
