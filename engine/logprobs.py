"""The log-probabilities a request asks for: each committed token's, and the most likely tokens at its position.

They come from the target model's own distribution at each position (the raw log-softmax of the logits, before
temperature, top-k or top-p, as vLLM reports by default): a verification's rows for speculated positions, which are
exactly the rows plain decoding would compute, so logprobs do not depend on the drafter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .sampling import SamplingParams

MAX_LOGPROBS = 20  # most alternatives one position may report (vLLM's default cap; OpenAI's chat API allows 20)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float | None  # None: a prompt's first token, which nothing predicts
    top: tuple[tuple[int, float], ...]  # the likeliest tokens at this position and their logprobs, likeliest first


@dataclass
class LogprobRows:
    """What a step's sequences that asked for logprobs need of their logits rows, on its way to the host (queued right
    behind the forward, before the step after it, so reading it never waits for that step): for a greedy sequence
    each row's likeliest tokens (its committed token is the row's argmax, the first of them), for a sampled one the
    whole rows (its token may be any)."""

    top: dict[int, tuple[torch.Tensor, torch.Tensor]]  # sequence index in the step -> ([rows, n] logprobs, ids)
    whole: dict[int, torch.Tensor]  # sequence index in the step -> [rows, vocab] logprobs
    # sequence index -> its prompt tokens' ([rows] logprobs, [rows, n] likeliest logprobs, ids), the first rows
    prompt: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    ready: torch.cuda.Event | None  # recorded after the copies (None on the CPU: already done)

    def prompt_logprobs(self, seq: int, tokens: list[int]) -> list[TokenLogprob]:
        """Sequence `seq`'s prompt tokens that its first rows predict, each with its alternatives."""
        if self.ready is not None:
            self.ready.synchronize()
        chosen, values, ids = self.prompt[seq]
        return [TokenLogprob(tok, lp, tuple(zip(i, v)))
                for tok, lp, i, v in zip(tokens, chosen.tolist(), ids.tolist(), values.tolist())]

    def token_logprobs(self, seq: int, tokens: list[int], num_top: int) -> list[TokenLogprob]:
        """Sequence `seq`'s committed tokens, token i chosen at its output row i, each with its num_top alternatives."""
        if self.ready is not None:
            self.ready.synchronize()
        if seq in self.whole:
            rows = self.whole[seq][: len(tokens)]
            chosen = rows.gather(1, torch.tensor(tokens)[:, None])[:, 0]
            values, ids = rows.topk(num_top, dim=-1)
        else:
            values, ids = (t[: len(tokens)] for t in self.top[seq])
            chosen = values[:, 0]
            values, ids = values[:, :num_top], ids[:, :num_top]
        return [TokenLogprob(tok, lp, tuple(zip(i, v)))
                for tok, lp, i, v in zip(tokens, chosen.tolist(), ids.tolist(), values.tolist())]


def queue_logprob_rows(
    logits: list[torch.Tensor], wanted: list[tuple[int, SamplingParams]], prompts: list[tuple[int, list[int], int]],
) -> LogprobRows | None:
    """Start copying to the host what the sequences asking for logprobs need of their logits rows, without waiting
    for the device. wanted: (sequence index, params) for output tokens, chosen at the sequence's rows after its
    prompt rows: one log-softmax, top-k and copy for the greedy ones, one log-softmax and copy for the sampled.
    prompts: (sequence index, the prompt tokens its first rows predict, alternatives per token): their logprobs
    gathered and their top-k taken on the device."""
    if not wanted and not prompts:
        return None
    top, whole, prompt = {}, {}, {}
    if prompts:
        rows = torch.log_softmax(torch.cat([logits[i][: len(t)] for i, t, _ in prompts]).float(), dim=-1)
        targets = torch.tensor([tok for _, t, _ in prompts for tok in t]).to(rows.device, non_blocking=True)
        chosen = rows.gather(1, targets[:, None])[:, 0]
        values, ids = rows.topk(max(n for *_, n in prompts), dim=-1)
        sizes = [len(t) for _, t, _ in prompts]
        parts = [x.to("cpu", non_blocking=True).split(sizes) for x in (chosen, values, ids)]
        prompt = {i: (c, v[:, :n], d[:, :n]) for (i, _, n), c, v, d in zip(prompts, *parts)}
    scored = {i: len(tokens) for i, tokens, _ in prompts}
    logits = [rows[scored.get(i, 0):] for i, rows in enumerate(logits)]  # output tokens: the rows after the prompt's
    greedy = [(i, p) for i, p in wanted if p.greedy]
    if greedy:
        rows = torch.log_softmax(torch.cat([logits[i] for i, _ in greedy]).float(), dim=-1)
        values, ids = rows.topk(max(max(p.logprobs for _, p in greedy), 1), dim=-1)
        sizes = [logits[i].shape[0] for i, _ in greedy]
        top = dict(zip((i for i, _ in greedy), zip(values.to("cpu", non_blocking=True).split(sizes),
                                                   ids.to("cpu", non_blocking=True).split(sizes))))
    sampled = [i for i, p in wanted if not p.greedy]
    if sampled:
        rows = torch.log_softmax(torch.cat([logits[i] for i in sampled]).float(), dim=-1)
        whole = dict(zip(sampled, rows.to("cpu", non_blocking=True).split([logits[i].shape[0] for i in sampled])))
    ready = None
    if logits[(wanted or prompts)[0][0]].is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    return LogprobRows(top, whole, prompt, ready)
