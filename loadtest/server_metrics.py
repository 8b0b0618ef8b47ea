"""The server's `/metrics` read as numbers: speculation counters, KV usage, queue gauges, resident memory.

Any metric may be absent (an older server, another exporter): lookups then answer None and reports
say "unavailable" instead of inventing a zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "specattn:"
DRAFTS = "spec_decode_num_drafts_total"
DRAFT_TOKENS = "spec_decode_num_draft_tokens_total"
ACCEPTED = "spec_decode_num_accepted_tokens_total"
# names tried in order; the first one present wins (vLLM spells KV usage both ways over its versions)
KV_USAGE = ("kv_cache_usage_ratio", "kv_cache_usage_perc", "gpu_cache_usage_perc", "kv_cache_usage", "cache_usage_perc")
RUNNING = ("num_requests_running",)
WAITING = ("num_requests_waiting",)
RSS = "process_resident_memory_bytes"


@dataclass
class Snapshot:
    """Sample name -> value summed over label sets (`_created` timestamps dropped)."""

    values: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # why the scrape failed, if it did

    def get(self, *names: str) -> float | None:
        for name in names:
            for candidate in (name, PREFIX + name):
                if candidate in self.values:
                    return self.values[candidate]
        return None

    @property
    def kv_usage(self) -> float | None:
        return self.get(*KV_USAGE)

    @property
    def running(self) -> float | None:
        return self.get(*RUNNING)

    @property
    def waiting(self) -> float | None:
        return self.get(*WAITING)

    @property
    def rss_bytes(self) -> float | None:
        return self.get(RSS)


def parse_metrics(text: str) -> Snapshot:
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return Snapshot(values)


async def scrape(client: httpx.AsyncClient, base_url: str, timeout_s: float = 10.0) -> Snapshot:
    try:
        r = await client.get(f"{base_url}/metrics", timeout=timeout_s)
        r.raise_for_status()
        return parse_metrics(r.text)
    except (httpx.HTTPError, ValueError) as e:
        return Snapshot(error=f"{type(e).__name__}: {e}")


def spec_delta(before: Snapshot, after: Snapshot) -> dict:
    """Speculation over the run from counter deltas: acceptance rate = accepted / drafted tokens,
    mean acceptance length = 1 + accepted / drafts. `available` False when a counter is missing."""
    names = {"num_drafts": DRAFTS, "num_draft_tokens": DRAFT_TOKENS, "num_accepted_tokens": ACCEPTED}
    out: dict = {"available": True, "missing": []}
    for key, name in names.items():
        b, a = before.get(name), after.get(name)
        if a is None or b is None:
            out["available"] = False
            out["missing"].append(PREFIX + name)
            out[key] = None
        else:
            out[key] = a - b
    if out["available"]:
        out["acceptance_rate"] = out["num_accepted_tokens"] / out["num_draft_tokens"] if out["num_draft_tokens"] else None
        out["mean_acceptance_length"] = 1 + out["num_accepted_tokens"] / out["num_drafts"] if out["num_drafts"] else None
    else:
        out["acceptance_rate"] = out["mean_acceptance_length"] = None
    return out


def client_spec_sum(spec_dicts: list[dict | None]) -> dict:
    """The same figures from the per-response `spec_decode` extension fields the client received."""
    drafts = sum((d or {}).get("num_drafts", 0) for d in spec_dicts)
    draft_tokens = sum((d or {}).get("num_draft_tokens", 0) for d in spec_dicts)
    accepted = sum((d or {}).get("num_accepted_tokens", 0) for d in spec_dicts)
    return {
        "responses_with_stats": sum(1 for d in spec_dicts if d),
        "num_drafts": drafts,
        "num_draft_tokens": draft_tokens,
        "num_accepted_tokens": accepted,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
    }


def process_rss_bytes(pid: int) -> int | None:
    """Resident memory of a local process from /proc (Linux); None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
