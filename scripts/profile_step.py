"""Profiles decode steps of the engine on CUDA (torch.profiler): where a step's time goes, per variant.

Usage (GPU machine, after scripts/gpu_bench.sh has set up the package path):
    python3 scripts/profile_step.py --batch 64 --context 8192 --out $OUT
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import io
import pstats
import shutil
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from specattn.engine.config import CacheConfig, EngineConfig, SchedulerConfig, SpecConfig
from specattn.engine.engine import LLMEngine
from specattn.engine.loader import load_model_files
from specattn.engine.sampling import SamplingParams


def _timed_phases(engine: LLMEngine, steps: int) -> dict[str, float]:
    """Seconds per step in the draft chain, the verification forward (score extraction included), the selection and the rest,
    each phase ended by a device sync (so the sum is a little above the bare step)."""
    spent = {"drafts": 0.0, "forward": 0.0, "refresh": 0.0}

    def timed(name, fn):
        def wrapper(*a, **kw):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*a, **kw)
            torch.cuda.synchronize()
            spent[name] += time.perf_counter() - t
            return out
        return wrapper

    originals = (engine._draft, engine.runner.run, engine._new_draft_states)
    engine._draft = timed("drafts", engine._draft)
    engine.runner.run = timed("forward", engine.runner.run)
    engine._new_draft_states = timed("refresh", engine._new_draft_states)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    total = time.perf_counter() - t
    engine._draft, engine.runner.run, engine._new_draft_states = originals
    spent["rest"] = total - sum(spent.values())
    return {k: v / steps for k, v in spent.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=".")
    args = p.parse_args()
    files = load_model_files(None)
    g = torch.Generator().manual_seed(0)
    # room for every decode step below, and prefill in few steps: requests that finish prefill early decode
    # while the rest prefill, and none may finish before the measured steps (that would shrink the batch)
    prompts = [torch.randint(100, 40000, (args.context - 512,), generator=g).tolist() for _ in range(args.batch)]
    pages = args.batch * (args.context // 16 + 8)
    report = []
    for drafter, gamma in (("none", 0), ("specattn", 4)):
        engine = LLMEngine(EngineConfig(device="cuda", spec=SpecConfig(drafter=drafter, gamma=max(gamma, 1), adaptive=False),
                                        cache=CacheConfig(num_pages=pages),
                                        scheduler=SchedulerConfig(max_num_seqs=args.batch, max_num_batched_tokens=32768)), files)
        for i, ids in enumerate(prompts):
            engine.add_request(f"r{i}", ids, SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        while any(r.num_computed < len(r.prompt_ids) for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()
        for _ in range(4):
            engine.step()
        assert engine.num_running == args.batch, f"{engine.num_running} of {args.batch} requests running"
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        bare_step = (time.perf_counter() - t) / args.steps
        breakdown = _timed_phases(engine, args.steps)
        report.append(f"## {drafter}: {bare_step * 1000:.1f} ms/step without profilers; phases (synchronized, ms/step): "
                      + ", ".join(f"{k} {v * 1000:.1f}" for k, v in breakdown.items()) + "\n")
        print(f"{drafter}: {bare_step * 1000:.1f} ms/step bare;", {k: round(v * 1000, 1) for k, v in breakdown.items()})
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                engine.step()
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - t0) / args.steps
        trace = Path(args.out, f"trace-{drafter}.json")
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        # host-side Python: where the step's wall time goes outside torch ops
        stats_io = io.StringIO()
        py = cProfile.Profile()
        t1 = time.perf_counter()
        py.enable()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        py.disable()
        plain_step = (time.perf_counter() - t1) / args.steps
        pstats.Stats(py, stream=stats_io).sort_stats("tottime").print_stats(25)
        pstats.Stats(py, stream=stats_io).sort_stats("cumulative").print_stats(35)
        report.append(f"## {drafter}: {plain_step * 1000:.1f} ms/step under cProfile\n\n```\n{stats_io.getvalue()[-16000:]}\n```\n")
        averages = prof.key_averages()
        table = averages.table(sort_by="cuda_time_total", row_limit=18)
        # kernel time per step against the bare step: what is left is the device waiting for the host
        busy = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA) / args.steps / 1000
        report.append(f"## {drafter}: device busy {busy:.1f} ms/step of {bare_step * 1000:.1f} (kernels, profiled steps)\n")
        print(f"{drafter}: device busy {busy:.1f} ms/step")
        cpu_table = averages.table(sort_by="self_cpu_time_total", row_limit=12)
        report.append(f"## {drafter} gamma={gamma} batch={args.batch} context={args.context}: {per_step * 1000:.1f} ms/step "
                      f"(profiled)\n\n```\n{table}\n```\n\nBy host time:\n\n```\n{cpu_table}\n```\n")
        print(f"{drafter}: {per_step * 1000:.1f} ms/step")
        del engine
        torch.cuda.empty_cache()
    Path(args.out, "profile.md").write_text("\n".join(report))


if __name__ == "__main__":
    main()
