"""The synchronous engine: owns model, cache, scheduler and runner, and advances all requests one step at a time."""

from __future__ import annotations

import itertools
import logging

from .attention import TorchAttentionBackend
from .config import EngineConfig
from .kv_cache import KVCache
from .loader import ModelFiles, load_model_files
from .model import DecoderModel
from .request import FinishReason, Request, RequestOutput, RequestStatus
from .runner import ModelRunner, SequenceInput
from .sampling import SamplingParams, sample_token
from .scheduler import Scheduler
from .stopping import OutputTracker

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, files: ModelFiles | None = None):
        files = files or load_model_files(config.model)
        self.config = config
        self.model_name = files.name
        self.model_config = files.config
        self.tokenizer = files.tokenizer
        dtype = config.resolved_dtype
        self.model = DecoderModel(files.config, files.weights, dtype, config.device)
        self.cache = KVCache(files.config, config.cache, dtype, config.device)
        backend = TorchAttentionBackend(self.cache, scale=files.config.head_dim**-0.5)
        self.runner = ModelRunner(self.model, backend)
        self.scheduler = Scheduler(config.scheduler, self.cache.allocator)
        self._trackers: dict[str, OutputTracker] = {}
        self._arrivals = itertools.count()

    @property
    def max_context(self) -> int:
        return self.model_config.max_context

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
        capacity = self.cache.allocator.num_pages * self.cache.page_size
        if min(len(prompt_ids) + params.max_tokens, self.max_context) > capacity:
            raise ValueError(f"the request needs more KV cache than the whole pool holds ({capacity} tokens)")

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
            generator=params.make_generator(),
        )
        self._trackers[request_id] = OutputTracker(req, self.tokenizer)
        self.scheduler.add(req)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its pages; its final output (finish_reason abort), or None if unknown."""
        tracker = self._trackers.get(request_id)
        if tracker is None:
            return None
        tracker.request.finish_reason = FinishReason.ABORT
        return self._finish(tracker, [])

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
        chunks = self.scheduler.schedule()
        if not chunks:
            return []
        logits = self.runner.run(
            [
                SequenceInput(
                    token_ids=c.request.all_ids[c.start : c.start + c.num_tokens],
                    start_pos=c.start,
                    page_table=c.request.page_table,
                    num_logits=1 if c.completes_sequence else 0,
                )
                for c in chunks
            ]
        )
        outputs = []
        for chunk, rows in zip(chunks, logits):
            req = chunk.request
            req.num_computed = chunk.start + chunk.num_tokens
            if not chunk.completes_sequence:
                continue
            tracker = self._trackers[req.request_id]
            token = sample_token(rows[-1], req.params, req.generator)
            taken = tracker.commit([token])
            outputs.append(self._finish(tracker, [token][:taken]) if req.finish_reason else self._output(tracker, [token]))
        return outputs

    def _output(self, tracker: OutputTracker, new_ids: list[int]) -> RequestOutput:
        req = tracker.request
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new_ids,
            new_text=tracker.take_new_text(),
            finished=req.finished,
            finish_reason=req.finish_reason,
            num_prompt_tokens=len(req.prompt_ids),
            num_output_tokens=len(req.output_ids),
            spec=req.spec if req.finished else None,
        )

    def _finish(self, tracker: OutputTracker, new_ids: list[int]) -> RequestOutput:
        req = tracker.request
        self.scheduler.remove(req)
        req.status = RequestStatus.FINISHED
        del self._trackers[req.request_id]
        return self._output(tracker, new_ids)

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
