"""Writes HF model directories for tests: the embedded model's weights, or tiny random models of each family."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from specattn.engine.config import ModelConfig
from specattn.engine.tokenizer import Tokenizer

_HF_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def write_hf_dir(path: Path, config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer: Tokenizer) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": [_HF_ARCH[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_context,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(cfg))
    tensors = {k: v.contiguous() for k, v in weights.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(tensors, path / "model.safetensors")
    tokenizer.save_pretrained(path)
    return path


def write_tiny_random_dir(path: Path, family: str, tokenizer: Tokenizer, seed: int = 0) -> Path:
    """A 2-layer random model saved by transformers itself, so the reference is independent of our writer."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=family == "qwen3",
    )
    if family == "llama":
        cfg = transformers.LlamaConfig(
            **common,
            rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    elif family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    else:
        raise ValueError(family)
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0; perturb them so they are tested too
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
