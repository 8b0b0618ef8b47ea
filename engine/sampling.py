"""Sampling parameters and the token sampler (greedy, temperature, top-k, top-p, per-request seeds)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .logprobs import MAX_LOGPROBS
from .transfer import to_device


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
    logprobs: int | None = None  # report each output token's logprob and this many alternatives (None: no logprobs)
    prompt_logprobs: int | None = None  # the same for each prompt token, on the request's first output

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
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")

    @property
    def greedy(self) -> bool:
        # below this, dividing logits by the temperature overflows float32; the result would be argmax anyway
        return self.temperature < 1e-5

    def resolve_seed(self) -> int:
        """The request's seed, or a random one: every sampled request draws from its own seeded noise."""
        return self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a non-greedy request samples from: temperature, then top-k, then top-p, over the last dim."""
    rows = logits.reshape(-1, logits.shape[-1])
    n, dev = rows.shape[0], logits.device
    probs = _probabilities(rows, torch.full((n,), float(params.temperature), device=dev),
                           torch.full((n,), params.top_k, device=dev), torch.full((n,), float(params.top_p), device=dev),
                           cut=_cuts(params))
    return probs.reshape(logits.shape)


def _probabilities(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, cut: bool = True
) -> torch.Tensor:
    """probabilities() of [R, vocab] logits, each row with its own temperature, top-k (0: off) and top-p, in one go
    and without waiting for the device (one sort serves top-k and top-p: softmax keeps the order). cut False: no
    row has top-k or top-p on, so no sort (a 49k-token sort is milliseconds on a CPU)."""
    logits = logits.float() / temperature[:, None]
    vocab = logits.shape[-1]
    if cut:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
        kth = sorted_logits.gather(1, (k - 1)[:, None])  # ties with the k-th logit stay
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # softmax and the sum in the token order either way, so a row without top-k or top-p gets the same numbers
    # whether or not the rows beside it cut (the same token from the same logits in any batch)
    probs = torch.softmax(logits, dim=-1)
    if cut:
        # keep the smallest prefix whose mass reaches top_p (the top token always stays; top_p = 1 keeps every
        # token), tokens tied in probability all or none: the mass before a tie group is its first member's, so
        # how a sort orders ties (which may depend on the batch) cannot change the distribution
        sorted_p = probs.gather(1, order)
        before = sorted_p.cumsum(-1) - sorted_p
        group_start = torch.ones_like(sorted_p, dtype=torch.bool)
        group_start[:, 1:] = sorted_p[:, 1:] != sorted_p[:, :-1]
        before = torch.where(group_start, before, float("-inf")).cummax(-1).values
        drop = (before >= top_p[:, None]) & (top_p[:, None] < 1)
        probs = probs.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), 0.0)
    return probs / probs.sum(-1, keepdim=True)


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2^32 for x in [0, 2^32) held in int64, without int64 overflow: c in 16-bit halves."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (Chris Wellons' lowbias32), elementwise on int64 holding uint32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, vocab] Gumbel noise, row r fixed by (seeds[r], positions[r]) and each token's index alone: a counter-based
    hash, no generator state, so the same on every device and in any batch, whoever asks (a draft or the verification)."""
    key = _hash32(_hash32((seeds ^ (seeds >> 32)) & _MASK32) ^ (positions & _MASK32))
    tokens = _mul32(torch.arange(vocab, device=seeds.device), 0x9E3779B1)  # spread apart: a bijection of 32-bit ints
    bits = _hash32(key[:, None] ^ tokens[None, :])
    u = ((bits >> 8).float() + 0.5) / (1 << 24)  # 24 bits, as float32 holds them: u in (0, 1)
    return -torch.log(-torch.log(u))


def sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int]
) -> torch.Tensor:
    """The token each row of [R, vocab] logits chooses, on the logits' device without waiting for it: row r with
    params[r] at position positions[r] of a request seeded seeds[r].

    Greedy rows take the argmax. Sampled rows use the Gumbel-max trick, argmax(log p + G), with the noise G fixed
    by (seed, position): that is an exact sample from p (after temperature, top-k, top-p), and the same position
    chosen from the same logits always gives the same token, whatever the batch and whether a draft or the
    verification chooses it. So speculation reproduces plain sampling token for token, and a seeded request is
    reproducible under any batch and any draft length."""
    chosen = logits.argmax(dim=-1)
    sampled = [r for r, p in enumerate(params) if not p.greedy]
    if not sampled:
        return chosen
    dev = logits.device
    picked = [params[r] for r in sampled]
    rows = to_device(sampled, dev, torch.long)
    probs = _probabilities(
        logits[rows],
        to_device([p.temperature for p in picked], dev, torch.float32),
        to_device([p.top_k for p in picked], dev, torch.long),
        to_device([p.top_p for p in picked], dev, torch.float32),
        cut=any(_cuts(p) for p in picked),
    )
    noise = gumbel_noise(to_device([seeds[r] for r in sampled], dev, torch.long),
                         to_device([positions[r] for r in sampled], dev, torch.long), logits.shape[-1])
    return chosen.index_copy(0, rows, (probs.log() + noise).argmax(dim=-1))


def _cuts(params: SamplingParams) -> bool:
    return params.top_k > 0 or params.top_p < 1
