"""Acceptance of draft tokens against the verification's choices."""

from __future__ import annotations

import torch


def accept_drafts(draft: list[int], target: list[int]) -> list[int]:
    """The longest prefix of the draft the target agrees with, then the target's own next token.

    target[i] is the token the verification chooses after the committed token and draft[:i], by the
    same rule plain decoding uses (argmax, or the seeded Gumbel-max of `sampling.sample_rows`), so
    the committed tokens are exactly those plain decoding would produce.
    """
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return draft[:n] + [target[n]]


def accept_drafts_on_device(drafts: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`accept_drafts` for a batch, without leaving the device: drafts [n, γ], targets [n, γ + 1] → per row the
    number of drafts accepted and the target's token after them (what the next step starts from)."""
    accepted = (drafts == targets[:, :-1]).cumprod(dim=1).sum(dim=1)
    return accepted, targets.gather(1, accepted[:, None])[:, 0]
