"""Adaptive speculation: picks the draft length γ for each step from measured step times and observed acceptance.

Model: with per-position conditional acceptance a_1..a_γ (the chance draft i is accepted given
1..i-1 were), a verification commits E(γ) = 1 + Σ_{i≤γ} Π_{j≤i} a_j tokens per request. A decode
step with γ drafts takes t(γ) seconds of wall time, everything included (drafts, verification,
selection, acceptance, bookkeeping). The controller picks the γ with the most tokens per second,
E(γ) / t(γ); γ = 0 is plain decoding (E = 1), and speculation must beat it by a margin, so noise
does not make it speculate at a loss. Step times are exponential moving averages per batch-size
bucket (powers of two); a γ not yet measured is estimated from t(0) plus the steepest per-draft
slope measured so far (pessimistic). Acceptance is a decayed count per position. Plain decoding is
measured first, then γ_max once; while plain decoding wins, γ = 1 is probed now and then so that a
change in the text's predictability is noticed.
"""

from __future__ import annotations

from collections import Counter

_EMA = 0.2  # weight of a new timing sample
_DECAY = 0.98  # per recorded verification: acceptance remembers roughly the last 50 drafts
_PROBE_EVERY = 32  # steps between probes of speculation while plain decoding wins
_MARGIN = 1.05  # speculation must promise this much more throughput than plain decoding


def _bucket(batch_size: int) -> int:
    return 1 << max(0, batch_size - 1).bit_length()


class GammaController:
    def __init__(self, max_gamma: int, adaptive: bool, prior_acceptance: float = 0.7):
        self.max_gamma = max_gamma
        self.adaptive = adaptive
        # decayed counts per draft position: [offered, accepted]; the prior counts as a few observations
        self._offered = [4.0] * max_gamma
        self._accepted = [4.0 * prior_acceptance] * max_gamma
        self._step_time: dict[int, dict[int, float]] = {}  # bucket -> gamma -> seconds per decode step
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
        times = self._step_time.setdefault(_bucket(batch_size), {})
        if 0 not in times:
            return 0
        measured = [g for g in times if g > 0]
        if not measured:
            return self.max_gamma
        slope = max((times[g] - times[0]) / g for g in measured)
        best, best_rate = 0, _MARGIN / times[0]
        for g in range(1, self.max_gamma + 1):
            rate = self.expected_tokens(g) / times.get(g, times[0] + g * slope)
            if rate > best_rate:
                best, best_rate = g, rate
        if best == 0 and self._steps % _PROBE_EVERY == 0:
            return 1
        return best

    def record_step_time(self, batch_size: int, gamma: int, seconds: float) -> None:
        """Wall time of a step in which batch_size requests decoded (and nothing else ran)."""
        times = self._step_time.setdefault(_bucket(batch_size), {})
        old = times.get(gamma)
        times[gamma] = seconds if old is None else (1 - _EMA) * old + _EMA * seconds

    def record_acceptance(self, num_draft: int, num_accepted: int) -> None:
        for i in range(num_draft):
            self._offered[i] *= _DECAY
            self._accepted[i] *= _DECAY
        # position i was offered only if drafts 1..i-1 were accepted: conditional acceptance
        for i in range(min(num_accepted + 1, num_draft)):
            self._offered[i] += 1
            self._accepted[i] += i < num_accepted
