"""The `specattn` command line: `specattn generate` (one prompt, printed) and `specattn serve` (the HTTP server)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from specattn.engine.config import (
    ATTENTION_BACKENDS, CPU_NUM_PAGES, DRAFTERS, DTYPES, SCHEDULER_DEFAULTS, CacheConfig, EngineConfig, SchedulerConfig,
    SpecConfig,
)
from specattn.engine.gguf_loader import ModelLoadError
from specattn.engine.sampling import SamplingParams


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a .gguf file or an HF model directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto",
                   help="auto: FlashInfer on CUDA (bf16/fp16) when installed, else the torch reference")
    p.add_argument("--enforce-eager", action="store_true", help="never replay steps as CUDA graphs (FlashInfer)")
    p.add_argument("--num-pages", type=int, default=None,
                   help=f"KV cache pages (default: {CPU_NUM_PAGES} on CPU; on CUDA as many as --gpu-memory-utilization leaves)")
    p.add_argument("--gpu-memory-utilization", type=float, default=CacheConfig.gpu_memory_utilization,
                   help="CUDA: the share of GPU memory the weights, KV cache and CUDA graphs may take (others' use "
                        "counts against it)")
    p.add_argument("--page-size", type=int, default=CacheConfig.page_size, help="tokens per KV page")
    gpu, reference = SCHEDULER_DEFAULTS["gpu"], SCHEDULER_DEFAULTS["reference"]
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help=f"requests decoded in one step (default: {gpu[0]} with FlashInfer on CUDA, else {reference[0]})")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=f"tokens one step may prefill, decodes included (default: {gpu[1]} with FlashInfer on CUDA, "
                        f"else {reference[1]})")
    p.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   help="read every step's tokens before queueing the next (by default a plain decode step's successor "
                        "is queued first, its tokens taken on the GPU, and after a verification the next draft chain)")
    p.add_argument("--drafter", choices=DRAFTERS, default=SpecConfig.drafter, help="none = plain decoding")
    p.add_argument("--gamma", type=int, default=SpecConfig.gamma, help="draft tokens per step (the maximum when adaptive)")
    p.add_argument("--no-adaptive", dest="adaptive", action="store_false", help="always draft --gamma tokens")
    p.add_argument("--budget-ratio", type=float, default=SpecConfig.budget_ratio, help="r: drafts keep ceil(r * context) positions")
    p.add_argument("--min-budget", type=int, default=SpecConfig.min_budget, help="k_min: ... but at least this many")
    p.add_argument("--reselect-after", type=int, default=SpecConfig.reselect_after,
                   help="a verification renews the drafts' selection once it is this many positions old (1: after "
                        "every verification; docs/speculation.md has where larger values paid)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return EngineConfig(
        model=args.model,
        device=device,
        dtype=DTYPES[args.dtype],
        attention=args.attention,
        enforce_eager=args.enforce_eager,
        cache=CacheConfig(page_size=args.page_size, num_pages=args.num_pages,
                          gpu_memory_utilization=args.gpu_memory_utilization),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  async_scheduling=args.async_scheduling),
        spec=SpecConfig(
            drafter=args.drafter, gamma=args.gamma, adaptive=args.adaptive,
            budget_ratio=args.budget_ratio, min_budget=args.min_budget, reselect_after=args.reselect_after,
        ),
    )


def _generate(args: argparse.Namespace) -> int:
    from specattn.engine.engine import LLMEngine

    engine = LLMEngine(engine_config(args))
    tok = engine.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    prompt_ids = tok.encode(text, add_special_tokens=not args.chat)
    engine.add_request("cli", prompt_ids, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        stats = engine.stats()
        print(json.dumps({"drafter": stats.drafter, "gamma_histogram": stats.gamma_histogram, **stats.spec.as_dict()}),
              file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from .serve import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    asyncio.run(
        serve(
            engine_config(args),
            host=args.host,
            port=args.port,
            served_model_name=args.served_model_name,
            api_key=args.api_key,
            max_queue=args.max_queue,
            shutdown_grace_s=args.shutdown_grace,
            log_level=args.log_level,
        )
    )
    return 0


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    from .app import DEFAULT_MAX_QUEUE

    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model's name)")
    p.add_argument("--api-key", default=os.environ.get("SPECATTN_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/ (default: $SPECATTN_API_KEY; unset: open)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="choices waiting for their first token before new requests get 503")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt and print it")
    _add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stats", action="store_true", help="print speculation stats (JSON) to stderr")
    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    _add_engine_args(srv)
    _add_serve_args(srv)
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "serve":
            return _serve(args)
    except (ModelLoadError, ValueError) as e:
        print(f"specattn: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
