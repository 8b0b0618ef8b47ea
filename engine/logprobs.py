"""The log-probabilities a request asks for: each committed token's, and the most likely tokens at its position.

They come from the target model's own distribution at each position (the raw log-softmax of the logits, before
temperature, top-k or top-p, as vLLM reports by default): a verification's rows for speculated positions, which are
exactly the rows plain decoding would compute, so logprobs do not depend on the drafter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # most alternatives one position may report (vLLM's default cap; OpenAI's chat API allows 20)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this position and their logprobs, most likely first


@dataclass
class LogprobRows:
    """Log-softmax rows of a step's sequences that asked for logprobs, on their way to the host (queued right behind
    the forward, before the step after it, so reading them does not wait for that step)."""

    rows: dict[int, torch.Tensor]  # sequence index in the step -> its [logits rows, vocab] float32, on the host
    ready: torch.cuda.Event | None  # recorded after the copies (None on the CPU: already done)

    def token_logprobs(self, seq: int, tokens: list[int], num_top: int) -> list[TokenLogprob]:
        """Sequence `seq`'s committed tokens, token i chosen at its logits row i, each with its num_top alternatives."""
        if self.ready is not None:
            self.ready.synchronize()
        rows = self.rows[seq][: len(tokens)]
        chosen = rows.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
        values, ids = rows.topk(num_top, dim=-1) if num_top else (rows[:, :0], rows[:, :0].long())
        return [TokenLogprob(tok, lp, list(zip(i, v))) for tok, lp, i, v in zip(tokens, chosen, ids.tolist(), values.tolist())]


def queue_logprob_rows(logits: list[torch.Tensor], wanted: list[int]) -> LogprobRows | None:
    """Start copying the log-softmax of the `wanted` sequences' logits rows to the host, without waiting for them."""
    if not wanted:
        return None
    sizes = [logits[i].shape[0] for i in wanted]
    rows = torch.log_softmax(torch.cat([logits[i] for i in wanted]).float(), dim=-1).to("cpu", non_blocking=True)
    ready = None
    if logits[wanted[0]].is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    return LogprobRows(dict(zip(wanted, rows.split(sizes))), ready)
