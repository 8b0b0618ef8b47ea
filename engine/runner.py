"""Turns one step's sequences into the model's flat batch, runs it, and returns the logits each sequence asked for."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import AttentionBackend, ScoreBatch, SequenceAttention, SparseKV
from .model import DecoderModel


@dataclass
class SequenceInput:
    token_ids: list[int]  # the new tokens, at positions start_pos, start_pos + 1, ...
    start_pos: int
    page_table: list[int]
    num_logits: int  # logits for this many trailing tokens (0 for a prefill chunk that is not the last)
    sparse: SparseKV | None = None  # a draft: the cache slots its one token attends to
    score_rows: tuple[int, ...] = ()  # rows (indices into token_ids) whose attention weights to return
    score_len: int = 0  # ... over cache positions [0, score_len)


@dataclass
class StepResult:
    logits: list[torch.Tensor]  # per sequence: [num_logits, vocab]
    argmax: list[list[int]]  # per sequence: the greedy token of each logits row (one device sync for all)
    scores: ScoreBatch | None  # attention scores of the sequences that asked


class ModelRunner:
    def __init__(self, model: DecoderModel, backend: AttentionBackend):
        self.model = model
        self.backend = backend

    def run(self, seqs: list[SequenceInput]) -> StepResult:
        """Write every sequence's new K/V into the cache; return the logits (and scores) each sequence asked for."""
        self.backend.plan(
            [
                SequenceAttention(
                    len(s.token_ids), s.start_pos, s.page_table, s.sparse, s.score_rows, s.score_len
                )
                for s in seqs
            ]
        )
        dev = self.model.device
        ids = torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.long)
        positions = torch.cat([torch.arange(s.start_pos, s.start_pos + len(s.token_ids)) for s in seqs])
        hidden = self.model.forward(ids.to(dev), positions.to(dev), self.backend)
        rows, end = [], 0
        for s in seqs:
            end += len(s.token_ids)
            rows.extend(range(end - s.num_logits, end))
        logits = self.model.logits(hidden[torch.tensor(rows, dtype=torch.long, device=dev)])
        sizes = [s.num_logits for s in seqs]
        greedy = iter(logits.argmax(dim=-1).tolist())
        argmax = [[next(greedy) for _ in range(n)] for n in sizes]
        return StepResult(list(logits.split(sizes)), argmax, self.backend.take_scores())
