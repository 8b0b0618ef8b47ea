"""Request datasets: synthetic random lengths, long documents, or a user JSONL file. All seeded, all finite."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .documents import load_documents
from .http_client import RequestSpec

DATASETS = ("random", "documents", "jsonl")


def synthetic(num: int, input_len: int, output_len: int, range_ratio: float = 0.0, seed: int = 0,
              vocab: tuple[int, int] = (1000, 10000)) -> list[RequestSpec]:
    """`num` prompts of random token ids (exact prompt lengths, no tokenizer needed on the client), lengths
    drawn uniformly from [len * (1 - range_ratio), len * (1 + range_ratio)]. `ignore_eos` so each request
    produces exactly its output length."""
    if not 0 <= range_ratio < 1:
        raise ValueError("range_ratio must be in [0, 1)")
    rng = random.Random(seed)

    def draw(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - range_ratio)), int(n * (1 + range_ratio))))

    specs = []
    for _ in range(num):
        n_in, n_out = draw(input_len), draw(output_len)
        ids = [rng.randrange(*vocab) for _ in range(n_in)]
        specs.append(RequestSpec(prompt=ids, max_tokens=n_out, prompt_len=n_in,
                                 extra={"ignore_eos": True, "temperature": 0}))
    return specs


def documents(num: int, output_len: int, doc_chars: int = 8000, paths: list[str] | None = None, seed: int = 0,
              chat: bool = True) -> list[RequestSpec]:
    """Summaries of long documents (the Python documentation by default, see `documents.load_documents`),
    each prompt a `doc_chars`-character slice of one document at a seeded offset."""
    docs = load_documents(paths)
    if not docs:
        raise ValueError("no documents")
    rng = random.Random(seed)
    specs = []
    for i in range(num):
        doc = docs[i % len(docs)]
        start = rng.randrange(0, max(1, len(doc) - doc_chars))
        text = "Summarize the following document.\n\n" + doc[start:start + doc_chars]
        extra = {"ignore_eos": True, "temperature": 0}
        if chat:
            specs.append(RequestSpec(messages=[{"role": "user", "content": text}], max_tokens=output_len, extra=extra))
        else:
            specs.append(RequestSpec(prompt=text, max_tokens=output_len, extra=extra))
    return specs


def jsonl(path: str, num: int | None = None, default_max_tokens: int = 128) -> list[RequestSpec]:
    """One request per line: `{"prompt": str | [ids]}` (completions) or `{"messages": [...]}` (chat), with
    optional `max_tokens` and any other request fields (temperature, stop, ...), passed on as they are.
    With `num` larger than the file, the lines repeat in order."""
    rows = []
    with open(Path(path), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
                raise ValueError(f"{path}:{lineno}: each line needs exactly one of 'prompt' or 'messages'")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no requests")
    num = len(rows) if num is None else num
    specs = []
    for i in range(num):
        row = dict(rows[i % len(rows)])
        prompt, messages = row.pop("prompt", None), row.pop("messages", None)
        max_tokens = int(row.pop("max_tokens", row.pop("max_completion_tokens", default_max_tokens)))
        for key in ("model", "stream", "stream_options"):  # the load generator sets these
            row.pop(key, None)
        prompt_len = len(prompt) if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) else None
        specs.append(RequestSpec(prompt=prompt, messages=messages, max_tokens=max_tokens, prompt_len=prompt_len, extra=row))
    return specs
