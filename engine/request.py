"""A request's state inside the engine, and what the engine reports back for it each step."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


from .drafters import DraftState
from .kv_cache import PageTable
from .logprobs import TokenLogprob
from .sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class SpecStats:
    """Speculation counters of one request or of the whole engine."""

    num_drafts: int = 0  # verifications that checked at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: drafts whose token i was accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per verification: accepted drafts plus the bonus token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def record(self, num_draft: int, num_accepted: int) -> None:
        if num_draft == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_draft:
            self.accepted_per_position.extend([0] * (num_draft - len(self.accepted_per_position)))
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1

    def as_dict(self) -> dict:
        return {
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "accepted_per_position": list(self.accepted_per_position),
            "acceptance_rate": self.acceptance_rate,
            "mean_acceptance_length": self.mean_acceptance_length,
        }


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order; the youngest running request is preempted first
    max_total_tokens: int  # prompt + output may not exceed this (the context length)
    seed: int = 0  # fixes the sampling noise of every position (unused when greedy)
    output_ids: list[int] = field(default_factory=list)
    page_table: PageTable = field(default_factory=PageTable)
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    spec: SpecStats = field(default_factory=SpecStats)
    draft: DraftState | None = None  # what the next drafts attend to; set by each verification
    # the prompt's tokens' logprobs gathered so far (where asked: params.prompt_logprobs), position by position
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs_sent: bool = False

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence (a per-step hot path)."""
        p = len(self.prompt_ids)
        return self.prompt_ids[start:min(end, p)] + self.output_ids[max(start - p, 0) : max(end - p, 0)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class RequestOutput:
    """What one step produced for one request: new tokens, their text, and whether it has finished."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    spec: SpecStats | None = None  # the request's speculation stats, on its final output
    logprobs: list[TokenLogprob] | None = None  # one per new token, where the request asked for logprobs
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token, on the first output, where asked
