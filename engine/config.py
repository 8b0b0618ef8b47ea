"""Configuration: the model's architecture hyper-parameters and the engine's knobs."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, replace

import torch

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency-dependent RoPE scaling ("rope_type": "llama3")."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_context: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each head of q and k before RoPE
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    def rope_inv_freq(self) -> torch.Tensor:
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        s = self.rope_scaling
        if s is None:
            return inv_freq.float()
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(mid, (1 - smooth) * inv_freq / s.factor + smooth * inv_freq, scaled).float()


CPU_NUM_PAGES = 2048  # 32k tokens: 1.5 GB in fp32 for the default model


@dataclass(frozen=True)
class CacheConfig:
    page_size: int = 16
    # None: CPU_NUM_PAGES on the CPU; on CUDA as many as fit in what gpu_memory_utilization leaves once the weights
    # are loaded (docs/deployment.md, "Sizing on a GPU node")
    num_pages: int | None = None
    # CUDA: the share of the GPU's memory that the weights, the KV pool with its score buffers and the CUDA graphs'
    # outputs may take (what other processes hold counts against it); activations and workspaces live in the rest
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        if self.page_size <= 0 or (self.num_pages is not None and self.num_pages <= 0):
            raise ValueError("page_size and num_pages must be positive")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


# Unset scheduler limits, (max_num_seqs, max_num_batched_tokens). Where the FlashInfer path serves (CUDA, 16-bit),
# vLLM's and SGLang's serving defaults on an H100/H200-class GPU: prefill in 8k-token chunks (1k chunks left a wave of
# long prompts waiting seconds for their first token, perf-notes 57) and up to 256 sequences a step (speculation
# gains most at large batches). Elsewhere (the CPU; the torch reference backend, whose padded K/V gathers grow with
# the batch) small ones keep a step short.
SCHEDULER_DEFAULTS = {"gpu": (256, 8192), "reference": (64, 1024)}


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int | None = None  # None: from SCHEDULER_DEFAULTS
    max_num_batched_tokens: int | None = None  # prefill chunk budget per step, shared with decodes (None: as above)
    # queue a plain decode step's successor before reading its tokens (they stay on the device), and after any other
    # greedy step the next draft chain: no GPU idle between steps
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if any(v is not None and v <= 0 for v in (self.max_num_seqs, self.max_num_batched_tokens)):
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")

    def with_defaults(self, gpu: bool) -> SchedulerConfig:
        """This config with its unset limits filled in: the GPU path's, or the reference path's."""
        seqs, tokens = SCHEDULER_DEFAULTS["gpu" if gpu else "reference"]
        return replace(self, max_num_seqs=self.max_num_seqs or seqs,
                       max_num_batched_tokens=self.max_num_batched_tokens or tokens)


DRAFTERS = ("none", "streaming", "specattn")


# A selection this many positions old is renewed by the request's next step that completes its sequence, plain
# ones included (which then score their query): drafts stay current and within the graphs' recent slots.
MAX_SELECTION_AGE = 32


@dataclass(frozen=True)
class SpecConfig:
    """Self-speculative decoding. See docs/speculation.md for how the defaults were chosen."""

    drafter: str = "specattn"  # none (plain decoding) | streaming (sink + window) | specattn (verification-guided)
    gamma: int = 4  # draft tokens per iteration; the upper bound when adaptive
    adaptive: bool = True  # choose gamma in [0, gamma] each step from measured costs and acceptance
    budget_ratio: float = 0.05  # r: a draft keeps ceil(r * context) scored positions per layer ...
    min_budget: int = 256  # ... but at least this many (k_min)
    sink_tokens: int = 4  # the streaming drafter's attention sink
    # a verification renews its request's selection once the selection is this many positions old (1: after every
    # verification, as the paper does); older selections keep serving, every later position counted as recent
    reselect_after: int = 1

    def __post_init__(self) -> None:
        if self.drafter not in DRAFTERS:
            raise ValueError(f"unknown drafter {self.drafter!r}; choose one of {', '.join(DRAFTERS)}")
        if not 0 <= self.gamma <= 16:
            raise ValueError(f"gamma must be in [0, 16], got {self.gamma}")
        if not 0 < self.budget_ratio <= 1:
            raise ValueError(f"budget_ratio must be in (0, 1], got {self.budget_ratio}")
        if not 1 <= self.reselect_after <= MAX_SELECTION_AGE:
            raise ValueError(f"reselect_after must be in [1, {MAX_SELECTION_AGE}], got {self.reselect_after}")
        if self.min_budget < 1 or self.sink_tokens < 0:
            raise ValueError("min_budget must be positive and sink_tokens non-negative")

    @property
    def max_gamma(self) -> int:
        return 0 if self.drafter == "none" else self.gamma


ATTENTION_BACKENDS = ("auto", "torch", "flashinfer")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: float32 on CPU, bfloat16 on CUDA
    attention: str = "auto"  # auto: FlashInfer on CUDA in 16-bit dtypes when installed, else the torch reference
    enforce_eager: bool = False  # FlashInfer only: never replay decode/verify/draft steps as CUDA graphs
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {self.attention!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
        if self.attention == "flashinfer" and not (
            self.device.startswith("cuda") and self.resolved_dtype in (torch.float16, torch.bfloat16)
        ):
            raise ValueError("the flashinfer attention backend needs a CUDA device and dtype bfloat16 or float16")

    @property
    def resolved_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.bfloat16 if self.device.startswith("cuda") else torch.float32

    @property
    def resolved_scheduler(self) -> SchedulerConfig:
        return self.scheduler.with_defaults(gpu=self.resolved_attention == "flashinfer")

    @property
    def resolved_attention(self) -> str:
        if self.attention != "auto":
            return self.attention
        on_gpu = self.device.startswith("cuda") and self.resolved_dtype in (torch.float16, torch.bfloat16)
        return "flashinfer" if on_gpu and importlib.util.find_spec("flashinfer") is not None else "torch"
