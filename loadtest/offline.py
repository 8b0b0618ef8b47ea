"""Offline engine benchmark: one workload under several decoding variants in one process, side by side.

    python -m specattn.loadtest.offline --workload summarize --contexts 4096 --batches 1,16 \
        --variants none,streaming,specattn,adaptive,hf --max-tokens 256 --out results/bench

A variant is `none`, `hf` (transformers generate), or `streaming` / `specattn` with optional
`:g<gamma>`, `:r<budget ratio>`, `:k<min budget>`, `:s<reselect after>` and `:adaptive`; `adaptive` alone is
`specattn:adaptive`. A trailing `:warm` first runs the workload once untimed and keeps what the γ controller
measured there, as a server's controller knows its workload after the first requests (otherwise every timed
run starts from a new controller; with `--repeats`, each warm run also keeps what the runs before it taught).
Greedy decoding throughout, so every variant must produce the tokens `none` does.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from specattn.engine.config import DTYPES, CacheConfig, EngineConfig, SchedulerConfig, SpecConfig
from specattn.engine.engine import EngineStats, LLMEngine
from specattn.engine.loader import ModelFiles, load_model_files
from specattn.engine.sampling import SamplingParams

from .documents import load_documents

STORY_TOPICS = ["a lighthouse keeper", "a city under the sea", "the first robot gardener", "a dragon who cannot fly",
                "two rival chess clubs", "a journey across a desert", "a library that never closes", "a lost letter"]


@dataclass
class Result:
    variant: str
    context: int
    batch: int
    requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float  # all output tokens over the whole run, prefill included
    decode_tokens_per_s: float | None = None  # output tokens once every request is decoding, over that span
    # ... only while every request is still running (speculation finishes requests unevenly; the batch then thins out)
    full_batch_tokens_per_s: float | None = None
    acceptance_rate: float | None = None
    mean_acceptance_length: float | None = None
    accepted_per_position: list[float] = field(default_factory=list)
    gamma_histogram: dict[int, int] = field(default_factory=dict)
    identical_to_none: int | None = None  # requests whose output equals plain decoding's, token for token
    # decode tok/s of every run with --repeats or --builds (the row's figures are the run with the median of these)
    decode_runs: list[float] = field(default_factory=list)
    note: str = ""


def parse_variant(name: str, defaults: SpecConfig) -> SpecConfig | None:
    """SpecConfig of a variant name; None for `hf`."""
    if name == "hf":
        return None
    parts = name.split(":")
    drafter = "specattn" if parts[0] == "adaptive" else parts[0]
    kw = dict(drafter=drafter, gamma=defaults.gamma, adaptive=parts[0] == "adaptive",
              budget_ratio=defaults.budget_ratio, min_budget=defaults.min_budget)
    for p in parts[1:]:
        if p == "adaptive":
            kw["adaptive"] = True
        elif p[:1] == "g":
            kw["gamma"] = int(p[1:])
        elif p[:1] == "r":
            kw["budget_ratio"] = float(p[1:])
        elif p[:1] == "k":
            kw["min_budget"] = int(p[1:])
        elif p[:1] == "s":
            kw["reselect_after"] = int(p[1:])
        else:
            raise ValueError(f"bad variant part {p!r} in {name!r}")
    return SpecConfig(**kw)


def build_prompts(files: ModelFiles, workload: str, docs: list[str], context: int, count: int, max_tokens: int) -> list[list[int]]:
    tok = files.tokenizer
    prompts = []
    for i in range(count):
        if workload == "summarize":
            doc_ids = tok.encode(docs[i % len(docs)], add_special_tokens=False)[: context - max_tokens - 64]
            text = "Summarize the following document.\n\n" + tok.decode(doc_ids)
        else:
            text = f"Write a long, detailed story about {STORY_TOPICS[i % len(STORY_TOPICS)]}."
        prompts.append(tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False))
    return prompts


@dataclass
class Timing:
    seconds: float  # the whole run: prefill and decode
    decode_seconds: float  # from the step after which every request had its first token, to the end
    decode_tokens: int  # tokens generated in that span
    # from the same step to the end of the step in which the first request finished (0: no such span, e.g. a
    # request finished before every request had its first token)
    full_batch_seconds: float
    full_batch_tokens: int

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else None


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, progress: tqdm) -> tuple[list[list[int]], Timing]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
    outputs: dict[str, list[int]] = {f"b{i}": [] for i in range(len(prompts))}
    produced, decode_start, decode_from, first_finish = 0, None, 0, None
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        finished = False
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
            produced += len(out.new_token_ids)
            progress.update(len(out.new_token_ids))
            finished |= out.finished
        # each step ends with its tokens on the host, so the clock here includes the step's device work
        now = time.perf_counter()
        if finished and first_finish is None:
            first_finish = (now, produced, decode_start is not None)
        if decode_start is None and all(outputs.values()):
            decode_start, decode_from = now, produced
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    full_seconds, full_tokens = 0.0, 0
    if first_finish is not None and first_finish[2]:  # the first finish came after every request was decoding
        full_seconds, full_tokens = first_finish[0] - decode_start, first_finish[1] - decode_from
    timing = Timing(end - start, end - (decode_start or end), produced - decode_from, full_seconds, full_tokens)
    return [outputs[f"b{i}"] for i in range(len(prompts))], timing


def benchmark(args: argparse.Namespace) -> list[Result]:
    files = load_model_files(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    docs = load_documents(args.docs) if args.workload == "summarize" else []
    defaults = SpecConfig(gamma=args.gamma, budget_ratio=args.budget_ratio, min_budget=args.min_budget)
    results: list[Result] = []
    try:
        _sweep(args, files, device, docs, defaults, results)
    except KeyboardInterrupt:  # `timeout -s INT` on a shared machine: keep what was measured
        print(f"interrupted after {len(results)} results", file=sys.stderr)
    return results


_Run = tuple[float, list[list[int]], Timing, EngineStats]  # decode tok/s, outputs, timing, the engine's statistics


def _sweep(args, files: ModelFiles, device: str, docs: list[str], defaults: SpecConfig, results: list[Result]) -> None:
    specs = {name: parse_variant(name.removesuffix(":warm"), defaults) for name in args.variants}  # None: HF
    for context in args.contexts:
        for batch in args.batches:
            prompts = build_prompts(files, args.workload, docs, context, max(batch, args.min_requests), args.max_tokens)
            # every engine variant's timed runs, over --builds engines each; the variants take turns build by build,
            # so a machine's drift, and what an engine's build fixes for its life (perf-notes 54), fall on all alike
            runs: dict[str, list[_Run]] = {}
            hf: dict[str, Result] = {}
            try:
                for build in range(args.builds):
                    for name in args.variants:  # a name given twice is built twice a build, its runs pooled
                        spec = specs[name]
                        if spec is None:
                            if build == 0:
                                hf[name] = _hf_result(files, prompts, args, device, context, batch)
                            continue
                        measured = _engine_runs(args, files, device, spec, name.endswith(":warm"), prompts, context,
                                                batch, name)
                        runs.setdefault(name, []).extend(measured)
            finally:  # an interrupted sweep keeps the rows of what it measured
                results.extend(_rows(args.variants, context, batch, len(prompts), runs, hf))


def _rows(variants: list[str], context: int, batch: int, requests: int, runs: dict[str, list[_Run]],
          hf: dict[str, Result]) -> list[Result]:
    """One row per variant measured: HF's as it ran, an engine variant's from its median run over every build."""
    rows, reference = [], None
    for name in dict.fromkeys(variants):  # one row per name
        if name in hf:
            rows.append(hf[name])
            continue
        if not runs.get(name):
            continue
        # the median run by decode tok/s, the lower of two (machines drift: one fast or slow run should not be the figure)
        _, outputs, timing, stats = sorted(runs[name], key=lambda r: r[0])[(len(runs[name]) - 1) // 2]
        produced = sum(len(o) for o in outputs)
        reference = outputs if name == "none" else reference
        rows.append(Result(
            variant=name, context=context, batch=batch, requests=requests, output_tokens=produced,
            seconds=round(timing.seconds, 3), tokens_per_s=round(produced / timing.seconds, 1),
            decode_tokens_per_s=None if timing.decode_tokens_per_s is None else round(timing.decode_tokens_per_s, 1),
            full_batch_tokens_per_s=round(timing.full_batch_tokens / timing.full_batch_seconds, 1)
            if timing.full_batch_seconds > 0 else None,
            acceptance_rate=round(stats.spec.acceptance_rate, 4) if stats.spec.num_drafts else None,
            mean_acceptance_length=round(stats.spec.mean_acceptance_length, 3) if stats.spec.num_drafts else None,
            accepted_per_position=[round(a / stats.spec.num_drafts, 3) for a in stats.spec.accepted_per_position],
            gamma_histogram=stats.gamma_histogram,
            identical_to_none=None if reference is None or name == "none" else sum(
                o == r for o, r in zip(outputs, reference)
            ),
            decode_runs=[round(r[0], 1) for r in runs[name]] if len(runs[name]) > 1 else [],
        ))
    return rows


def bench_engine_config(device: str, dtype: torch.dtype | None, spec: SpecConfig, context: int, batch: int,
                        max_tokens: int, prefill_chunk: int = 0) -> EngineConfig:
    """An engine for `batch` requests of `context` tokens: a KV pool that holds them all with their output, and
    (prefill_chunk 0) every prompt prefilled in the first step, so decoding runs at the full batch."""
    pages = -(-(context + max_tokens + 32) // 16) * batch + 64
    return EngineConfig(device=device, dtype=dtype, spec=spec, cache=CacheConfig(num_pages=pages),
                        scheduler=SchedulerConfig(max_num_seqs=batch,
                                                  max_num_batched_tokens=prefill_chunk or batch * (context + 64)))


def _engine_runs(args, files: ModelFiles, device: str, spec: SpecConfig, warm: bool, prompts, context: int, batch: int,
                 name: str) -> list[_Run]:
    """Build an engine for a variant, warm it up, and time --repeats runs of the workload on it."""
    engine = LLMEngine(bench_engine_config(device, DTYPES[args.dtype], spec, context, batch, args.max_tokens,
                                           args.prefill_chunk), files)
    # warm-up at the same batch size on short prompts: kernels compile (the engine captured its decode-phase CUDA
    # graphs when it was built)
    run_engine(engine, [p[:256] for p in prompts], 24, tqdm(disable=True))
    gc.collect()
    gc.freeze()  # as `specattn serve` does after warm-up: full collections skip the start-up heap
    if warm:
        engine.reset_stats()
        run_engine(engine, prompts, args.max_tokens, tqdm(disable=True))
    runs = []
    with tqdm(total=len(prompts) * args.max_tokens, desc=f"ctx {context} batch {batch} {name}", unit="tok",
              leave=False) as bar:
        for _ in range(args.repeats):
            engine.reset_stats(keep_controller=warm)
            outputs, timing = run_engine(engine, prompts, args.max_tokens, bar)
            runs.append((timing.decode_tokens_per_s or 0.0, outputs, timing, engine.stats()))
            bar.reset()
    del engine
    gc.unfreeze()
    gc.collect()  # the engine's cycles, and with them its GPU memory, go before the next one is built
    return runs


def _hf_result(files: ModelFiles, prompts, args, device: str, context: int, batch: int) -> Result:
    try:
        return run_hf(files, prompts, args, device, context, batch)
    except torch.OutOfMemoryError:  # HF pads and materializes masks; big batches may not fit
        torch.cuda.empty_cache()
        return Result("hf", context, batch, len(prompts), 0, 0.0, 0.0, note="out of memory")


def run_hf(files: ModelFiles, prompts, args, device: str, context: int, batch: int) -> Result:
    from .hf_baseline import build_hf_model, hf_generate_tokens_per_s

    dtype = DTYPES[args.dtype] or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = build_hf_model(files, device, dtype)
    pad = next(iter(files.tokenizer.eos_token_ids))
    hf_generate_tokens_per_s(model, prompts[:1], 2, 1, pad)  # warm-up
    start = time.perf_counter()
    rate = hf_generate_tokens_per_s(model, prompts, args.max_tokens, batch, pad)
    return Result("hf", context, batch, len(prompts), len(prompts) * args.max_tokens,
                  round(time.perf_counter() - start, 3), round(rate, 1))


def markdown_table(results: list[Result]) -> str:
    rows = ["| context | batch | variant | tok/s | × none | decode tok/s | decode × none | full-batch tok/s | full × none "
            "| accept rate | mean accept len | per-position accept | γ steps | = none |",
            "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | :---: |"]
    base = {(r.context, r.batch): r for r in results if r.variant == "none"}

    def ratio(r: Result, attr: str) -> str:
        ref = base.get((r.context, r.batch))
        value, ref_value = getattr(r, attr), ref and getattr(ref, attr)
        return f"{value / ref_value:.2f}" if value and ref_value else ""

    for r in results:
        decode = "" if r.decode_tokens_per_s is None else f"{r.decode_tokens_per_s:.1f}"
        if r.decode_runs:
            decode += f" ({min(r.decode_runs):.0f}–{max(r.decode_runs):.0f})"
        full = "" if r.full_batch_tokens_per_s is None else f"{r.full_batch_tokens_per_s:.1f}"
        fmt = lambda x: "" if x is None else f"{x:.3f}"
        same = "" if r.identical_to_none is None else f"{r.identical_to_none}/{r.requests}"
        if r.note:
            same = f"{same} {r.note}".strip()
        rows.append(
            f"| {r.context} | {r.batch} | {r.variant} | {r.tokens_per_s:.1f} | {ratio(r, 'tokens_per_s')} | {decode} | "
            f"{ratio(r, 'decode_tokens_per_s')} | {full} | {ratio(r, 'full_batch_tokens_per_s')} | {fmt(r.acceptance_rate)} | "
            f"{fmt(r.mean_acceptance_length)} | {' '.join(f'{a:.2f}' for a in r.accepted_per_position)} | "
            f"{' '.join(f'{g}:{n}' for g, n in sorted(r.gamma_histogram.items()))} | {same} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="specattn-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--workload", choices=["summarize", "longgen"], default="summarize")
    p.add_argument("--docs", nargs="*", help="text or HTML files (default: the Python documentation from python3-doc)")
    p.add_argument("--contexts", type=ints, default=[4096], help="prompt lengths in tokens (summarize)")
    p.add_argument("--batches", type=ints, default=[1])
    p.add_argument("--min-requests", type=int, default=1, help="at least this many requests even at small batch")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--variants", type=lambda s: s.split(","), default=["none", "streaming", "specattn", "adaptive"])
    p.add_argument("--gamma", type=int, default=SpecConfig.gamma)
    p.add_argument("--budget-ratio", type=float, default=SpecConfig.budget_ratio)
    p.add_argument("--min-budget", type=int, default=SpecConfig.min_budget)
    p.add_argument("--repeats", type=int, default=1,
                   help="timed runs per engine variant; a row shows the run with the median decode tok/s and their range")
    p.add_argument("--builds", type=int, default=1,
                   help="engines built per variant, the variants taking turns; a row's median and range are over "
                        "every build's runs (a run's speed can be fixed when its engine is built; a variant named "
                        "twice pools both engines' runs in one row)")
    p.add_argument("--prefill-chunk", type=int, default=0,
                   help="prefill token budget per step (default 0: every prompt in the first step, so decoding runs at the full batch)")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.builds < 1:
        p.error("--repeats and --builds must be at least 1")
    for name in args.variants:  # every name checked before the first (long) run, not when the sweep reaches it
        try:
            spec = parse_variant(name.removesuffix(":warm"), SpecConfig())
        except ValueError as exc:
            p.error(f"variant {name!r}: {exc}")
        if spec is None and name.endswith(":warm"):
            p.error(f"{name}: only the engine's variants have a γ controller to warm")
    if args.workload == "longgen":
        args.contexts = [0]
    results = benchmark(args)
    table = markdown_table(results)
    command = "python -m specattn.loadtest.offline " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and (args.device or "cuda") != "cpu" else platform.processor() or "cpu"
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        header = (f"Command: `{command}`\n\nDevice: {device}, dtype {args.dtype}, torch {torch.__version__}, "
                  f"{time.strftime('%Y-%m-%d')}\n\n")
        out.with_suffix(".md").write_text(header + table)
        out.with_suffix(".json").write_text(json.dumps(
            {"command": command, "device": device, "torch": torch.__version__, "results": [asdict(r) for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
