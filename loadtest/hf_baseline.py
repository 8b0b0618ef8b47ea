"""What a user would otherwise run: HF transformers `generate` on the same weights, greedy, batched."""

from __future__ import annotations

import time

import torch

from specattn.engine.loader import ModelFiles

_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def build_hf_model(files: ModelFiles, device: str, dtype: torch.dtype):
    import transformers

    c = files.config
    config_cls = getattr(transformers, _HF_CLASSES[c.architecture].replace("ForCausalLM", "Config"))
    cfg = config_cls(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_context,
        tie_word_embeddings=c.tie_word_embeddings, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
    )
    model = getattr(transformers, _HF_CLASSES[c.architecture])(cfg)
    model.load_state_dict(files.weights, strict=False)
    if c.tie_word_embeddings:
        model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


def hf_generate_tokens_per_s(model, prompts: list[list[int]], max_tokens: int, batch_size: int, pad_id: int) -> float:
    """Generated tokens per second of greedy `generate` over the prompts in batches (left padding, static length)."""
    device = next(model.parameters()).device
    total, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                do_sample=False, pad_token_id=pad_id,
            )
        total += (out.shape[1] - width) * len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return total / (time.perf_counter() - start)
