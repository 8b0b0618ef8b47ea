"""Plain-torch references of the SpecAttn kernels: verification attention and scores, the token budget and critical-token selection.

These run on the CPU path and are what every GPU kernel of the same function is tested against.
"""

from __future__ import annotations

import math

import torch


def verification_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention weights exp(scale·q·k − lse) of a few query rows, averaged over all query heads and rows.

    q: [B, R, H, d] the scored query rows; k: [B, K, Hkv, d] the keys they attend to; mask: [B, R, K]
    True where row r attends key j (its causal span). Returns [B, K]; keys no row attends score 0.
    """
    b, r, h, d = q.shape
    kv_heads = k.shape[2]
    # query heads grouped by the KV head they share (GQA), so K is never expanded or copied
    grouped = q.reshape(b, r, kv_heads, h // kv_heads, d)
    logits = torch.einsum("brkgd,bnkd->brkgn", grouped, k).float().reshape(b, r, h, -1) * scale
    logits = logits.masked_fill(~mask[:, :, None, :], float("-inf"))
    weights = torch.exp(logits - torch.logsumexp(logits, dim=-1, keepdim=True))
    return weights.mean(dim=(1, 2))


def verification_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of a sequence's last Q positions over all of its positions (a verification, or a decode at Q = 1).

    q: [Q, heads, d]; k, v: [K, kv_heads, d] positions 0 … K − 1, the queries at K − Q …. Returns [Q, heads, d].
    """
    n_q, n_k = q.shape[0], k.shape[0]
    mask = torch.arange(n_k)[None, :] <= torch.arange(n_k - n_q, n_k)[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
        attn_mask=mask.to(q.device), scale=scale, enable_gqa=True,
    )
    return o.transpose(0, 1).to(q.dtype)


def token_budget(length: int, ratio: float, min_tokens: int) -> int:
    """k = clamp(ceil(ratio · length), min_tokens, length): how many scored positions a draft keeps."""
    return min(length, max(min_tokens, math.ceil(ratio * length)))


def select_critical_tokens(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per layer, the k highest-scoring positions in increasing order. scores: [layers, length] → [layers, k]."""
    return torch.topk(scores, k, dim=-1, sorted=False).indices.sort(dim=-1).values


def sparse_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: list[torch.Tensor], scale: float
) -> torch.Tensor:
    """Each sequence's one query attending exactly the cache slots it is given (a draft's selected + recent).

    q: [B, heads, d]; k_cache, v_cache: [slots, kv_heads, d]; slots: B int tensors. Returns [B, heads, d].
    """
    out = []
    for qb, sb in zip(q, slots):
        k, v = k_cache[sb.long()].transpose(0, 1), v_cache[sb.long()].transpose(0, 1)  # [kv_heads, K, d]
        o = torch.nn.functional.scaled_dot_product_attention(
            qb[:, None].float(), k.float(), v.float(), scale=scale, enable_gqa=True
        )
        out.append(o[:, 0].to(q.dtype))
    return torch.stack(out)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Each new token's K and V into its cache slot: k_cache[slot_mapping[i]] = k[i], the same for v."""
    k_cache[slot_mapping] = k
    v_cache[slot_mapping] = v
