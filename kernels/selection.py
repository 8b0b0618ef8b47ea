"""Critical-token selection for a whole batch at once, on the scores' device.

On CUDA one Triton launch per step (`kernels.radix_select`); elsewhere a torch top-k and a sort. Both return what
`kernels.reference.select_critical_tokens` returns per sequence; tests compare them.
"""

from __future__ import annotations

import torch


def select_critical_tokens_batched(scores: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """Per layer and sequence, the budget's highest-scoring positions in increasing order.

    scores: [layers, S, N] (entries past a sequence's length hold -1, below every real weight);
    budgets: [S] k of each sequence. Returns [layers, S, max(budgets)]: row s holds its k_s positions
    first, then N as padding.
    """
    widest = max(budgets)
    assert widest <= scores.shape[-1], "a budget beyond the scored positions"
    if scores.is_cuda:
        # imported here: CPU serving never needs Triton
        from specattn.kernels.radix_select import select_critical_tokens_triton

        k = torch.tensor(budgets, dtype=torch.int32).to(scores.device, non_blocking=True)
        return select_critical_tokens_triton(scores.float().contiguous(), k, widest)
    return select_critical_tokens_torch(scores, budgets)


def compile_selection(max_width: int, device: torch.device) -> None:
    """Compile what the selection runs on this device for rows up to max_width (on CUDA: the Triton kernel's launch
    shapes), so that no request waits for a compile mid-run."""
    if device.type == "cuda":
        from specattn.kernels.radix_select import compile_for_widths

        compile_for_widths(max_width, device)


def select_critical_tokens_torch(scores: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """`select_critical_tokens_batched` as one top-k and one sort (ties in top-k's order)."""
    width = scores.shape[-1]
    top = torch.topk(scores, max(budgets), dim=-1, sorted=True).indices
    rank = torch.arange(top.shape[-1], device=scores.device)
    beyond = rank[None, :] >= torch.tensor(budgets).to(scores.device, non_blocking=True)[:, None]
    return top.masked_fill(beyond[None], width).sort(dim=-1).values
