"""The synchronous engine: owns model, cache, scheduler and runner, and advances all requests one step at a time."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch

from specattn.kernels.reference import token_budget
from specattn.kernels.selection import compile_selection

from .acceptance import accept_drafts, accept_drafts_on_device
from .adaptive import GammaController
from .attention import AttentionBackend, ScoreBatch, SparseKV, TorchAttentionBackend
from .config import CPU_NUM_PAGES, MAX_SELECTION_AGE, EngineConfig
from .kv_cache import KVCache, gpu_kv_pages, kv_bytes_per_slot
from .loader import ModelFiles, load_model_files
from .logprobs import LogprobRows, TokenLogprob, queue_logprob_rows
from .model import DecoderModel
from .drafters import DraftState, make_drafter
from .request import FinishReason, Request, RequestOutput, RequestStatus, SpecStats
from .runner import ModelRunner, SequenceInput, StepResult
from .sampling import SamplingParams, sample_rows
from .scheduler import ScheduledChunk, Scheduler
from .step_clock import StepClock, StepMark
from .stopping import OutputTracker
from .transfer import to_device

# makes the logprobs of a request's new tokens (host work, left until the next step is queued)
_Logprobs = Callable[[], list[TokenLogprob]]

# An output token a step launched ahead takes from the device: it stands in the request's output ids from that launch
# until the step before is accepted (token ids are never negative)
_ON_DEVICE = -1


@dataclass
class EngineStats:
    drafter: str
    last_gamma: int
    gamma_histogram: dict[int, int]  # decode steps per chosen gamma
    spec: SpecStats
    num_running: int
    num_waiting: int
    kv_usage: float
    num_preemptions: int


@dataclass
class _LaunchedStep:
    """A step queued on the device whose tokens are not read yet: what accepting them needs."""

    chunks: list[ScheduledChunk]
    seqs: list[SequenceInput]
    gamma: int
    drafted: dict[str, int]  # request id -> its row of the drafts
    result: StepResult
    new_drafts: list[tuple[Request, DraftState]]  # selections queued behind the forward, for requests that refresh
    timed_decodes: int  # a pure decode step that captured no graph: its batch size (its wall time feeds the γ controller)
    started: StepMark  # when the device starts on it (the step's cost runs from there to the next step's start)
    # set when a step with sampling requests had a step launched ahead behind it: the token each chunk chose, on the
    # device, which that step took as its input (accepting this step commits exactly these)
    chosen: torch.Tensor | None = None
    drafts: torch.Tensor | None = None  # [drafting requests, γ] the drafts it verifies, on the device (rows: `drafted`)
    logprobs: LogprobRows | None = None  # the logits rows of its chunks whose requests asked for logprobs

    def renew_drafts(self) -> None:
        """Give its requests still running the selections it renewed (queued on the device behind its forward)."""
        for req, state in self.new_drafts:
            if not req.finished:
                req.draft = state


@dataclass
class _DraftsAhead:
    """The next step's draft chain, queued before the verification that decides where it starts was read: the
    verification is planned after the read (its lengths are host values), the drafts are ready by then."""

    gamma: int  # chosen for the next step; 0: nothing was drafted (the choice still stands)
    rows: dict[str, int]  # request id -> its row of `drafts`
    drafts: torch.Tensor | None  # [requests, γ] on the device
    # the next step's start, before its chain (None when nothing was queued: the step starts when it is launched,
    # and the device's wait for the host's read counts to the step before, as after any step read first)
    started: StepMark | None
    graphs_before: int


class LLMEngine:
    def __init__(self, config: EngineConfig, files: ModelFiles | None = None):
        files = files or load_model_files(config.model)
        self.config = config
        self.model_name = files.name
        self.model_config = files.config
        self.tokenizer = files.tokenizer
        dtype = config.resolved_dtype
        self.model = DecoderModel(files.config, files.weights, dtype, config.device)
        self.drafter = make_drafter(config.spec, files.config.num_layers)
        # from here on the config holds what it left to the engine: the pool's size and the device's limits
        self.config = replace(config, cache=replace(config.cache, num_pages=self._num_pages()),
                              scheduler=config.resolved_scheduler)
        self.cache = KVCache(files.config, self.config.cache, dtype, config.device)
        self.runner = ModelRunner(self.model, self._attention_backend())
        self.scheduler = Scheduler(self.config.scheduler, self.cache.allocator)
        self.gamma_controller = GammaController(config.spec.max_gamma, config.spec.adaptive)
        self.spec_stats = SpecStats()
        self._trackers: dict[str, OutputTracker] = {}
        self._in_flight: _LaunchedStep | None = None  # queued on the device, its tokens not read yet
        self.clock = StepClock(self.model.device)
        self._untimed: _LaunchedStep | None = None  # accepted, its cost known once the step after it is read
        self._arrivals = itertools.count()
        self._capture_graphs()
        if self.drafter is not None and self.drafter.needs_scores:  # on CUDA: the selection kernel, eager or graphed
            compile_selection(self.max_request_tokens, self.cache.k.device)

    def _capture_graphs(self) -> None:
        """Capture every decode-phase CUDA graph now, as vLLM does at start-up, so that no step pays for a capture later.

        Per batch bucket: plain decode, the verification for each draft length the engine may choose, and the one
        draft forward every chain replays; batches of padding sequences on the scratch page stand in for real ones.
        """
        buckets = self.runner.backend.graph_batches
        if not buckets:
            return
        scratch = [self.cache.scratch_page]
        gammas = self._graph_gammas()
        no_selection = torch.empty(self.model_config.num_layers, 0, dtype=torch.int32, device=self.cache.k.device)
        first_slot = self.cache.scratch_page * self.cache.page_size
        scored = self.drafter is not None and self.drafter.needs_scores
        for b in buckets:
            self.runner.run([SequenceInput([0], 0, scratch, 1)] * b)
            if scored:  # a plain decode that renews a stale selection
                self.runner.run([SequenceInput([0], 0, scratch, 1, score_rows=(0,), score_len=1)] * b)
            for g in gammas:
                score_kwargs = dict(score_rows=(0, g), score_len=1) if scored else {}
                self.runner.run([SequenceInput([0] * (g + 1), 0, scratch, g + 1, **score_kwargs)] * b)
            if self.drafter is not None:  # every γ's chain replays the one draft forward's graph
                sparse = SparseKV(no_selection, -1, [first_slot])
                self.runner.run_drafts([SequenceInput([0], 0, scratch, 1, sparse=sparse)] * b, 1, None)

    def _graph_gammas(self) -> list[int]:
        """The draft lengths whose verification is captured as a graph."""
        spec = self.config.spec
        choices = range(1, spec.max_gamma + 1) if spec.adaptive else [spec.max_gamma]
        # a verification longer than a page is never a graph (padding lives on the one scratch page)
        return [] if self.drafter is None else [g for g in choices if g + 1 <= self.config.cache.page_size]

    def _graph_output_bytes(self) -> int:
        """What the graphs _capture_graphs makes keep allocated: each its own float32 logits and argmax, a row per
        query token (≈ 4 GB for the default model at 256 sequences and adaptive γ ≤ 4)."""
        from .flashinfer_attention import graph_batches

        scored = self.drafter is not None and self.drafter.needs_scores
        queries = 1 + scored + sum(g + 1 for g in self._graph_gammas()) + (self.drafter is not None)
        rows = queries * sum(graph_batches(self.config.resolved_scheduler.max_num_seqs))
        return rows * (4 * self.model_config.vocab_size + 8)

    def _num_pages(self) -> int:
        """The KV pool's pages: as configured, else CPU_NUM_PAGES on the CPU and on CUDA what the memory budget leaves
        once the CUDA graphs' outputs are set aside."""
        cache, mc = self.config.cache, self.model_config
        if cache.num_pages is not None:
            return cache.num_pages
        if not self.config.device.startswith("cuda"):
            return CPU_NUM_PAGES
        per_slot, graphs = kv_bytes_per_slot(mc, self.config.resolved_dtype), 0
        if self.config.resolved_attention == "flashinfer" and not self.config.enforce_eager:
            from .flashinfer_attention import FlashInferAttentionBackend

            if self.drafter is not None and self.drafter.needs_scores:  # the scoring graphs' per-slot buffers
                per_slot += FlashInferAttentionBackend.score_bytes_per_slot(mc.num_layers, mc.num_heads, mc.num_kv_heads)
            graphs = self._graph_output_bytes()
        return gpu_kv_pages(cache, per_slot, self.config.device, reserved_bytes=graphs)

    def _attention_backend(self) -> AttentionBackend:
        scale = self.model_config.head_dim**-0.5
        if self.config.resolved_attention == "flashinfer":
            from .flashinfer_attention import FlashInferAttentionBackend

            spec = self.config.spec
            return FlashInferAttentionBackend(
                self.cache, scale, self.model_config.num_heads, max_batch=self.config.scheduler.max_num_seqs,
                max_query_len=spec.max_gamma + 1,
                max_draft_selected=token_budget(self.max_context, spec.budget_ratio, spec.min_budget),
                # a chain of drafts attends the positions since its anchor: fewer than MAX_SELECTION_AGE before
                # its step, then up to γ accepted and γ drafted
                max_draft_recent=MAX_SELECTION_AGE + 2 * spec.max_gamma,
                needs_scores=self.drafter is not None and self.drafter.needs_scores,
                graphs=not self.config.enforce_eager,
            )
        return TorchAttentionBackend(self.cache, scale)

    @property
    def max_context(self) -> int:
        return self.model_config.max_context

    @property
    def max_request_tokens(self) -> int:
        """Most tokens (prompt + output) one request may reach: the context, or what the KV pool holds less lookahead."""
        pool = self.cache.allocator.num_pages * self.cache.page_size
        return min(self.max_context, pool - self.config.spec.max_gamma)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError with a user-facing message if the request can never run."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(
                f"the prompt is {len(prompt_ids)} tokens but the model's context is {self.max_context} tokens "
                "(including at least one generated token)"
            )
        if min(len(prompt_ids) + params.max_tokens, self.max_context) > self.max_request_tokens:
            raise ValueError(
                f"the request needs more KV cache than the whole pool holds ({self.max_request_tokens} tokens)"
            )

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._trackers:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_ids, params)
        req = Request(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            arrival=next(self._arrivals),
            max_total_tokens=self.max_context,
            seed=params.resolve_seed(),
        )
        self._trackers[request_id] = OutputTracker(req, self.tokenizer)
        self.scheduler.add(req)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its pages; its final output (finish_reason abort), or None if unknown."""
        tracker = self._trackers.get(request_id)
        if tracker is None:
            return None
        tracker.request.finish_reason = FinishReason.ABORT
        if tracker.request.output_ids[-1:] == [_ON_DEVICE]:  # left by a step() that raised (the server then aborts all)
            tracker.request.output_ids.pop()
        self._retire(tracker.request)
        return self._output(tracker, [])

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def kv_usage(self) -> float:
        return self.cache.allocator.usage

    def step(self) -> list[RequestOutput]:
        """One iteration: accept the tokens of the step on the device (launching it first if none is), queue the
        next step, then detokenize and report this one's.

        The next step's scheduling, drafts and forward are queued before this step's text is made, so the GPU
        runs while the host detokenizes and builds outputs (SGLang's overlap schedule). The state it is planned
        from is whole: finishes, accepted tokens and new selections are settled first (a stop string, which needs
        the text, is checked then too). A request aborted while its step is in flight is skipped when accepted.

        After a plain decode step (every request one new token) the next step is known but for those tokens, which
        are on the device (sampled ones chosen there too): it is queued before this step is even read (vLLM's async
        scheduling), so the GPU does not wait for the host between the two. After any other greedy step (a
        verification, or one with prefill) the next step's draft chain is queued before the read, starting where
        the device finds each verification's accepted drafts end; the verification after it is planned once the
        step is read, while the GPU drafts. A request this step finishes wastes its row of the next."""
        launched = self._in_flight or self._launch()
        self._in_flight = None
        if launched is None:
            return []
        ahead = drafts_ahead = None
        if self.config.scheduler.async_scheduling:
            ahead = self._launch_ahead(launched)
            if ahead is None:
                drafts_ahead = self._draft_ahead(launched)
        committed = self._accept(launched)
        del launched  # its logits (every row, float32) need not stay alive next to the next step's
        self._in_flight = ahead or self._launch(drafts_ahead=drafts_ahead)
        if self._in_flight is None:
            self._untimed = None  # nothing follows it: the next step's start would count the engine's idle time
        return [self._emit(tracker, new_ids, logprobs) for tracker, new_ids, logprobs in committed]

    def _launch_ahead(self, launched: _LaunchedStep) -> _LaunchedStep | None:
        """Queue the step after `launched` before its tokens are read, if it is a plain decode step whose next step
        the scheduler would plan the same way: each request that can go on decodes its one new token (taken from the
        device), nobody waits to be admitted, the pages are there without preempting, the batch fits the budget."""
        chunks, sched = launched.chunks, self.scheduler
        if launched.gamma or not all(c.num_tokens == 1 and c.completes_sequence for c in chunks):
            return None
        scheduled = {id(c.request) for c in chunks}
        if any(id(r) not in scheduled for r in sched.running):
            return None  # a running request the budget left out: the scheduler may fit it in next
        # requests the length limits end with this token (or aborted) have no next step; EOS and stop ids are not
        # known yet: those requests get a next step that is dropped when it is accepted
        going_on = [
            (i, c) for i, c in enumerate(chunks)
            if not c.request.finished and len(c.request.output_ids) + 1 < c.request.params.max_tokens
            and c.request.num_tokens + 1 < c.request.max_total_tokens
        ]
        if sched.waiting and len(going_on) < sched.config.max_num_seqs:
            return None  # the scheduler would admit a request: a prefill chunk needs the host's view of the step
        lookahead = self.config.spec.max_gamma if self.drafter is not None else 0
        if not going_on or len(going_on) * (1 + lookahead) > sched.config.max_num_batched_tokens:
            return None
        need = sum(self.cache.allocator.pages_needed(c.request.page_table, c.start + 2 + lookahead) for _, c in going_on)
        if need > self.cache.allocator.num_free:
            return None
        for _, c in going_on:
            self.cache.allocator.grow(c.request.page_table, c.start + 2 + lookahead)
            c.request.output_ids.append(_ON_DEVICE)
        launched.renew_drafts()  # what the next step's drafts read (device work queued before them)
        # every chunk's token (greedy or sampled, each one row of logits), chosen on the device
        chosen = launched.result.argmax
        if not all(c.request.params.greedy for c in chunks):
            chosen = launched.chosen = sample_rows(torch.cat(launched.result.logits), [c.request.params for c in chunks],
                                                   [c.request.seed for c in chunks], [c.start + 1 for c in chunks])
        tokens = chosen[to_device([i for i, _ in going_on], chosen.device)]
        return self._launch([ScheduledChunk(c.request, c.start + 1, 1) for _, c in going_on], tokens)

    def _draft_ahead(self, launched: _LaunchedStep) -> _DraftsAhead | None:
        """Choose the next step's γ and queue its draft chain before `launched` is read, for every request `launched`
        leaves decoding with a draft context. Where a request's chain starts (after the drafts the verification
        accepts) and its first token (the one chosen there) are found on the device by the host's acceptance rule;
        pages are grown for any count. Greedy steps only: sampled drafts are chosen on the host."""
        if not all(c.request.params.greedy for c in launched.chunks):
            return None
        lookahead, g = self.config.spec.max_gamma, launched.gamma
        room = self.max_context - lookahead
        renewed = {id(req) for req, _ in launched.new_drafts}
        # (chunk index, chunk, most drafts it can accept): its next step starts 1 to that + 1 positions on; one
        # ending now (a stop, EOS) wastes its row
        going_on = []
        for i, c in enumerate(launched.chunks):
            req = c.request
            most = g if req.request_id in launched.drafted else 0
            if (c.completes_sequence and not req.finished and (req.draft is not None or id(req) in renewed)
                    and len(req.output_ids) + 1 < req.params.max_tokens and c.start + c.num_tokens + most < room):
                going_on.append((i, c, most))
        # the next verification's positions, at most: its start, then up to `lookahead` drafts
        ends = [c.start + c.num_tokens + most + 1 + lookahead for _, c, most in going_on]
        allocator = self.cache.allocator
        need = sum(allocator.pages_needed(c.request.page_table, end) for (_, c, _), end in zip(going_on, ends))
        # as for a step launched ahead: a batch over the token budget is one the scheduler would cut
        if not going_on or need > allocator.num_free or len(going_on) * (1 + lookahead) > self.scheduler.config.max_num_batched_tokens:
            return None
        gamma = self.gamma_controller.choose(len(going_on))
        if not gamma:
            return _DraftsAhead(0, {}, None, None, 0)
        started, graphs_before = self.clock.mark(), len(self.runner.graph_shapes)
        for (_, c, _), end in zip(going_on, ends):
            allocator.grow(c.request.page_table, end)
        launched.renew_drafts()  # what the chains read (queued on the device before them)
        accepted, first = self._accept_on_device(launched, [(i, most) for i, _, most in going_on])
        ps = self.cache.page_size
        seqs = [
            # planned at the earliest start; the recent slots reach the latest chain's last draft
            SequenceInput([0], c.start + c.num_tokens, c.request.page_table, 1,
                          sparse=c.request.draft.attended(c.start + c.num_tokens + most + gamma - 1, c.request.page_table, ps))
            for _, c, most in going_on
        ]
        drafts = self.runner.run_drafts(seqs, gamma, None, first, accepted)
        return _DraftsAhead(gamma, {c.request.request_id: j for j, (_, c, _) in enumerate(going_on)}, drafts, started, graphs_before)

    @staticmethod
    def _accept_on_device(launched: _LaunchedStep, chunks: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy acceptance of these (chunk index, drafts) of `launched`, on the device: per chunk how many drafts
        its verification accepts and the token it chooses after them (a chunk without drafts: its one token)."""
        g, dev = launched.gamma, launched.result.argmax.device
        row_start = np.cumsum([0] + launched.result.sizes)
        # a chunk's rows end with the ones its drafts' verification used (a prefill scoring prompt tokens has more)
        last = [row_start[i] + launched.result.sizes[i] - 1 - most for i, most in chunks]
        rows = [[start + min(j, most) for j in range(g + 1)] for start, (_, most) in zip(last, chunks)]
        targets = launched.result.argmax[to_device(rows, dev)]
        drafts = torch.full((len(chunks), g), -1, dtype=targets.dtype, device=dev)  # -1: no token agrees
        drafting = [k for k, (_, most) in enumerate(chunks) if most]
        if drafting:
            own = [launched.drafted[launched.chunks[chunks[k][0]].request.request_id] for k in drafting]
            drafts[to_device(drafting, dev)] = launched.drafts[to_device(own, dev)]
        return accept_drafts_on_device(drafts, targets)

    def _launch(
        self, chunks: list[ScheduledChunk] | None = None, on_device: torch.Tensor | None = None,
        drafts_ahead: _DraftsAhead | None = None,
    ) -> _LaunchedStep | None:
        """Schedule a step and queue it on the device: draft ×γ for decoding requests, then one verification/prefill
        forward, then the new selections. Nothing here waits for the device (except drafts of sampling requests,
        chosen on the host).

        chunks, on_device: a step launched ahead: one-token decodes whose tokens are on the device, in that order.
        drafts_ahead: this step's γ and draft chain, queued before the step before was read: its requests verify
        those drafts, any other decodes plainly."""
        if drafts_ahead is not None and drafts_ahead.started is not None:
            started, graphs_before = drafts_ahead.started, drafts_ahead.graphs_before
        else:
            started, graphs_before = self.clock.mark(), len(self.runner.graph_shapes)
        drafting = self.drafter is not None
        if chunks is None:
            chunks = self.scheduler.schedule(lookahead=self.config.spec.max_gamma if drafting else 0)
        if not chunks:
            return None
        # requests whose drafts would run past the context decode plainly this step (RoPE ends there)
        room = self.max_context - self.config.spec.max_gamma
        decodes = [
            c for c in chunks
            if c.num_tokens == 1 and c.completes_sequence and c.request.draft is not None and c.start < room
        ]
        if drafts_ahead is not None and drafts_ahead.gamma:
            decodes = [c for c in decodes if c.request.request_id in drafts_ahead.rows]
        if not decodes:
            gamma = 0
        else:
            gamma = drafts_ahead.gamma if drafts_ahead is not None else self.gamma_controller.choose(len(decodes))
        drafted = {c.request.request_id: j for j, c in enumerate(decodes)} if gamma else {}
        # a step launched ahead: every chunk's token is on the device, row i of on_device (drafts start from theirs)
        draft_rows = [drafted.get(c.request.request_id) for c in chunks]
        first = None
        if on_device is not None and gamma:
            first = on_device[to_device([i for i, j in enumerate(draft_rows) if j is not None], on_device.device)]
        # the drafts stay on the device: the verification reads them there, queued right behind the draft chain
        if gamma and drafts_ahead is not None:
            drafts = drafts_ahead.drafts[to_device([drafts_ahead.rows[c.request.request_id] for c in decodes], self.model.device)]
        else:
            drafts = self._draft(decodes, gamma, first) if gamma else None

        seqs, refreshed, prompt_rows = [], [], []
        for i, c in enumerate(chunks):
            req = c.request
            num_drafted = gamma if draft_rows[i] is not None else 0
            if on_device is not None:
                tokens = [0] * (1 + num_drafted)
            else:
                tokens = req.token_slice(c.start, c.start + c.num_tokens) + [0] * num_drafted
            # a new selection after prefill, after a verification once the selection is `reselect_after` positions
            # old, and after a plain (γ = 0) step once it is stale; until then every later position counts as recent
            age = c.start - req.draft.anchor if req.draft is not None else MAX_SELECTION_AGE
            refresh = drafting and c.completes_sequence and (
                age >= MAX_SELECTION_AGE or (num_drafted > 0 and age >= self.config.spec.reselect_after))
            scored = refresh and self.drafter.needs_scores
            num_logits = len(tokens) - c.num_tokens + 1 if c.completes_sequence else 0
            predicted = self._prompt_tokens_to_score(c)
            if predicted:  # rows from the one before the first predicted prompt token on
                num_logits = max(num_logits, c.num_tokens - predicted[0])
                prompt_rows.append((i, req.prompt_ids[c.start + 1 + predicted[0]: c.start + 2 + predicted[1]],
                                    req.params.prompt_logprobs))
            if refresh:
                refreshed.append((i, req, c.start + c.num_tokens - 1))
            seqs.append(
                SequenceInput(
                    token_ids=tokens,
                    start_pos=c.start,
                    page_table=req.page_table,
                    num_logits=num_logits,
                    # SpecAttn scores the verification's first and last rows over [0, anchor]
                    score_rows=(c.num_tokens - 1, len(tokens) - 1) if scored else (),
                    score_len=c.start + c.num_tokens if scored else 0,
                    num_on_device=num_drafted + (on_device is not None),
                )
            )
        result = self.runner.run(seqs, _placeholder_tokens(on_device, drafts, draft_rows), drafts)
        logprobs = queue_logprob_rows(result.logits, [(i, c.request.params) for i, c in enumerate(chunks)
                                                      if c.completes_sequence and c.request.params.logprobs is not None],
                                      prompt_rows)
        # the new selections queue on the device behind the score extraction while the host accepts tokens
        new_drafts = self._new_draft_states(refreshed, result.scores)
        # steps with prefill work, or that captured a CUDA graph (a one-off cost), say nothing about decode cost
        timed = bool(decodes) and len(decodes) == len(chunks) and len(self.runner.graph_shapes) == graphs_before
        return _LaunchedStep(chunks, seqs, gamma, drafted, result, new_drafts, len(decodes) if timed else 0, started,
                             drafts=drafts, logprobs=logprobs)

    @staticmethod
    def _prompt_tokens_to_score(c: ScheduledChunk) -> tuple[int, int] | None:
        """For a request asking for prompt logprobs: the (first, last) of the chunk's rows (offsets from its start)
        that predict prompt tokens not scored yet; None if none does. Row j predicts position start + j + 1; the
        prompt's first token has nothing to predict it, and a prefill again after preemption scores nothing twice."""
        req = c.request
        if req.params.prompt_logprobs is None:
            return None
        first = max(len(req.prompt_logprobs), 1, c.start + 1)
        last = min(c.start + c.num_tokens, len(req.prompt_ids) - 1)
        return (first - c.start - 1, last - c.start - 1) if first <= last else None

    def _accept(self, launched: _LaunchedStep) -> list[tuple[OutputTracker, list[int], _Logprobs | None]]:
        """Wait for a launched step's tokens and settle everything the next step is planned from: accepted drafts,
        output ids, finishes (finished requests leave the scheduler), new selections. Returns, per request that
        got tokens, its tracker, the new ids and (where it asked) what makes their logprobs once the next step is
        queued."""
        argmax_rows, draft_rows = launched.result.read_tokens()
        # The step before this one is timed now: the device has passed this one's start. A step costs the time from
        # the device starting on it to it starting on the next, so costs tile the timeline whichever steps follow
        # which (the host's accept and launch count where the device waited for them).
        if self._untimed is not None:
            self._time_step(self._untimed, launched.started)
            self._untimed = None
        live, live_index, dropped = [], [], False
        # the tokens a step launched ahead took as its inputs: those are what this step commits (a sampled choice made
        # again here, in another batch, could order tied probabilities differently)
        chosen = None if launched.chosen is None else launched.chosen.tolist()
        for i, (chunk, seq, logits, argmax) in enumerate(
            zip(launched.chunks, launched.seqs, launched.result.logits, argmax_rows)
        ):
            req = chunk.request
            if req.finished:  # aborted (or, launched ahead, finished by the step before) while the step was in flight
                dropped = True
                continue
            if req.output_ids and req.output_ids[-1] == _ON_DEVICE:
                req.output_ids.pop()  # the step launched ahead took this step's token from the device: here it is
            req.num_computed = chunk.start + chunk.num_tokens
            if launched.logprobs is not None and i in launched.logprobs.prompt:
                if not req.prompt_logprobs:
                    req.prompt_logprobs.append(TokenLogprob(req.prompt_ids[0], None, ()))
                first = len(req.prompt_logprobs)
                count = len(launched.logprobs.prompt[i][0])
                req.prompt_logprobs += launched.logprobs.prompt_logprobs(i, req.prompt_ids[first:first + count])
            if chunk.completes_sequence:
                live.append((chunk, seq, logits, argmax if chosen is None else [chosen[i]]))
                live_index.append(i)
        committed = []
        targets = [argmax for *_, argmax in live] if chosen is not None else _targets(live)
        for i, (chunk, _, _, _), target in zip(live_index, live, targets):
            req = chunk.request
            draft = draft_rows[launched.drafted[req.request_id]] if req.request_id in launched.drafted else None
            tokens = accept_drafts(draft, target) if draft is not None else [target[-1]]
            if draft is not None:
                accepted = len(tokens) - 1
                req.spec.record(launched.gamma, accepted)
                self.spec_stats.record(launched.gamma, accepted)
                self.gamma_controller.record_acceptance(launched.gamma, accepted)
                req.num_computed += accepted  # accepted drafts' K/V came from the verification itself
            tracker = self._trackers[req.request_id]
            taken = tracker.commit_ids(tokens)
            if req.finish_reason is not None:
                self._retire(req)
            num_top = req.params.logprobs
            logprobs = None if num_top is None else partial(launched.logprobs.token_logprobs, i, tokens[:taken], num_top)
            committed.append((tracker, tokens[:taken], logprobs))
        launched.renew_drafts()
        # a step some of whose requests were aborted is not timed: it may have waited, launched, while the engine idled
        if launched.timed_decodes and not dropped:
            self._untimed = launched
        return committed

    def _time_step(self, step: _LaunchedStep, next_started: StepMark) -> None:
        self.gamma_controller.record_step_time(step.timed_decodes, step.gamma, self.clock.seconds(step.started, next_started))

    def _emit(self, tracker: OutputTracker, new_ids: list[int], logprobs: _Logprobs | None) -> RequestOutput:
        """A request's output for one step: its new text and logprobs made now (the ids were committed when
        accepted), while the device runs the next step."""
        tracker.commit_text()
        return self._output(tracker, new_ids, logprobs() if logprobs is not None else None)

    def _new_draft_states(
        self, refreshed: list[tuple[int, Request, int]], scores: ScoreBatch | None
    ) -> list[tuple[Request, DraftState]]:
        """New draft contexts, all at once (device work, no wait), for the requests that verified or finished
        prefill this step: (step index, request, anchor)."""
        if not refreshed:
            return []
        selection = self.drafter.select([anchor for _, _, anchor in refreshed], scores, self.cache.k.device)
        slots = self.runner.backend.slots_of([i for i, _, _ in refreshed], selection.positions)
        budgets = selection.budgets
        return [(req, DraftState(anchor, slots[:, j, : budgets[j]])) for j, (_, req, anchor) in enumerate(refreshed)]

    def _draft(self, chunks: list[ScheduledChunk], gamma: int, first: torch.Tensor | None) -> torch.Tensor:
        """γ chained sparse forwards for all decoding requests at once; each sees only its draft positions.
        The draft tokens [chunks, γ], on the model's device. first: the chunks' tokens on the device (launched ahead)."""
        greedy = all(c.request.params.greedy for c in chunks)
        # a chain with sampling requests chooses its drafts on the host, so it needs its first tokens there too
        first_ids = None if first is None or greedy else first.tolist()
        first = first if greedy else None
        seqs = [
            SequenceInput(
                [first_ids[k]] if first_ids is not None else [0] if first is not None
                else c.request.token_slice(c.start, c.start + 1),
                c.start, c.request.page_table, 1,
                sparse=c.request.draft.attended(c.start + gamma - 1, c.request.page_table, self.cache.page_size),
            )
            for k, c in enumerate(chunks)
        ]

        def choose(j: int, logits: torch.Tensor) -> list[int]:
            # the same rule, and for sampling the same noise, the verification will use at this position
            return sample_rows(logits, [c.request.params for c in chunks], [c.request.seed for c in chunks],
                               [c.start + j + 1 for c in chunks]).tolist()

        return self.runner.run_drafts(seqs, gamma, None if greedy else choose, first)

    def reset_stats(self, keep_controller: bool = False) -> None:
        """Forget speculation statistics, preemption count and the γ controller's measurements (benchmarks call this
        after a warm-up); keep_controller: keep all it learned (step times, acceptance, when to probe next), forget
        only its histogram of choices."""
        self.spec_stats = SpecStats()
        self.scheduler.num_preemptions = 0
        if keep_controller:
            self.gamma_controller.histogram.clear()
        else:
            self.gamma_controller = GammaController(self.config.spec.max_gamma, self.config.spec.adaptive)
        self._untimed = None

    def stats(self) -> EngineStats:
        return EngineStats(
            drafter=self.config.spec.drafter,
            last_gamma=self.gamma_controller.last_gamma,
            gamma_histogram=dict(self.gamma_controller.histogram),
            spec=copy.deepcopy(self.spec_stats),
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            kv_usage=self.kv_usage,
            num_preemptions=self.scheduler.num_preemptions,
        )

    def _output(self, tracker: OutputTracker, new_ids: list[int], logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        """The request's output with these new ids; a finished request's is its last (its tracker is dropped)."""
        req = tracker.request
        if req.finished:
            del self._trackers[req.request_id]
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new_ids,
            new_text=tracker.take_new_text(),
            finished=req.finished,
            finish_reason=req.finish_reason,
            num_prompt_tokens=len(req.prompt_ids),
            num_output_tokens=len(req.output_ids),
            spec=req.spec if req.finished else None,
            logprobs=logprobs,
            prompt_logprobs=self._take_prompt_logprobs(req, new_ids),
        )

    @staticmethod
    def _take_prompt_logprobs(req: Request, new_ids: list[int]) -> list[TokenLogprob] | None:
        """The prompt logprobs, on the first output with tokens of a request that asked for them."""
        if req.params.prompt_logprobs is None or req.prompt_logprobs_sent or not new_ids:
            return None
        req.prompt_logprobs_sent = True
        return list(req.prompt_logprobs) or [TokenLogprob(req.prompt_ids[0], None, ())]  # a one-token prompt

    def _retire(self, req: Request) -> None:
        """Take a finished request out of scheduling and give its pages back."""
        self.scheduler.remove(req)
        req.status = RequestStatus.FINISHED

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts to completion together; the output token ids of each, in order (for tools and tests)."""
        ids = [f"gen-{next(self._arrivals)}" for _ in prompts]
        for rid, prompt in zip(ids, prompts):
            self.add_request(rid, prompt, params)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished_requests():
            for out in self.step():
                results[out.request_id].extend(out.new_token_ids)
        return [results[rid] for rid in ids]


def _targets(live: list[tuple[ScheduledChunk, SequenceInput, torch.Tensor, list[int]]]) -> list[list[int]]:
    """Per (chunk, its input, its logits rows, their argmax) the token each row chooses: the argmax, or for a sampling
    request its seeded choice, every sampled row of the step in one batch (one wait for the device)."""
    targets = [argmax for *_, argmax in live]
    sampled = [i for i, (chunk, *_) in enumerate(live) if not chunk.request.params.greedy]
    if not sampled:
        return targets
    rows, params, seeds, positions = [], [], [], []
    for i in sampled:
        chunk, seq, logits, _ = live[i]
        # logits row j chooses the token right after token (len - num_logits + j) of this step's input
        first = chunk.start + len(seq.token_ids) - seq.num_logits + 1
        rows.append(logits)
        params += [chunk.request.params] * len(logits)
        seeds += [chunk.request.seed] * len(logits)
        positions += range(first, first + len(logits))
    chosen = iter(sample_rows(torch.cat(rows), params, seeds, positions).tolist())
    for i in sampled:
        targets[i] = [next(chosen) for _ in range(len(live[i][2]))]
    return targets


def _placeholder_tokens(
    on_device: torch.Tensor | None, drafts: torch.Tensor | None, draft_rows: list[int | None]
) -> torch.Tensor | None:
    """A step's device tokens for its placeholders, flat in sequence order: each sequence's own token if the step was
    launched ahead (on_device[i]), then its drafts if it drafted (row draft_rows[i] of drafts)."""
    if on_device is None or drafts is None:
        return drafts if on_device is None else on_device
    gamma = drafts.shape[1]
    rows = [i for i, j in enumerate(draft_rows) if j is not None]
    table = torch.zeros(len(draft_rows), 1 + gamma, dtype=drafts.dtype, device=drafts.device)
    table[:, 0] = on_device
    table[to_device(rows, drafts.device), 1:] = drafts[to_device([draft_rows[i] for i in rows], drafts.device)]
    # integer indices, not a boolean mask: selecting by mask waits for the device to count the selected entries
    flat = [i * (1 + gamma) + k for i, j in enumerate(draft_rows) for k in range(1 + gamma * (j is not None))]
    return table.reshape(-1)[to_device(flat, drafts.device)]
