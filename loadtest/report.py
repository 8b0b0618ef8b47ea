"""Summaries of a load run: latency statistics, throughput, goodput, speculation from /metrics; JSON, markdown, PNG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .http_client import RequestResult
from .runner import RunResult
from .server_metrics import client_spec_sum, spec_delta

PERCENTILES = (50, 90, 99)
METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_KEYS = {"ttft", "tpot", "e2el"}


def stats_ms(values: list[float]) -> dict:
    """count, mean, median, p90, p99, min, max of seconds, in milliseconds (None when there are none)."""
    if not values:
        return {"count": 0, "mean": None, "median": None, "p90": None, "p99": None, "min": None, "max": None}
    a = np.asarray(values, dtype=float) * 1000.0
    p50, p90, p99 = (float(x) for x in np.percentile(a, PERCENTILES))
    return {"count": len(values), "mean": float(a.mean()), "median": p50, "p90": p90, "p99": p99,
            "min": float(a.min()), "max": float(a.max())}


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """`ttft:500 tpot:50 e2el:10000` (milliseconds) -> {"ttft": 500.0, ...}."""
    slos = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in SLO_KEYS or not value:
            raise ValueError(f"bad SLO {item!r}: use ttft:MS, tpot:MS or e2el:MS")
        slos[key] = float(value)
    return slos


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    if not r.ok:
        return False
    measured = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.e2e}
    for key, limit_ms in slos.items():
        v = measured[key]
        if v is not None and v * 1000.0 > limit_ms:  # tpot is None for 1-token answers: nothing to miss
            return False
    return True


def throughput_timeline(results: list[RequestResult], duration_s: float, bucket_s: float | None = None) -> dict:
    """Output tokens and completed requests per second, in buckets over the run. A request's tokens are spread
    evenly over its text chunks (with speculation one chunk can carry several tokens)."""
    bucket_s = bucket_s or max(0.25, duration_s / 60)
    n = max(1, int(np.ceil(duration_s / bucket_s)))
    tokens = np.zeros(n)
    done = np.zeros(n)
    for r in results:
        if r.chunk_times and r.output_tokens:
            per_chunk = r.output_tokens / len(r.chunk_times)
            for t in r.chunk_times:
                tokens[min(n - 1, int(t / bucket_s))] += per_chunk
        if r.ok and r.e2e is not None:
            done[min(n - 1, int((r.start + r.e2e) / bucket_s))] += 1
    return {"bucket_s": bucket_s, "t": [i * bucket_s for i in range(n)],
            "output_tokens_per_s": (tokens / bucket_s).tolist(), "requests_per_s": (done / bucket_s).tolist()}


def summarize(run: RunResult, slos: dict[str, float] | None = None) -> dict:
    results = run.results
    ok = [r for r in results if r.ok]
    by_status: dict[str, int] = {}
    for r in results:
        key = str(r.status) if r.status is not None else "no_response"
        by_status[key] = by_status.get(key, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    d = run.duration_s
    slos = slos or {}
    good = sum(1 for r in ok if meets_slos(r, slos))
    summary = {
        "config": run.config,
        "model": run.model,
        "max_model_len": run.max_model_len,
        "duration_s": d,
        "requests": {"issued": len(results), "completed": len(ok), "failed": len(results) - len(ok),
                     "by_status": by_status,
                     "finish_reasons": _count(r.finish_reason for r in ok)},
        "tokens": {"input": in_tokens, "output": out_tokens},
        "throughput": {"requests_per_s": len(ok) / d if d else None,
                       "output_tokens_per_s": out_tokens / d if d else None,
                       "total_tokens_per_s": (in_tokens + out_tokens) / d if d else None},
        "goodput": {"slos_ms": slos, "good_requests": good, "requests_per_s": good / d if d else None},
        "latency_ms": {
            "ttft": stats_ms([r.ttft for r in ok if r.ttft is not None]),
            "tpot": stats_ms([r.tpot for r in ok if r.tpot is not None]),
            "itl": stats_ms([x for r in ok for x in r.itls]),
            "e2el": stats_ms([r.e2e for r in ok if r.e2e is not None]),
        },
        "speculation": {
            "server_metrics": spec_delta(run.before, run.after),
            "responses": client_spec_sum([r.spec_decode for r in ok]),
        },
        "metrics_scrape_errors": [e for e in (run.before.error, run.after.error) if e],
        "errors": _count(r.error[:120] for r in results if r.error),
        "timeline": throughput_timeline(results, d),
    }
    return summary


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[str(x)] = out.get(str(x), 0) + 1
    return out


def _f(x, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(summary: dict, title: str = "Load test") -> str:
    req, thr, gp = summary["requests"], summary["throughput"], summary["goodput"]
    lines = [f"# {title}", "",
             f"Model `{summary['model']}`, {req['issued']} requests in {summary['duration_s']:.1f} s " + (
                 "(the soak's admitted good requests)." if summary["config"].get("mode") == "soak" else
                 f"(rate {summary['config'].get('rate') or 'inf'} req/s, burstiness {summary['config'].get('burstiness')}, "
                 f"max concurrency {summary['config'].get('max_concurrency') or 'none'})."), "",
             "| | value |", "|---|---|",
             f"| completed / failed | {req['completed']} / {req['failed']} |",
             f"| HTTP statuses | {', '.join(f'{k}: {v}' for k, v in sorted(req['by_status'].items()))} |",
             f"| input / output tokens | {summary['tokens']['input']} / {summary['tokens']['output']} |",
             f"| request throughput | {_f(thr['requests_per_s'], 2)} req/s |",
             f"| output token throughput | {_f(thr['output_tokens_per_s'])} tok/s |",
             f"| total token throughput | {_f(thr['total_tokens_per_s'])} tok/s |",
             f"| goodput ({', '.join(f'{k} <= {v:g} ms' for k, v in gp['slos_ms'].items()) or 'no SLOs'}) | "
             f"{gp['good_requests']} requests, {_f(gp['requests_per_s'], 2)} req/s |",
             "", "| latency (ms) | mean | median | p90 | p99 | n |", "|---|---|---|---|---|---|"]
    for name, s in summary["latency_ms"].items():
        lines.append(f"| {name} | {_f(s['mean'])} | {_f(s['median'])} | {_f(s['p90'])} | {_f(s['p99'])} | {s['count']} |")
    sm, resp = summary["speculation"]["server_metrics"], summary["speculation"]["responses"]
    lines += ["", "| speculation | acceptance rate | mean acceptance length | drafts | draft tokens | accepted |",
              "|---|---|---|---|---|---|"]
    if sm["available"]:
        lines.append(f"| server /metrics (delta) | {_f(sm['acceptance_rate'], 3)} | {_f(sm['mean_acceptance_length'], 3)} | "
                     f"{sm['num_drafts']:g} | {sm['num_draft_tokens']:g} | {sm['num_accepted_tokens']:g} |")
    else:
        lines.append(f"| server /metrics | unavailable (missing: {', '.join(sm['missing'])}) | | | | |")
    lines.append(f"| responses' `spec_decode` | {_f(resp['acceptance_rate'], 3)} | {_f(resp['mean_acceptance_length'], 3)} | "
                 f"{resp['num_drafts']} | {resp['num_draft_tokens']} | {resp['num_accepted_tokens']} |")
    if summary["errors"]:
        lines += ["", "Errors:", ""] + [f"- {n} x {msg}" for msg, n in summary["errors"].items()]
    return "\n".join(lines) + "\n"


def plot(run: RunResult, summary: dict, out_dir: Path) -> list[Path]:
    """latency_cdf.png (TTFT, TPOT, ITL, E2E) and throughput.png (tokens and requests per second over time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in run.results if r.ok]
    series = {"TTFT": [r.ttft for r in ok if r.ttft is not None], "TPOT": [r.tpot for r in ok if r.tpot is not None],
              "ITL": [x for r in ok for x in r.itls], "E2E latency": [r.e2e for r in ok if r.e2e is not None]}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (name, values) in zip(axes, series.items()):
        if values:
            v = np.sort(np.asarray(values) * 1000.0)
            ax.plot(v, np.arange(1, len(v) + 1) / len(v))
        ax.set_title(f"{name} CDF (n={len(values)})")
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests / tokens")
    fig.tight_layout()
    paths = [out_dir / "latency_cdf.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    tl = summary["timeline"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.step(tl["t"], tl["output_tokens_per_s"], where="post", label="output tokens/s")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("output tokens/s")
    ax2 = ax.twinx()
    ax2.step(tl["t"], tl["requests_per_s"], where="post", color="tab:orange", label="completed requests/s")
    ax2.set_ylabel("requests/s")
    fig.legend(loc="upper right")
    ax.set_title("throughput over time")
    fig.tight_layout()
    paths.append(out_dir / "throughput.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def write(run: RunResult, summary: dict, out_dir: str | Path, title: str = "Load test", plots: bool = True,
          extra_markdown: str = "") -> dict[str, Path]:
    """result.json (summary + per-request records), report.md and the plots into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "result.json", "markdown": out / "report.md"}
    files["json"].write_text(json.dumps({"summary": summary, "requests": [r.as_dict() for r in run.results]}, indent=1))
    files["markdown"].write_text(markdown(summary, title) + extra_markdown)
    if plots:
        for p in plot(run, summary, out):
            files[p.stem] = p
    return files
