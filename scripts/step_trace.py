"""Wall time of every engine step of one offline run, per variant: where a variant's time goes step by step
(e.g. whether adaptive's plain steps cost what `none`'s do, and what its speculative probes cost), and with
--controller the step costs adaptive γ's controller recorded, in order (what its choices were made from).

With --warm, the controller first learns from one run of the workload and keeps what it learned (the offline
benchmark's `:warm` variants), so a run shows what a server's controller does once it knows its workload.

Each run also reports Python's full (generation 2) garbage collections during it: how many, their total and longest
pause. With --gc-freeze the heap alive after the engine's start-up and warm-up is frozen (`gc.freeze()`, as the
server and the offline benchmark do), so those collections skip it.

Usage (GPU machine, after `source scripts/gpu_env.sh`):
    python3 scripts/step_trace.py --docs .bench-docs/*.txt --context 8192 --batch 1 --variants none,adaptive,specattn
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections import defaultdict

import torch

from specattn.engine.config import SpecConfig
from specattn.engine.engine import LLMEngine
from specattn.engine.loader import load_model_files
from specattn.engine.sampling import SamplingParams
from specattn.loadtest.documents import load_documents
from specattn.loadtest.offline import bench_engine_config, build_prompts, parse_variant


def trace(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[tuple[int, float, int]]:
    """(γ, seconds, tokens) of each step after every request had its first token."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"t{i}", p, params)
    started: set[str] = set()
    steps = []
    while engine.has_unfinished_requests():
        in_flight = engine._in_flight
        t = time.perf_counter()
        outs = engine.step()
        seconds = time.perf_counter() - t
        decoding = len(started) == len(prompts)
        started.update(o.request_id for o in outs if o.new_token_ids)
        if decoding and in_flight is not None:
            steps.append((in_flight.gamma, seconds, sum(len(o.new_token_ids) for o in outs)))
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize()
    return steps


def record_controller(engine: LLMEngine) -> list[tuple[int, int, float]]:
    """(γ, batch, seconds) of each step cost the engine's γ controller records from now on."""
    controller, recorded = engine.gamma_controller, []
    record = controller.record_step_time

    def recording(batch_size: int, gamma: int, seconds: float) -> None:
        recorded.append((gamma, batch_size, seconds))
        record(batch_size, gamma, seconds)

    controller.record_step_time = recording
    return recorded


def record_full_collections() -> list[float]:
    """Seconds of each generation-2 garbage collection from now on (the list fills as they happen)."""
    pauses: list[float] = []
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                pauses.append(time.perf_counter() - started[0])

    gc.callbacks.append(on_gc)
    return pauses


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--docs", nargs="+", required=True)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--variants", type=lambda s: s.split(","), default=["none", "adaptive", "specattn"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--controller", action="store_true", help="print each step cost the γ controller recorded")
    p.add_argument("--warm", action="store_true",
                   help="first serve the workload once with a new controller (traced as run 'warm-up'), then keep "
                        "the γ controller across the runs after it")
    p.add_argument("--gc-freeze", action="store_true", help="freeze the heap after start-up and warm-up (gc.freeze)")
    args = p.parse_args()
    pauses = record_full_collections()
    files = load_model_files(None)
    prompts = build_prompts(files, "summarize", load_documents(args.docs), args.context, args.batch, args.max_tokens)
    for name in args.variants:
        spec = parse_variant(name, SpecConfig())
        engine = LLMEngine(bench_engine_config(args.device, None, spec, args.context, args.batch, args.max_tokens), files)
        trace(engine, [q[:256] for q in prompts], 24)  # warm-up, as the offline benchmark does
        if args.gc_freeze:
            gc.collect()
            gc.freeze()
        for r in (["warm-up"] if args.warm else []) + list(range(args.repeats)):
            engine.reset_stats(keep_controller=args.warm and r != "warm-up")
            recorded = record_controller(engine) if args.controller else []
            pauses.clear()
            steps = trace(engine, prompts, args.max_tokens)
            total = sum(s for _, s, _ in steps)
            tokens = sum(n for _, _, n in steps)
            by_gamma = defaultdict(list)
            for g, s, n in steps:
                by_gamma[g].append((s, n))
            per_gamma = "; ".join(
                f"γ={g}: {len(v)} steps, median {statistics.median(s for s, _ in v) * 1e3:.2f} ms, "
                f"{sum(n for _, n in v) / len(v):.2f} tok/step"
                for g, v in sorted(by_gamma.items())
            )
            slowest = sorted(range(len(steps)), key=lambda i: -steps[i][1])[:6]
            print(f"{name} run {r}: {len(steps)} steps {total * 1e3:.1f} ms {tokens / total:.1f} tok/s | {per_gamma} | slowest "
                  + ", ".join(f"#{i} γ={steps[i][0]} {steps[i][1] * 1e3:.1f}ms" for i in slowest)
                  + f" | full GCs: {len(pauses)}, {sum(pauses) * 1e3:.1f} ms, longest {max(pauses, default=0) * 1e3:.1f} ms",
                  flush=True)
            if args.controller:
                del engine.gamma_controller.record_step_time  # the class's own again: a kept controller is wrapped anew
                print(f"{name} run {r} controller (γ:ms, batch): " + " ".join(f"{g}:{t * 1e3:.2f}" for g, _, t in recorded)
                      + f" | batches {sorted({b for _, b, _ in recorded})}", flush=True)
        del engine
        if args.gc_freeze:
            gc.unfreeze()
        gc.collect()  # the deleted engine's cycles (and its GPU memory) go now, not inside the next one's runs


if __name__ == "__main__":
    main()
