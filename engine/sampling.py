"""Sampling parameters and the token sampler (greedy, temperature, top-k, top-p, per-request seeds)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        # below this, dividing logits by the temperature overflows float32; the result would be argmax anyway
        return self.temperature < 1e-5

    def resolve_seed(self) -> int:
        """The request's seed, or a random one: every sampled request draws from its own seeded noise."""
        return self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a non-greedy request samples from: temperature, then top-k, then top-p, over the last dim."""
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop[..., 0] = False  # a top_p that rounds to 0 in float32 must still leave one token
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _gumbel(seed: int, position: int, vocab: int, device: torch.device) -> torch.Tensor:
    # one noise vector per (seed, position): fixed, whoever asks for it and in whatever batch
    g = torch.Generator(device=device).manual_seed((seed * 1_000_003 + position) % (1 << 63))
    u = torch.rand(vocab, generator=g, device=device).clamp_(min=1e-20)
    return -torch.log(-torch.log(u))


def choose_tokens(logits: torch.Tensor, params: SamplingParams, seed: int, first_position: int) -> list[int]:
    """The token each row of [n, vocab] logits chooses; row i chooses the token at first_position + i.

    Greedy takes the argmax. Sampling uses the Gumbel-max trick, argmax(log p + G), with the noise G
    fixed by (seed, position): that is an exact sample from p (after temperature, top-k, top-p), and
    the same position chosen from the same logits always gives the same token, whatever the batch and
    whether a draft or the verification chooses it. So speculation reproduces plain sampling token for
    token, and a seeded request is reproducible under any batch and any draft length.
    """
    if params.greedy:
        return logits.argmax(dim=-1).tolist()
    noise = torch.stack(
        [_gumbel(seed, first_position + i, logits.shape[-1], logits.device) for i in range(logits.shape[0])]
    )
    return (probabilities(logits, params).log() + noise).argmax(dim=-1).tolist()
