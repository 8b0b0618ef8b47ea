"""Turns one step's sequences into the model's flat batch, runs it, and returns the logits each sequence asked for."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .attention import AttentionBackend, GraphShape, ScoreBatch, SequenceAttention, SparseKV
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


@dataclass
class _CapturedStep:
    """One CUDA graph of a whole forward (embedding to logits and argmax) over fixed input buffers."""

    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor  # [tokens, vocab]: every row, padding included
    argmax: torch.Tensor


class ModelRunner:
    def __init__(self, model: DecoderModel, backend: AttentionBackend):
        self.model = model
        self.backend = backend
        self._graphs: dict[GraphShape, _CapturedStep] = {}
        self._graph_pool = None

    @property
    def graph_shapes(self) -> list[GraphShape]:
        """The step shapes captured as CUDA graphs so far."""
        return list(self._graphs)

    def run(self, seqs: list[SequenceInput]) -> StepResult:
        """Write every sequence's new K/V into the cache; return the logits (and scores) each sequence asked for."""
        # CUDA graphs, their memory pool and Triton launch on the thread's current device, which need not be ours
        with torch.cuda.device(self.model.device) if self.model.device.type == "cuda" else contextlib.nullcontext():
            return self._run(seqs)

    def _run(self, seqs: list[SequenceInput]) -> StepResult:
        shape = self.backend.plan(
            [
                SequenceAttention(
                    len(s.token_ids), s.start_pos, s.page_table, s.sparse, s.score_rows, s.score_len
                )
                for s in seqs
            ]
        )
        dev = self.model.device
        ids = [t for s in seqs for t in s.token_ids]
        positions = [p for s in seqs for p in range(s.start_pos, s.start_pos + len(s.token_ids))]
        rows, end = [], 0
        for s in seqs:
            end += len(s.token_ids)
            rows.extend(range(end - s.num_logits, end))
        row_index = torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True)
        if shape is None:
            hidden = self.model.forward(torch.tensor(ids).to(dev), torch.tensor(positions).to(dev), self.backend)
            logits = self.model.logits(hidden[row_index])
            greedy = logits.argmax(dim=-1)
        else:
            # padding sequences: token 0 at positions 0.. on the scratch page
            pad = shape.num_tokens - len(ids)
            ids += [0] * pad
            positions += list(range(shape.query_len)) * (pad // shape.query_len)
            step = self._graphs.get(shape) or self._capture(shape, ids, positions)
            step.input_ids.copy_(torch.tensor(ids), non_blocking=True)
            step.positions.copy_(torch.tensor(positions), non_blocking=True)
            step.graph.replay()
            logits, greedy = step.logits[row_index], step.argmax[row_index]
        sizes = [s.num_logits for s in seqs]
        tokens = iter(greedy.tolist())
        argmax = [[next(tokens) for _ in range(n)] for n in sizes]
        return StepResult(list(logits.split(sizes)), argmax, self.backend.take_scores())

    def _forward_logits(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.logits(self.model.forward(input_ids, positions, self.backend))
        return logits, logits.argmax(dim=-1)

    def _capture(self, shape: GraphShape, ids: list[int], positions: list[int]) -> _CapturedStep:
        """Record this shape's forward as a CUDA graph (the backend has planned it: its fixed buffers hold this step)."""
        dev = self.model.device
        input_ids, pos = torch.tensor(ids, device=dev), torch.tensor(positions, device=dev)
        # one eager run first, on a side stream as graph capture wants: lazy inits and kernel compiles happen there
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self._forward_logits(input_ids, pos)
        torch.cuda.current_stream(dev).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits, argmax = self._forward_logits(input_ids, pos)
        step = _CapturedStep(graph, input_ids, pos, logits, argmax)
        self._graphs[shape] = step
        return step
