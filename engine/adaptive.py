"""Adaptive speculation: picks the draft length γ for each step from measured step times and observed acceptance.

Model: with per-position conditional acceptance a_1..a_γ (the chance draft i is accepted given
1..i-1 were), a verification commits E(γ) = 1 + Σ_{i≤γ} Π_{j≤i} a_j tokens per request. A decode
step with γ drafts takes t(γ) seconds of wall time, everything included (drafts, verification,
selection, acceptance, bookkeeping). The controller picks the γ with the most tokens per second,
E(γ) / t(γ); γ = 0 is plain decoding (E = 1), and speculation must beat it by a margin, so noise
does not make it speculate at a loss. A step kind's time, per batch-size bucket (powers of two), is the
median of its times of the last 128 steps, at most 9 (the lower of two while there are fewer than three: a
first time can carry one-off costs, e.g. the first step at a new batch size allocates, and a 128-token request
may be done in 40 steps). A median, because a few steps run off their kind's pace (the plain step that renews
stale selections for speculation, on the H200 a speculative step of 260 ms among 30 ms ones right after a
2M-token prefill) and an average let each of them decide choices for many steps (perf-notes 43); only recent
times, so a kind measured rarely (a probe) follows a change at its next measurement. Speculation costs a
fixed part (the verification's extra work, scores, selection, a sync) plus a part per draft, so
t(γ) = t(0) + c + γ·d for γ ≥ 1: an unmeasured γ is read off the line through the measured ones (with only one
measured, c is taken as 0, which makes shorter drafts look cheaper than they are, so they get tried and
measured rather than written off). Acceptance is a decayed count per position.
Plain decoding is timed first (twice), then γ_max (twice where it could be chosen, were drafts accepted at the
optimistic bound below; the two back to back, and no third while both times are on their way: a step's time reaches
the controller two choices after it was made, and at one request a third γ_max step is ≈ 0.5 ms lost); in a
bucket new to a controller that has chosen in another, the nearest such bucket's choice comes first (twice), so a
batch thinning at the end of a run does not spend the few steps it has in each bucket on plain decoding (a bucket
where plain decoding wins pays a few speculative steps for that, once).
While plain decoding wins, the most promising γ is probed now and then (only where speculation could be chosen at
the optimistic bound; after 32 steps, then twice as long after each probe plain decoding still wins, up to 1024) so
that a change in the text's predictability is noticed; while a shorter γ wins, γ_max is timed again every 64 steps,
so a change in what drafts cost is. The optimistic bound of a position's acceptance is one standard error above its
estimate (the upper end of the Wilson score interval), the decayed counts as the sample size: before anything is
measured 0.87 (the prior), after a step of many requests close to what they accept, and after one request's first few
verifications well below 1, so that one request whose drafts cannot pay is not made to speculate over and over to find
that out (on the H200 six speculative steps of a 128-token request, 5 % of its time). The counts fade a little every
step, so while nothing is drafted the bound rises back toward 1 and probes resume.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque

_DECAY = 0.98  # per recorded verification: acceptance remembers roughly the last 50 drafts
_PROBE_EVERY = 32  # steps before the first probe of speculation while plain decoding wins
_PROBE_EVERY_MAX = 1024  # each probe that plain decoding still wins doubles the wait, up to this
_MARGIN = 1.05  # speculation must promise this much more throughput than plain decoding
_REMEASURE_EVERY = 64  # steps after which γ_max is chosen again while a shorter γ wins
_WINDOW = 9  # a step kind's time: the median of at most this many of its last times …
_MAX_AGE = 128  # … recorded in the last this many steps (the newest one at least)
_FADE = 0.995  # per step, on the acceptance counts: what they say fades with a half-life of ≈ 140 steps
_LAG = 2  # choices the engine makes before a step's time arrives (it times a step once the step after it is read)


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
        self._samples: dict[int, Counter[int]] = {}  # bucket -> gamma -> step times recorded
        self._recent: dict[int, dict[int, deque[tuple[int, float]]]] = {}  # bucket -> gamma -> its last (step, time)
        self._remeasured_at: dict[int, int] = {}  # bucket -> step γ_max was last chosen to be measured again
        self._top_in_flight: dict[int, deque[int]] = {}  # bucket -> steps γ_max was chosen to be timed, time not in
        self._chosen: dict[int, int] = {}  # bucket -> γ it last chose from its measurements (0: plain decoding)
        self._steps = 0
        self._probe_wait = _PROBE_EVERY
        self._next_probe = _PROBE_EVERY
        self.last_gamma = 0
        self.histogram: Counter[int] = Counter()  # decode steps per chosen gamma

    def acceptance(self) -> list[float]:
        """Estimated conditional acceptance of each draft position."""
        return [a / o if o > 0 else 0.0 for a, o in zip(self._accepted, self._offered)]

    def acceptance_bound(self) -> list[float]:
        """Each position's acceptance at one standard error above its estimate: the upper end of the Wilson score
        interval, its decayed count as the sample size (unlike estimate + error it rises as the count fades even where
        nearly every draft was rejected)."""
        bounds = []
        for p, n in zip(self.acceptance(), self._offered):
            if n <= 0:
                bounds.append(1.0)
                continue
            spread = math.sqrt(p * (1 - p) / n + 0.25 / n**2)
            bounds.append(min(1.0, (p + 0.5 / n + spread) / (1 + 1 / n)))
        return bounds

    def expected_tokens(self, gamma: int, acceptance: list[float] | None = None) -> float:
        """E(γ) at the estimated acceptance, or at the one given per position."""
        total, chain = 1.0, 1.0
        for a in (self.acceptance() if acceptance is None else acceptance)[:gamma]:
            chain *= a
            total += chain
        return total

    def choose(self, batch_size: int) -> int:
        self._steps += 1
        self._offered = [o * _FADE for o in self._offered]
        self._accepted = [a * _FADE for a in self._accepted]
        gamma = self._choose(batch_size) if self.adaptive else self.max_gamma
        self.last_gamma = gamma
        self.histogram[gamma] += 1
        return gamma

    def _choose(self, batch_size: int) -> int:
        if self.max_gamma == 0:
            return 0
        bucket = _bucket(batch_size)
        times = self._step_time.setdefault(bucket, {})
        samples = self._samples.get(bucket, Counter())
        # plain decoding, then γ_max, each timed twice before anything is read off them: the first step of a
        # bucket can carry one-off costs (allocations at a new size), and a run may be over before a remeasure.
        # (γ_max's second time only where speculation could be chosen at the optimistic bound.) A bucket new to
        # a controller that has chosen elsewhere first does what the nearest such bucket chose, until that choice
        # is timed twice here: a batch thinning at the end of a run passes through a bucket in a few steps, which
        # plain steps for measurement would otherwise fill.
        if samples[0] < 2:
            borrowed = self._nearest_choice(bucket)
            return borrowed if borrowed is not None and samples[borrowed] < 2 else 0
        top, bound = self.max_gamma, self.acceptance_bound()
        if samples[top] == 0 or (samples[top] == 1 and self.expected_tokens(top, bound) / times[top] > _MARGIN / times[0]):
            in_flight = self._top_in_flight.setdefault(bucket, deque())
            while in_flight and self._steps - in_flight[0] > _LAG:
                in_flight.popleft()  # a step that was not timed (it had prefill work): its time never comes
            if samples[top] + len(in_flight) < 2:
                in_flight.append(self._steps)
                return top
            if samples[top] == 0:
                return 0  # both first times on their way
        cost = self._step_cost(times)
        rates = {g: self.expected_tokens(g) / cost(g) for g in range(1, self.max_gamma + 1)}
        best = max(rates, key=rates.get)
        speculate = rates[best] > _MARGIN / times[0]
        self._chosen[bucket] = best if speculate else 0
        if speculate:
            self._probe_wait = _PROBE_EVERY
            if best < self.max_gamma and self._steps - self._remeasured_at.get(bucket, 0) >= _REMEASURE_EVERY:
                # counted when chosen, not when timed: a step with prefill work is not timed
                self._remeasured_at[bucket] = self._steps
                return self.max_gamma
            return best
        # probe only where speculation could be chosen at all (by the margin, at the optimistic bound), and less
        # often each time plain decoding keeps winning: a probe costs a whole speculative step
        could_win = any(self.expected_tokens(g, bound) / cost(g) > _MARGIN / times[0] for g in rates)
        if could_win and self._steps >= self._next_probe:
            self._next_probe = self._steps + self._probe_wait
            self._probe_wait = min(2 * self._probe_wait, _PROBE_EVERY_MAX)
            return best
        return 0

    def _nearest_choice(self, bucket: int) -> int | None:
        """What the nearest other bucket chose from its own measurements when it last did (the larger of two as near)."""
        if not self._chosen:
            return None
        nearest = min(self._chosen, key=lambda b: (abs(b.bit_length() - bucket.bit_length()), -b))
        return self._chosen[nearest]

    @staticmethod
    def _step_cost(times: dict[int, float]):
        """t(γ) for γ ≥ 1: measured where it was, else on the least-squares line t(0) + c + γ·d through the measured γ."""
        points = [(g, t) for g, t in times.items() if g > 0]
        if len(points) == 1:
            (g1, t1), = points
            intercept, slope = times[0], max(0.0, (t1 - times[0]) / g1)
        else:
            mean_g = sum(g for g, _ in points) / len(points)
            mean_t = sum(t for _, t in points) / len(points)
            slope = sum((g - mean_g) * (t - mean_t) for g, t in points) / sum((g - mean_g) ** 2 for g, _ in points)
            slope = max(0.0, slope)
            intercept = max(times[0], mean_t - slope * mean_g)
        return lambda g: times.get(g, intercept + slope * g)

    def record_step_time(self, batch_size: int, gamma: int, seconds: float) -> None:
        """Wall time of a step in which batch_size requests decoded (and nothing else ran)."""
        bucket = _bucket(batch_size)
        times = self._step_time.setdefault(bucket, {})
        samples = self._samples.setdefault(bucket, Counter())
        window = self._recent.setdefault(bucket, {}).setdefault(gamma, deque(maxlen=_WINDOW))
        window.append((self._steps, seconds))
        recent = [t for step, t in window if self._steps - step <= _MAX_AGE]
        times[gamma] = min(recent) if len(recent) < 3 else statistics.median(recent)
        samples[gamma] += 1
        if gamma == self.max_gamma and self._top_in_flight.get(bucket):
            self._top_in_flight[bucket].popleft()

    def record_acceptance(self, num_draft: int, num_accepted: int) -> None:
        for i in range(num_draft):
            self._offered[i] *= _DECAY
            self._accepted[i] *= _DECAY
        # position i was offered only if drafts 1..i-1 were accepted: conditional acceptance
        for i in range(min(num_accepted + 1, num_draft)):
            self._offered[i] += 1
            self._accepted[i] += i < num_accepted
