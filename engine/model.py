"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a flat batch of tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from specattn.kernels.reference import write_kv

from .config import ModelConfig
from .gguf_loader import ModelLoadError
from .kv_cache import KVWrite


class Attention(Protocol):
    """What a layer needs from the attention backend: where its new K/V go, then attention over the cache."""

    def kv_write(self, layer: int) -> KVWrite: ...

    def __call__(self, layer: int, q: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # q, k and v projections stacked: one matmul instead of three
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # gate and up projections stacked
    down: torch.Tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE; x is [tokens, heads, head_dim], cos/sin are [tokens, head_dim // 2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_write_kv(
    qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
) -> torch.Tensor:
    """RoPE on the q and k heads of qk [tokens, heads + kv_heads, head_dim]; the rotated K and v [tokens, kv_heads,
    head_dim] written to the caches at slots [tokens]. Returns the rotated q heads."""
    qk = apply_rope(qk, cos, sin)
    heads = qk.shape[1] - v.shape[1]
    write_kv(qk[:, heads:], v, k_cache, v_cache, slots)
    return qk[:, :heads]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream's add then norm: (rms_norm(x + residual), x + residual); residual None: x starts it."""
    h = x if residual is None else x + residual
    return rms_norm(h, weight, eps), h


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """The MLP's silu(gate) * up from the stacked gate/up projection [tokens, 2 * intermediate]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class DecoderModel:
    def __init__(
        self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: str,
        fused: bool | None = None,
    ):
        """fused: the layer's norms, RoPE with the K/V cache write, and SiLU·up as Triton kernels (None: on CUDA,
        where launches dominate a decode step); otherwise plain torch, so CPU serving never needs Triton. Tests
        force it on CPU under the Triton interpreter."""
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.fused = self.device.type == "cuda" if fused is None else fused
        if self.fused:
            # imported only here: the torch path has no Triton dependency
            from specattn.kernels import fused_layer

            self._add_rms_norm, self._rope_write_kv, self._silu_mul, self._rms_norm = (
                fused_layer.add_rms_norm, fused_layer.rope_write_kv, fused_layer.silu_mul, fused_layer.rms_norm)
        else:
            self._add_rms_norm, self._rope_write_kv, self._silu_mul = add_rms_norm, rope_write_kv, silu_mul
        c = config

        def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            w = weights.get(name)
            if w is None:
                raise ModelLoadError(f"weights lack {name}")
            if tuple(w.shape) != shape:
                raise ModelLoadError(f"{name} has shape {tuple(w.shape)}, expected {shape}")
            return w.to(device=self.device, dtype=dtype)

        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.embed = take("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
        self.lm_head = (
            self.embed if c.tie_word_embeddings else take("lm_head.weight", (c.vocab_size, c.hidden_size))
        )
        self.final_norm = take("model.norm.weight", (c.hidden_size,))
        self.layers: list[LayerWeights] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            bias = None
            if c.attention_bias:
                bias = torch.cat(
                    [take(attn + "q_proj.bias", (q_out,)), take(attn + "k_proj.bias", (kv_out,)),
                     take(attn + "v_proj.bias", (kv_out,))]
                )
            self.layers.append(
                LayerWeights(
                    input_norm=take(p + "input_layernorm.weight", (c.hidden_size,)),
                    qkv=torch.cat(
                        [take(attn + "q_proj.weight", (q_out, c.hidden_size)),
                         take(attn + "k_proj.weight", (kv_out, c.hidden_size)),
                         take(attn + "v_proj.weight", (kv_out, c.hidden_size))]
                    ),
                    qkv_bias=bias,
                    q_norm=take(attn + "q_norm.weight", (c.head_dim,)) if c.qk_norm else None,
                    k_norm=take(attn + "k_norm.weight", (c.head_dim,)) if c.qk_norm else None,
                    o_proj=take(attn + "o_proj.weight", (c.hidden_size, q_out)),
                    post_norm=take(p + "post_attention_layernorm.weight", (c.hidden_size,)),
                    gate_up=torch.cat(
                        [take(p + "mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size)),
                         take(p + "mlp.up_proj.weight", (c.intermediate_size, c.hidden_size))]
                    ),
                    down=take(p + "mlp.down_proj.weight", (c.hidden_size, c.intermediate_size)),
                )
            )
        freqs = torch.outer(torch.arange(c.max_context, dtype=torch.float32), c.rope_inv_freq())
        self.rope_cos = freqs.cos().to(self.device)
        self.rope_sin = freqs.sin().to(self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        """Hidden states after the final norm for a flat batch of tokens of any number of sequences."""
        c = self.config
        n = input_ids.shape[0]
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        # Residual-stream form: `delta` is what a sublayer adds to the residual stream, and each add is folded
        # into the norm that follows it (one fused kernel on the GPU path; the same math in torch).
        delta, residual = self.embed[input_ids], None
        for i, w in enumerate(self.layers):
            x, residual = self._add_rms_norm(delta, residual, w.input_norm, c.rms_norm_eps)
            qkv = F.linear(x, w.qkv, w.qkv_bias)
            # q and k heads side by side: RoPE on both and the cache write are one launch on the GPU path
            qk = qkv[:, : q_out + kv_out].view(n, c.num_heads + c.num_kv_heads, c.head_dim)
            v = qkv[:, q_out + kv_out :].view(n, c.num_kv_heads, c.head_dim)
            if w.q_norm is not None:
                qk = self._qk_norm(qk, w)
            dest = attention.kv_write(i)
            q = self._rope_write_kv(qk, v, cos, sin, dest.k_cache, dest.v_cache, dest.slots)
            o = attention(i, q)
            x, residual = self._add_rms_norm(F.linear(o.reshape(n, q_out), w.o_proj), residual, w.post_norm, c.rms_norm_eps)
            delta = F.linear(self._silu_mul(F.linear(x, w.gate_up)), w.down)
        return self._add_rms_norm(delta, residual, self.final_norm, c.rms_norm_eps)[0]

    def _qk_norm(self, qk: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        """Qwen3's RMSNorm of each q head (q_norm) and each k head (k_norm)."""
        h, eps = self.config.num_heads, self.config.rms_norm_eps
        if self.fused:  # in place on the heads views of qkv: two launches, no copies
            self._rms_norm(qk[:, :h], w.q_norm, eps, out=qk[:, :h])
            self._rms_norm(qk[:, h:], w.k_norm, eps, out=qk[:, h:])
            return qk
        return torch.cat([rms_norm(qk[:, :h], w.q_norm, eps), rms_norm(qk[:, h:], w.k_norm, eps)], dim=1)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
