"""Acceptance of draft tokens against the verification's target logits: greedy match, or rejection sampling."""

from __future__ import annotations

import torch

from .sampling import SamplingParams, probabilities


def accept_greedy(draft: list[int], target: list[int]) -> list[int]:
    """The longest prefix of the draft that greedy decoding would produce, then the target's next token.

    target[i] is the verification's argmax after the committed token and draft[:i].
    """
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return draft[:n] + [target[n]]


def accept_sampled(
    draft: list[int],
    draft_probs: torch.Tensor,
    target_logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> list[int]:
    """Speculative rejection sampling (Leviathan et al.): the result is distributed exactly as sampling the target.

    draft_probs [γ, V] are the distributions the draft tokens were drawn from, target_logits [γ+1, V].
    """
    p = probabilities(target_logits, params)
    out: list[int] = []
    for i, d in enumerate(draft):
        u = torch.rand((), generator=generator, dtype=torch.float64)
        if u * draft_probs[i, d] <= p[i, d]:  # accept with probability min(1, p/q)
            out.append(d)
            continue
        residual = (p[i] - draft_probs[i]).clamp(min=0)
        total = residual.sum()
        residual = residual / total if total > 0 else p[i]
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p[len(draft)], 1, generator=generator)))
    return out
