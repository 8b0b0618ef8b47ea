"""Adaptive speculation: picks the draft length γ for each step from measured step costs and observed acceptance.

Model: with per-position conditional acceptance a_1..a_γ (the chance draft i is accepted given
1..i-1 were), a verification commits E(γ) = 1 + Σ_{i≤γ} Π_{j≤i} a_j tokens per request, and one
iteration costs γ·t_draft + t_verify(γ) for the batch. The controller picks the γ with the most
tokens per second, E(γ) / cost(γ); γ = 0 is plain decoding (E = 1, cost = t_verify(0)), so it only
speculates when the measurements say it pays. Costs are exponential moving averages per batch-size
bucket (powers of two); acceptance is a decayed count per position. Plain decoding is measured
first; speculation is re-probed now and then so a change in the text's predictability is noticed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

_EMA = 0.2  # weight of a new timing sample
_DECAY = 0.98  # per recorded verification: acceptance remembers roughly the last 50 drafts
_PROBE_EVERY = 32  # steps between re-probes of speculation while plain decoding wins


def _bucket(batch_size: int) -> int:
    return 1 << max(0, batch_size - 1).bit_length()


@dataclass
class _Costs:
    draft: float | None = None  # seconds per draft forward
    verify: dict[int, float] = field(default_factory=dict)  # gamma -> seconds per verify forward


class GammaController:
    def __init__(self, max_gamma: int, adaptive: bool, prior_acceptance: float = 0.7):
        self.max_gamma = max_gamma
        self.adaptive = adaptive
        # decayed counts per draft position: [offered, accepted]; the prior counts as a few observations
        self._offered = [4.0] * max_gamma
        self._accepted = [4.0 * prior_acceptance] * max_gamma
        self._costs: dict[int, _Costs] = {}
        self._steps = 0
        self.last_gamma = 0
        self.histogram: Counter[int] = Counter()  # decode steps per chosen gamma

    def acceptance(self) -> list[float]:
        """Estimated conditional acceptance of each draft position."""
        return [a / o if o > 0 else 0.0 for a, o in zip(self._accepted, self._offered)]

    def expected_tokens(self, gamma: int) -> float:
        total, chain = 1.0, 1.0
        for a in self.acceptance()[:gamma]:
            chain *= a
            total += chain
        return total

    def choose(self, batch_size: int) -> int:
        self._steps += 1
        gamma = self._choose(batch_size) if self.adaptive else self.max_gamma
        self.last_gamma = gamma
        self.histogram[gamma] += 1
        return gamma

    def _choose(self, batch_size: int) -> int:
        if self.max_gamma == 0:
            return 0
        costs = self._costs.setdefault(_bucket(batch_size), _Costs())
        if 0 not in costs.verify:
            return 0
        if costs.draft is None:
            return self.max_gamma
        best, best_rate = 0, 1.0 / costs.verify[0]
        for g in range(1, self.max_gamma + 1):
            verify = costs.verify.get(g, self._nearest_verify(costs, g))
            rate = self.expected_tokens(g) / (g * costs.draft + verify)
            if rate > best_rate:
                best, best_rate = g, rate
        if best == 0 and self._steps % _PROBE_EVERY == 0:
            return 1  # cheap probe: keeps the acceptance estimate fresh
        return best

    @staticmethod
    def _nearest_verify(costs: _Costs, gamma: int) -> float:
        known = min(costs.verify, key=lambda g: abs(g - gamma))
        return costs.verify[known]

    def record_draft_time(self, batch_size: int, seconds: float) -> None:
        costs = self._costs.setdefault(_bucket(batch_size), _Costs())
        costs.draft = seconds if costs.draft is None else (1 - _EMA) * costs.draft + _EMA * seconds

    def record_verify_time(self, batch_size: int, gamma: int, seconds: float) -> None:
        costs = self._costs.setdefault(_bucket(batch_size), _Costs())
        old = costs.verify.get(gamma)
        costs.verify[gamma] = seconds if old is None else (1 - _EMA) * old + _EMA * seconds

    def record_acceptance(self, num_draft: int, num_accepted: int) -> None:
        for i in range(num_draft):
            self._offered[i] *= _DECAY
            self._accepted[i] *= _DECAY
        # position i was offered only if drafts 1..i-1 were accepted: conditional acceptance
        for i in range(min(num_accepted + 1, num_draft)):
            self._offered[i] += 1
            self._accepted[i] += i < num_accepted
