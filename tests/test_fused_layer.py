"""The fused decoder-layer kernels equal their torch references, and so does a whole model run through them.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); the `gpu` variants run
the same comparisons on CUDA in bfloat16.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # requirements-test.txt pins it; the `test` extra alone does not

from specattn.engine.attention import SequenceAttention, TorchAttentionBackend
from specattn.engine.config import CacheConfig, ModelConfig
from specattn.engine.kv_cache import KVCache
from specattn.engine.model import (
    DecoderModel,
    add_rms_norm,
    rms_norm,
    rope_write_kv,
    silu_mul,
)
from specattn.kernels import fused_layer

EPS = 1e-5
# (device, dtype): float32 on CPU (tight), bfloat16 on CPU (loose), bfloat16 on CUDA
CASES = [
    ("cpu", torch.float32),
    ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
]


def _tol(dtype: torch.dtype) -> dict[str, float]:
    # bf16: the kernels round where torch does, but a different reduction order can flip a rounding (one ulp),
    # and Triton's interpreter (CPU) rounds float32 -> bf16 toward zero where CUDA and torch round to nearest,
    # so an interpreted kernel can be one ulp (2^-8 relative, 2^-7 at most) off at each of its roundings
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 2e-2}


def _exact_unless_interpreted_bf16(device: str, dtype: torch.dtype) -> dict[str, float]:
    """A single rounded op: bit-exact, except the interpreter's truncating bf16 rounding (one ulp)."""
    return {"atol": 0.0, "rtol": 2**-7 if (device, dtype) == ("cpu", torch.bfloat16) else 0.0}


def _randn(*shape: int, dtype: torch.dtype, device: str, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("rows,hidden", [(1, 576), (7, 576), (33, 64), (5, 1000)])
def test_add_rms_norm_equals_reference(device, dtype, rows, hidden):
    x = _randn(rows, hidden, dtype=dtype, device=device)
    residual = _randn(rows, hidden, dtype=dtype, device=device, scale=3.0)
    weight = _randn(hidden, dtype=dtype, device=device, scale=0.1) + 1
    normed, new_residual = fused_layer.add_rms_norm(x, residual, weight, EPS)
    ref_normed, ref_residual = add_rms_norm(x, residual, weight, EPS)
    assert normed.dtype == new_residual.dtype == dtype
    torch.testing.assert_close(new_residual, ref_residual, **_exact_unless_interpreted_bf16(device, dtype))
    torch.testing.assert_close(normed, ref_normed, **_tol(dtype))
    # no residual: the input starts the residual stream, unchanged
    normed, same = fused_layer.add_rms_norm(x, None, weight, EPS)
    assert same is x
    torch.testing.assert_close(normed, rms_norm(x, weight, EPS), **_tol(dtype))
    torch.testing.assert_close(fused_layer.rms_norm(x, weight, EPS), rms_norm(x, weight, EPS), **_tol(dtype))


@pytest.mark.parametrize("device,dtype", CASES)
def test_rms_norm_of_heads_in_place_on_a_strided_view(device, dtype):
    """Qwen3's per-head q/k norm: heads of the qkv projection's output, normed in place; the rest untouched."""
    rows, heads, head_dim, width = 9, 5, 64, 7 * 64
    qkv = _randn(rows, width, dtype=dtype, device=device)
    before = qkv.clone()
    heads_view = qkv[:, 64 : 64 + heads * head_dim].view(rows, heads, head_dim)
    weight = _randn(head_dim, dtype=dtype, device=device, scale=0.1) + 1
    ref = rms_norm(heads_view.clone(), weight, EPS)
    out = fused_layer.rms_norm(heads_view, weight, EPS, out=heads_view)
    assert out is heads_view
    torch.testing.assert_close(heads_view, ref, **_tol(dtype))
    torch.testing.assert_close(qkv[:, :64], before[:, :64], atol=0, rtol=0)
    torch.testing.assert_close(qkv[:, 64 + heads * head_dim :], before[:, 64 + heads * head_dim :], atol=0, rtol=0)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("rows,inter", [(1, 1536), (5, 40), (3, 2500)])
def test_silu_mul_equals_reference(device, dtype, rows, inter):
    gate_up = _randn(rows, 2 * inter, dtype=dtype, device=device, scale=2.0)
    out = fused_layer.silu_mul(gate_up)
    assert out.shape == (rows, inter) and out.dtype == dtype
    torch.testing.assert_close(out, silu_mul(gate_up), **_tol(dtype))


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("rows,heads,kv_heads,head_dim", [(1, 9, 3, 64), (11, 9, 3, 64), (4, 4, 2, 80)])
def test_rope_write_kv_equals_reference(device, dtype, rows, heads, kv_heads, head_dim):
    """q, k and v as the model has them (views of the qkv output whose row stride spans all three), written to
    scattered slots: q rotated in place, the rotated K and v in the cache at their slots, every other slot as it was."""
    qkv = _randn(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(rows, heads + kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(rows, kv_heads, head_dim)
    angles = torch.rand(rows, head_dim // 2) * 100
    cos, sin = angles.cos().to(device), angles.sin().to(device)
    num_slots = 3 * rows + 5
    slots = torch.randperm(num_slots)[:rows].to(device)
    caches = [_randn(num_slots, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2)]
    expected = [c.clone() for c in caches]
    ref_q = rope_write_kv(qk.clone(), v.clone(), cos, sin, *expected, slots)
    k_before = qk[:, heads:].clone()
    q = fused_layer.rope_write_kv(qk, v, cos, sin, *caches, slots)
    assert torch.equal(qk[:, heads:], k_before)  # the k heads go to the cache only
    assert q.data_ptr() == qkv.data_ptr() and q.shape == (rows, heads, head_dim)
    torch.testing.assert_close(q, ref_q, **_tol(dtype))
    torch.testing.assert_close(caches[0], expected[0], **_tol(dtype))
    assert torch.equal(caches[1], expected[1])  # v is copied, not computed


def _tiny_model(device: str, dtype: torch.dtype, fused: bool, qwen3: bool) -> DecoderModel:
    """A 2-layer random model (the same weights for every call: a fixed seed), Qwen3-style q/k norm and bias or Llama."""
    heads, kv_heads, head_dim, hidden, inter, vocab = 4, 2, 16, 48, 72, 50
    config = ModelConfig(
        "qwen3" if qwen3 else "llama", vocab, hidden, inter, 2, heads, kv_heads, head_dim, 1e4, EPS, 64,
        tie_word_embeddings=False, attention_bias=qwen3, qk_norm=qwen3,
    )
    g = torch.Generator().manual_seed(7)

    def rand(*shape: int, scale: float = 0.2, offset: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + offset

    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    weights = {"model.embed_tokens.weight": rand(vocab, hidden, scale=1.0), "lm_head.weight": rand(vocab, hidden),
               "model.norm.weight": rand(hidden, scale=0.1, offset=1.0)}
    for i in range(2):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        weights.update({
            p + "input_layernorm.weight": rand(hidden, scale=0.1, offset=1.0),
            p + "post_attention_layernorm.weight": rand(hidden, scale=0.1, offset=1.0),
            a + "q_proj.weight": rand(q_out, hidden), a + "k_proj.weight": rand(kv_out, hidden),
            a + "v_proj.weight": rand(kv_out, hidden), a + "o_proj.weight": rand(hidden, q_out),
            p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
        })
        if qwen3:
            weights.update({
                a + "q_proj.bias": rand(q_out), a + "k_proj.bias": rand(kv_out), a + "v_proj.bias": rand(kv_out),
                a + "q_norm.weight": rand(head_dim, scale=0.1, offset=1.0),
                a + "k_norm.weight": rand(head_dim, scale=0.1, offset=1.0),
            })
    return DecoderModel(config, weights, dtype, device, fused=fused)


def _run_steps(model: DecoderModel) -> list[torch.Tensor]:
    """A prefill of two sequences (5 and 3 tokens), then a step that decodes one and extends the other by 2."""
    c, dev = model.config, model.device
    cache = KVCache(c, CacheConfig(page_size=4, num_pages=8), model.dtype, str(dev))
    backend = TorchAttentionBackend(cache, c.head_dim**-0.5)
    tables = [[0, 1], [2, 3]]
    steps = [
        ([SequenceAttention(5, 0, tables[0]), SequenceAttention(3, 0, tables[1])], [3, 14, 15, 9, 26, 5, 35, 8]),
        ([SequenceAttention(1, 5, tables[0]), SequenceAttention(2, 3, tables[1])], [41, 7, 49]),
    ]
    outs = []
    for seqs, ids in steps:
        backend.plan(seqs)
        positions = torch.cat([torch.arange(s.start_pos, s.end_pos) for s in seqs]).to(dev)
        outs.append(model.forward(torch.tensor(ids, device=dev), positions, backend))
    return outs


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("qwen3", [False, True], ids=["llama", "qwen3"])
def test_fused_model_equals_torch_model(device, dtype, qwen3):
    fused, plain = _tiny_model(device, dtype, True, qwen3), _tiny_model(device, dtype, False, qwen3)
    assert fused.fused and not plain.fused
    outs, refs = _run_steps(fused), _run_steps(plain)
    if dtype == torch.float32:
        for out, ref in zip(outs, refs):
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        return
    # bf16: rounding differences compound over the layers (and the interpreter's truncating bf16 rounding
    # biases them), so judge both bf16 paths against the float32 model: the fused one may not be much worse
    truths = _run_steps(_tiny_model(device, torch.float32, False, qwen3))
    for out, ref, truth in zip(outs, refs, truths):
        assert out.dtype == dtype and torch.isfinite(out).all()
        fused_err, plain_err = _rel_err(out, truth), _rel_err(ref, truth)
        assert fused_err < 2.5 * plain_err + 1e-3, (fused_err, plain_err)


def test_fused_defaults_to_the_device():
    assert not _tiny_model("cpu", torch.float32, None, False).fused
