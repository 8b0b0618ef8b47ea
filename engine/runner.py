"""Turns one step's sequences into the model's flat batch, runs it, and returns the logits each sequence asked for."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .attention import AttentionBackend, GraphShape, ScoreBatch, SequenceAttention, SparseKV
from .kv_cache import PageTable
from .model import DecoderModel


@dataclass
class SequenceInput:
    token_ids: list[int]  # the new tokens, at positions start_pos, start_pos + 1, ...
    start_pos: int
    page_table: PageTable | list[int]
    num_logits: int  # logits for this many trailing tokens (0 for a prefill chunk that is not the last)
    sparse: SparseKV | None = None  # a draft: the cache slots its one token (and the drafts after it) attend to
    score_rows: tuple[int, ...] = ()  # rows (indices into token_ids) whose attention weights to return
    score_len: int = 0  # ... over cache positions [0, score_len)
    # the last num_on_device token_ids are placeholders for tokens still on the device (drafts, and the previous
    # step's token when that step's result is not read yet): run() takes them from its `on_device` rows (one row
    # per such sequence, in order), so neither a verification nor a step launched ahead needs a host round-trip
    num_on_device: int = 0


@dataclass
class StepResult:
    logits: list[torch.Tensor]  # per sequence: [num_logits, vocab]
    scores: ScoreBatch | None  # attention scores of the sequences that asked (device work queued behind the forward)
    argmax: torch.Tensor  # every logits row's argmax, on the device (a step launched ahead reads its tokens here)
    greedy: torch.Tensor  # host copy of `argmax`, complete once `ready` has passed
    drafts: torch.Tensor | None  # host copy of the drafts run() filled in, likewise
    sizes: list[int]  # logits rows per sequence
    ready: torch.cuda.Event | None  # recorded after the forward and the two copies (None on the CPU: already done)

    def read_tokens(self) -> tuple[list[list[int]], list[list[int]]]:
        """Per sequence the greedy token of each logits row, and the draft tokens each drafting sequence verified.

        Waits for the forward only, not for what was queued behind it (score extraction, the next selection),
        so the host accepts tokens while the device still works."""
        if self.ready is not None:
            self.ready.synchronize()
        tokens = iter(self.greedy.tolist())
        return [[next(tokens) for _ in range(n)] for n in self.sizes], self.drafts.tolist() if self.drafts is not None else []


# picks draft j's token of every sequence from its logits [sequences, vocab] (sampling: on the host)
DraftChooser = Callable[[int, torch.Tensor], list[int]]


@dataclass
class _CapturedStep:
    """One CUDA graph of a whole forward (embedding to logits and argmax) over fixed input buffers."""

    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor  # [tokens, vocab]: every row, padding included
    argmax: torch.Tensor  # [tokens]


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

    def _on_device(self) -> contextlib.AbstractContextManager:
        # CUDA graphs, their memory pool and Triton launch on the thread's current device, which need not be ours
        return torch.cuda.device(self.model.device) if self.model.device.type == "cuda" else contextlib.nullcontext()

    def run(
        self, seqs: list[SequenceInput], on_device: torch.Tensor | None = None, drafts: torch.Tensor | None = None
    ) -> StepResult:
        """Write every sequence's new K/V into the cache; return the logits (and scores) each sequence asked for.

        on_device: the device tokens for the placeholders, flat in sequence order (any shape that flattens so);
        drafts: the draft tokens among them (from run_drafts), copied to the host for acceptance.
        """
        with self._on_device():
            return self._run(seqs, on_device, drafts)

    def run_drafts(
        self, seqs: list[SequenceInput], num_drafts: int, choose: DraftChooser | None, first: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`num_drafts` chained draft forwards (each sequence one token, sparse): draft j's input is draft j−1's token.
        Returns the tokens [sequences, num_drafts] on the model's device.

        choose None: greedy, the chain stays on the device (γ replays of one CUDA graph when the batch fits one)
        and nothing waits for it: the verification queues behind it; otherwise choose(j, logits) picks each draft's tokens on the host.
        first: [sequences] device tokens for the first draft's inputs in place of the sequences' token_ids (greedy only).
        shift: [sequences] device counts: each chain starts this many positions after its sequence's start_pos (drafts
        queued before the verification that decides their start is read; the recent slots cover every start), greedy only.
        """
        with self._on_device():
            return self._run_drafts(seqs, num_drafts, choose, first, shift)

    def _run_drafts(
        self, seqs: list[SequenceInput], num_drafts: int, choose: DraftChooser | None, first: torch.Tensor | None,
        shift: torch.Tensor | None,
    ) -> torch.Tensor:
        assert all(s.sparse is not None and len(s.token_ids) == 1 for s in seqs)
        assert (first is None and shift is None) or choose is None, "tokens and starts on the device are for greedy chains"
        shape = self._plan(seqs)
        if shift is not None:
            self.backend.next_draft(shift)
        dev, n = self.model.device, len(seqs)
        ids = [s.token_ids[0] for s in seqs]
        positions = [s.start_pos for s in seqs]
        if shape is not None:
            pad = shape.batch - n
            ids, positions = ids + [0] * pad, positions + [0] * pad
        if choose is None:
            if shape is None:
                input_ids = first if first is not None else torch.tensor(ids).to(dev, non_blocking=True)
                start = torch.tensor(positions).to(dev, non_blocking=True)
                tokens = self._draft_chain(input_ids, start if shift is None else start + shift, num_drafts)
            else:
                tokens = self._replay_chain(shape, seqs, ids, positions, num_drafts, first, shift)
            return tokens[:n]
        drafts: list[list[int]] = [[] for _ in seqs]
        for j in range(num_drafts):
            if j:
                self.backend.next_draft()
            logits, _ = self._forward(shape, seqs, ids, [p + j for p in positions])
            chosen = choose(j, logits[:n])
            for d, t in zip(drafts, chosen):
                d.append(t)
            ids[:n] = chosen
        return torch.tensor(drafts).to(dev, non_blocking=True)

    def _replay_chain(
        self, shape: GraphShape, seqs: list[SequenceInput], ids: list[int], positions: list[int], num_drafts: int,
        first: torch.Tensor | None, shift: torch.Tensor | None,
    ) -> torch.Tensor:
        """The draft chain as `num_drafts` replays of one draft forward's graph, each fed the one before's tokens
        on the device. One launch per draft: the GPU starts the first while the host launches the rest (a graph
        of the whole chain kept the GPU idle for its whole launch, ~0.7 ms per draft at 30 layers).
        The tokens land outside the graphs' shared memory pool, which the verification's graph reuses."""
        on_device = None if first is None else (torch.arange(len(first), device=first.device), first)
        step = self._replay(shape, seqs, ids, positions, on_device, shift)
        tokens = torch.empty(shape.batch, num_drafts, dtype=torch.long, device=self.model.device)
        tokens[:, 0] = step.argmax
        for j in range(1, num_drafts):
            self.backend.next_draft()
            step.input_ids.copy_(step.argmax)
            step.positions.add_(1)
            step.graph.replay()
            tokens[:, j] = step.argmax
        return tokens

    def _draft_chain(self, input_ids: torch.Tensor, positions: torch.Tensor, num_drafts: int) -> torch.Tensor:
        """[sequences, num_drafts] greedy draft tokens, every draft fed the one before's token, all on the device."""
        tokens = []
        for j in range(num_drafts):
            if j:
                self.backend.next_draft()
            input_ids = self._forward_logits(input_ids, positions + j)[1]
            tokens.append(input_ids)
        return torch.stack(tokens, dim=1)

    def _plan(self, seqs: list[SequenceInput]) -> GraphShape | None:
        return self.backend.plan(
            [SequenceAttention(len(s.token_ids), s.start_pos, s.page_table, s.sparse, s.score_rows, s.score_len) for s in seqs]
        )

    def _forward(
        self, shape: GraphShape | None, seqs: list[SequenceInput], ids: list[int], positions: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and argmax of every token of a planned step (a CUDA graph's: padding rows included)."""
        dev = self.model.device
        if shape is None:
            return self._forward_logits(torch.tensor(ids).to(dev, non_blocking=True), torch.tensor(positions).to(dev, non_blocking=True))
        step = self._replay(shape, seqs, ids, positions)
        return step.logits, step.argmax

    def _replay(
        self, shape: GraphShape, seqs: list[SequenceInput], ids: list[int], positions: list[int],
        on_device: tuple[torch.Tensor, torch.Tensor] | None = None, shift: torch.Tensor | None = None,
    ) -> _CapturedStep:
        """Run the graph of this planned shape (capturing it if it is new) on these padded inputs
        (on_device: flat token indices and device tokens to write over placeholder ids; shift: device offsets of the
        first positions, one per token)."""
        step = self._graphs.get(shape) or self._capture(shape, ids, positions, seqs)
        step.input_ids.copy_(torch.tensor(ids), non_blocking=True)
        if on_device is not None:
            step.input_ids[on_device[0]] = on_device[1]
        step.positions.copy_(torch.tensor(positions), non_blocking=True)
        if shift is not None:
            step.positions[: len(shift)] += shift
        step.graph.replay()
        return step

    def _run(self, seqs: list[SequenceInput], on_device: torch.Tensor | None, drafts: torch.Tensor | None) -> StepResult:
        shape = self._plan(seqs)
        dev = self.model.device
        ids = [t for s in seqs for t in s.token_ids]
        positions = [p for s in seqs for p in range(s.start_pos, s.start_pos + len(s.token_ids))]
        rows, placeholders, end = [], [], 0
        for s in seqs:
            end += len(s.token_ids)
            rows.extend(range(end - s.num_logits, end))
            placeholders.extend(range(end - s.num_on_device, end))
        assert (on_device is None) == (not placeholders), "tokens on the device come with placeholders for them"
        filled = None if on_device is None else (torch.tensor(placeholders).to(dev, non_blocking=True), on_device.reshape(-1))
        row_index = torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True)
        if shape is None:
            input_ids = torch.tensor(ids).to(dev, non_blocking=True)
            if filled is not None:
                input_ids[filled[0]] = filled[1]
            hidden = self.model.forward(input_ids, torch.tensor(positions).to(dev, non_blocking=True), self.backend)
            logits = self.model.logits(hidden[row_index])
            greedy = logits.argmax(dim=-1)
        else:
            # padding sequences: token 0 at positions 0.. on the scratch page
            pad = shape.num_tokens - len(ids)
            ids += [0] * pad
            positions += list(range(shape.query_len)) * (pad // shape.query_len)
            step = self._replay(shape, seqs, ids, positions, filled)
            logits, greedy = step.logits[row_index], step.argmax[row_index]
        sizes = [s.num_logits for s in seqs]
        # to pinned host memory without waiting; the event marks them done before the score extraction is queued
        greedy_host = greedy.to("cpu", non_blocking=True)
        drafts_host = drafts.to("cpu", non_blocking=True) if drafts is not None else None
        ready = None
        if dev.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return StepResult(list(logits.split(sizes)), self.backend.take_scores(), greedy, greedy_host, drafts_host, sizes, ready)

    def _forward_logits(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.logits(self.model.forward(input_ids, positions, self.backend))
        return logits, logits.argmax(dim=-1)

    def _capture(self, shape: GraphShape, ids: list[int], positions: list[int], seqs: list[SequenceInput]) -> _CapturedStep:
        """Record this shape's forward as a CUDA graph; the backend has planned `seqs` into its fixed buffers."""
        dev = self.model.device
        input_ids, pos = torch.tensor(ids, device=dev), torch.tensor(positions, device=dev)

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            return self._forward_logits(input_ids, pos)

        # one eager run first, on a side stream as graph capture wants: lazy inits and kernel compiles happen there
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream(dev).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits, argmax = forward()
        step = _CapturedStep(graph, input_ids, pos, logits, argmax)
        self._graphs[shape] = step
        return step
