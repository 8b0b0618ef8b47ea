"""`specattn-loadtest`: load a running server (`bench`) or soak it with faults (`soak`). Loopback targets only.

    specattn-loadtest bench --url http://127.0.0.1:8000 --dataset random --num-prompts 200 \
        --input-len 256 --output-len 64 --request-rate 4 --burstiness 1 --goodput ttft:500 tpot:50 --out results/run
    specattn-loadtest soak --url http://127.0.0.1:8000 --duration 60 --burst-size 32 --server-pid $PID --out results/soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import shlex
import sys
from pathlib import Path

from . import datasets, report
from .http_client import NotLoopbackError, check_loopback
from .runner import run_load
from .soak import SoakConfig, check, run_soak
from .soak import markdown as soak_markdown


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request, the whole request")
    p.add_argument("--out", default=None, help="directory for result.json, report.md and PNG plots")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="specattn-loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)

    b = sub.add_parser("bench", help="send a dataset with Poisson/gamma arrivals or a fixed concurrency")
    _common(b)
    b.add_argument("--dataset", choices=datasets.DATASETS, default="random")
    b.add_argument("--num-prompts", type=int, default=100)
    b.add_argument("--input-len", type=int, default=256, help="random: prompt tokens")
    b.add_argument("--output-len", type=int, default=64, help="random, documents: max_tokens (ignore_eos)")
    b.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths uniform in len*(1 +- ratio)")
    b.add_argument("--doc-chars", type=int, default=8000, help="documents: characters of document per prompt")
    b.add_argument("--docs", nargs="*", default=None, help="documents: text/HTML files (default: the Python docs)")
    b.add_argument("--jsonl", default=None, help="jsonl: one {prompt|messages, max_tokens, ...} per line")
    b.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (default inf: all at once)")
    b.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 Poisson, <1 burstier")
    b.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    b.add_argument("--max-duration", type=float, default=3600.0, help="stop issuing requests after this many seconds")
    b.add_argument("--goodput", nargs="*", default=None, metavar="KEY:MS", help="SLOs: ttft:MS tpot:MS e2el:MS")

    s = sub.add_parser("soak", help="bounded soak with malformed requests, disconnects, over-long prompts, bursts")
    _common(s)
    s.set_defaults(timeout=120.0)
    s.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    s.add_argument("--concurrency", type=int, default=4, help="workers issuing the mixed traffic")
    s.add_argument("--max-tokens", type=int, default=16, help="tokens per good request (ignore_eos)")
    s.add_argument("--mix", default="good:0.55,malformed:0.2,disconnect:0.15,too_long:0.1")
    s.add_argument("--burst-size", type=int, default=32, help="simultaneous requests per burst (above --max-queue)")
    s.add_argument("--burst-every", type=float, default=10.0, help="seconds between bursts")
    s.add_argument("--server-pid", type=int, default=None, help="read the server's RSS from /proc (else /metrics)")
    s.add_argument("--rss-growth-limit-mib", type=float, default=256.0)
    s.add_argument("--settle-timeout", type=float, default=30.0, help="seconds to wait for KV usage to reach 0")
    s.add_argument("--max-requests", type=int, default=100_000, help="hard bound on requests issued")
    return ap


def _dataset(args: argparse.Namespace) -> list:
    if args.dataset == "random":
        return datasets.synthetic(args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.seed)
    if args.dataset == "documents":
        return datasets.documents(args.num_prompts, args.output_len, args.doc_chars, args.docs, args.seed)
    if not args.jsonl:
        raise SystemExit("--dataset jsonl needs --jsonl FILE")
    return datasets.jsonl(args.jsonl, args.num_prompts)


def bench(args: argparse.Namespace, command: str) -> dict:
    specs = _dataset(args)
    run = asyncio.run(run_load(args.url, specs, rate=args.request_rate, burstiness=args.burstiness,
                               max_concurrency=args.max_concurrency, seed=args.seed, timeout_s=args.timeout,
                               max_duration_s=args.max_duration, api_key=args.api_key, progress=not args.no_progress))
    summary = report.summarize(run, report.parse_slos(args.goodput))
    summary["command"] = command
    summary["config"]["dataset"] = args.dataset
    print(report.markdown(summary, "Load test"))
    if args.out:
        report.write(run, summary, args.out, "Load test", plots=not args.no_plots,
                     extra_markdown=f"\nCommand: `{command}`\n")
    return summary


def soak(args: argparse.Namespace, command: str) -> dict:
    mix = {}
    for item in args.mix.split(","):
        k, _, v = item.partition(":")
        if k not in ("good", "malformed", "disconnect", "too_long"):
            raise SystemExit(f"bad --mix entry {item!r}")
        mix[k] = float(v)
    cfg = SoakConfig(duration_s=args.duration, concurrency=args.concurrency, max_tokens=args.max_tokens, mix=mix,
                     burst_size=args.burst_size, burst_every_s=args.burst_every, seed=args.seed, timeout_s=args.timeout,
                     settle_timeout_s=args.settle_timeout, server_pid=args.server_pid,
                     rss_growth_limit_mib=args.rss_growth_limit_mib, max_requests=args.max_requests)
    res = asyncio.run(run_soak(args.url, cfg, api_key=args.api_key, progress=not args.no_progress))
    verdict = check(res)
    run = res.as_run()
    summary = report.summarize(run)
    summary["command"] = command
    summary["soak"] = verdict
    text = soak_markdown(verdict) + "\n" + report.markdown(summary, "Admitted good requests").replace("# ", "## ", 1)
    text += ("\nThe server's /metrics delta also counts the speculation of requests the client disconnected from "
             "(and of none of the rejected ones); the responses' sum covers the admitted good requests only.\n")
    print(text)
    if args.out:
        out = Path(args.out)
        report.write(run, summary, out, "Soak", plots=not args.no_plots)
        (out / "report.md").write_text(f"# Soak\n\nCommand: `{command}`\n\n{text}")
        (out / "result.json").write_text(json.dumps({"summary": summary, "requests": [
            {**r.as_dict(), "label": lab} for r, lab in zip(res.results, res.labels)]}, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        check_loopback(args.url)
    except NotLoopbackError as e:
        print(f"specattn-loadtest: {e}", file=sys.stderr)
        return 2
    command = shlex.join(["specattn-loadtest", *argv])
    if args.mode == "bench":
        summary = bench(args, command)
        return 0 if summary["requests"]["completed"] else 1
    summary = soak(args, command)
    return 0 if summary["soak"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
